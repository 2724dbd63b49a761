//! ggml's K-quants, Q4_K and Q6_K, as kernels of their own: a GGUF file's K-quant matrices
//! run on the file's own bytes (ggml's K-quant quantizers search scales iteratively, so a
//! dequantized block does not map back to the same bytes the way Q8_0/Q4_0/Q4_1/Q5_0 do,
//! and moelab keeps the bytes instead of quantizing again).
//!
//! A super-block holds 256 values: Q4_K as 8 sub-blocks of 32 with 6-bit scales and
//! minimums (`x = d * sc_j * q - dmin * m_j`, q in 0..15), Q6_K as 16 sub-blocks of 16 with
//! int8 scales (`x = d * sc_k * (q - 32)`, q in 0..63). Both are dotted with the same int8
//! activation blocks of 32 as the other types ([`QActs`]); where ggml quantizes activations
//! per 256 values for K-quants (Q8_K), moelab keeps the per-32 scales, which are at least as
//! precise.
//!
//! Every output is defined by [`dot_ref`]: per activation block, lane k (of 8) sums the
//! integer products of elements 4k..4k+3 exactly, is multiplied by `(d * sc) * dx` (the
//! product `d * sc` is exact in f32, one rounding for `* dx`) and added to one of two
//! accumulators by a fused multiply-add (even blocks to the first, odd to the second);
//! Q4_K's minimum terms `(dmin * m_j) * s` go to 8 lanes of their own (lane j: sub-block j)
//! by fused multiply-adds. The result is `hsum8(acc0 + acc1) - hsum8(mins)`. The SIMD tiles
//! compute the same operations, so every path, thread count and row count gives the same
//! bits.

use super::{f16_at, hsum8, QActs, QType, QView, QK};

/// Values per K-quant super-block.
pub const QK_K: usize = 256;

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A super-block's 256 values as integers (Q6_K's with 32 subtracted), the scale of each 16
/// values (`d * sc`, exact) and Q4_K's 8 minimums (`dmin * m`, exact; zero for Q6_K).
fn block(ty: QType, b: &[u8]) -> ([i32; QK_K], [f32; 16], [f32; 8]) {
    let mut q = [0i32; QK_K];
    let mut ds = [0f32; 16];
    let mut mins = [0f32; 8];
    match ty {
        QType::Q4_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &b[4..16]);
                ds[2 * j] = d * sc as f32;
                ds[2 * j + 1] = ds[2 * j];
                mins[j] = dmin * m as f32;
            }
            // 32 bytes per 64 values: low nibbles the first 32, high nibbles the next
            for c in 0..4 {
                for l in 0..32 {
                    let v = b[16 + 32 * c + l];
                    q[64 * c + l] = (v & 0xF) as i32;
                    q[64 * c + 32 + l] = (v >> 4) as i32;
                }
            }
        }
        QType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for (k, s) in ds.iter_mut().enumerate() {
                *s = d * (sc[k] as i8) as f32;
            }
            for n in 0..2 {
                for l in 0..32 {
                    let (a, c, h) = (ql[64 * n + l], ql[64 * n + 32 + l], qh[32 * n + l]);
                    let y = &mut q[128 * n..];
                    y[l] = ((a & 0xF) | ((h & 3) << 4)) as i32 - 32;
                    y[l + 32] = ((c & 0xF) | (((h >> 2) & 3) << 4)) as i32 - 32;
                    y[l + 64] = ((a >> 4) | (((h >> 4) & 3) << 4)) as i32 - 32;
                    y[l + 96] = ((c >> 4) | (((h >> 6) & 3) << 4)) as i32 - 32;
                }
            }
        }
        _ => unreachable!("not a K-quant: {ty:?}"),
    }
    (q, ds, mins)
}

/// Dequantizes whole super-blocks as ggml's `dequantize_row_q4_K` / `_q6_K` do (`(d * sc) *
/// q - dmin * m`, each product rounded once).
pub fn dequantize_row(ty: QType, bytes: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    for (b, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK_K)) {
        let (q, ds, mins) = block(ty, b);
        for (e, y) in y.iter_mut().enumerate() {
            *y = ds[e / 16] * q[e] as f32 - mins[e / 32];
        }
    }
}

/// The dot of K-quant weight row `w` with row `r` of `x`, as the module doc defines it.
pub fn dot_ref(ty: QType, w: &[u8], x: &QActs, r: usize) -> f32 {
    let nb = x.cols / QK;
    let bb = ty.block_bytes();
    assert_eq!(w.len(), x.cols / QK_K * bb, "dot_ref: K-quant row size");
    let mut acc = [[0f32; 8]; 2];
    let mut mins = [0f32; 8];
    for s in 0..x.cols / QK_K {
        let (q, ds, mn) = block(ty, &w[s * bb..(s + 1) * bb]);
        for g in 0..8 {
            let xb = r * nb + 8 * s + g;
            let qx = &x.q[xb * QK..(xb + 1) * QK];
            for k in 0..8 {
                let isum: i32 = (4 * k..4 * k + 4)
                    .map(|i| q[32 * g + i] * qx[i] as i32)
                    .sum();
                let dd = ds[2 * g + k / 4] * x.d[xb];
                acc[g & 1][k] = dd.mul_add(isum as f32, acc[g & 1][k]);
            }
            mins[g] = mn[g].mul_add(x.s[xb], mins[g]);
        }
    }
    hsum8(std::array::from_fn(|k| acc[0][k] + acc[1][k])) - hsum8(mins)
}

/// Bytes of quantized activation rows (int8 values, block scales and sums) the prefill tiles
/// keep in L1 while a task's weight rows stream past them. A K-quant tile is one weight row
/// against 4 activation rows, so taking every activation row for each weight row read the
/// activations from L2 again per weight row; blocks of rows against all of the task's
/// weight rows instead. With [`finish4`] inlined, the width-512 Q4_K_M model
/// (`bench/kquant-model.sh`) prefilled 512 tokens at 2,248 against 2,111 tokens/s (medians of
/// 7 alternating rounds, every round faster; decoding unchanged). The 32-value types' tiles,
/// 4 weight rows each, gained nothing from it (SmolLM2 Q4_1, 4 rounds).
const ACT_BLOCK_BYTES: usize = 16 << 10;

/// Row ranges `b0..b1` covering `0..rows` (a multiple of 4) in blocks of whole 4-row tiles of
/// about [`ACT_BLOCK_BYTES`] of `x`'s quantized rows.
fn act_blocks(x: &QActs, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    debug_assert!(rows.is_multiple_of(4));
    let row_bytes = x.cols + x.cols / QK * 8;
    let block = (ACT_BLOCK_BYTES / row_bytes).max(1).div_ceil(4) * 4;
    (0..rows)
        .step_by(block)
        .map(move |b0| (b0, (b0 + block).min(rows)))
}

// the tiles' const type parameter
const Q4K: u8 = 0;
const Q6K: u8 = 1;

/// The f16 at `p` (a super-block's scale or minimum scale).
///
/// # Safety
/// F16C must be present; `p` points to 2 readable bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn f16_scale(p: *const u8) -> f32 {
    use std::arch::x86_64::*;
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// A Q4_K super-block's 8 sub-block scales and minimums as `(d * sc_j, dmin * m_j)` (ggml's
/// unpacking of the 12 bytes of 6-bit values: bytes 0-7 of `u` the scales, 8-15 the
/// minimums).
///
/// # Safety
/// AVX2 and F16C must be present; `p` points to a whole Q4_K block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn q4k_scales(p: *const u8) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    let (k1, k2, k3) = (0x3f3f3f3fu32, 0x0f0f0f0fu32, 0x03030303u32);
    let mut u = [0u32; 4];
    std::ptr::copy_nonoverlapping(p.add(4), u.as_mut_ptr() as *mut u8, 12);
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
    let aux = u[1] & k1;
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
    u[2] = aux;
    u[0] &= k1;
    let v = _mm_loadu_si128(u.as_ptr() as *const __m128i);
    let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    let mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(v)));
    (
        _mm256_mul_ps(_mm256_set1_ps(f16_scale(p)), sc),
        _mm256_mul_ps(_mm256_set1_ps(f16_scale(p.add(2))), mn),
    )
}

/// A Q6_K super-block's 16 sub-block scales `d * sc_k`, 8 per half.
///
/// # Safety
/// AVX2 and F16C must be present; `p` points to a whole Q6_K block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn q6k_scales(p: *const u8) -> [std::arch::x86_64::__m256; 2] {
    use std::arch::x86_64::*;
    let d = _mm256_set1_ps(f16_scale(p.add(208)));
    let scv = _mm_loadu_si128(p.add(192) as *const __m128i);
    [
        _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(scv))),
        _mm256_mul_ps(
            d,
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(scv))),
        ),
    ]
}

/// The 6-bit values (0..63) of half `n` of a Q6_K super-block: four runs of 32, the
/// activation blocks 4n..4n + 3.
///
/// # Safety
/// AVX2 must be present; `p` points to a whole Q6_K block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn q6k_quads(p: *const u8, n: usize) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let ld = |p: *const u8| _mm256_loadu_si256(p as *const __m256i);
    let mask = _mm256_set1_epi8(0xF);
    let m30 = _mm256_set1_epi8(0x30);
    let (ql0, ql1) = (ld(p.add(64 * n)), ld(p.add(64 * n + 32)));
    let qh = ld(p.add(128 + 32 * n));
    [
        _mm256_or_si256(
            _mm256_and_si256(ql0, mask),
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, mask),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), mask),
            _mm256_and_si256(qh, m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), mask),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
        ),
    ]
}

/// The 256-bit dot for one instruction set (`$isum` as in `quant_tiles!`).
macro_rules! k_dot {
    ($dot:ident, $feat:literal, $isum:ident) => {
        /// The dots of one K-quant weight row `w` with activation rows `rows` (a weight
        /// super-block unpacked once for all of them), [`dot_ref`]'s operations in its order.
        ///
        /// # Safety
        /// The features of `$feat` must be present; `w` is a whole row for `x.cols`; every
        /// row in `rows` is below `x.rows()`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $dot<const T: u8, const R: usize>(
            w: &[u8],
            x: &QActs,
            rows: [usize; R],
        ) -> [f32; R] {
            use std::arch::x86_64::*;
            let nb = x.cols / QK;
            let bb = if T == Q4K { 144 } else { 210 };
            debug_assert!(w.len() >= x.cols / QK_K * bb);
            let wp = w.as_ptr();
            let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
            let mask = _mm256_set1_epi8(0xF);
            let ones = _mm256_set1_epi16(1);
            let ld = |p: *const u8| _mm256_loadu_si256(p as *const __m256i);
            let lane = |i: i32| _mm256_set1_epi32(i);
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let mut mins = [_mm256_setzero_ps(); R];
            for s in 0..x.cols / QK_K {
                let p = wp.add(s * bb);
                let xb0: [usize; R] = std::array::from_fn(|i| rows[i] * nb + 8 * s);
                if T == Q4K {
                    let (dsc, dmn) = q4k_scales(p);
                    let mut dd = [_mm256_setzero_ps(); R];
                    for i in 0..R {
                        dd[i] = _mm256_mul_ps(dsc, _mm256_loadu_ps(xd.add(xb0[i])));
                        mins[i] = _mm256_fmadd_ps(dmn, _mm256_loadu_ps(xs.add(xb0[i])), mins[i]);
                    }
                    for c in 0..4 {
                        let raw = ld(p.add(16 + 32 * c));
                        let lo = _mm256_and_si256(raw, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                        for i in 0..R {
                            let a = xq.add((xb0[i] + 2 * c) * QK) as *const u8;
                            let s0 = $isum!(lo, ld(a), ones);
                            let s1 = $isum!(hi, ld(a.add(QK)), ones);
                            let d0 = _mm256_permutevar8x32_ps(dd[i], lane(2 * c as i32));
                            let d1 = _mm256_permutevar8x32_ps(dd[i], lane(2 * c as i32 + 1));
                            acc[i][0] = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(s0), acc[i][0]);
                            acc[i][1] = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(s1), acc[i][1]);
                        }
                    }
                } else {
                    let dsc = q6k_scales(p);
                    let m32 = _mm256_set1_epi8(32);
                    for n in 0..2 {
                        let q = q6k_quads(p, n);
                        for (t, &qt) in q.iter().enumerate() {
                            let g = 4 * n + t;
                            let wv = _mm256_sub_epi8(qt, m32);
                            let aw = _mm256_sign_epi8(wv, wv);
                            // lanes 0-3 take scale 2t of this half, lanes 4-7 scale 2t + 1
                            let (e, o) = (2 * t as i32, 2 * t as i32 + 1);
                            let idx = _mm256_setr_epi32(e, e, e, e, o, o, o, o);
                            let ls = _mm256_permutevar8x32_ps(dsc[n], idx);
                            for i in 0..R {
                                let xb = xb0[i] + g;
                                let a = ld(xq.add(xb * QK) as *const u8);
                                let isum = $isum!(aw, _mm256_sign_epi8(a, wv), ones);
                                let dd = _mm256_mul_ps(ls, _mm256_set1_ps(*xd.add(xb)));
                                acc[i][g & 1] =
                                    _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[i][g & 1]);
                            }
                        }
                    }
                }
            }
            let mut out = [0f32; R];
            for i in 0..R {
                let (mut a, mut m) = ([0f32; 8], [0f32; 8]);
                _mm256_storeu_ps(a.as_mut_ptr(), _mm256_add_ps(acc[i][0], acc[i][1]));
                _mm256_storeu_ps(m.as_mut_ptr(), mins[i]);
                out[i] = hsum8(a) - hsum8(m);
            }
            out
        }
    };
}

/// The tiles for one instruction set, on its dot (`$dot::<T, R>` as [`dot512`]).
macro_rules! k_tiles {
    ($dot:ident, $tiles:ident, $feat:literal) => {
        /// Output columns c0..c1 for all `n` rows: each weight row with 4 activation rows at
        /// a time, then the rest one by one.
        ///
        /// # Safety
        /// The features of `$feat` must be present; columns c0..c1 are rows row0+c0.. of `w`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn $tiles(
            w: QView,
            row0: usize,
            x: &QActs,
            c0: usize,
            c1: usize,
            n: usize,
            put: &impl Fn(usize, usize, f32),
        ) {
            let rb = w.row_bytes();
            // activation rows in blocks that stay in L1 while the task's weight rows stream
            // past them (see ACT_BLOCK_BYTES)
            let full = n / 4 * 4;
            for (b0, b1) in act_blocks(x, full) {
                for c in c0..c1 {
                    let ws = &w.data[(row0 + c) * rb..(row0 + c + 1) * rb];
                    for r in (b0..b1).step_by(4) {
                        let rows = [r, r + 1, r + 2, r + 3];
                        let v = match w.ty {
                            QType::Q4_K => $dot::<Q4K, 4>(ws, x, rows),
                            _ => $dot::<Q6K, 4>(ws, x, rows),
                        };
                        for (i, v) in v.into_iter().enumerate() {
                            put(r + i, c, v);
                        }
                    }
                }
            }
            for c in c0..c1 {
                let ws = &w.data[(row0 + c) * rb..(row0 + c + 1) * rb];
                for r in full..n {
                    let v = match w.ty {
                        QType::Q4_K => $dot::<Q4K, 1>(ws, x, [r]),
                        _ => $dot::<Q6K, 1>(ws, x, [r]),
                    };
                    put(r, c, v[0]);
                }
            }
        }
    };
}

k_dot!(dot_avx2, "avx2,fma,f16c", isum_avx2);
k_tiles!(dot_avx2, tiles_avx2, "avx2,fma,f16c");
k_tiles!(
    dot512,
    tiles_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl"
);

/// The dots of one K-quant weight row with activation rows `rows` on AVX-512 VNNI: two
/// 32-value activation blocks per 512-bit register, the even block in lanes 0-7 and the odd
/// one in lanes 8-15, so [`dot_ref`]'s two accumulators (even and odd blocks) are the two
/// halves of one register and every lane sees its operations in its order. Against the
/// 256-bit tile: one integer dot, scale permute, conversion and fused multiply-add per 64
/// values and row instead of two of each.
///
/// # Safety
/// AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C must be present; `w` is a whole row for
/// `x.cols`; every row in `rows` is below `x.rows()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
#[inline]
unsafe fn dot512<const T: u8, const R: usize>(w: &[u8], x: &QActs, rows: [usize; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let nb = x.cols / QK;
    let bb = if T == Q4K { 144 } else { 210 };
    debug_assert!(w.len() >= x.cols / QK_K * bb);
    let wp = w.as_ptr();
    let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
    let zero = _mm512_setzero_si512();
    // lanes 0-7 take element a of an 8-lane vector, lanes 8-15 element b
    let halves = |a: i32, b: i32| _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut mins = [_mm256_setzero_ps(); R];
    for s in 0..x.cols / QK_K {
        let p = wp.add(s * bb);
        let xb0: [usize; R] = std::array::from_fn(|i| rows[i] * nb + 8 * s);
        if T == Q4K {
            let (dsc, dmn) = q4k_scales(p);
            let mut dd = [_mm512_setzero_ps(); R];
            for i in 0..R {
                dd[i] = _mm512_castps256_ps512(_mm256_mul_ps(dsc, _mm256_loadu_ps(xd.add(xb0[i]))));
                mins[i] = _mm256_fmadd_ps(dmn, _mm256_loadu_ps(xs.add(xb0[i])), mins[i]);
            }
            // the low nibbles of 32 bytes are block 2c, the high nibbles block 2c + 1
            let nibble = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
            let mask = _mm512_set1_epi8(0xF);
            for c in 0..4 {
                let raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    p.add(16 + 32 * c) as *const __m256i
                ));
                let wv = _mm512_and_si512(_mm512_srlv_epi64(raw, nibble), mask);
                let idx = halves(2 * c as i32, 2 * c as i32 + 1);
                for i in 0..R {
                    let a = _mm512_loadu_si512(xq.add((xb0[i] + 2 * c) * QK) as *const _);
                    let isum = _mm512_dpbusd_epi32(zero, wv, a);
                    let d = _mm512_permutexvar_ps(idx, dd[i]);
                    acc[i] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(isum), acc[i]);
                }
            }
        } else {
            let dsc = q6k_scales(p).map(|v| _mm512_castps256_ps512(v));
            // each row's 8 activation block scales of this super-block
            let xd8: [__m512; R] =
                std::array::from_fn(|i| _mm512_castps256_ps512(_mm256_loadu_ps(xd.add(xb0[i]))));
            let m32 = _mm512_set1_epi8(32);
            for (n, &dsc) in dsc.iter().enumerate() {
                let q = q6k_quads(p, n);
                for tp in 0..2 {
                    // activation blocks g (even) and g + 1 of this super-block
                    let g = 4 * n + 2 * tp;
                    let wv = _mm512_sub_epi8(
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q[2 * tp]), q[2 * tp + 1]),
                        m32,
                    );
                    let aw = _mm512_abs_epi8(wv);
                    let neg = _mm512_movepi8_mask(wv);
                    // 16-value sub-blocks: lanes 4j..4j + 3 take scale 4 tp + j of this half
                    let e = 4 * tp as i32;
                    let idx = _mm512_setr_epi32(
                        e,
                        e,
                        e,
                        e,
                        e + 1,
                        e + 1,
                        e + 1,
                        e + 1,
                        e + 2,
                        e + 2,
                        e + 2,
                        e + 2,
                        e + 3,
                        e + 3,
                        e + 3,
                        e + 3,
                    );
                    let ls = _mm512_permutexvar_ps(idx, dsc);
                    let pick = halves(g as i32, g as i32 + 1);
                    for i in 0..R {
                        let a = _mm512_loadu_si512(xq.add((xb0[i] + g) * QK) as *const _);
                        // a times the sign of w (w = 0 gives |w| = 0 either way)
                        let sa = _mm512_mask_sub_epi8(a, neg, zero, a);
                        let isum = _mm512_dpbusd_epi32(zero, aw, sa);
                        let dd = _mm512_mul_ps(ls, _mm512_permutexvar_ps(pick, xd8[i]));
                        acc[i] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), acc[i]);
                    }
                }
            }
        }
    }
    let mut out = [0f32; R];
    // acc0 + acc1 of a row
    let sum = |a: __m512| {
        _mm256_add_ps(
            _mm512_castps512_ps256(a),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))),
        )
    };
    if R == 4 {
        let r = finish4(
            [acc[0], acc[1], acc[2], acc[3]],
            [mins[0], mins[1], mins[2], mins[3]],
        );
        out.copy_from_slice(&r[..R]);
        return out;
    }
    for i in 0..R {
        let (mut a, mut m) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(a.as_mut_ptr(), sum(acc[i]));
        _mm256_storeu_ps(m.as_mut_ptr(), mins[i]);
        out[i] = hsum8(a) - hsum8(m);
    }
    out
}

/// [`dot512`]'s results for 4 rows: `hsum8(acc0 + acc1) - hsum8(mins)` of each, the eight
/// hsum8 at once. (Inlined: only 4-row tiles call it. An earlier version of the reduction
/// written into the dot itself had made the one-row dots 20% slower.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f")]
#[inline]
unsafe fn finish4(
    acc: [std::arch::x86_64::__m512; 4],
    mins: [std::arch::x86_64::__m256; 4],
) -> [f32; 4] {
    use std::arch::x86_64::*;
    let mut out = [0f32; 4];
    let sum = |a: __m512| {
        _mm256_add_ps(
            _mm512_castps512_ps256(a),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))),
        )
    };
    let sums = [sum(acc[0]), sum(acc[1]), sum(acc[2]), sum(acc[3])];
    // lanes 0-3 the sums' hsum8, 4-7 the minimums'
    let h = crate::vmath::hsum8_x8([
        sums[0], sums[1], sums[2], sums[3], mins[0], mins[1], mins[2], mins[3],
    ]);
    let d = _mm_sub_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    _mm_storeu_ps(out.as_mut_ptr(), d);
    out
}

#[cfg(test)]
mod tests {
    use super::super::{qlinear_rows, QMatrix};
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Random valid blocks: any bytes, with finite f16 scales of moderate size.
    pub(crate) fn random_blocks(ty: QType, n: usize, seed: u64) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bb = ty.block_bytes();
        let mut v: Vec<u8> = (0..n * bb).map(|_| rng.gen()).collect();
        for b in v.chunks_exact_mut(bb) {
            let mut scale = |at: usize, rng: &mut ChaCha8Rng| {
                let x = half::f16::from_f32(rng.gen_range(1e-4f32..0.02));
                b[at..at + 2].copy_from_slice(&x.to_le_bytes());
            };
            match ty {
                QType::Q4_K => {
                    scale(0, &mut rng);
                    scale(2, &mut rng);
                }
                _ => scale(208, &mut rng),
            }
        }
        v
    }

    /// Every path equals the reference bit for bit for any number of rows, a row range and
    /// threads; the reference is close to the f64 dot of the dequantized values.
    #[test]
    fn k_quant_dots_equal_reference() {
        let (n, i, o) = (7, 3 * QK_K, 13);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let x: Vec<f32> = (0..n * i)
            .map(|k| {
                if k % 13 == 0 {
                    0.0
                } else {
                    rng.gen_range(-1.0f32..1.0) * if k % 7 == 0 { 3.0 } else { 1.0 }
                }
            })
            .collect();
        for ty in QType::K {
            let m = QMatrix::from_bytes(ty, o, i, random_blocks(ty, o * i / QK_K, 9));
            super::super::tests::check_paths(&m, &x, n, &[(0, o), (2, o - 3)]);
            let wd = m.dequantize();
            let rb = m.row_bytes();
            let mut acts = QActs::new();
            acts.quantize(&x, i);
            for r in 0..n {
                for c in 0..o {
                    let want = dot_ref(ty, &m.bytes()[c * rb..(c + 1) * rb], &acts, r);
                    let (wrow, xr) = (&wd[c * i..(c + 1) * i], &x[r * i..(r + 1) * i]);
                    let exact: f64 = wrow
                        .iter()
                        .zip(xr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    let scale: f64 = wrow
                        .iter()
                        .zip(xr)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    assert!(
                        (want as f64 - exact).abs() <= 0.02 * scale + 1e-6,
                        "{ty:?} ({r},{c}): {want} vs {exact}"
                    );
                }
            }
            let mut got = vec![0.0; n * o];
            qlinear_rows(&mut got, &acts, m.view(), 0, o, false);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let mut three = vec![0.0; n * o];
            pool.install(|| qlinear_rows(&mut three, &acts, m.view(), 0, o, false));
            assert_eq!(three, got, "{ty:?} threads");
        }
    }

    /// Prefill over more activation rows than one of the tiles' L1 blocks holds (several
    /// blocks, a partial last block and rows past the last whole tile): every path equals
    /// the reference bit for bit.
    #[test]
    fn k_quant_prefill_over_several_row_blocks() {
        let (i, o) = (3 * QK_K, 9);
        let per_block = ACT_BLOCK_BYTES / (i + i / QK * 8);
        let n = 2 * per_block + 7;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let x: Vec<f32> = (0..n * i).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut acts = QActs::new();
        acts.quantize(&x, i);
        for ty in QType::K {
            let m = QMatrix::from_bytes(ty, o, i, random_blocks(ty, o * i / QK_K, 3));
            let rb = m.row_bytes();
            for path in super::super::QPath::available() {
                let mut got = vec![0.0; n * o];
                super::super::qlinear_rows_on(path, &mut got, &acts, m.view(), 0, o, false);
                for r in 0..n {
                    for c in 0..o {
                        let want = dot_ref(ty, &m.bytes()[c * rb..(c + 1) * rb], &acts, r);
                        assert_eq!(
                            got[r * o + c].to_bits(),
                            want.to_bits(),
                            "{ty:?} {path:?} ({r},{c}) of {n} rows"
                        );
                    }
                }
            }
        }
    }

    /// The unpacked scales match ggml's `get_scale_min_k4` for every byte pattern position:
    /// the SIMD path's 32-bit unpacking is checked through the dots above; here the scalar
    /// layout against a hand-built block.
    #[test]
    fn q4_k_block_layout() {
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        // sub-block 0: scale 3, min 1; sub-block 5: scale 2 | (1 << 4) = 18, min 4 | (2 << 4)
        b[4] = 3;
        b[8] = 1;
        b[4 + 1] = 1 << 6; // high bits of sub-block 5's scale
        b[4 + 5] = 2 << 6; // high bits of sub-block 5's min
        b[4 + 9] = 2 | (4 << 4);
        b[16] = 0x7 | (0x9 << 4); // value 0 = 7 (sub-block 0), value 32 = 9 (sub-block 1)
        b[16 + 64 + 5] = 0xA0; // value 128 + 32 + 5 (sub-block 5) = 10
        let mut y = vec![0.0; 256];
        dequantize_row(QType::Q4_K, &b, &mut y);
        assert_eq!(y[0], 0.5 * 3.0 * 7.0 - 0.25);
        assert_eq!(y[32], 0.0); // sub-block 1: scale 0... times 9, min 0
        assert_eq!(y[128 + 32 + 5], 0.5 * 18.0 * 10.0 - 0.25 * 36.0);
    }
}
