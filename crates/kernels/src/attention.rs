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
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
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
            let _serial = crate::par::Task::enter();
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
                        softmax_row(&mut p[r * t..(r + 1) * t], r + 1, scale);
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
            let _serial = crate::par::Task::enter();
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
                        softmax_backward_row(&mut dp[r * t..r * t + r1], &p[r * t..], r + 1, scale);
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
/// positions per slot. Key/value head `gi` of a slot holds its entries as rows of D at
/// `((slot * G + gi) * tmax + index) * D` (index = position % tmax): head-major, so a
/// decode step's heads each read one contiguous run instead of D of every G*D, which the
/// hardware prefetchers follow (the student's f32 decode on the Intel host: 12,704 against
/// 11,998 and 12,046 tokens/s, medians of 21 alternating rounds of `bench/decode-ab.sh`).
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
    hsum8(&acc)
}

/// Lanes summed as ((0+4)+(2+6))+((1+5)+(3+7)).
#[inline(always)]
fn hsum8(acc: &[f32; 8]) -> f32 {
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

/// [`dot8_lanes`] in one AVX register (adding into `acc`, as it does).
///
/// # Safety
/// AVX must be present; `a` and `b` have the same length, a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn dot8_avx(acc: &mut [f32; 8], a: &[f32], b: &[f32]) {
    use std::arch::x86_64::*;
    let mut v = _mm256_loadu_ps(acc.as_ptr());
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

/// Element type of a KV cache: f32, or f16 / bf16 (half the memory; keys and values are
/// rounded to nearest-even when written and widened exactly to f32 when read, so attention
/// computes in f32 on the rounded values with the f32 cache's fixed order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    #[default]
    F32,
    F16,
    Bf16,
}

impl KvType {
    /// `f32`, `f16` or `bf16`.
    pub fn parse(s: &str) -> Option<KvType> {
        match s {
            "f32" => Some(KvType::F32),
            "f16" => Some(KvType::F16),
            "bf16" => Some(KvType::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 | KvType::Bf16 => 2,
        }
    }
}

/// The storage of a KV cache (keys or values of one block) in its element type.
#[derive(Clone, Debug)]
pub enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl KvBuf {
    pub fn zeros(t: KvType, n: usize) -> KvBuf {
        match t {
            KvType::F32 => KvBuf::F32(vec![0.0; n]),
            KvType::F16 => KvBuf::F16(vec![f16::ZERO; n]),
            KvType::Bf16 => KvBuf::Bf16(vec![bf16::ZERO; n]),
        }
    }

    /// Stores `src` at element `at` (rounded to nearest-even in a 16-bit cache).
    pub fn write(&mut self, at: usize, src: &[f32]) {
        self.whole_mut().write(at, src);
    }

    /// All of it, mutable.
    pub fn whole_mut(&mut self) -> KvMut<'_> {
        match self {
            KvBuf::F32(b) => KvMut::F32(b),
            KvBuf::F16(b) => KvMut::F16(b),
            KvBuf::Bf16(b) => KvMut::Bf16(b),
        }
    }

    pub fn view(&self) -> KvRef<'_> {
        match self {
            KvBuf::F32(b) => KvRef::F32(b),
            KvBuf::F16(b) => KvRef::F16(b),
            KvBuf::Bf16(b) => KvRef::Bf16(b),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            KvBuf::F32(b) => b.len() * 4,
            KvBuf::F16(b) => b.len() * 2,
            KvBuf::Bf16(b) => b.len() * 2,
        }
    }
}

/// A mutable range of a KV cache ([`KvBuf::whole_mut`], cut with [`KvMut::split_at`]): one
/// per thread writing its own key/value heads.
#[derive(Debug)]
pub enum KvMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    Bf16(&'a mut [bf16]),
}

impl<'a> KvMut<'a> {
    /// The elements before `mid` and those from it on, as `<[T]>::split_at_mut`.
    pub fn split_at(self, mid: usize) -> (KvMut<'a>, KvMut<'a>) {
        match self {
            KvMut::F32(b) => {
                let (x, y) = b.split_at_mut(mid);
                (KvMut::F32(x), KvMut::F32(y))
            }
            KvMut::F16(b) => {
                let (x, y) = b.split_at_mut(mid);
                (KvMut::F16(x), KvMut::F16(y))
            }
            KvMut::Bf16(b) => {
                let (x, y) = b.split_at_mut(mid);
                (KvMut::Bf16(x), KvMut::Bf16(y))
            }
        }
    }

    /// Stores `src` at element `at` of the range (rounded to nearest-even in a 16-bit
    /// cache).
    pub fn write(&mut self, at: usize, src: &[f32]) {
        let r = at..at + src.len();
        match self {
            KvMut::F32(b) => b[r].copy_from_slice(src),
            KvMut::F16(b) => b[r].convert_from_f32_slice(src),
            KvMut::Bf16(b) => b[r].convert_from_f32_slice(src),
        }
    }

    pub fn view(&self) -> KvRef<'_> {
        match self {
            KvMut::F32(b) => KvRef::F32(b),
            KvMut::F16(b) => KvRef::F16(b),
            KvMut::Bf16(b) => KvRef::Bf16(b),
        }
    }
}

/// A borrowed KV cache in its element type.
#[derive(Clone, Copy, Debug)]
pub enum KvRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> KvRef<'a> {
    fn slice(self, r: std::ops::Range<usize>) -> KvRef<'a> {
        match self {
            KvRef::F32(b) => KvRef::F32(&b[r]),
            KvRef::F16(b) => KvRef::F16(&b[r]),
            KvRef::Bf16(b) => KvRef::Bf16(&b[r]),
        }
    }
}

/// One query head `q (D)` over cache entries `segs` (ranges of entry indices, oldest
/// first; entry e's key at `kc[e * gd + off..][..D]`, value likewise in `vc`): the scores
/// `sc` (scaled), then `acc = sum_j w_j v_j` with `w_j = exp(s_j - max)`, divided by
/// their sum ([`sum`]'s order) when `norm`. Returns (max, sum of exps). Fixed order
/// throughout.
/// A 16-bit cache is widened to f32 as it is loaded (exactly), so it gives the bits of an f32
/// cache holding the rounded values.
#[allow(clippy::too_many_arguments)]
fn attend_head<T: KvElem>(
    q: &[f32],
    kc: &[T],
    vc: &[T],
    gd: usize,
    off: usize,
    segs: [(usize, usize); 2],
    scale: f32,
    sc: &mut [f32],
    acc: &mut [f32],
    norm: bool,
) -> (f32, f32) {
    T::scores(q, kc, gd, off, segs, scale, sc);
    let (mx, total) = exps_in_place(sc, norm);
    T::values(vc, gd, off, segs, sc, acc);
    (mx, total)
}

simd! {
    /// The max of `sc`, then `sc[j] = exp(sc[j] - max)`, their fixed-order sum, and (with
    /// `norm`) `sc[j] /= sum` (the weights of the values).
    fn exps_in_place(sc: &mut [f32], norm: bool) -> (f32, f32) {
        let mx = max(sc);
        for sj in sc.iter_mut() {
            *sj = exp(*sj - mx);
        }
        let total = sum(sc);
        if norm {
            for sj in sc.iter_mut() {
                *sj /= total;
            }
        }
        (mx, total)
    }
}

/// A cache element: scores and weighted values computed as [`attend_head`] does, in AVX2
/// registers where present.
trait KvElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// `sc[j] = dot8(q, key j) * scale` for the entries of `segs` in order.
    #[allow(clippy::too_many_arguments)]
    fn scores(
        q: &[f32],
        kc: &[Self],
        gd: usize,
        off: usize,
        segs: [(usize, usize); 2],
        scale: f32,
        sc: &mut [f32],
    );

    /// `acc = sum_j w_j v_j`, summed over the entries of `segs` in order per element.
    fn values(
        vc: &[Self],
        gd: usize,
        off: usize,
        segs: [(usize, usize); 2],
        w: &[f32],
        acc: &mut [f32],
    );
}

/// Portable [`KvElem::scores`]: each key widened, then [`dot8`].
#[allow(clippy::too_many_arguments)]
fn scores_portable<T: KvElem>(
    q: &[f32],
    kc: &[T],
    gd: usize,
    off: usize,
    segs: [(usize, usize); 2],
    scale: f32,
    sc: &mut [f32],
) {
    let d = q.len();
    let mut k = vec![0f32; d];
    let mut j = 0;
    for &(a, b) in &segs {
        for e in a..b {
            for (x, y) in k.iter_mut().zip(&kc[e * gd + off..e * gd + off + d]) {
                *x = y.to_f32();
            }
            sc[j] = dot8(q, &k) * scale;
            j += 1;
        }
    }
}

/// Portable [`KvElem::values`].
fn values_portable<T: KvElem>(
    vc: &[T],
    gd: usize,
    off: usize,
    segs: [(usize, usize); 2],
    w: &[f32],
    acc: &mut [f32],
) {
    let d = acc.len();
    acc.fill(0.0);
    let mut j = 0;
    for &(a, b) in &segs {
        for e in a..b {
            for (a, vv) in acc.iter_mut().zip(&vc[e * gd + off..e * gd + off + d]) {
                *a += w[j] * vv.to_f32();
            }
            j += 1;
        }
    }
}

/// The AVX2 weighted sum of values: each element summed over the entries in order (as
/// [`values_portable`]), up to 64 columns at a time in registers that stay in registers
/// across the entries (`$load` widens 8 elements at a pointer). Every 8-column block of a
/// pass has its own register, so a pass has up to eight independent add chains: at head
/// width 32 one chain per block (a pass per block) left the step latency-bound.
macro_rules! values_avx2 {
    ($t:ty, $values:ident, $load:ident) => {
        /// # Safety
        /// The CPU has the enabled features.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn $values(
            vc: &[$t],
            gd: usize,
            off: usize,
            segs: [(usize, usize); 2],
            w: &[f32],
            acc: &mut [f32],
        ) {
            /// Columns `cb..cb + 8 NB` of the sum.
            #[inline]
            #[target_feature(enable = "avx2,f16c")]
            unsafe fn pass<const NB: usize>(
                base: *const $t,
                gd: usize,
                cb: usize,
                segs: [(usize, usize); 2],
                w: &[f32],
                ap: *mut f32,
            ) {
                use std::arch::x86_64::*;
                let mut r = [_mm256_setzero_ps(); NB];
                let mut j = 0;
                for &(a, b) in &segs {
                    for e in a..b {
                        let wv = _mm256_set1_ps(*w.get_unchecked(j));
                        let p = base.add(e * gd + cb);
                        for (k, r) in r.iter_mut().enumerate() {
                            *r = _mm256_add_ps(*r, _mm256_mul_ps(wv, $load!(p.add(8 * k))));
                        }
                        j += 1;
                    }
                }
                for (k, r) in r.iter().enumerate() {
                    _mm256_storeu_ps(ap.add(cb + 8 * k), *r);
                }
            }
            let d = acc.len();
            let full = d / 8 * 8;
            let n: usize = segs.iter().map(|&(a, b)| b - a).sum();
            assert!(w.len() >= n);
            for &(a, b) in &segs {
                assert!(b == a || (b - 1) * gd + off + d <= vc.len());
            }
            let base = vc.as_ptr().add(off);
            let ap = acc.as_mut_ptr();
            let mut cb = 0;
            while cb < full {
                let nb = (full - cb) / 8;
                cb += 8 * match nb {
                    8.. => {
                        pass::<8>(base, gd, cb, segs, w, ap);
                        8
                    }
                    4..=7 => {
                        pass::<4>(base, gd, cb, segs, w, ap);
                        4
                    }
                    2 | 3 => {
                        pass::<2>(base, gd, cb, segs, w, ap);
                        2
                    }
                    _ => {
                        pass::<1>(base, gd, cb, segs, w, ap);
                        1
                    }
                };
            }
            for t in full..d {
                let mut x = 0f32;
                let mut j = 0;
                for &(a, b) in &segs {
                    for e in a..b {
                        x += w[j] * (*base.add(e * gd + t)).to_f32();
                        j += 1;
                    }
                }
                *ap.add(t) = x;
            }
        }
    };
}

/// The AVX2 scores over a 16-bit cache (see [`KvElem::scores`]).
macro_rules! scores_avx2 {
    ($t:ty, $scores:ident, $load:ident) => {
        /// # Safety
        /// The CPU has the enabled features.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $scores(
            q: &[f32],
            kc: &[$t],
            gd: usize,
            off: usize,
            segs: [(usize, usize); 2],
            scale: f32,
            sc: &mut [f32],
        ) {
            use std::arch::x86_64::*;
            let d = q.len();
            let full = d / 8 * 8;
            let mut j = 0;
            for &(a, b) in &segs {
                assert!(b == a || (b - 1) * gd + off + d <= kc.len());
                let mut e = a;
                // eight keys at a time: eight lane accumulators reduced together, each
                // in hsum8's order (halves, then pairs of lanes, then the last pair)
                while full == d && e + 8 <= b {
                    let mut r = [_mm256_setzero_ps(); 8];
                    let mut i = 0;
                    while i < d {
                        let qv = _mm256_loadu_ps(q.as_ptr().add(i));
                        for (t, r) in r.iter_mut().enumerate() {
                            let kp = kc.as_ptr().add((e + t) * gd + off + i);
                            *r = _mm256_add_ps(*r, _mm256_mul_ps(qv, $load!(kp)));
                        }
                        i += 8;
                    }
                    let h = crate::vmath::hsum8_x8(r);
                    assert!(j + 8 <= sc.len());
                    _mm256_storeu_ps(
                        sc.as_mut_ptr().add(j),
                        _mm256_mul_ps(h, _mm256_set1_ps(scale)),
                    );
                    j += 8;
                    e += 8;
                }
                for e in e..b {
                    let kp = kc.as_ptr().add(e * gd + off);
                    let mut v = _mm256_setzero_ps();
                    let mut i = 0;
                    while i < full {
                        v = _mm256_add_ps(
                            v,
                            _mm256_mul_ps(_mm256_loadu_ps(q.as_ptr().add(i)), $load!(kp.add(i))),
                        );
                        i += 8;
                    }
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    for t in full..d {
                        lanes[t - full] += q[t] * (*kp.add(t)).to_f32();
                    }
                    sc[j] = hsum8(&lanes) * scale;
                    j += 1;
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! load_f32 {
    ($p:expr) => {
        _mm256_loadu_ps($p)
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! load_f16 {
    ($p:expr) => {
        _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i))
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! load_bf16 {
    ($p:expr) => {
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128($p as *const __m128i)),
            16,
        ))
    };
}

values_avx2!(f32, values_f32_avx2, load_f32);
values_avx2!(f16, values_f16_avx2, load_f16);
values_avx2!(bf16, values_bf16_avx2, load_bf16);
scores_avx2!(f32, scores_f32_avx2, load_f32);
scores_avx2!(f16, scores_f16_avx2, load_f16);
scores_avx2!(bf16, scores_bf16_avx2, load_bf16);

/// True where the AVX2 kernels run.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

macro_rules! kv_elem {
    ($t:ty, $to_f32:expr, $scores:ident, $values:ident) => {
        impl KvElem for $t {
            fn to_f32(self) -> f32 {
                $to_f32(self)
            }

            fn scores(
                q: &[f32],
                kc: &[Self],
                gd: usize,
                off: usize,
                segs: [(usize, usize); 2],
                scale: f32,
                sc: &mut [f32],
            ) {
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    // SAFETY: the features were detected; the kernel checks the bounds.
                    unsafe { $scores(q, kc, gd, off, segs, scale, sc) };
                    return;
                }
                scores_portable(q, kc, gd, off, segs, scale, sc);
            }

            fn values(
                vc: &[Self],
                gd: usize,
                off: usize,
                segs: [(usize, usize); 2],
                w: &[f32],
                acc: &mut [f32],
            ) {
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    // SAFETY: the features were detected; the kernel checks the bounds.
                    unsafe { $values(vc, gd, off, segs, w, acc) };
                    return;
                }
                values_portable(vc, gd, off, segs, w, acc);
            }
        }
    };
}

kv_elem!(f32, |x: f32| x, scores_f32_avx2, values_f32_avx2);
kv_elem!(f16, f16::to_f32, scores_f16_avx2, values_f16_avx2);

kv_elem!(bf16, bf16::to_f32, scores_bf16_avx2, values_bf16_avx2);

/// One query head over keys and values of any cache type (see [`attend_head`]).
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    kc: KvRef<'_>,
    vc: KvRef<'_>,
    gd: usize,
    off: usize,
    segs: [(usize, usize); 2],
    scale: f32,
    sc: &mut [f32],
    acc: &mut [f32],
    norm: bool,
) -> (f32, f32) {
    match (kc, vc) {
        (KvRef::F32(k), KvRef::F32(v)) => attend_head(q, k, v, gd, off, segs, scale, sc, acc, norm),
        (KvRef::F16(k), KvRef::F16(v)) => attend_head(q, k, v, gd, off, segs, scale, sc, acc, norm),
        (KvRef::Bf16(k), KvRef::Bf16(v)) => {
            attend_head(q, k, v, gd, off, segs, scale, sc, acc, norm)
        }
        _ => panic!("keys and values of different cache types"),
    }
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
/// window), oldest first. Writes `out (n, HD)`; `scores (n, H*tmax)` is scratch. Each row
/// is computed on its own with fixed-order sums, so a row's result does not depend on the
/// other rows. A 16-bit cache gives exactly the bits of an f32 cache holding its (rounded)
/// values: its elements are widened to f32 as they are loaded.
pub fn decode_attention(
    out: &mut [f32],
    scores: &mut [f32],
    qkv: &[f32],
    k_cache: KvRef<'_>,
    v_cache: KvRef<'_>,
    rows: &[(usize, usize)],
    s: KvShape,
) {
    let (h, d, tmax) = (s.h, s.d, s.tmax);
    let (hpg, r) = (h / s.g, (h + 2 * s.g) * d);
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
    // the cache entries of row i's slot and key/value head gi
    let kv = |i: usize, gi: usize| {
        let at = (rows[i].0 * s.g + gi) * tmax * d..(rows[i].0 * s.g + gi + 1) * tmax * d;
        (k_cache.slice(at.clone()), v_cache.slice(at))
    };
    let long = |i: usize| {
        let (lo, len) = visible(i);
        len - lo > DECODE_CHUNK
    };
    // one short row (a decode step) inside a team: its heads on both threads
    if n == 1 && !long(0) && h > 1 {
        let (lo, len) = visible(0);
        let segs = ring_segments(lo, len, tmax);
        let (optr, sptr) = (SendPtr(out.as_mut_ptr()), SendPtr(scores.as_mut_ptr()));
        // two tasks of consecutive heads (a claim costs a transfer between the cores)
        let half = h.div_ceil(2);
        let heads = |t: usize| {
            for hi in t * half..((t + 1) * half).min(h) {
                let gi = hi / hpg;
                let (kc, vc) = kv(0, gi);
                let q = &qkv[hi * d..(hi + 1) * d];
                // SAFETY: head hi writes only its d outputs and its tmax scores.
                let (sc, o) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(sptr.get().add(hi * tmax), len - lo),
                        std::slice::from_raw_parts_mut(optr.get().add(hi * d), d),
                    )
                };
                attend(q, kc, vc, d, 0, segs, scale, sc, o, true);
            }
        };
        if crate::par::team_for_each(2, &heads) {
            return;
        }
    }
    out[..n * h * d]
        .par_chunks_mut(h * d)
        .zip(scores[..n * h * tmax].par_chunks_mut(h * tmax))
        .enumerate()
        .filter(|(i, _)| !long(*i))
        .for_each(|(i, (o, sc))| {
            let (lo, len) = visible(i);
            let segs = ring_segments(lo, len, tmax);
            for hi in 0..h {
                let gi = hi / hpg;
                let (kc, vc) = kv(i, gi);
                let q = &qkv[i * r + hi * d..i * r + (hi + 1) * d];
                let sc = &mut sc[hi * tmax..hi * tmax + len - lo];
                let o = &mut o[hi * d..(hi + 1) * d];
                attend(q, kc, vc, d, 0, segs, scale, sc, o, true);
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
    // the positions of task t
    let bounds = |t: usize| {
        let (i, _, c) = tasks[t];
        let (lo, len) = visible(i);
        (
            lo + c * DECODE_CHUNK,
            (lo + (c + 1) * DECODE_CHUNK).min(len),
        )
    };
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
    let jobs: Vec<Vec<usize>> = jobs.into_values().collect();
    let job = |j: usize| {
        let mut sc = [0.0f32; DECODE_CHUNK];
        for &t in &jobs[j] {
            let (i, gi, _) = tasks[t];
            let (kc, vc) = kv(i, gi);
            // SAFETY: every task index belongs to one job, so its part of `partial`
            // is written by this thread alone.
            let pt = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(t * part), part) };
            let (c0, c1) = bounds(t);
            let segs = ring_segments(c0, c1, tmax);
            let sc = &mut sc[..c1 - c0];
            for (hj, pt) in pt.chunks_mut(d + 2).enumerate() {
                let hi = gi * hpg + hj;
                let q = &qkv[i * r + hi * d..i * r + (hi + 1) * d];
                let (ms, acc) = pt.split_at_mut(2);
                let (mx, total) = attend(q, kc, vc, d, 0, segs, scale, sc, acc, false);
                ms[0] = mx;
                ms[1] = total;
            }
        }
    };
    // inside a team (a single-row decode step) on its two threads, else rayon's
    if !crate::par::team_for_each(jobs.len(), &job) {
        (0..jobs.len()).into_par_iter().for_each(job);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `dot8`'s lanes in an AVX register equal its array form (CPUs without AVX) bit for
    /// bit, lengths from one lane chunk to many, both adding into the lanes they are given.
    #[test]
    fn dot8_lanes_equal_in_registers_and_arrays() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for len in [8, 16, 32, 40, 128, 200] {
            let a: Vec<f32> = (0..len).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let start: [f32; 8] = std::array::from_fn(|_| rng.gen_range(-1.0..1.0));
            let mut lanes = start;
            dot8_lanes(&mut lanes, &a, &b);
            // the order the docs state, written out
            let mut want = start;
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                want[i % 8] += x * y;
            }
            assert_eq!(lanes.map(f32::to_bits), want.map(f32::to_bits), "len {len}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx") {
                let mut reg = start;
                // SAFETY: AVX is present; equal lengths, multiples of 8.
                unsafe { dot8_avx(&mut reg, &a, &b) };
                assert_eq!(reg.map(f32::to_bits), want.map(f32::to_bits), "len {len}");
            }
        }
    }

    /// The dispatched (AVX2 where present) 16-bit score and value loops equal the portable
    /// ones bit for bit, for head dims with and without a tail past the last 8 lanes.
    #[test]
    fn half_kernels_equal_portable() {
        fn check<T: KvElem + std::fmt::Debug>(conv: impl Fn(f32) -> T) {
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            for d in [8, 13, 16, 32, 48, 64, 100, 128, 200] {
                let (gd, off, n) = (3 * d, d, 40);
                let q: Vec<f32> = (0..d).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let c: Vec<T> = (0..n * gd)
                    .map(|_| conv(rng.gen_range(-2.0..2.0)))
                    .collect();
                let segs = [(30, 40), (0, 25)];
                let (mut a, mut b) = (vec![0.0; 35], vec![0.0; 35]);
                T::scores(&q, &c, gd, off, segs, 0.3, &mut a);
                scores_portable(&q, &c, gd, off, segs, 0.3, &mut b);
                assert_eq!(a, b, "scores, d {d}");
                let (mut x, mut y) = (vec![1.0; d], vec![2.0; d]);
                T::values(&c, gd, off, segs, &a, &mut x);
                values_portable(&c, gd, off, segs, &a, &mut y);
                assert_eq!(x, y, "values, d {d}");
            }
        }
        check(f16::from_f32);
        check(bf16::from_f32);
        check(|x| x);
    }

    /// `KvMut::split_at` cuts a cache into disjoint ranges, in every element type: writes
    /// through them land at the cut's offset, and nothing outside them is touched.
    #[test]
    fn kv_split_at_views_disjoint_ranges() {
        for t in [KvType::F32, KvType::F16, KvType::Bf16] {
            let mut b = KvBuf::zeros(t, 20);
            {
                let (_, rest) = b.whole_mut().split_at(3);
                let (mut p0, rest) = rest.split_at(5);
                let (p1, rest) = rest.split_at(0);
                let (mut p2, _) = rest.split_at(7);
                p0.write(1, &[1.0, 2.0]);
                p2.write(6, &[3.0]);
                assert!(matches!(
                    p1.view(),
                    KvRef::F32(&[]) | KvRef::F16(&[]) | KvRef::Bf16(&[])
                ));
            }
            let got: Vec<f32> = match b.view() {
                KvRef::F32(x) => x.to_vec(),
                KvRef::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
                KvRef::Bf16(x) => x.iter().map(|v| v.to_f32()).collect(),
            };
            let mut want = vec![0.0; 20];
            (want[4], want[5], want[14]) = (1.0, 2.0, 3.0);
            assert_eq!(got, want, "{t:?}");
        }
    }

    /// A 16-bit cache gives exactly the bits of an f32 cache holding its rounded values:
    /// short rows, rows split into flash-decoding chunks (several rows of one slot sharing
    /// them, as in prefill), and a sliding-window ring buffer.
    #[test]
    fn half_precision_cache_equals_f32_cache_of_rounded_values() {
        let (h, g, d) = (6, 2, 16);
        let gd = g * d;
        let r = (h + 2 * g) * d;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (tmax, window, rows) in [
            (64, 0, vec![(0, 5), (1, 64), (1, 1)]),
            (
                700,
                0,
                vec![(1, 600), (0, 300), (0, 301), (0, 302), (1, 17)],
            ),
            (300, 200, vec![(0, 650), (0, 651), (1, 199), (1, 260)]),
            (300, 280, vec![(1, 900), (1, 901), (1, 902), (0, 3)]),
        ] {
            let s = KvShape {
                h,
                g,
                d,
                tmax,
                window,
            };
            let n = rows.len();
            let qkv: Vec<f32> = (0..n * r).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let k: Vec<f32> = (0..2 * tmax * gd)
                .map(|_| rng.gen_range(-2.0..2.0))
                .collect();
            let v: Vec<f32> = (0..2 * tmax * gd)
                .map(|_| rng.gen_range(-2.0..2.0))
                .collect();
            let run = |kc: KvRef, vc: KvRef| {
                let mut out = vec![0.0; n * h * d];
                let mut sc = vec![0.0; n * h * tmax];
                decode_attention(&mut out, &mut sc, &qkv, kc, vc, &rows, s);
                out
            };
            for t in [KvType::F16, KvType::Bf16] {
                let (mut kb, mut vb) = (KvBuf::zeros(t, k.len()), KvBuf::zeros(t, v.len()));
                kb.write(0, &k);
                vb.write(0, &v);
                let widen = |b: &KvBuf| -> Vec<f32> {
                    match b {
                        KvBuf::F16(x) => x.iter().map(|y| y.to_f32()).collect(),
                        KvBuf::Bf16(x) => x.iter().map(|y| y.to_f32()).collect(),
                        KvBuf::F32(x) => x.clone(),
                    }
                };
                let (kr, vr) = (widen(&kb), widen(&vb));
                assert_ne!(kr, k, "{t:?} rounds");
                let want = run(KvRef::F32(&kr), KvRef::F32(&vr));
                let got = run(kb.view(), vb.view());
                assert_eq!(got, want, "{t:?}, tmax {tmax}, window {window}");
                assert_eq!(kb.bytes(), k.len() * t.bytes());
            }
        }
    }
}
