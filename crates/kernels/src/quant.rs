//! Quantized weights for inference: ggml's Q8_0, Q4_0, Q4_1 and Q5_0 blocks (32 weights
//! with an f16 scale, and an f16 minimum for Q4_1; Q5_0 keeps each weight's fifth bit in a
//! 32-bit word beside its nibbles), kept quantized in memory, times activations
//! quantized per 32-value block to int8 (an f32 scale each), as llama.cpp's CPU backend
//! does. A block's products are summed in integers (exact); the per-block scaling and the
//! sum over blocks are float, in a fixed order of 8 lanes:
//!
//! - lane k of a block holds the integer sum of its elements 4k..4k+3, converted to f32 and
//!   added into lane accumulator k with one fused multiply-add by `d_w * d_x`;
//! - the 8 lanes are summed as `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))` (ggml's `hsum_float_8`);
//! - Q4_1's offset term `m_w * d_x * sum(q_x)` is summed over blocks in a separate f32 scalar
//!   and added last.
//!
//! [`dot_ref`] is the portable statement of that order; the AVX2 kernel computes the same
//! operations in registers, so both give the same bits (`tests` check random blocks), and a
//! row's result does not depend on the other rows, on the thread count or on how outputs are
//! split into tasks. Block layouts and the weight quantizers are ggml's reference ones
//! (`quantize_row_*_ref`), so a GGUF file's blocks survive dequantize + quantize unchanged.

use half::f16;
use rayon::prelude::*;

/// Values per block.
pub const QK: usize = 32;

/// A quantized weight format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // ggml's names
pub enum QType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    /// ggml's K-quants (256-value super-blocks, [`kquant`]): kept as a GGUF file
    /// holds them; moelab has no quantizer for them.
    Q4_K,
    Q6_K,
}

impl QType {
    /// The types [`quantize_row`] makes (the K-quants come only from files).
    pub const ALL: [QType; 4] = [QType::Q8_0, QType::Q4_0, QType::Q4_1, QType::Q5_0];
    /// The K-quants.
    pub const K: [QType; 2] = [QType::Q4_K, QType::Q6_K];

    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "q8_0",
            QType::Q4_0 => "q4_0",
            QType::Q4_1 => "q4_1",
            QType::Q5_0 => "q5_0",
            QType::Q4_K => "q4_k",
            QType::Q6_K => "q6_k",
        }
    }

    /// `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q4_k` or `q6_k` (any case).
    pub fn parse(s: &str) -> Option<QType> {
        QType::ALL
            .into_iter()
            .chain(QType::K)
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Whether moelab can quantize to it ([`QType::ALL`]).
    pub fn quantizable(self) -> bool {
        QType::ALL.contains(&self)
    }

    /// Values per block: [`QK`], or a K-quant's 256.
    pub fn block_values(self) -> usize {
        match self {
            QType::Q4_K | QType::Q6_K => kquant::QK_K,
            _ => QK,
        }
    }

    /// Bytes of one block of [`QType::block_values`] values.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q8_0 => 34,
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q4_K => 144,
            QType::Q6_K => 210,
        }
    }

    /// Bytes of a row of `cols` values (a whole number of blocks).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_values() * self.block_bytes()
    }

    /// ggml's type id (as in GGUF tensor infos).
    pub fn ggml_type(self) -> u32 {
        match self {
            QType::Q8_0 => 8,
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q5_0 => 6,
            QType::Q4_K => 12,
            QType::Q6_K => 14,
        }
    }

    pub fn from_ggml(t: u32) -> Option<QType> {
        QType::ALL
            .into_iter()
            .chain(QType::K)
            .find(|q| q.ggml_type() == t)
    }
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Appends the blocks of `x` (a whole number of [`QK`]-value blocks) quantized as ggml's
/// reference `quantize_row_*_ref` does.
pub fn quantize_row(ty: QType, x: &[f32], out: &mut Vec<u8>) {
    assert!(
        ty.quantizable(),
        "moelab has no quantizer for {}",
        ty.name()
    );
    assert!(
        x.len().is_multiple_of(QK),
        "{} values is not a whole number of 32-value blocks",
        x.len()
    );
    for b in x.chunks_exact(QK) {
        match ty {
            QType::Q8_0 => {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
            QType::Q4_0 => {
                let (d, id) = signed_scale(b, 8.0);
                out.extend(f16_bytes(d));
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..QK / 2 {
                    out.push(q(b[j]) | (q(b[j + QK / 2]) << 4));
                }
            }
            QType::Q5_0 => {
                // as Q4_0 with 32 levels: the fifth bit of value j is bit j of `qh`
                let (d, id) = signed_scale(b, 16.0);
                out.extend(f16_bytes(d));
                let q: Vec<u8> = b
                    .iter()
                    .map(|&v| ((v * id + 16.5) as i32).clamp(0, 31) as u8)
                    .collect();
                let qh = (0..QK).fold(0u32, |h, j| h | (((q[j] >> 4) as u32) << j));
                out.extend(qh.to_le_bytes());
                for j in 0..QK / 2 {
                    out.push((q[j] & 0xF) | ((q[j + QK / 2] & 0xF) << 4));
                }
            }
            QType::Q4_1 => {
                let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bytes(d));
                out.extend(f16_bytes(min));
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                for j in 0..QK / 2 {
                    out.push(q(b[j]) | (q(b[j + QK / 2]) << 4));
                }
            }
            QType::Q4_K | QType::Q6_K => unreachable!("checked above"),
        }
    }
}

/// Q4_0's and Q5_0's scale of a block, `max / -half` with `max` its value of largest
/// magnitude (the first of equals) with its sign, and the scale's inverse (0 when all are 0).
fn signed_scale(b: &[f32], half: f32) -> (f32, f32) {
    let mut max = 0f32;
    for &v in b {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -half;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// The integer values of a block and its scale (and Q4_1's minimum): `x_i = d * q_i (+ m)`.
fn block_ints(ty: QType, blk: &[u8]) -> ([i32; QK], f32, f32) {
    let mut q = [0i32; QK];
    let nib = |off: usize, i: usize| -> i32 {
        if i < QK / 2 {
            (blk[off + i] & 0xF) as i32
        } else {
            (blk[off + i - QK / 2] >> 4) as i32
        }
    };
    match ty {
        QType::Q8_0 => {
            for (i, v) in q.iter_mut().enumerate() {
                *v = blk[2 + i] as i8 as i32;
            }
            (q, f16_at(blk, 0), 0.0)
        }
        QType::Q4_0 => {
            for (i, v) in q.iter_mut().enumerate() {
                *v = nib(2, i) - 8;
            }
            (q, f16_at(blk, 0), 0.0)
        }
        QType::Q4_1 => {
            for (i, v) in q.iter_mut().enumerate() {
                *v = nib(4, i);
            }
            (q, f16_at(blk, 0), f16_at(blk, 2))
        }
        QType::Q5_0 => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            for (i, v) in q.iter_mut().enumerate() {
                *v = (nib(6, i) | (((qh >> i) & 1) << 4) as i32) - 16;
            }
            (q, f16_at(blk, 0), 0.0)
        }
        QType::Q4_K | QType::Q6_K => unreachable!("K-quants are kquant's"),
    }
}

/// Dequantizes whole blocks of `bytes` into `out` ([`QType::block_values`] values per
/// block).
pub fn dequantize_row(ty: QType, bytes: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    assert_eq!(
        bytes.len() / bb * ty.block_values(),
        out.len(),
        "dequantize_row sizes"
    );
    if !ty.quantizable() {
        return kquant::dequantize_row(ty, bytes, out);
    }
    for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        let (q, d, m) = block_ints(ty, blk);
        for (o, q) in o.iter_mut().zip(q) {
            *o = q as f32 * d + m;
        }
    }
}

/// A (rows, cols) weight matrix of quantized rows (cols a multiple of [`QK`]), row-major
/// blocks as in a GGUF tensor.
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub ty: QType,
    pub rows: usize,
    pub cols: usize,
    data: Vec<u8>,
}

impl QMatrix {
    /// Quantizes `w (rows, cols)`.
    pub fn quantize(ty: QType, w: &[f32], rows: usize, cols: usize) -> QMatrix {
        let mut data = vec![0u8; QMatrix::size(ty, rows, cols)];
        quantize_into(ty, w, rows, cols, &mut data);
        QMatrix {
            ty,
            rows,
            cols,
            data,
        }
    }

    /// Bytes of a (rows, cols) matrix of type `ty`.
    pub fn size(ty: QType, rows: usize, cols: usize) -> usize {
        rows * ty.row_bytes(cols)
    }

    /// A matrix of the blocks `data` (a GGUF tensor's bytes, e.g. a K-quant's, which moelab
    /// cannot make itself).
    pub fn from_bytes(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> QMatrix {
        assert!(
            cols.is_multiple_of(ty.block_values()),
            "{cols} columns is not a whole number of {}-value blocks",
            ty.block_values()
        );
        assert_eq!(data.len(), QMatrix::size(ty, rows, cols), "QMatrix bytes");
        QMatrix {
            ty,
            rows,
            cols,
            data,
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }

    /// The matrix as the kernels take it.
    pub fn view(&self) -> QView<'_> {
        QView {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data: &self.data,
        }
    }

    /// The raw blocks (GGUF's layout).
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        dequantize_row(self.ty, &self.data, &mut out);
        out
    }
}

/// Quantizes `w (rows, cols)` into `out` ([`QMatrix::size`] bytes), rows in parallel.
pub fn quantize_into(ty: QType, w: &[f32], rows: usize, cols: usize, out: &mut [u8]) {
    assert!(
        ty.quantizable(),
        "moelab has no quantizer for {}",
        ty.name()
    );
    assert_eq!(w.len(), rows * cols, "quantize_into sizes");
    assert!(
        cols.is_multiple_of(QK),
        "{cols} columns is not a whole number of {QK}-value blocks"
    );
    let rb = cols / QK * ty.block_bytes();
    assert_eq!(out.len(), rows * rb, "quantize_into output size");
    out.par_chunks_mut(rb.max(1))
        .zip(w.par_chunks(cols.max(1)))
        .for_each(|(o, r)| {
            let mut v = Vec::with_capacity(rb);
            quantize_row(ty, r, &mut v);
            o.copy_from_slice(&v);
        });
}

/// A borrowed quantized matrix: what [`qlinear_rows`] multiplies by.
#[derive(Clone, Copy, Debug)]
pub struct QView<'a> {
    pub ty: QType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl QView<'_> {
    pub(crate) fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }
}

/// A byte buffer for weights that are streamed once per token: 2 MiB-aligned and advised
/// to the kernel as transparent-huge-page memory (Linux), so that streaming it crosses no
/// 4 KiB page boundaries (where hardware prefetchers stop) and misses the TLB rarely.
/// Zero-filled.
pub struct WeightBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: WeightBuf owns its allocation like a Vec<u8>.
unsafe impl Send for WeightBuf {}
unsafe impl Sync for WeightBuf {}

const HUGE: usize = 2 << 20;

impl WeightBuf {
    pub fn new(len: usize) -> WeightBuf {
        if len == 0 {
            return WeightBuf {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            };
        }
        let layout = WeightBuf::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        #[cfg(target_os = "linux")]
        // SAFETY: [ptr, ptr + size) is this allocation; madvise only advises (a failure
        // leaves ordinary pages).
        unsafe {
            libc::madvise(ptr as *mut libc::c_void, layout.size(), libc::MADV_HUGEPAGE);
        }
        // SAFETY: the allocation holds layout.size() >= len bytes; zeroing after the advice
        // makes the first touch fault in huge pages.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        WeightBuf { ptr, len }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.next_multiple_of(HUGE), HUGE)
            .expect("weight buffer layout")
    }
}

impl std::ops::Deref for WeightBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr holds len initialised bytes (or is dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for WeightBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as Deref, and &mut self is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for WeightBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr, WeightBuf::layout(self.len)) };
        }
    }
}

/// Activation rows quantized per block for the dot kernels: int8 values, the scale `d` and
/// `d * sum(q)` of every block.
#[derive(Clone, Debug, Default)]
pub struct QActs {
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) cols: usize,
}

impl QActs {
    pub fn new() -> QActs {
        QActs::default()
    }

    /// Quantizes `x (n, cols)`: per block `d = max|x| / 127` and `q = round(x * 127 / max|x|)`
    /// (ties to even), as llama.cpp's AVX2 quantizer computes them (it then stores `d` as f16;
    /// here it stays f32).
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        assert!(cols.is_multiple_of(QK) && cols > 0, "QActs: {cols} columns");
        assert!(x.len().is_multiple_of(cols), "QActs: ragged rows");
        let nb = x.len() / QK;
        self.cols = cols;
        self.q.resize(x.len(), 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present; the buffers were sized for x above.
            unsafe { quantize_acts_512(x, &mut self.q, &mut self.d, &mut self.s) };
            return;
        } else if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present; the buffers were sized for x above.
            unsafe { quantize_acts_256(x, &mut self.q, &mut self.d, &mut self.s) };
            return;
        }
        quantize_acts(x, &mut self.q, &mut self.d, &mut self.s);
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.q.len().checked_div(self.cols).unwrap_or(0)
    }
}

crate::simd! {
    /// [`QActs::quantize`]'s blocks.
    fn quantize_acts(x: &[f32], q: &mut [i8], ds: &mut [f32], ss: &mut [f32]) {
        for (((xb, qb), d), s) in x
            .chunks_exact(QK)
            .zip(q.chunks_exact_mut(QK))
            .zip(ds.iter_mut())
            .zip(ss.iter_mut())
        {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let dd = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = (v * id).round_ties_even() as i8;
                sum += *q as i32;
            }
            *d = dd;
            *s = dd * sum as f32;
        }
    }
}

/// [`quantize_acts`] in AVX-512 registers, the same values: the block's maximum is exact in
/// any order, `d` and `1 / d` are computed as there, and each value is multiplied, rounded to
/// the nearest even integer and narrowed as there (its autovectorized form took 3.9 ns per
/// value against 0.32: `activation_quantizer_speed`).
///
/// # Safety
/// AVX-512F must be present; `q` holds `x.len()` values, `ds` and `ss` one per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_acts_512(x: &[f32], q: &mut [i8], ds: &mut [f32], ss: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / QK;
    assert!(q.len() >= nb * QK && ds.len() >= nb && ss.len() >= nb);
    let (xp, qp) = (x.as_ptr(), q.as_mut_ptr());
    for b in 0..nb {
        let v0 = _mm512_loadu_ps(xp.add(b * QK));
        let v1 = _mm512_loadu_ps(xp.add(b * QK + 16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let dd = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let idv = _mm512_set1_ps(id);
        let round = |v| {
            _mm512_cvtps_epi32(_mm512_roundscale_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm512_mul_ps(v, idv)))
        };
        let (i0, i1) = (round(v0), round(v1));
        _mm_storeu_si128(qp.add(b * QK) as *mut __m128i, _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128(
            qp.add(b * QK + 16) as *mut __m128i,
            _mm512_cvtepi32_epi8(i1),
        );
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        ds[b] = dd;
        ss[b] = dd * sum as f32;
    }
}

/// [`quantize_acts_512`] on AVX2 (hosts without AVX-512), the same values.
///
/// # Safety
/// AVX2 must be present; `q` holds `x.len()` values, `ds` and `ss` one per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_acts_256(x: &[f32], q: &mut [i8], ds: &mut [f32], ss: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / QK;
    assert!(q.len() >= nb * QK && ds.len() >= nb && ss.len() >= nb);
    let (xp, qp) = (x.as_ptr(), q.as_mut_ptr());
    let sign = _mm256_set1_ps(-0.0);
    for b in 0..nb {
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(xp.add(b * QK + 8 * k)));
        let a = |v| _mm256_andnot_ps(sign, v);
        let m = _mm256_max_ps(
            _mm256_max_ps(a(v[0]), a(v[1])),
            _mm256_max_ps(a(v[2]), a(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let dd = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(v[k], idv)))
        });
        // i32 -> i16 -> i8 (in range: no saturation), then the lanes back in order
        let w = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qp.add(b * QK) as *mut __m256i, w);
        let t = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t)));
        ds[b] = dd;
        ss[b] = dd * sum as f32;
    }
}

/// The fixed final sum of the 8 lane accumulators (ggml's `hsum_float_8`).
pub(crate) fn hsum8(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// Portable reference of the dot of quantized weight row `w` (`cols / QK` blocks) with row
/// `r` of `x`, in the order the module doc states.
pub fn dot_ref(ty: QType, w: &[u8], x: &QActs, r: usize) -> f32 {
    if !ty.quantizable() {
        return kquant::dot_ref(ty, w, x, r);
    }
    let nb = x.cols / QK;
    let bb = ty.block_bytes();
    assert_eq!(w.len(), nb * bb, "dot_ref: weight row of {} bytes", w.len());
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for b in 0..nb {
        let (q, dw, m) = block_ints(ty, &w[b * bb..(b + 1) * bb]);
        let xb = r * nb + b;
        let qx = &x.q[xb * QK..(xb + 1) * QK];
        let d = dw * x.d[xb];
        for (k, a) in acc.iter_mut().enumerate() {
            let isum: i32 = (4 * k..4 * k + 4).map(|i| q[i] * qx[i] as i32).sum();
            *a = d.mul_add(isum as f32, *a);
        }
        if ty == QType::Q4_1 {
            summs += m * x.s[xb];
        }
    }
    hsum8(acc) + summs
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// The kernels a quantized matmul runs: [`dot_ref`] in portable Rust, AVX2, or AVX2 with
/// AVX512-VNNI's byte dot products. All give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QPath {
    Portable,
    Avx2,
    Vnni,
}

impl QPath {
    /// The fastest this CPU runs.
    pub fn best() -> QPath {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has_avx2()
                && has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vnni")
                && has!("avx512vl")
            {
                return QPath::Vnni;
            }
            if has_avx2() {
                return QPath::Avx2;
            }
        }
        QPath::Portable
    }

    /// The paths this CPU can run.
    pub fn available() -> Vec<QPath> {
        let best = QPath::best();
        let mut v = vec![QPath::Portable];
        if best != QPath::Portable {
            v.push(QPath::Avx2);
        }
        if best == QPath::Vnni {
            v.push(QPath::Vnni);
        }
        v
    }
}

// The SIMD kernels' const type parameter (a QType as a u8; Q4_0 is 1).
const Q8_0: u8 = 0;
const Q4_1: u8 = 2;
const Q5_0: u8 = 3;

/// Bytes of a block of kernel type `t`.
const fn kernel_block_bytes(t: u8) -> usize {
    match t {
        Q8_0 => 34,
        Q4_1 => 20,
        Q5_0 => 22,
        _ => 18,
    }
}

/// The tile kernels for one instruction set: `$isum!(u8 weights, i8 activations, ones)` is
/// the i32 sums of four adjacent byte products per lane (AVX2: `maddubs` then `madd`, no
/// saturation at these magnitudes; AVX512-VNNI: one `dpbusd`), the same integers either way.
macro_rules! quant_tiles {
    ($dot:ident, $tiles:ident, $tile:ident, $feat:literal, $isum:ident, $tile4:expr, $tile44:expr) => {
        /// The AVX2 dots of `C` weight rows (`w`, consecutive rows of `rb` bytes) with `R`
        /// activation rows at once: a weight block is unpacked once for the R rows, an activation
        /// block loaded once for the C weight rows, and the C x R accumulator chains are independent.
        /// Each output's arithmetic is [`dot_ref`]'s; out[c][r] is weight row c with row `rows[r]`.
        ///
        /// # Safety
        /// AVX2, FMA and F16C must be present; `w` holds `C` rows of `x.cols / QK` blocks of type
        /// `T` at stride `rb`; every row in `rows` is below `x.rows()`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $dot<const T: u8, const C: usize, const R: usize>(
            w: &[u8],
            rb: usize,
            x: &QActs,
            rows: [usize; R],
        ) -> [[f32; R]; C] {
            use std::arch::x86_64::*;
            let nb = x.cols / QK;
            let bb = kernel_block_bytes(T);
            debug_assert!(w.len() >= (C - 1) * rb + nb * bb);
            let h = |p: *const u8| -> f32 {
                let bits = (p as *const u16).read_unaligned();
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            };
            let mask = _mm256_set1_epi8(0xF);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[_mm256_setzero_ps(); R]; C];
            let mut summs = [[0f32; R]; C];
            let wp = w.as_ptr();
            let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
            for b in 0..nb {
                let mut qxs = [_mm256_setzero_si256(); R];
                for (i, q) in qxs.iter_mut().enumerate() {
                    *q = _mm256_loadu_si256(xq.add((rows[i] * nb + b) * QK) as *const __m256i);
                }
                for c in 0..C {
                    let p = wp.add(c * rb + b * bb);
                    let dw = h(p);
                    // the block's 32 weights as bytes, element order
                    let qw = match T {
                        Q8_0 => _mm256_loadu_si256(p.add(2) as *const __m256i),
                        _ => {
                            let off = match T {
                                Q4_1 => 4,
                                Q5_0 => 6,
                                _ => 2,
                            };
                            let t = _mm_loadu_si128(p.add(off) as *const __m128i);
                            let both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
                            let nib = _mm256_and_si256(both, mask);
                            match T {
                                Q4_1 => nib,
                                // (nibble | fifth bit << 4) - 16: 0xF0 or'ed in where the
                                // bit is clear gives the same byte
                                Q5_0 => _mm256_or_si256(
                                    nib,
                                    _mm256_andnot_si256(
                                        bytes_from_bits((p.add(2) as *const u32).read_unaligned()),
                                        _mm256_set1_epi8(0xF0u8 as i8),
                                    ),
                                ),
                                _ => _mm256_sub_epi8(nib, _mm256_set1_epi8(8)),
                            }
                        }
                    };
                    let aw = _mm256_sign_epi8(qw, qw);
                    let m = if T == Q4_1 { h(p.add(2)) } else { 0.0 };
                    for i in 0..R {
                        let xb = rows[i] * nb + b;
                        let isum = if T == Q4_1 {
                            $isum!(qw, qxs[i], ones)
                        } else {
                            $isum!(aw, _mm256_sign_epi8(qxs[i], qw), ones)
                        };
                        let d = _mm256_set1_ps(dw * *xd.add(xb));
                        acc[c][i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), acc[c][i]);
                        if T == Q4_1 {
                            summs[c][i] += m * *xs.add(xb);
                        }
                    }
                }
            }
            let mut out = [[0f32; R]; C];
            for c in 0..C {
                for i in 0..R {
                    let mut a = [0f32; 8];
                    _mm256_storeu_ps(a.as_mut_ptr(), acc[c][i]);
                    out[c][i] = hsum8(a) + summs[c][i];
                }
            }
            out
        }

        /// Output columns c0..c1 for all `n` rows in tiles of 4 weight rows x 1 activation row
        /// (decoding: independent chains) or 4 x 4 (prefill: each block unpacked once for 4
        /// rows; on AVX2 two 2 x 4 tiles), then 2 x 4, edges one by one. The tiles inline into
        /// these functions whatever the codegen partition (a build once lost 13% of prefill
        /// speed to a different inlining).
        ///
        /// # Safety
        /// AVX2, FMA and F16C must be present; columns c0..c1 are rows row0+c0.. of `w`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        unsafe fn $tiles(
            w: QView,
            row0: usize,
            x: &QActs,
            c0: usize,
            c1: usize,
            n: usize,
            put: &impl Fn(usize, usize, f32),
        ) {
            // the decode loop in a function of its own: inlined beside prefill's 4 x 4 tiles
            // it decoded ~3% slower
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feat)]
            #[inline(never)]
            unsafe fn decode(
                w: QView,
                row0: usize,
                x: &QActs,
                c0: usize,
                c1: usize,
                n: usize,
                put: &impl Fn(usize, usize, f32),
            ) -> usize {
                let mut c = c0;
                while c + 4 <= c1 {
                    for r in 0..n {
                        $tile4(w, row0, x, c, r, put);
                    }
                    c += 4;
                }
                c
            }
            let mut c = c0;
            if n < 4 {
                c = decode(w, row0, x, c0, c1, n, put);
            } else {
                while c + 4 <= c1 {
                    let mut r = 0;
                    while r + 4 <= n {
                        $tile44(w, row0, x, c, r, put);
                        r += 4;
                    }
                    // (not $tile4: a second call site kept it from being inlined into the
                    // decode loop above, 5% slower decoding)
                    for r in r..n {
                        $tile::<2, 1>(w, row0, x, c, r, put);
                        $tile::<2, 1>(w, row0, x, c + 2, r, put);
                    }
                    c += 4;
                }
                while c + 2 <= c1 {
                    let mut r = 0;
                    while r + 4 <= n {
                        $tile::<2, 4>(w, row0, x, c, r, put);
                        r += 4;
                    }
                    for r in r..n {
                        $tile::<2, 1>(w, row0, x, c, r, put);
                    }
                    c += 2;
                }
            }
            for c in c..c1 {
                for r in 0..n {
                    $tile::<1, 1>(w, row0, x, c, r, put);
                }
            }
        }

        /// [`dot_avx2`] for type `ty` over weight rows `c..c+C` and activation rows `r..r+R`, stored.
        ///
        /// # Safety
        /// As [`dot_avx2`]; `put` writes output (row, column).
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $tile<const C: usize, const R: usize>(
            w: QView,
            row0: usize,
            x: &QActs,
            c: usize,
            r: usize,
            put: &impl Fn(usize, usize, f32),
        ) {
            let rb = w.row_bytes();
            let ws = &w.data[(row0 + c) * rb..(row0 + c + C) * rb];
            let rows: [usize; R] = std::array::from_fn(|i| r + i);
            let v = match w.ty {
                QType::Q8_0 => $dot::<0, C, R>(ws, rb, x, rows),
                QType::Q4_0 => $dot::<1, C, R>(ws, rb, x, rows),
                QType::Q4_1 => $dot::<2, C, R>(ws, rb, x, rows),
                QType::Q5_0 => $dot::<3, C, R>(ws, rb, x, rows),
                QType::Q4_K | QType::Q6_K => unreachable!("K-quants run kquant's tiles"),
            };
            store(&v, r, c, put);
        }
    };
}

/// A tile's outputs, `v[ci][ri]` at (row r + ri, column c + ci).
#[inline(always)]
fn store<const C: usize, const R: usize>(
    v: &[[f32; R]; C],
    r: usize,
    c: usize,
    put: &impl Fn(usize, usize, f32),
) {
    for (ci, vc) in v.iter().enumerate() {
        for (ri, &val) in vc.iter().enumerate() {
            put(r + ri, c + ci, val);
        }
    }
}

/// 32 bits as 32 bytes, 0xFF where bit i of `x` is set (byte i), else 0 (ggml's
/// `bytes_from_bits_32`).
///
/// # Safety
/// AVX2 must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bytes_from_bits(x: u32) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, bit), _mm256_set1_epi64x(-1))
}

#[cfg(target_arch = "x86_64")]
macro_rules! isum_avx2 {
    ($u:expr, $s:expr, $ones:expr) => {
        _mm256_madd_epi16(_mm256_maddubs_epi16($u, $s), $ones)
    };
}

#[cfg(target_arch = "x86_64")]
macro_rules! isum_vnni {
    ($u:expr, $s:expr, $ones:expr) => {{
        let _ = $ones;
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), $u, $s)
    }};
}

// after the isum macros, which its tiles use
pub mod kquant;

quant_tiles!(
    dot_avx2,
    tiles_avx2,
    tile_avx2,
    "avx2,fma,f16c",
    isum_avx2,
    tile_avx2::<4, 1>,
    tile44_avx2
);
quant_tiles!(
    dot_vnni,
    tiles_vnni,
    tile_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl",
    isum_vnni,
    tile4_512::<1>,
    tile4_512::<4>
);

/// [`tile_vnni`]`::<4, R>` in 512-bit registers: 4 weight rows times R activation rows (1:
/// a decode step's tile; 4: prefill's). The 4 weight rows' scales are converted by one
/// instruction and multiplied by an activation row's scale in one more, their nibbles
/// unpacked together, and two weight rows share each byte dot product (row A in lanes 0-7,
/// row B in 8-15, the activation block in both halves). Every lane does [`dot_ref`]'s
/// operations in its order (`d = dw * dx` rounded, one fused multiply-add per block, `m * s`
/// products summed apart), so the bits equal the other paths'; a third as many instructions
/// per block as the AVX2 tile, which spent them on scalar scale conversions.
///
/// # Safety
/// AVX2, FMA, F16C, AVX-512 F/BW/VL and VNNI must be present; columns c..c+4 are rows
/// row0+c.. of `w`; rows r..r+R are below `x.rows()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
#[inline]
unsafe fn tile4_512<const R: usize>(
    w: QView,
    row0: usize,
    x: &QActs,
    c: usize,
    r: usize,
    put: &impl Fn(usize, usize, f32),
) {
    let rb = w.row_bytes();
    let ws = &w.data[(row0 + c) * rb..(row0 + c + 4) * rb];
    let rows: [usize; R] = std::array::from_fn(|i| r + i);
    let v = match w.ty {
        QType::Q8_0 => dot4_512::<0, R>(ws, rb, x, rows),
        QType::Q4_0 => dot4_512::<1, R>(ws, rb, x, rows),
        QType::Q4_1 => dot4_512::<2, R>(ws, rb, x, rows),
        QType::Q5_0 => dot4_512::<3, R>(ws, rb, x, rows),
        QType::Q4_K | QType::Q6_K => unreachable!("K-quants run kquant's tiles"),
    };
    store(&v, r, c, put);
}

/// The dots of 4 weight rows (`w`, stride `rb`, blocks of type `T` as in [`dot_avx2`]) with
/// activation rows `rows`, for [`tile4_512`]: out[c][i] is weight row c with `rows[i]`.
///
/// # Safety
/// As [`tile4_512`]; `w` holds 4 rows of `x.cols / QK` blocks at stride `rb`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
#[inline]
unsafe fn dot4_512<const T: u8, const R: usize>(
    w: &[u8],
    rb: usize,
    x: &QActs,
    rows: [usize; R],
) -> [[f32; R]; 4] {
    use std::arch::x86_64::*;
    let nb = x.cols / QK;
    let bb = kernel_block_bytes(T);
    debug_assert!(w.len() >= 3 * rb + nb * bb);
    let wp = w.as_ptr();
    let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
    let mask = _mm512_set1_epi8(0xF);
    let zero = _mm512_setzero_si512();
    // 64-bit elements of (low nibbles, high nibbles) of rows A..D (16 bytes each) into
    // [A's 32 weights | B's] and [C's | D's], element order
    let (ab, cd) = (
        _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11),
        _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15),
    );
    // lanes of the 4 (Q4_1: 8, with the minimums) converted scales to broadcast per row pair
    let (sab, scd) = if T == Q4_1 {
        (
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
            _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
        )
    } else {
        (
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
            _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
        )
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // Q4_1: lane 2c + 1 of summs[i] sums weight row c's m * s (the even lanes are unused)
    let mut summs = [_mm256_setzero_ps(); R];
    let rd = |p: *const u8| (p as *const u16).read_unaligned() as i32;
    for b in 0..nb {
        let p = [0, 1, 2, 3].map(|c| wp.add(c * rb + b * bb));
        // d (and m) of the 4 weight rows as f32
        let (dm8, d4) = if T == Q4_1 {
            let dm = |c: usize| (p[c] as *const i32).read_unaligned();
            let h = _mm_setr_epi32(dm(0), dm(1), dm(2), dm(3));
            (_mm256_cvtph_ps(h), _mm_setzero_ps())
        } else {
            let h = _mm_setr_epi16(
                rd(p[0]) as i16,
                rd(p[1]) as i16,
                rd(p[2]) as i16,
                rd(p[3]) as i16,
                0,
                0,
                0,
                0,
            );
            (_mm256_setzero_ps(), _mm_cvtph_ps(h))
        };
        // the weights of rows (A, B) and (C, D) as bytes
        let (w_ab, w_cd) = if T == Q8_0 {
            let two = |c: usize| {
                _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(p[c].add(2) as *const __m256i)),
                    _mm256_loadu_si256(p[c + 1].add(2) as *const __m256i),
                )
            };
            (two(0), two(2))
        } else {
            let off = match T {
                Q4_1 => 4,
                Q5_0 => 6,
                _ => 2,
            };
            let l = |c: usize| _mm_loadu_si128(p[c].add(off) as *const __m128i);
            let v = _mm512_inserti32x4::<3>(
                _mm512_inserti32x4::<2>(
                    _mm512_inserti32x4::<1>(_mm512_castsi128_si512(l(0)), l(1)),
                    l(2),
                ),
                l(3),
            );
            let lo = _mm512_and_si512(v, mask);
            let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            let (x_ab, x_cd) = (
                _mm512_permutex2var_epi64(lo, ab, hi),
                _mm512_permutex2var_epi64(lo, cd, hi),
            );
            match T {
                Q4_1 => (x_ab, x_cd),
                Q5_0 => {
                    // 0xF0 or'ed into the bytes whose fifth bit is clear: (q | b << 4) - 16
                    let qh = |c: usize| (p[c].add(2) as *const u32).read_unaligned() as u64;
                    let f0 = _mm512_set1_epi8(0xF0u8 as i8);
                    let clear = |a: usize| !(qh(a) | (qh(a + 1) << 32));
                    (
                        _mm512_or_si512(x_ab, _mm512_maskz_mov_epi8(clear(0), f0)),
                        _mm512_or_si512(x_cd, _mm512_maskz_mov_epi8(clear(2), f0)),
                    )
                }
                _ => {
                    let eight = _mm512_set1_epi8(8);
                    (_mm512_sub_epi8(x_ab, eight), _mm512_sub_epi8(x_cd, eight))
                }
            }
        };
        // signed weights: |w| times x with w's sign (as the AVX2 path's sign_epi8 pair;
        // where w is 0 the product is 0 either way)
        let (a_ab, a_cd) = (_mm512_abs_epi8(w_ab), _mm512_abs_epi8(w_cd));
        let (n_ab, n_cd) = (_mm512_movepi8_mask(w_ab), _mm512_movepi8_mask(w_cd));
        for i in 0..R {
            let xb = rows[i] * nb + b;
            let qx = _mm512_broadcast_i64x4(_mm256_loadu_si256(xq.add(xb * QK) as *const __m256i));
            // the 4 weight rows' d times this activation block's d (Q4_1: and m times s)
            let scales = if T == Q4_1 {
                let xds =
                    _mm256_unpacklo_ps(_mm256_set1_ps(*xd.add(xb)), _mm256_set1_ps(*xs.add(xb)));
                let prods = _mm256_mul_ps(dm8, xds);
                summs[i] = _mm256_add_ps(summs[i], prods);
                _mm512_castps256_ps512(prods)
            } else {
                _mm512_castps128_ps512(_mm_mul_ps(d4, _mm_set1_ps(*xd.add(xb))))
            };
            let (d_ab, d_cd) = (
                _mm512_permutexvar_ps(sab, scales),
                _mm512_permutexvar_ps(scd, scales),
            );
            let (s_ab, s_cd) = if T == Q4_1 {
                (
                    _mm512_dpbusd_epi32(zero, w_ab, qx),
                    _mm512_dpbusd_epi32(zero, w_cd, qx),
                )
            } else {
                (
                    _mm512_dpbusd_epi32(zero, a_ab, _mm512_mask_sub_epi8(qx, n_ab, zero, qx)),
                    _mm512_dpbusd_epi32(zero, a_cd, _mm512_mask_sub_epi8(qx, n_cd, zero, qx)),
                )
            };
            acc[i][0] = _mm512_fmadd_ps(d_ab, _mm512_cvtepi32_ps(s_ab), acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(d_cd, _mm512_cvtepi32_ps(s_cd), acc[i][1]);
        }
    }
    let mut out = [[0f32; R]; 4];
    for i in 0..R {
        let mut a = [0f32; 32];
        _mm512_storeu_ps(a.as_mut_ptr(), acc[i][0]);
        _mm512_storeu_ps(a.as_mut_ptr().add(16), acc[i][1]);
        let mut sm = [0f32; 8];
        _mm256_storeu_ps(sm.as_mut_ptr(), summs[i]);
        for (c, o) in out.iter_mut().enumerate() {
            let lanes: [f32; 8] = a[8 * c..8 * c + 8].try_into().expect("8 lanes");
            o[i] = hsum8(lanes) + if T == Q4_1 { sm[2 * c + 1] } else { 0.0 };
        }
    }
    out
}

/// Prefill's AVX2 tile for 4 weight rows: two 2 x 4 tiles.
///
/// # Safety
/// As [`tile_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile44_avx2(
    w: QView,
    row0: usize,
    x: &QActs,
    c: usize,
    r: usize,
    put: &impl Fn(usize, usize, f32),
) {
    tile_avx2::<2, 4>(w, row0, x, c, r, put);
    tile_avx2::<2, 4>(w, row0, x, c + 2, r, put);
}

/// Output columns per parallel task of [`qlinear_rows`] (at least).
const QCOLS_PER_TASK: usize = 16;

/// `out (N,O) [+]= x (N,I) @ w[row0..row0+O]^T` with quantized weights: `x` holds the N
/// activation rows quantized ([`QActs::quantize`] with I columns), output column c uses
/// weight row `row0 + c`. Every output is one [`dot_ref`]-ordered dot, so the bits do not
/// depend on N, on the thread count or on the CPU's path (AVX2 or portable).
pub fn qlinear_rows(out: &mut [f32], x: &QActs, w: QView, row0: usize, o: usize, accumulate: bool) {
    qlinear_rows_on(QPath::best(), out, x, w, row0, o, accumulate);
}

/// [`qlinear_rows`] on the given kernels (tests compare them).
pub fn qlinear_rows_on(
    path: QPath,
    out: &mut [f32],
    x: &QActs,
    w: QView,
    row0: usize,
    o: usize,
    accumulate: bool,
) {
    assert!(
        QPath::available().contains(&path),
        "{path:?} kernels on this CPU"
    );
    let n = x.rows();
    assert_eq!(
        x.cols, w.cols,
        "qlinear_rows: activations of {} columns",
        x.cols
    );
    assert!(
        row0 + o <= w.rows,
        "qlinear_rows: rows {row0}+{o} of {}",
        w.rows
    );
    assert_eq!(out.len(), n * o, "qlinear_rows out len");
    assert!(
        w.cols.is_multiple_of(w.ty.block_values()),
        "qlinear_rows: {} columns of {}",
        w.cols,
        w.ty.name()
    );
    let rb = w.row_bytes();
    let k = !w.ty.quantizable();
    let ptr = crate::par::SendPtr(out.as_mut_ptr());
    let threads = rayon::current_num_threads().max(1);
    // in a team, two halves (as linear_rows)
    let team = n * o * w.cols >= 1 << 12 && crate::par::in_team();
    let per = if team {
        o.div_ceil(2).max(QCOLS_PER_TASK)
    } else {
        o.div_ceil(threads * 4).max(QCOLS_PER_TASK)
    };
    let tasks = o.div_ceil(per);
    let run = |t: usize| {
        let (c0, c1) = (t * per, ((t + 1) * per).min(o));
        let put = |r: usize, c: usize, v: f32| {
            // SAFETY: column c is in c0..c1, owned by this task; r < n.
            let dst = unsafe { &mut *ptr.get().add(r * o + c) };
            *dst = if accumulate { *dst + v } else { v };
        };
        #[cfg(target_arch = "x86_64")]
        match path {
            // SAFETY: the features were checked (QPath::available); c0..c1 are this task's.
            QPath::Vnni if k => return unsafe { kquant::tiles_vnni(w, row0, x, c0, c1, n, &put) },
            QPath::Avx2 if k => return unsafe { kquant::tiles_avx2(w, row0, x, c0, c1, n, &put) },
            QPath::Vnni => return unsafe { tiles_vnni(w, row0, x, c0, c1, n, &put) },
            QPath::Avx2 => return unsafe { tiles_avx2(w, row0, x, c0, c1, n, &put) },
            QPath::Portable => {}
        }
        for c in c0..c1 {
            let wr = &w.data[(row0 + c) * rb..(row0 + c + 1) * rb];
            for r in 0..n {
                put(r, c, dot_ref(w.ty, wr, x, r));
            }
        }
    };
    // NOTE: parallel also inside a rayon worker (the serving engine decodes on one): a
    // decode step has no outer parallel loop to leave the other cores to.
    let teamed = team && tasks > 1 && crate::par::team_for_each(tasks, &run);
    if teamed {
        return;
    }
    if tasks <= 1 || n * o * w.cols < 1 << 17 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                // mixed magnitudes, some exact zeros, a constant block
                if i / QK == 3 {
                    0.25
                } else if i % 17 == 0 {
                    0.0
                } else {
                    rng.gen_range(-1.0f32..1.0) * if i % 5 == 0 { 4.0 } else { 1.0 }
                }
            })
            .collect()
    }

    /// Every path this CPU runs equals [`dot_ref`] bit for bit, for the first 1..=n rows of
    /// `x` and each (first weight row, columns) range.
    pub(super) fn check_paths(m: &QMatrix, x: &[f32], n: usize, ranges: &[(usize, usize)]) {
        let (i, rb) = (m.cols, m.row_bytes());
        for nd in 1..=n {
            let mut few = QActs::new();
            few.quantize(&x[..nd * i], i);
            for &(row0, oo) in ranges {
                for path in QPath::available() {
                    let mut p = vec![0.0; nd * oo];
                    qlinear_rows_on(path, &mut p, &few, m.view(), row0, oo, false);
                    for r in 0..nd {
                        for c in 0..oo {
                            let wr = &m.bytes()[(row0 + c) * rb..(row0 + c + 1) * rb];
                            let want = dot_ref(m.ty, wr, &few, r);
                            assert_eq!(
                                p[r * oo + c].to_bits(),
                                want.to_bits(),
                                "{:?} {path:?} {nd} rows ({r},{c}) from row {row0}",
                                m.ty
                            );
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 and AVX2 activation quantizers give the portable one's values: random
    /// blocks of mixed magnitudes, an all-zero block, exact halves (ties) and the block
    /// maximum.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn activation_quantizers_agree() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut x: Vec<f32> = (0..64 * QK)
            .map(|i| rng.gen_range(-1.0f32..1.0) * [1e-3, 1.0, 30.0][i / QK % 3])
            .collect();
        x[QK..2 * QK].fill(0.0);
        // block 2: maximum 127, so x * 127 / 127 = x and halves are ties
        for (j, v) in x[2 * QK..3 * QK].iter_mut().enumerate() {
            *v = if j == 0 { 127.0 } else { j as f32 - 15.5 };
        }
        let (mut q0, mut d0, mut s0) = (vec![0i8; x.len()], vec![0f32; 64], vec![0f32; 64]);
        quantize_acts(&x, &mut q0, &mut d0, &mut s0);
        assert_eq!(&q0[2 * QK..2 * QK + 4], &[127, -14, -14, -12]);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        type Quantizer = unsafe fn(&[f32], &mut [i8], &mut [f32], &mut [f32]);
        let mut paths: Vec<(&str, Quantizer)> = vec![];
        if std::arch::is_x86_feature_detected!("avx2") {
            paths.push(("AVX2", quantize_acts_256));
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            paths.push(("AVX-512", quantize_acts_512));
        }
        for (name, f) in paths {
            let (mut q1, mut d1, mut s1) = (vec![0i8; x.len()], vec![0f32; 64], vec![0f32; 64]);
            // SAFETY: the path's features were detected; buffers sized for x.
            unsafe { f(&x, &mut q1, &mut d1, &mut s1) };
            assert_eq!(q0, q1, "{name}");
            assert_eq!(bits(&d0), bits(&d1), "{name}");
            assert_eq!(bits(&s0), bits(&s1), "{name}");
        }
    }

    /// Speed of the activation quantizers (a benchmark, not a check: `cargo test --release -p
    /// kernels activation_quantizer_speed -- --ignored --nocapture`).
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn activation_quantizer_speed() {
        let x: Vec<f32> = (0..1 << 20)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.001 - 0.5)
            .collect();
        let nb = x.len() / QK;
        let (mut q, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb]);
        type Quantizer = unsafe fn(&[f32], &mut [i8], &mut [f32], &mut [f32]);
        let mut paths: Vec<(&str, Quantizer)> =
            vec![("portable", |a, b, c, d| quantize_acts(a, b, c, d))];
        if std::arch::is_x86_feature_detected!("avx2") {
            paths.push(("avx2", quantize_acts_256));
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            paths.push(("avx512", quantize_acts_512));
        }
        for _ in 0..3 {
            for &(name, f) in &paths {
                let t = std::time::Instant::now();
                for _ in 0..20 {
                    // SAFETY: the path's features were detected; buffers sized for x.
                    unsafe { f(&x, &mut q, &mut d, &mut s) };
                }
                let ns = t.elapsed().as_nanos() as f64 / (20.0 * x.len() as f64);
                println!("{name}: {ns:.3} ns per value");
            }
        }
    }

    /// Every SIMD path equals the reference on arbitrary block bytes, not only the ones
    /// moelab's quantizers make: a GGUF file may hold any (Q8_0 bytes of -128, Q4_1
    /// minimums of either sign, any Q5_0 high bits), with f16 scales of moderate size.
    #[test]
    fn dots_equal_reference_on_random_blocks() {
        let (n, i, o) = (6, 4 * QK, 11);
        let mut rng = ChaCha8Rng::seed_from_u64(33);
        let x: Vec<f32> = (0..n * i).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        for ty in QType::ALL {
            let bb = ty.block_bytes();
            let mut bytes: Vec<u8> = (0..o * i / QK * bb).map(|_| rng.gen()).collect();
            for b in bytes.chunks_exact_mut(bb) {
                let d = half::f16::from_f32(rng.gen_range(1e-3f32..0.05));
                b[..2].copy_from_slice(&d.to_le_bytes());
                if ty == QType::Q4_1 {
                    let m = half::f16::from_f32(rng.gen_range(-0.1f32..0.1));
                    b[2..4].copy_from_slice(&m.to_le_bytes());
                }
            }
            if ty == QType::Q8_0 {
                bytes[2] = 0x80; // -128
            }
            let m = QMatrix::from_bytes(ty, o, i, bytes);
            check_paths(&m, &x, n, &[(0, o), (3, o - 5)]);
        }
    }

    /// Dequantize then quantize gives back the same blocks: a GGUF file's weights survive
    /// moelab's f32 import and re-quantization unchanged.
    #[test]
    fn quantize_dequantize_round_trip_is_exact() {
        for ty in QType::ALL {
            let w = random(64 * QK, 1);
            let m = QMatrix::quantize(ty, &w, 8, 8 * QK);
            let back = QMatrix::quantize(ty, &m.dequantize(), 8, 8 * QK);
            assert_eq!(m.bytes(), back.bytes(), "{ty:?}");
            // and the dequantized values are close to the originals
            let err = m
                .dequantize()
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            // half a step (Q4_0: a whole one where +8 steps clamp to +7); blocks reach |4|
            let tol = match ty {
                QType::Q8_0 => 0.02,
                QType::Q4_0 => 0.55,
                QType::Q4_1 => 0.3,
                QType::Q5_0 => 0.3,
                QType::Q4_K | QType::Q6_K => unreachable!("not in ALL"),
            };
            assert!(err < tol, "{ty:?}: worst error {err}");
        }
    }

    /// Every dot equals the portable reference bit for bit (AVX2 where present), for any
    /// number of rows; the block integer sums are exact and the result is close to the f64
    /// dot of the dequantized values.
    #[test]
    fn qlinear_rows_equals_reference() {
        let (n, i, o) = (7, 5 * QK, 37);
        let x = random(n * i, 2);
        let w = random(o * i, 3);
        let mut acts = QActs::new();
        acts.quantize(&x, i);
        for ty in QType::ALL {
            let m = QMatrix::quantize(ty, &w, o, i);
            let mut got = vec![0.0; n * o];
            qlinear_rows(&mut got, &acts, m.view(), 0, o, false);
            // every kernel this CPU runs gives the same bits
            for path in QPath::available() {
                let mut p = vec![0.0; n * o];
                qlinear_rows_on(path, &mut p, &acts, m.view(), 0, o, false);
                assert_eq!(p, got, "{ty:?}: {path:?} kernels");
            }
            let wd = m.dequantize();
            for r in 0..n {
                for c in 0..o {
                    let rb = m.row_bytes();
                    let want = dot_ref(ty, &m.bytes()[c * rb..(c + 1) * rb], &acts, r);
                    assert_eq!(got[r * o + c].to_bits(), want.to_bits(), "{ty:?} ({r},{c})");
                    let exact: f64 = (0..i)
                        .map(|k| wd[c * i + k] as f64 * x[r * i + k] as f64)
                        .sum();
                    let scale: f64 = (0..i)
                        .map(|k| (wd[c * i + k] as f64 * x[r * i + k] as f64).abs())
                        .sum();
                    assert!(
                        (want as f64 - exact).abs() <= 0.02 * scale + 1e-6,
                        "{ty:?} ({r},{c}): {want} vs {exact}"
                    );
                }
            }
            // every tile shape on every path against the reference: 1-3 rows (decode: 4 x 1
            // tiles), 4-7 rows (4 x 4 tiles and leftover rows), 37 columns (4-column tiles
            // and one left) and 35 from row 1 (4-column tiles, a 2-column one, one left)
            check_paths(&m, &x, n, &[(0, o), (1, o - 2)]);
            // one row alone, a row range of the matrix, and accumulation
            let mut one = QActs::new();
            one.quantize(&x[2 * i..3 * i], i);
            let mut part = vec![1.0; 5];
            qlinear_rows(&mut part, &one, m.view(), 30, 5, true);
            for c in 0..5 {
                assert_eq!(part[c], 1.0 + got[2 * o + 30 + c], "{ty:?} row range");
            }
            // thread count does not matter
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let mut three = vec![0.0; n * o];
            pool.install(|| qlinear_rows(&mut three, &acts, m.view(), 0, o, false));
            assert_eq!(three, got, "{ty:?} threads");
        }
    }
}
