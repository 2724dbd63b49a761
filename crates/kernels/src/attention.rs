//! Causal multi-head self-attention with grouped-query heads (Ainslie et al. 2023), forward
//! and backward, on a fused qkv buffer.
//!
//! Layout: `qkv (N, (H + 2G) * D)`, each row `[q_0..q_{H-1} | k_0..k_{G-1} | v_0..v_{G-1}]`;
//! query head h reads key/value head `h / (H / G)`. Attention probabilities are kept in
//! `att (B, H, T, T)` (upper triangle zero) for the backward pass.
//!
//! Work is split over (batch, kv-group) pairs: the heads of one group run in order inside one
//! task, so the key/value gradients they share are summed in a fixed order. The causal mask
//! is exploited by row blocks of [`ROW_BLOCK`] queries that only touch keys up to the block's
//! end (about 40% fewer FLOPs than a full T x T product at T = 128).
//!
//! [`decode_attention`] is the one-query-per-row case over a KV cache (incremental
//! decoding); a row with more than [`DECODE_CHUNK`] visible positions is split into chunks
//! computed in parallel and merged by log-sum-exp rescaling (flash-decoding). Not here: the
//! cache itself (slots and positions belong to the model crate's decoder) or training-time
//! tiling (`crate::flash`).

use crate::matmul::{matmul_raw, View};
use crate::par::SendPtr;
use crate::simd;
use crate::vmath::{dot, exp, max, sum};
use rayon::prelude::*;

simd! {
    /// In place: the first `live` entries of `row` become softmax(row * scale), the rest 0.
    fn softmax_row(row: &mut [f32], live: usize, scale: f32) {
        let (l, dead) = row.split_at_mut(live);
        for x in l.iter_mut() {
            *x *= scale;
        }
        let mx = max(l);
        for x in l.iter_mut() {
            *x = exp(*x - mx);
        }
        let inv = 1.0 / sum(l);
        for x in l.iter_mut() {
            *x *= inv;
        }
        dead.fill(0.0);
    }
}

simd! {
    /// In place: `dp[..live]` becomes `p * (dp - sum(p * dp)) * scale`; `dp[live..]` zero.
    fn softmax_backward_row(dp: &mut [f32], p: &[f32], live: usize, scale: f32) {
        let (l, dead) = dp.split_at_mut(live);
        let d = dot(&p[..live], l);
        for (x, pv) in l.iter_mut().zip(&p[..live]) {
            *x = pv * (*x - d) * scale;
        }
        dead.fill(0.0);
    }
}

/// Query rows per causal block.
pub const ROW_BLOCK: usize = 32;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub g: usize,
    pub d: usize,
}

impl AttnShape {
    fn row_len(&self) -> usize {
        (self.h + 2 * self.g) * self.d
    }
    fn k_col(&self, g: usize) -> usize {
        (self.h + g) * self.d
    }
    fn v_col(&self, g: usize) -> usize {
        (self.h + self.g + g) * self.d
    }
}

fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(ROW_BLOCK)).map(move |i| (i * ROW_BLOCK, ((i + 1) * ROW_BLOCK).min(t)))
}

/// `out (N, H*D) = softmax(mask(q k^T / sqrt(D))) v`; fills `att (B,H,T,T)`.
pub fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], s: AttnShape) {
    let AttnShape { b: _, t, h, g, d } = s;
    let hpg = h / g;
    let rl = s.row_len();
    let od = h * d;
    assert_eq!(att.len(), s.b * h * t * t);
    assert_eq!(out.len(), s.b * t * od);
    let scale = 1.0 / (d as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    att.par_chunks_mut(hpg * t * t)
        .enumerate()
        .for_each(|(task, att_g)| {
            let (bi, gi) = (task / g, task % g);
            let rows = &qkv[bi * t * rl..(bi + 1) * t * rl];
            let kt = View {
                data: &rows[s.k_col(gi)..],
                rs: 1,
                cs: rl,
            }; // K^T (D, T)
            let vv = View {
                data: &rows[s.v_col(gi)..],
                rs: rl,
                cs: 1,
            }; // V (T, D)
            for j in 0..hpg {
                let hi = gi * hpg + j;
                let p = &mut att_g[j * t * t..(j + 1) * t * t];
                for (r0, r1) in blocks(t) {
                    let q = View {
                        data: &rows[r0 * rl + hi * d..],
                        rs: rl,
                        cs: 1,
                    };
                    // SAFETY: p is this task's own (T,T) slice.
                    unsafe {
                        matmul_raw(p[r0 * t..].as_mut_ptr(), t, q, kt, r1 - r0, r1, d, false)
                    };
                    for r in r0..r1 {
                        let row = &mut p[r * t..(r + 1) * t];
                        let live = &mut row[..=r];
                        let mut mx = f32::NEG_INFINITY;
                        for x in live.iter_mut() {
                            *x *= scale;
                            mx = mx.max(*x);
                        }
                        let mut sum = 0.0;
                        for x in live.iter_mut() {
                            *x = (*x - mx).exp();
                            sum += *x;
                        }
                        let inv = 1.0 / sum;
                        for x in live.iter_mut() {
                            *x *= inv;
                        }
                        row[r + 1..].fill(0.0);
                    }
                    let pv = View {
                        data: &p[r0 * t..],
                        rs: t,
                        cs: 1,
                    };
                    // SAFETY: rows r0..r1 of batch bi, columns of head hi: written by this task only.
                    unsafe {
                        let dst = out_ptr.get().add((bi * t + r0) * od + hi * d);
                        matmul_raw(dst, od, pv, vv, r1 - r0, d, r1, false);
                    }
                }
            }
        });
}

/// Backward of [`attention_forward`]. `dqkv (N, (H+2G)*D)` is overwritten; `datt` is
/// scratch shaped like `att`.
pub fn attention_backward(
    dqkv: &mut [f32],
    datt: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    s: AttnShape,
) {
    let AttnShape { b: _, t, h, g, d } = s;
    let hpg = h / g;
    let rl = s.row_len();
    let od = h * d;
    let scale = 1.0 / (d as f32).sqrt();
    let dptr = SendPtr(dqkv.as_mut_ptr());
    datt.par_chunks_mut(hpg * t * t)
        .enumerate()
        .for_each(|(task, datt_g)| {
            let (bi, gi) = (task / g, task % g);
            let rows = &qkv[bi * t * rl..(bi + 1) * t * rl];
            let drow0 = bi * t * rl;
            // SAFETY (all raw writes below): this task owns, within batch bi's rows, the q columns
            // of its heads and the k/v columns of group gi; no other task touches them.
            unsafe {
                for r in 0..t {
                    let base = dptr.get().add(drow0 + r * rl);
                    std::slice::from_raw_parts_mut(base.add(s.k_col(gi)), d).fill(0.0);
                    std::slice::from_raw_parts_mut(base.add(s.v_col(gi)), d).fill(0.0);
                }
            }
            let k = View {
                data: &rows[s.k_col(gi)..],
                rs: rl,
                cs: 1,
            };
            let vt = View {
                data: &rows[s.v_col(gi)..],
                rs: 1,
                cs: rl,
            };
            for j in 0..hpg {
                let hi = gi * hpg + j;
                let p = &att[((bi * h) + hi) * t * t..((bi * h) + hi + 1) * t * t];
                let dp = &mut datt_g[j * t * t..(j + 1) * t * t];
                let dob = &dout[bi * t * od + hi * d..];
                for (r0, r1) in blocks(t) {
                    let dov = View {
                        data: &dob[r0 * od..],
                        rs: od,
                        cs: 1,
                    };
                    // dP = dO V^T (rows r0..r1, keys 0..r1)
                    unsafe {
                        matmul_raw(dp[r0 * t..].as_mut_ptr(), t, dov, vt, r1 - r0, r1, d, false)
                    };
                    // dS = P * (dP - sum(P * dP)) * scale
                    for r in r0..r1 {
                        let pr = &p[r * t..r * t + r + 1];
                        let dr = &mut dp[r * t..(r + 1) * t];
                        let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                        for (x, pv) in dr[..=r].iter_mut().zip(pr) {
                            *x = pv * (*x - dot) * scale;
                        }
                        dr[r + 1..r1].fill(0.0);
                    }
                    let ds = View {
                        data: &dp[r0 * t..],
                        rs: t,
                        cs: 1,
                    };
                    let dst_t = View {
                        data: &dp[r0 * t..],
                        rs: 1,
                        cs: t,
                    };
                    let pt = View {
                        data: &p[r0 * t..],
                        rs: 1,
                        cs: t,
                    };
                    let q = View {
                        data: &rows[r0 * rl + hi * d..],
                        rs: rl,
                        cs: 1,
                    };
                    unsafe {
                        // dQ[r0..r1] = dS K[0..r1]
                        let dq = dptr.get().add(drow0 + r0 * rl + hi * d);
                        matmul_raw(dq, rl, ds, k, r1 - r0, d, r1, false);
                        // dK[0..r1] += dS^T Q[r0..r1]
                        let dk = dptr.get().add(drow0 + s.k_col(gi));
                        matmul_raw(dk, rl, dst_t, q, r1, d, r1 - r0, true);
                        // dV[0..r1] += P^T dO[r0..r1]
                        let dv = dptr.get().add(drow0 + s.v_col(gi));
                        matmul_raw(dv, rl, pt, dov, r1, d, r1 - r0, true);
                    }
                }
            }
        });
}

/// Shape of a KV cache: H query heads, G key/value heads of dim D, room for `tmax`
/// positions per slot. A slot's keys (and values) are rows of G*D at
/// `(slot * tmax + position) * G * D`.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub h: usize,
    pub g: usize,
    pub d: usize,
    /// Positions a slot's cache holds: position p lives at index p % tmax.
    pub tmax: usize,
    /// Sliding window: a query sees itself and the `window - 1` positions before it (0: every
    /// position). With a window, the cache may be a ring buffer of `tmax >= window` entries.
    pub window: usize,
}

/// Visible positions per chunk of a long cache row: flash-decoding (Dao et al. 2023) splits a
/// row's visible positions into chunks of this many, computes each chunk for all query heads
/// of one KV group (its keys and values read once) as a parallel task, and merges the chunks
/// by log-sum-exp rescaling in chunk order. The split depends on the row's length only, so
/// the bits do not depend on the thread count or on the other rows; a row of at most this
/// many positions keeps the one-pass path and its bits.
pub const DECODE_CHUNK: usize = 256;

simd! {
    /// One query head `q (D)` over cache entries `segs` (ranges of entry indices, oldest
    /// first; entry e's key at `kc[e * gd + off..][..D]`, value likewise in `vc`): the scores
    /// `sc` (scaled), then `acc = sum_j w_j v_j` with `w_j = exp(s_j - max)`, divided by
    /// their sum ([`sum`]'s order) when `norm`. Returns (max, sum of exps). Fixed order
    /// throughout.
    #[allow(clippy::too_many_arguments)]
    fn attend_head(
        q: &[f32],
        kc: &[f32],
        vc: &[f32],
        gd: usize,
        off: usize,
        segs: [(usize, usize); 2],
        scale: f32,
        sc: &mut [f32],
        acc: &mut [f32],
        norm: bool,
    ) -> (f32, f32) {
        let d = q.len();
        let mut j = 0;
        for &(a, b) in &segs {
            for e in a..b {
                sc[j] = dot8(q, &kc[e * gd + off..e * gd + off + d]) * scale;
                j += 1;
            }
        }
        let mx = max(sc);
        // exps first (a loop the compiler vectorises), then their fixed-order sum
        for sj in sc.iter_mut() {
            *sj = exp(*sj - mx);
        }
        let total = sum(sc);
        acc.fill(0.0);
        let mut j = 0;
        for &(a, b) in &segs {
            for e in a..b {
                let w = if norm { sc[j] / total } else { sc[j] };
                let vv = &vc[e * gd + off..e * gd + off + d];
                for (a, vv) in acc.iter_mut().zip(vv) {
                    *a += w * vv;
                }
                j += 1;
            }
        }
        (mx, total)
    }
}

/// Dot product of a query and a key in 8 lanes (elements i, i+8, ... in lane i % 8, each a
/// multiply then an add), lanes summed as ((0+4)+(2+6))+((1+5)+(3+7)): the order of every
/// decode attention score, in AVX registers where present (the compiler's own vectorisation
/// of the array form gathers pairs of floats).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let full = a.len() / 8 * 8;
    let mut acc = [0f32; 8];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present; both slices hold `full` elements.
        unsafe { dot8_avx(&mut acc, &a[..full], &b[..full]) };
    } else {
        dot8_lanes(&mut acc, &a[..full], &b[..full]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dot8_lanes(&mut acc, &a[..full], &b[..full]);
    for (j, (x, y)) in a[full..].iter().zip(&b[full..]).enumerate() {
        acc[j] += x * y;
    }
    let h = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (h[0] + h[2]) + (h[1] + h[3])
}

#[inline(always)]
fn dot8_lanes(acc: &mut [f32; 8], a: &[f32], b: &[f32]) {
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
}

/// [`dot8_lanes`] in one AVX register.
///
/// # Safety
/// AVX must be present; `a` and `b` have the same length, a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn dot8_avx(acc: &mut [f32; 8], a: &[f32], b: &[f32]) {
    use std::arch::x86_64::*;
    let mut v = _mm256_setzero_ps();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    while i + 8 <= a.len() {
        v = _mm256_add_ps(
            v,
            _mm256_mul_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))),
        );
        i += 8;
    }
    _mm256_storeu_ps(acc.as_mut_ptr(), v);
}

/// Cache entries of positions `lo..hi` in a ring of `tmax` entries (position p at p % tmax),
/// as at most two ranges, oldest first.
fn ring_segments(lo: usize, hi: usize, tmax: usize) -> [(usize, usize); 2] {
    let start = lo % tmax;
    let first = (hi - lo).min(tmax - start);
    [(start, start + first), (0, hi - lo - first)]
}

/// Attention of one new query row per sequence over its cached keys and values (the
/// current position's already appended): row i of `qkv (n, (H+2G)D)` attends over the
/// first `rows[i].1` positions of slot `rows[i].0` (the last `window` of them with a
/// window), oldest first. Writes `out (n, HD)`; `scores (n, H*tmax)` is scratch. Each row is computed on its own with fixed-order sums, so a row's result
/// does not depend on the other rows.
pub fn decode_attention(
    out: &mut [f32],
    scores: &mut [f32],
    qkv: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    rows: &[(usize, usize)],
    s: KvShape,
) {
    let (h, d, tmax) = (s.h, s.d, s.tmax);
    let (gd, hpg, r) = (s.g * d, h / s.g, (h + 2 * s.g) * d);
    let n = rows.len();
    let scale = 1.0 / (d as f32).sqrt();
    // the visible positions of row i: lo..len, position p at cache index p % tmax
    let visible = |i: usize| {
        let (_, len) = rows[i];
        let lo = if s.window > 0 {
            len.saturating_sub(s.window)
        } else {
            0
        };
        assert!(
            len - lo <= tmax,
            "{} positions in a cache of {tmax}",
            len - lo
        );
        (lo, len)
    };
    let kv = |i: usize| {
        let slot = rows[i].0;
        (
            &k_cache[slot * tmax * gd..(slot + 1) * tmax * gd],
            &v_cache[slot * tmax * gd..(slot + 1) * tmax * gd],
        )
    };
    let long = |i: usize| {
        let (lo, len) = visible(i);
        len - lo > DECODE_CHUNK
    };
    out[..n * h * d]
        .par_chunks_mut(h * d)
        .zip(scores[..n * h * tmax].par_chunks_mut(h * tmax))
        .enumerate()
        .filter(|(i, _)| !long(*i))
        .for_each(|(i, (o, sc))| {
            let (lo, len) = visible(i);
            let (kc, vc) = kv(i);
            let segs = ring_segments(lo, len, tmax);
            for hi in 0..h {
                let gi = hi / hpg;
                let q = &qkv[i * r + hi * d..i * r + (hi + 1) * d];
                let sc = &mut sc[hi * tmax..hi * tmax + len - lo];
                let o = &mut o[hi * d..(hi + 1) * d];
                attend_head(q, kc, vc, gd, gi * d, segs, scale, sc, o, true);
            }
        });
    // flash-decoding of the long rows: one task per (row, kv group, chunk), each writing
    // (max, sum of exps, unnormalised output) per head of its group
    let tasks: Vec<(usize, usize, usize)> = (0..n)
        .filter(|&i| long(i))
        .flat_map(|i| {
            let (lo, len) = visible(i);
            let chunks = (len - lo).div_ceil(DECODE_CHUNK);
            (0..s.g).flat_map(move |gi| (0..chunks).map(move |c| (i, gi, c)))
        })
        .collect();
    if tasks.is_empty() {
        return;
    }
    let part = hpg * (d + 2);
    let mut partial = vec![0.0f32; tasks.len() * part];
    // Jobs: the tasks of one (slot, kv group, chunk) over consecutive rows of that slot (a
    // prompt's rows in prefill), so that a chunk's keys and values are read from memory once
    // for all of them and stay in cache. Each task computes exactly as alone.
    let mut jobs: std::collections::BTreeMap<(usize, usize, usize), Vec<usize>> =
        std::collections::BTreeMap::new();
    let mut run = 0;
    for (t, &(i, gi, c)) in tasks.iter().enumerate() {
        if i == 0 || rows[i - 1].0 != rows[i].0 || !long(i - 1) {
            run = i;
        }
        jobs.entry((run, gi, c)).or_default().push(t);
    }
    let ptr = SendPtr(partial.as_mut_ptr());
    jobs.into_values()
        .collect::<Vec<_>>()
        .par_iter()
        .for_each(|ts| {
            let mut sc = [0.0f32; DECODE_CHUNK];
            for &t in ts {
                let (i, gi, c) = tasks[t];
                // SAFETY: every task index belongs to one job, so its part of `partial`
                // is written by this thread alone.
                let pt = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(t * part), part) };
                let (lo, len) = visible(i);
                let (kc, vc) = kv(i);
                let (c0, c1) = (
                    lo + c * DECODE_CHUNK,
                    (lo + (c + 1) * DECODE_CHUNK).min(len),
                );
                let segs = ring_segments(c0, c1, tmax);
                let sc = &mut sc[..c1 - c0];
                for (hj, pt) in pt.chunks_mut(d + 2).enumerate() {
                    let hi = gi * hpg + hj;
                    let q = &qkv[i * r + hi * d..i * r + (hi + 1) * d];
                    let (ms, acc) = pt.split_at_mut(2);
                    let (mx, total) =
                        attend_head(q, kc, vc, gd, gi * d, segs, scale, sc, acc, false);
                    ms[0] = mx;
                    ms[1] = total;
                }
            }
        });
    // merge each long row's chunks in order
    let mut t = 0;
    for i in (0..n).filter(|&i| long(i)) {
        let (lo, len) = visible(i);
        let chunks = (len - lo).div_ceil(DECODE_CHUNK);
        for gi in 0..s.g {
            let group = &partial[(t + gi * chunks) * part..(t + (gi + 1) * chunks) * part];
            for hj in 0..hpg {
                let hi = gi * hpg + hj;
                let head =
                    |c: usize| &group[c * part + hj * (d + 2)..c * part + (hj + 1) * (d + 2)];
                let m = (0..chunks).map(|c| head(c)[0]).fold(f32::MIN, f32::max);
                let l: f32 = (0..chunks).map(|c| head(c)[1] * exp(head(c)[0] - m)).sum();
                let o = &mut out[i * h * d + hi * d..i * h * d + (hi + 1) * d];
                o.fill(0.0);
                for c in 0..chunks {
                    let w = exp(head(c)[0] - m) / l;
                    for (oo, a) in o.iter_mut().zip(&head(c)[2..]) {
                        *oo += w * a;
                    }
                }
            }
        }
        t += s.g * chunks;
    }
}
