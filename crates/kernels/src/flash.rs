//! Tiled causal attention with an online softmax (FlashAttention-2, Dao 2023) on the CPU:
//! memory O(B·H·T) beyond q, k, v and the output, for contexts whose (B, H, T, T)
//! probabilities would not fit.
//!
//! Same layout and grouping as [`crate::attention`]: `qkv (N, (H + 2G) * D)`, query head h
//! reads key/value head `h / (H / G)`, one parallel task per (batch, kv-group) whose heads
//! run in order, so the key/value gradients they share are summed in a fixed order and the
//! result is the same for any thread count.
//!
//! Forward: per head and query tile of [`BR`] rows, key tiles of [`BC`] columns stream
//! through a running max `m`, sum `l` and unnormalised output; tiles wholly above the
//! diagonal (or, with a sliding window, wholly before it) are skipped. Only the per-row
//! log-sum-exp `lse = m + ln l` is kept (`lse (B, H, T)`).
//!
//! Backward: `Δ = rowsum(dO ∘ O)`, then per tile pair the probabilities are recomputed from
//! `lse` (`P = exp(S - lse)`), `dS = P ∘ (dP - Δ)`, and dQ, dK, dV accumulate tile by tile.
//!
//! `window` (sliding-window attention, Mistral/Qwen2): query i sees keys j with
//! `i - window < j <= i`; 0 means no window.

use crate::attention::AttnShape;
use crate::matmul::{Precision, View};
use crate::par::SendPtr;
use crate::simd;
use crate::vmath::{dot, exp, max, sum};
use rayon::prelude::*;

/// Query rows per tile.
pub const BR: usize = 64;
/// Key columns per tile.
pub const BC: usize = 64;

/// The keys query `r` sees, as a half-open range.
#[inline]
fn visible(r: usize, window: usize) -> (usize, usize) {
    let lo = if window == 0 {
        0
    } else {
        (r + 1).saturating_sub(window)
    };
    (lo, r + 1)
}

/// The keys query `r` sees within the key tile `c0..c1`, relative to `c0` (empty: lo >= hi).
#[inline]
fn visible_in(r: usize, window: usize, c0: usize, c1: usize) -> (usize, usize) {
    let (lo, hi) = visible(r, window);
    (lo.clamp(c0, c1) - c0, hi.clamp(c0, c1) - c0)
}

/// Key tiles that query rows `r0..r1` touch.
fn key_tiles(r0: usize, r1: usize, window: usize) -> impl Iterator<Item = (usize, usize)> {
    let lo = visible(r0, window).0 / BC * BC;
    (lo..r1).step_by(BC).map(move |c0| (c0, (c0 + BC).min(r1)))
}

fn tiles(t: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(size).map(move |r0| (r0, (r0 + size).min(t)))
}

simd! {
    /// One row of a score tile, in place: the visible entries (`lo..hi` of the tile) become
    /// `exp(s * scale - m_new)`, the rest 0; returns (m_new, sum of the row, rescale factor
    /// of what came before `exp(m - m_new)`).
    fn online_row(row: &mut [f32], lo: usize, hi: usize, scale: f32, m: f32) -> (f32, f32, f32) {
        // three passes without a serial reduction, so each vectorises (one fused loop with
        // a running sum stayed scalar: 12% of a width-128 training step under perf)
        let vis = &mut row[lo..hi];
        for x in vis.iter_mut() {
            *x *= scale;
        }
        let mx = m.max(max(vis));
        for x in vis.iter_mut() {
            *x = exp(*x - mx);
        }
        let sum = sum(vis);
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        let alpha = if m == f32::NEG_INFINITY { 0.0 } else { exp(m - mx) };
        (mx, sum, alpha)
    }
}

simd! {
    /// One row of a backward tile, in place: `s` (scores q·k) becomes P = exp(s * scale -
    /// lse) on the visible entries (0 elsewhere), and `dp` becomes dS = P (dP - Δ) * scale.
    fn backward_row(s: &mut [f32], dp: &mut [f32], lo: usize, hi: usize, scale: f32, lse: f32, delta: f32) {
        for (x, g) in s[lo..hi].iter_mut().zip(&mut dp[lo..hi]) {
            *x = exp(*x * scale - lse);
            *g = *x * (*g - delta) * scale;
        }
        s[..lo].fill(0.0);
        s[hi..].fill(0.0);
        dp[..lo].fill(0.0);
        dp[hi..].fill(0.0);
    }
}

/// The tile products of one (batch, kv-group) task. [`Generic`] multiplies views in the
/// precision given; with bf16 on AVX512-BF16 hardware, [`crate::flash_bf16::Packed`] rounds and
/// packs each operand once (K and V per task, Q and dO per query tile) instead of once per
/// product. Both compute every output as the same sum, so they give the same bits.
pub(crate) trait Tiles<'a> {
    /// The task's keys and values: `k`, `v` are (T, D) views.
    fn task(&mut self, k: View<'a>, v: View<'a>, t: usize, d: usize);
    /// The query tile of `nr` rows: `q` (nr, D), and `dout` (nr, D) in the backward.
    fn query(&mut self, q: View<'a>, dout: Option<View<'a>>, nr: usize);
    /// `out (nr, c1-c0) = Q K[c0..c1]^T`, or `dO V[c0..c1]^T` with `dp`.
    ///
    /// # Safety
    /// `out` is valid for the (nr, c1-c0) tile at row stride `ldc`, owned by the caller.
    unsafe fn scores(&mut self, out: *mut f32, ldc: usize, c0: usize, c1: usize, dp: bool);
    /// `out (nr, D) += a (nr, c1-c0) V[c0..c1]`, or `K[c0..c1]` with `keys` (dQ += dS K).
    ///
    /// # Safety
    /// As [`Tiles::scores`], for an (nr, D) tile.
    unsafe fn times_kv(
        &mut self,
        out: *mut f32,
        ldc: usize,
        a: View,
        c0: usize,
        c1: usize,
        keys: bool,
    );
    /// `out (nc, D) += a (nc, nr) Q`, or `dO` with `dout` (dK += dS^T Q, dV += P^T dO).
    ///
    /// # Safety
    /// As [`Tiles::scores`], for an (nc, D) tile.
    unsafe fn times_q(&mut self, out: *mut f32, ldc: usize, a: View, nc: usize, dout: bool);
}

/// [`Tiles`] through [`Precision::matmul_raw`] on the views themselves.
pub(crate) struct Generic<'a> {
    pr: Precision,
    k: Option<View<'a>>,
    v: Option<View<'a>>,
    q: Option<View<'a>>,
    dout: Option<View<'a>>,
    nr: usize,
    d: usize,
}

impl<'a> Generic<'a> {
    pub(crate) fn new(pr: Precision) -> Self {
        Generic {
            pr,
            k: None,
            v: None,
            q: None,
            dout: None,
            nr: 0,
            d: 0,
        }
    }
}

fn rows_from<'a>(v: View<'a>, r: usize) -> View<'a> {
    View {
        data: &v.data[r * v.rs..],
        ..v
    }
}

/// `v` read as its transpose.
pub(crate) fn transposed(v: View) -> View {
    View {
        data: v.data,
        rs: v.cs,
        cs: v.rs,
    }
}

impl<'a> Tiles<'a> for Generic<'a> {
    fn task(&mut self, k: View<'a>, v: View<'a>, _t: usize, d: usize) {
        (self.k, self.v, self.d) = (Some(k), Some(v), d);
    }

    fn query(&mut self, q: View<'a>, dout: Option<View<'a>>, nr: usize) {
        (self.q, self.dout, self.nr) = (Some(q), dout, nr);
    }

    unsafe fn scores(&mut self, out: *mut f32, ldc: usize, c0: usize, c1: usize, dp: bool) {
        let (a, b) = if dp {
            (self.dout, self.v)
        } else {
            (self.q, self.k)
        };
        let b = transposed(rows_from(b.expect("task"), c0));
        // SAFETY: the caller vouches for `out`.
        unsafe {
            self.pr.matmul_raw(
                out,
                ldc,
                a.expect("query"),
                b,
                self.nr,
                c1 - c0,
                self.d,
                false,
            )
        }
    }

    unsafe fn times_kv(
        &mut self,
        out: *mut f32,
        ldc: usize,
        a: View,
        c0: usize,
        c1: usize,
        keys: bool,
    ) {
        let b = if keys { self.k } else { self.v };
        let b = rows_from(b.expect("task"), c0);
        // SAFETY: the caller vouches for `out`.
        unsafe {
            self.pr
                .matmul_raw(out, ldc, a, b, self.nr, self.d, c1 - c0, true)
        }
    }

    unsafe fn times_q(&mut self, out: *mut f32, ldc: usize, a: View, nc: usize, dout: bool) {
        let b = if dout { self.dout } else { self.q };
        // SAFETY: the caller vouches for `out`.
        unsafe {
            self.pr
                .matmul_raw(out, ldc, a, b.expect("query"), nc, self.d, self.nr, true)
        }
    }
}

/// The tile engine for `pr` at head width `d`: packed bf16 where the hardware has it (and a
/// head's pairs fit one packed block).
fn engine<'a>(pr: Precision, d: usize) -> Box<dyn Tiles<'a> + 'a> {
    #[cfg(target_arch = "x86_64")]
    if pr == Precision::Bf16 && crate::bf16::has_hardware() && d <= 2 * crate::bf16::KCP {
        return Box::new(crate::flash_bf16::Packed::default());
    }
    Box::new(Generic::new(pr))
}

/// `out (N, H*D) = softmax(mask(q k^T / sqrt(D))) v`; writes `lse (B, H, T)`. The products
/// run in `pr` (softmax statistics and accumulators stay f32).
pub fn flash_forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    s: AttnShape,
    window: usize,
    pr: Precision,
) {
    forward_with(out, lse, qkv, s, window, &|| engine(pr, s.d));
}

pub(crate) fn forward_with<'a>(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &'a [f32],
    s: AttnShape,
    window: usize,
    make: &(dyn Fn() -> Box<dyn Tiles<'a> + 'a> + Sync),
) {
    let AttnShape { b: _, t, h, g, d } = s;
    let hpg = h / g;
    assert_eq!(lse.len(), s.b * h * t);
    assert_eq!(out.len(), s.b * t * h * d);
    let out_ptr = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(hpg * t)
        .enumerate()
        // one engine per rayon job, its buffers reused by the tasks the job runs
        .for_each_init(make, |e, (task, lse_g)| {
            let _serial = crate::par::Task::enter();
            forward_task(task, lse_g, qkv, s, window, &mut **e, out_ptr)
        });
}

simd! {
    /// One (batch, kv-group) task of [`forward_with`] (compiled per SIMD level: its row
    /// loops are most of the attention's elementwise work).
    #[allow(clippy::too_many_arguments)]
    fn forward_task<'a>(task: usize, lse_g: &mut [f32], qkv: &'a [f32], s: AttnShape, window: usize, e: &mut (dyn Tiles<'a> + 'a), out_ptr: SendPtr) {
        let AttnShape { b: _, t, h, g, d } = s;
        let hpg = h / g;
        let rl = (h + 2 * g) * d;
        let od = h * d;
        let scale = 1.0 / (d as f32).sqrt();
        let (bi, gi) = (task / g, task % g);
        let rows = &qkv[bi * t * rl..(bi + 1) * t * rl];
        let (kc, vc) = ((h + gi) * d, (h + g + gi) * d);
        let col = move |c: usize| View {
            data: &rows[c..],
            rs: rl,
            cs: 1,
        };
        e.task(col(kc), col(vc), t, d);
        let mut sb = vec![0f32; BR * BC];
        let mut acc = vec![0f32; BR * d];
        let (mut m, mut l) = ([0f32; BR], [0f32; BR]);
        for j in 0..hpg {
            let hi = gi * hpg + j;
            for (r0, r1) in tiles(t, BR) {
                let nr = r1 - r0;
                m[..nr].fill(f32::NEG_INFINITY);
                l[..nr].fill(0.0);
                acc[..nr * d].fill(0.0);
                e.query(rows_from(col(hi * d), r0), None, nr);
                for (c0, c1) in key_tiles(r0, r1, window) {
                    let nc = c1 - c0;
                    // SAFETY: sb is this task's scratch, BR x BC at stride BC.
                    unsafe { e.scores(sb.as_mut_ptr(), BC, c0, c1, false) };
                    for i in 0..nr {
                        let (lo, hi_) = visible_in(r0 + i, window, c0, c1);
                        let row = &mut sb[i * BC..i * BC + nc];
                        if lo >= hi_ {
                            row.fill(0.0);
                            continue;
                        }
                        let (mn, sum, alpha) = online_row(row, lo, hi_, scale, m[i]);
                        m[i] = mn;
                        l[i] = l[i] * alpha + sum;
                        for x in &mut acc[i * d..(i + 1) * d] {
                            *x *= alpha;
                        }
                    }
                    let p = View {
                        data: &sb,
                        rs: BC,
                        cs: 1,
                    };
                    // SAFETY: acc is this task's scratch, BR x D.
                    unsafe { e.times_kv(acc.as_mut_ptr(), d, p, c0, c1, false) };
                }
                for i in 0..nr {
                    let inv = 1.0 / l[i];
                    // SAFETY: row r0 + i of batch bi, head hi's columns: this task's only.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(
                            out_ptr.get().add((bi * t + r0 + i) * od + hi * d),
                            d,
                        )
                    };
                    for (o, a) in o.iter_mut().zip(&acc[i * d..(i + 1) * d]) {
                        *o = a * inv;
                    }
                    lse_g[j * t + r0 + i] = m[i] + l[i].ln();
                }
            }
        }
    }
}

/// Backward of [`flash_forward`]: `dqkv (N, (H+2G)*D)` is overwritten. `out` and `lse` are
/// the forward's.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttnShape,
    window: usize,
    pr: Precision,
) {
    backward_with(dqkv, dout, qkv, out, lse, s, window, &|| engine(pr, s.d));
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_with<'a>(
    dqkv: &mut [f32],
    dout: &'a [f32],
    qkv: &'a [f32],
    out: &[f32],
    lse: &[f32],
    s: AttnShape,
    window: usize,
    make: &(dyn Fn() -> Box<dyn Tiles<'a> + 'a> + Sync),
) {
    let g = s.g;
    let dptr = SendPtr(dqkv.as_mut_ptr());
    (0..s.b * g).into_par_iter().for_each_init(make, |e, task| {
        let _serial = crate::par::Task::enter();
        backward_task(task, dptr, dout, qkv, out, lse, s, window, &mut **e)
    });
}

simd! {
    /// One (batch, kv-group) task of [`backward_with`] (compiled per SIMD level, as
    /// [`forward_task`]).
    #[allow(clippy::too_many_arguments)]
    fn backward_task<'a>(task: usize, dptr: SendPtr, dout: &'a [f32], qkv: &'a [f32], out: &[f32], lse: &[f32], s: AttnShape, window: usize, e: &mut (dyn Tiles<'a> + 'a)) {
        let AttnShape { b: _, t, h, g, d } = s;
        let hpg = h / g;
        let rl = (h + 2 * g) * d;
        let od = h * d;
        let scale = 1.0 / (d as f32).sqrt();
        let (bi, gi) = (task / g, task % g);
        let rows = &qkv[bi * t * rl..(bi + 1) * t * rl];
        let drow0 = bi * t * rl;
        let (kc, vc) = ((h + gi) * d, (h + g + gi) * d);
        // SAFETY (all raw accesses below): within batch bi's rows, this task owns the q
        // columns of its heads and the k/v columns of group gi; no other task touches them.
        unsafe {
            for r in 0..t {
                let base = dptr.get().add(drow0 + r * rl);
                std::slice::from_raw_parts_mut(base.add(kc), d).fill(0.0);
                std::slice::from_raw_parts_mut(base.add(vc), d).fill(0.0);
            }
        }
        let col = move |c: usize| View {
            data: &rows[c..],
            rs: rl,
            cs: 1,
        };
        e.task(col(kc), col(vc), t, d);
        let mut sb = vec![0f32; BR * BC];
        let mut dp = vec![0f32; BR * BC];
        let mut delta = vec![0f32; t];
        for j in 0..hpg {
            let hi = gi * hpg + j;
            let lse_h = &lse[(bi * h + hi) * t..(bi * h + hi + 1) * t];
            let dob = &dout[bi * t * od + hi * d..];
            let ob = &out[bi * t * od + hi * d..];
            for (r, dl) in delta.iter_mut().enumerate() {
                *dl = dot(&dob[r * od..r * od + d], &ob[r * od..r * od + d]);
            }
            for (r0, r1) in tiles(t, BR) {
                let nr = r1 - r0;
                let dov = View {
                    data: &dob[r0 * od..],
                    rs: od,
                    cs: 1,
                };
                e.query(rows_from(col(hi * d), r0), Some(dov), nr);
                unsafe {
                    let dq = dptr.get().add(drow0 + r0 * rl + hi * d);
                    for i in 0..nr {
                        std::slice::from_raw_parts_mut(dq.add(i * rl), d).fill(0.0);
                    }
                }
                for (c0, c1) in key_tiles(r0, r1, window) {
                    let nc = c1 - c0;
                    unsafe {
                        // S = Q K^T, dP = dO V^T (this tile)
                        e.scores(sb.as_mut_ptr(), BC, c0, c1, false);
                        e.scores(dp.as_mut_ptr(), BC, c0, c1, true);
                    }
                    for i in 0..nr {
                        let r = r0 + i;
                        let (lo, hi_) = visible_in(r, window, c0, c1);
                        let (srow, drow) =
                            (&mut sb[i * BC..i * BC + nc], &mut dp[i * BC..i * BC + nc]);
                        if lo >= hi_ {
                            srow.fill(0.0);
                            drow.fill(0.0);
                            continue;
                        }
                        backward_row(srow, drow, lo, hi_, scale, lse_h[r], delta[r]);
                    }
                    let ds = View {
                        data: &dp,
                        rs: BC,
                        cs: 1,
                    };
                    unsafe {
                        // dQ[r0..r1] += dS K[c0..c1]
                        let dq = dptr.get().add(drow0 + r0 * rl + hi * d);
                        e.times_kv(dq, rl, ds, c0, c1, true);
                        // dK[c0..c1] += dS^T Q[r0..r1]
                        let dk = dptr.get().add(drow0 + c0 * rl + kc);
                        e.times_q(dk, rl, transposed(ds), nc, false);
                        // dV[c0..c1] += P^T dO[r0..r1]
                        let dv = dptr.get().add(drow0 + c0 * rl + vc);
                        let p = View {
                            data: &sb,
                            rs: BC,
                            cs: 1,
                        };
                        e.times_q(dv, rl, transposed(p), nc, true);
                    }
                }
            }
        }
    }
}

/// Reference: the same attention through explicit probabilities, in f64 (tests).
pub fn reference_forward(qkv: &[f64], s: AttnShape, window: usize) -> Vec<f64> {
    let AttnShape { b, t, h, g, d } = s;
    let rl = (h + 2 * g) * d;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; b * t * h * d];
    for bi in 0..b {
        for hi in 0..h {
            let gi = hi / (h / g);
            for r in 0..t {
                let (lo, hi_) = visible(r, window);
                let q = &qkv[(bi * t + r) * rl + hi * d..][..d];
                let sc: Vec<f64> = (lo..hi_)
                    .map(|c| {
                        let k = &qkv[(bi * t + c) * rl + (h + gi) * d..][..d];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                for (c, x) in (lo..hi_).zip(&sc) {
                    let p = (x - mx).exp() / z;
                    let v = &qkv[(bi * t + c) * rl + (h + g + gi) * d..][..d];
                    for (o, vv) in out[(bi * t + r) * h * d + hi * d..][..d].iter_mut().zip(v) {
                        *o += p * vv;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{attention_backward, attention_forward};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    fn shape(b: usize, t: usize, h: usize, g: usize, d: usize) -> AttnShape {
        AttnShape { b, t, h, g, d }
    }

    fn fwd(qkv: &[f32], s: AttnShape, w: usize) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0f32; s.b * s.t * s.h * s.d];
        let mut lse = vec![0f32; s.b * s.h * s.t];
        flash_forward(&mut out, &mut lse, qkv, s, w, Precision::F32);
        (out, lse)
    }

    fn bwd(qkv: &[f32], dout: &[f32], s: AttnShape, w: usize) -> Vec<f32> {
        let (out, lse) = fwd(qkv, s, w);
        let mut dqkv = vec![f32::NAN; qkv.len()];
        flash_backward(&mut dqkv, dout, qkv, &out, &lse, s, w, Precision::F32);
        dqkv
    }

    /// Shapes across tile edges: T below, at and past the tiles, GQA and MHA, windows
    /// narrower than a tile and wider.
    const CASES: [(usize, usize, usize, usize, usize, usize); 6] = [
        (2, 37, 4, 2, 8, 0),
        (1, 64, 2, 2, 16, 0),
        (1, 150, 4, 1, 8, 0),
        (2, 150, 4, 2, 8, 17),
        (1, 200, 2, 1, 16, 100),
        (1, 130, 3, 3, 4, 1),
    ];

    #[test]
    fn forward_matches_the_f64_reference() {
        for (i, &(b, t, h, g, d, w)) in CASES.iter().enumerate() {
            let s = shape(b, t, h, g, d);
            let qkv = rand(b * t * (h + 2 * g) * d, i as u64 + 1);
            let (out, _) = fwd(&qkv, s, w);
            let q64: Vec<f64> = qkv.iter().map(|&x| x as f64).collect();
            let want = reference_forward(&q64, s, w);
            let worst = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 2e-6, "case {i}: {worst}");
        }
    }

    #[test]
    fn equals_the_stored_probability_kernel_without_a_window() {
        for (i, &(b, t, h, g, d, w)) in CASES.iter().enumerate().filter(|c| c.1 .5 == 0) {
            let s = shape(b, t, h, g, d);
            let qkv = rand(b * t * (h + 2 * g) * d, 10 + i as u64);
            let dout = rand(b * t * h * d, 20 + i as u64);
            let mut out = vec![0f32; b * t * h * d];
            let mut att = vec![0f32; b * h * t * t];
            attention_forward(&mut out, &mut att, &qkv, s);
            let mut dq_old = vec![0f32; qkv.len()];
            let mut datt = vec![0f32; att.len()];
            attention_backward(&mut dq_old, &mut datt, &dout, &qkv, &att, s);
            let (fo, _) = fwd(&qkv, s, w);
            let dq = bwd(&qkv, &dout, s, w);
            let close = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                    .fold(0f32, f32::max)
            };
            assert!(close(&fo, &out) < 1e-5, "case {i} forward");
            assert!(
                close(&dq, &dq_old) < 1e-4,
                "case {i} backward {}",
                close(&dq, &dq_old)
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences_with_windows() {
        // L = sum(out * c): dL/dqkv by central differences of the f64 reference
        for (i, &(b, t, h, g, d, w)) in [(1, 40, 2, 1, 4, 0), (1, 70, 2, 2, 4, 9)]
            .iter()
            .enumerate()
        {
            let s = shape(b, t, h, g, d);
            let qkv = rand(b * t * (h + 2 * g) * d, 30 + i as u64);
            let c = rand(b * t * h * d, 40 + i as u64);
            let dq = bwd(&qkv, &c, s, w);
            let q64: Vec<f64> = qkv.iter().map(|&x| x as f64).collect();
            let loss = |q: &[f64]| -> f64 {
                reference_forward(q, s, w)
                    .iter()
                    .zip(&c)
                    .map(|(o, c)| o * *c as f64)
                    .sum()
            };
            let mut worst = 0f64;
            for j in (0..qkv.len()).step_by(7) {
                let (mut a, mut bb) = (q64.clone(), q64.clone());
                a[j] += 1e-5;
                bb[j] -= 1e-5;
                let fd = (loss(&a) - loss(&bb)) / 2e-5;
                worst = worst.max((fd - dq[j] as f64).abs() / (1.0 + fd.abs()));
            }
            assert!(worst < 1e-4, "case {i}: {worst}");
        }
    }

    /// Forward (out, lse) and backward (dqkv) through the given tile engine.
    fn both_with<'a>(
        qkv: &'a [f32],
        dout: &'a [f32],
        s: AttnShape,
        w: usize,
        make: &(dyn Fn() -> Box<dyn Tiles<'a> + 'a> + Sync),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut out = vec![0f32; s.b * s.t * s.h * s.d];
        let mut lse = vec![0f32; s.b * s.h * s.t];
        forward_with(&mut out, &mut lse, qkv, s, w, make);
        let mut dqkv = vec![f32::NAN; qkv.len()];
        backward_with(&mut dqkv, dout, qkv, &out, &lse, s, w, make);
        (out, lse, dqkv)
    }

    /// [`both_with`] through the engine training uses for `pr`.
    fn both(
        qkv: &[f32],
        dout: &[f32],
        s: AttnShape,
        w: usize,
        pr: Precision,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        both_with(qkv, dout, s, w, &|| engine(pr, s.d))
    }

    #[test]
    fn packed_bf16_tiles_equal_the_bf16_matmul_bit_for_bit() {
        if !crate::bf16::has_hardware() {
            println!("no AVX512-BF16 here: the packed engine is never used on this host");
            return;
        }
        let wide = [
            (2, 300, 4, 2, 64, 0),
            (1, 129, 2, 1, 32, 70),
            (1, 64, 1, 1, 48, 0),
        ];
        for (i, &(b, t, h, g, d, w)) in CASES.iter().chain(&wide).enumerate() {
            let s = shape(b, t, h, g, d);
            let qkv = rand(b * t * (h + 2 * g) * d, 50 + i as u64);
            let dout = rand(b * t * h * d, 60 + i as u64);
            let generic = both_with(&qkv, &dout, s, w, &|| {
                Box::new(Generic::new(Precision::Bf16))
            });
            let packed = both_with(&qkv, &dout, s, w, &|| {
                Box::new(crate::flash_bf16::Packed::default())
            });
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&packed.0), bits(&generic.0), "case {i} out");
            assert_eq!(bits(&packed.1), bits(&generic.1), "case {i} lse");
            assert_eq!(bits(&packed.2), bits(&generic.2), "case {i} dqkv");
        }
    }

    #[test]
    fn bf16_attention_is_close_to_f32() {
        // bf16 operands (8 significant bits): errors of a few 1e-3 relative to the values
        for (i, &(b, t, h, g, d, w)) in CASES.iter().enumerate() {
            let s = shape(b, t, h, g, d);
            let qkv = rand(b * t * (h + 2 * g) * d, 70 + i as u64);
            let dout = rand(b * t * h * d, 80 + i as u64);
            let (f, b16) = (
                both(&qkv, &dout, s, w, Precision::F32),
                both(&qkv, &dout, s, w, Precision::Bf16),
            );
            let worst = |x: &[f32], y: &[f32]| {
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
            };
            assert!(
                worst(&b16.0, &f.0) < 2e-2,
                "case {i} out {}",
                worst(&b16.0, &f.0)
            );
            assert!(
                worst(&b16.2, &f.2) < 3e-2,
                "case {i} dqkv {}",
                worst(&b16.2, &f.2)
            );
            assert!(b16.0 != f.0, "case {i}: bf16 changed nothing");
        }
    }

    #[test]
    fn the_same_bits_for_any_thread_count() {
        let s = shape(2, 150, 4, 2, 8);
        let qkv = rand(2 * 150 * 8 * 8, 7);
        let dout = rand(2 * 150 * 4 * 8, 8);
        let run = |n: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap();
            pool.install(|| {
                let f32s = (fwd(&qkv, s, 33), bwd(&qkv, &dout, s, 33));
                (f32s, both(&qkv, &dout, s, 33, Precision::Bf16))
            })
        };
        let ((one, one_bf16), bits) = (run(1), |v: &[f32]| {
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        });
        for n in [2, 3, 4] {
            let (x, x_bf16) = run(n);
            assert!(
                x.0 .0 == one.0 .0 && x.0 .1 == one.0 .1 && x.1 == one.1,
                "{n} threads"
            );
            let (a, b) = (&x_bf16, &one_bf16);
            assert!(
                bits(&a.0) == bits(&b.0) && bits(&a.1) == bits(&b.1) && bits(&a.2) == bits(&b.2),
                "{n} threads, bf16"
            );
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::attention::{attention_backward, attention_forward};

    /// `cargo test --release -p kernels flash_vs_probs -- --ignored --nocapture`: forward +
    /// backward time of both kernels at small-moe's widths, 2,048 tokens per call.
    #[test]
    #[ignore]
    fn flash_vs_probs() {
        for t in [64, 128, 256, 512, 1024, 2048] {
            let s = AttnShape {
                b: 2048 / t,
                t,
                h: 4,
                g: 4,
                d: 64,
            };
            let n = s.b * t;
            let qkv: Vec<f32> = (0..n * 12 * 64)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let dout = qkv[..n * 256].to_vec();
            let mut out = vec![0f32; n * 256];
            let mut dq = vec![0f32; qkv.len()];
            let mut best = [f64::MAX; 2];
            for _ in 0..5 {
                let t0 = std::time::Instant::now();
                let mut att = vec![0f32; s.b * 4 * t * t];
                let mut datt = vec![0f32; att.len()];
                attention_forward(&mut out, &mut att, &qkv, s);
                attention_backward(&mut dq, &mut datt, &dout, &qkv, &att, s);
                best[0] = best[0].min(t0.elapsed().as_secs_f64());
                let t0 = std::time::Instant::now();
                let mut lse = vec![0f32; s.b * 4 * t];
                flash_forward(&mut out, &mut lse, &qkv, s, 0, Precision::F32);
                flash_backward(&mut dq, &dout, &qkv, &out, &lse, s, 0, Precision::F32);
                best[1] = best[1].min(t0.elapsed().as_secs_f64());
            }
            println!(
                "T {t:5}: probs {:.2} ms, flash {:.2} ms, ratio {:.2}",
                best[0] * 1e3,
                best[1] * 1e3,
                best[0] / best[1]
            );
        }
    }

    /// `RAYON_NUM_THREADS=2 cargo test --release -p kernels flash_precisions -- --ignored
    /// --nocapture`: forward and backward (ms, best of 10) at small-moe's attention shape
    /// (16 x 128 tokens, 4 heads of 64) and the shakespeare preset's (8 x 256, 5 heads of 32),
    /// f32 (gemm), bf16 through the general matmul, bf16 with packed operands.
    #[test]
    #[ignore]
    fn flash_precisions() {
        for (b, t, h, d) in [(16, 128, 4, 64), (8, 256, 5, 32)] {
            let s = AttnShape { b, t, h, g: h, d };
            let n = b * t;
            let qkv: Vec<f32> = (0..n * 3 * h * d)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let dout = qkv[..n * h * d].to_vec();
            measure("f32", &qkv, &dout, s, &|| {
                Box::new(Generic::new(Precision::F32))
            });
            measure("bf16 general", &qkv, &dout, s, &|| {
                Box::new(Generic::new(Precision::Bf16))
            });
            measure("bf16 packed", &qkv, &dout, s, &|| {
                engine(Precision::Bf16, d)
            });
        }
    }

    fn measure<'a>(
        name: &str,
        qkv: &'a [f32],
        dout: &'a [f32],
        s: AttnShape,
        make: &(dyn Fn() -> Box<dyn Tiles<'a> + 'a> + Sync),
    ) {
        let mut best = [f64::MAX; 2];
        let mut out = vec![0f32; dout.len()];
        let mut lse = vec![0f32; s.b * s.h * s.t];
        let mut dq = vec![0f32; qkv.len()];
        for _ in 0..10 {
            let t0 = std::time::Instant::now();
            forward_with(&mut out, &mut lse, qkv, s, 0, make);
            let t1 = std::time::Instant::now();
            backward_with(&mut dq, dout, qkv, &out, &lse, s, 0, make);
            best[0] = best[0].min((t1 - t0).as_secs_f64());
            best[1] = best[1].min(t1.elapsed().as_secs_f64());
        }
        println!(
            "T {} d {}: {name:13} forward {:.2} ms, backward {:.2} ms",
            s.t,
            s.d,
            best[0] * 1e3,
            best[1] * 1e3
        );
    }
}
