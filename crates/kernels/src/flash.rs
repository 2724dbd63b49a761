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
use crate::matmul::{matmul_raw, View};
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

/// `out (N, H*D) = softmax(mask(q k^T / sqrt(D))) v`; writes `lse (B, H, T)`.
pub fn flash_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], s: AttnShape, window: usize) {
    let AttnShape { b: _, t, h, g, d } = s;
    let hpg = h / g;
    let rl = (h + 2 * g) * d;
    let od = h * d;
    assert_eq!(lse.len(), s.b * h * t);
    assert_eq!(out.len(), s.b * t * od);
    let scale = 1.0 / (d as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(hpg * t)
        .enumerate()
        .for_each(|(task, lse_g)| {
            let (bi, gi) = (task / g, task % g);
            let rows = &qkv[bi * t * rl..(bi + 1) * t * rl];
            let (kc, vc) = ((h + gi) * d, (h + g + gi) * d);
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
                    let q = View {
                        data: &rows[r0 * rl + hi * d..],
                        rs: rl,
                        cs: 1,
                    };
                    for (c0, c1) in key_tiles(r0, r1, window) {
                        let nc = c1 - c0;
                        let kt = View {
                            data: &rows[c0 * rl + kc..],
                            rs: 1,
                            cs: rl,
                        };
                        // SAFETY: sb is this task's scratch, BR x BC at stride BC.
                        unsafe { matmul_raw(sb.as_mut_ptr(), BC, q, kt, nr, nc, d, false) };
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
                        let v = View {
                            data: &rows[c0 * rl + vc..],
                            rs: rl,
                            cs: 1,
                        };
                        // SAFETY: acc is this task's scratch, BR x D.
                        unsafe { matmul_raw(acc.as_mut_ptr(), d, p, v, nr, d, nc, true) };
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
        });
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
) {
    let AttnShape { b: _, t, h, g, d } = s;
    let hpg = h / g;
    let rl = (h + 2 * g) * d;
    let od = h * d;
    let scale = 1.0 / (d as f32).sqrt();
    let dptr = SendPtr(dqkv.as_mut_ptr());
    (0..s.b * g).into_par_iter().for_each(|task| {
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
                let q = View {
                    data: &rows[r0 * rl + hi * d..],
                    rs: rl,
                    cs: 1,
                };
                let dov = View {
                    data: &dob[r0 * od..],
                    rs: od,
                    cs: 1,
                };
                unsafe {
                    let dq = dptr.get().add(drow0 + r0 * rl + hi * d);
                    for i in 0..nr {
                        std::slice::from_raw_parts_mut(dq.add(i * rl), d).fill(0.0);
                    }
                }
                for (c0, c1) in key_tiles(r0, r1, window) {
                    let nc = c1 - c0;
                    let kt = View {
                        data: &rows[c0 * rl + kc..],
                        rs: 1,
                        cs: rl,
                    };
                    let vt = View {
                        data: &rows[c0 * rl + vc..],
                        rs: 1,
                        cs: rl,
                    };
                    unsafe {
                        // S = Q K^T, dP = dO V^T (this tile)
                        matmul_raw(sb.as_mut_ptr(), BC, q, kt, nr, nc, d, false);
                        matmul_raw(dp.as_mut_ptr(), BC, dov, vt, nr, nc, d, false);
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
                    let dst = View {
                        data: &dp,
                        rs: 1,
                        cs: BC,
                    };
                    let pt = View {
                        data: &sb,
                        rs: 1,
                        cs: BC,
                    };
                    let k = View {
                        data: &rows[c0 * rl + kc..],
                        rs: rl,
                        cs: 1,
                    };
                    unsafe {
                        // dQ[r0..r1] += dS K[c0..c1]
                        let dq = dptr.get().add(drow0 + r0 * rl + hi * d);
                        matmul_raw(dq, rl, ds, k, nr, d, nc, true);
                        // dK[c0..c1] += dS^T Q[r0..r1]
                        let dk = dptr.get().add(drow0 + c0 * rl + kc);
                        matmul_raw(dk, rl, dst, q, nc, d, nr, true);
                        // dV[c0..c1] += P^T dO[r0..r1]
                        let dv = dptr.get().add(drow0 + c0 * rl + vc);
                        matmul_raw(dv, rl, pt, dov, nc, d, nr, true);
                    }
                }
            }
        }
    });
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
        flash_forward(&mut out, &mut lse, qkv, s, w);
        (out, lse)
    }

    fn bwd(qkv: &[f32], dout: &[f32], s: AttnShape, w: usize) -> Vec<f32> {
        let (out, lse) = fwd(qkv, s, w);
        let mut dqkv = vec![f32::NAN; qkv.len()];
        flash_backward(&mut dqkv, dout, qkv, &out, &lse, s, w);
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
            pool.install(|| (fwd(&qkv, s, 33), bwd(&qkv, &dout, s, 33)))
        };
        let one = run(1);
        for n in [2, 3, 4] {
            let x = run(n);
            assert!(
                x.0 .0 == one.0 .0 && x.0 .1 == one.0 .1 && x.1 == one.1,
                "{n} threads"
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
                flash_forward(&mut out, &mut lse, &qkv, s, 0);
                flash_backward(&mut dq, &dout, &qkv, &out, &lse, s, 0);
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
}
