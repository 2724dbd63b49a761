//! bf16 matrix multiplication with f32 accumulation, for `train.precision = "bf16"`.
//!
//! The result is defined exactly, so the AVX512-BF16 kernel, the scalar reference and any
//! thread count give the same bits:
//!
//! - both operands are rounded to bf16: round to nearest even, subnormals to zero, NaN
//!   quieted ([`round`]);
//! - every output is one f32 accumulator: it starts at 0 (or at `out` when accumulating, a
//!   subnormal read as 0) and takes the reduction in pairs, `k = 2p, 2p + 1` in order of `p`
//!   (a zero pair pads an odd K): `acc = acc + a[2p+1] b[2p+1]`, then `acc = acc + a[2p] b[2p]`,
//!   each product exact and each sum rounded to nearest even, a subnormal sum flushed to zero
//!   ([`dot_step`]).
//!
//! That is one lane of `vdpbf16ps` as Intel's SDM describes it, and as it measured on an AMD
//! Zen 4 (random operands over the whole exponent range, subnormals included: every lane
//! equal). The kernel keeps each accumulator in a register for a block of pairs and in `out`
//! between blocks (an f32 store and load change nothing), so blocking and threads only decide
//! who computes an output, never the order it is summed in.
//!
//! Layout of the fast path (BLIS style): B is packed per block of [`KCP`] pairs into panels of
//! [`NR`] columns, `[pair][column]` as u32 (two bf16); A into panels of [`MR`] rows, `[row][pair]`
//! when A is contiguous along K, `[pair][row]` when along M (so neither needs a transpose);
//! a 14 x 32 register tile (28 accumulators) broadcasts one A pair per row and multiplies two
//! B vectors. Hosts without AVX512-BF16 run the scalar reference (exact, slow).

use crate::matmul::View;
use crate::par::{in_worker, SendPtr};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of the register tile.
pub const MR: usize = 14;
/// Columns of the register tile (two 16-lane vectors).
pub const NR: usize = 32;
/// K pairs per packed block (a 14 x 128-pair A panel is 7 KiB, a B panel 16 KiB: both stay
/// in L1 while a tile is computed).
pub const KCP: usize = 128;
/// Columns per packed B block.
const NC: usize = 64 * NR;
/// Most row panels per parallel task (a 112-row A chunk of 57 KiB, kept in L2).
const MAX_ROW_PANELS: usize = 8;

/// f32 to bf16, as `vcvtneps2bf16` rounds: nearest even, subnormals to (signed) zero, NaN
/// quieted.
pub fn round(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else if x.is_subnormal() {
        ((b >> 16) & 0x8000) as u16
    } else {
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// bf16 to f32 (exact).
pub fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Two consecutive K elements as one packed pair: `lo` in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    round(lo) as u32 | (round(hi) as u32) << 16
}

fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// One lane of `vdpbf16ps`: `acc + a.hi b.hi`, rounded, then `+ a.lo b.lo`, rounded.
///
/// NOTE: the f64 sum rounds once to f32 exactly: a bf16 product has 16 significant bits, so
/// the exact sum of it and an f32 either fits in f64's 53 bits or lies so far below the f32
/// result's last bit that neither rounding can land on an f32 halfway point.
pub fn dot_step(acc: f32, a: u32, b: u32) -> f32 {
    let prod = |s: u32| widen((a >> s) as u16) as f64 * widen((b >> s) as u16) as f64;
    let acc = flush((flush(acc) as f64 + prod(16)) as f32);
    flush((acc as f64 + prod(0)) as f32)
}

/// True when this CPU has AVX512-BF16 (the fast path); otherwise the scalar reference runs.
pub fn has_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn at(v: &View, i: usize, j: usize) -> f32 {
    v.data[i * v.rs + j * v.cs]
}

/// The packed pair `p` of row `i` of A (or column `j` of B with `trans`): zero past K.
fn pair_at(v: &View, i: usize, p: usize, k: usize, trans: bool) -> u32 {
    let get = |kk: usize| {
        if kk >= k {
            0.0
        } else if trans {
            at(v, kk, i)
        } else {
            at(v, i, kk)
        }
    };
    pair(get(2 * p), get(2 * p + 1))
}

/// The scalar definition: `out[i*out_rs + j] [+]= sum_p a(i,p) b(p,j)` in the semantics of the
/// module doc, one output at a time.
#[allow(clippy::too_many_arguments)]
pub fn matmul_reference(
    out: &mut [f32],
    out_rs: usize,
    a: View,
    b: View,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    for i in 0..m {
        reference_row(
            &mut out[i * out_rs..i * out_rs + n],
            &a,
            &b,
            i,
            k,
            accumulate,
        );
    }
}

fn reference_row(row: &mut [f32], a: &View, b: &View, i: usize, k: usize, accumulate: bool) {
    let kp = k.div_ceil(2);
    let bp: Vec<u32> = (0..row.len() * kp)
        .map(|q| pair_at(b, q / kp, q % kp, k, true))
        .collect();
    reference_row_packed(row, a, &bp, i, k, accumulate);
}

/// [`reference_row`] with B's pairs packed column by column (`bp[j * kp + p]`).
fn reference_row_packed(
    row: &mut [f32],
    a: &View,
    bp: &[u32],
    i: usize,
    k: usize,
    accumulate: bool,
) {
    let kp = k.div_ceil(2);
    if kp == 0 {
        if !accumulate {
            row.fill(0.0);
        }
        return;
    }
    let ap: Vec<u32> = (0..kp).map(|p| pair_at(a, i, p, k, false)).collect();
    for (o, col) in row.iter_mut().zip(bp.chunks_exact(kp)) {
        let mut acc = if accumulate { *o } else { 0.0 };
        for (&x, &y) in ap.iter().zip(col) {
            acc = dot_step(acc, x, y);
        }
        *o = acc;
    }
}

/// `out (M,N) [+]= op(a) (M,K) @ op(b) (K,N)` in bf16 with f32 accumulation; the arguments of
/// [`crate::matmul::matmul`].
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let (av, bv) = crate::matmul::views(out.len(), a, ta, b, tb, m, n, k);
    // SAFETY: `out` is a unique borrow of (m, n) (checked by `views`).
    unsafe { matmul_raw(out.as_mut_ptr(), n, av, bv, m, n, k, accumulate) };
}

/// [`crate::matmul::matmul_raw`] in bf16: strided operands, a raw destination, parallel only
/// when called outside a rayon worker (as [`matmul`]).
///
/// # Safety
/// As [`crate::matmul::matmul_raw`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw(
    out: *mut f32,
    out_rs: usize,
    a: View,
    b: View,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    crate::matmul::check_operands(&a, &b, m, n, k);
    let serial = rayon::current_num_threads() <= 1 || in_worker();
    // SAFETY: the caller vouches for `out`; a, b cover (m, k) and (k, n) (checked).
    unsafe { run(out, out_rs, a, b, m, n, k, accumulate, serial) };
}

/// [`matmul`] after its checks, with the choice of parallelism made by the caller.
///
/// # Safety
/// `out` must be valid for writes at `i*out_rs + j` for i < m, j < n, no other thread may
/// touch those elements during the call, and a, b must cover (m, k) and (k, n).
#[allow(clippy::too_many_arguments)]
unsafe fn run(
    out: *mut f32,
    out_rs: usize,
    a: View,
    b: View,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    serial: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if has_hardware() {
        // SAFETY: AVX512-BF16 and AVX512-BW are present (checked); the caller vouches for
        // `out`, a and b.
        unsafe { fast::matmul(out, out_rs, &a, &b, m, n, k, accumulate, serial) };
        return;
    }
    // SAFETY: as this function's.
    unsafe { reference_rows(out, out_rs, a, b, m, n, k, accumulate, serial) }
}

/// The path of CPUs without AVX512-BF16: the definition itself, B's pairs packed once, one
/// task per row.
///
/// # Safety
/// As [`run`].
#[allow(clippy::too_many_arguments)]
unsafe fn reference_rows(
    out: *mut f32,
    out_rs: usize,
    a: View,
    b: View,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    serial: bool,
) {
    let kp = k.div_ceil(2);
    let bp: Vec<u32> = (0..n * kp)
        .map(|q| pair_at(&b, q / kp, q % kp, k, true))
        .collect();
    let ptr = SendPtr(out);
    let row = |i: usize| {
        // SAFETY: row i of `out` (n elements at i*out_rs) is written by this task only.
        let row = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(i * out_rs), n) };
        reference_row_packed(row, &a, &bp, i, k, accumulate);
    };
    if serial {
        (0..m).for_each(row);
    } else {
        (0..m).into_par_iter().for_each(row);
    }
}

thread_local! {
    /// The packed B block of the calling thread and each worker's packed A chunk, kept
    /// between calls (a fresh 1 MiB buffer per matmul costs its page faults every time).
    static PACKED_B: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static PACKED_A: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod fast {
    use super::*;
    use std::arch::x86_64::*;

    /// How A is packed: `[row][pair]` (row stride KCP) or `[pair][row]` (pair stride MR).
    pub(crate) fn a_by_rows(a: &View) -> bool {
        a.cs == 1 || a.rs != 1
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn matmul(
        out: *mut f32,
        out_rs: usize,
        a: &View,
        b: &View,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
        serial: bool,
    ) {
        let kp = k.div_ceil(2);
        if kp == 0 {
            if !accumulate {
                for i in 0..m {
                    std::slice::from_raw_parts_mut(out.add(i * out_rs), n).fill(0.0);
                }
            }
            return;
        }
        let mpan = m.div_ceil(MR);
        let by_rows = a_by_rows(a);
        let threads = if serial {
            1
        } else {
            rayon::current_num_threads()
        };
        let kblocks = kp.div_ceil(KCP);
        let out = SendPtr(out);
        PACKED_B.with(|cell| {
            let mut guard = cell.try_borrow_mut();
            let mut fresh = Vec::new();
            let bbuf = match guard.as_mut() {
                Ok(g) => &mut **g,
                Err(_) => &mut fresh,
            };
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                let npan = nc.div_ceil(NR);
                // all of B's K for these columns, [k block][panel][pair][column]: one pass
                // (one barrier), then every task runs all its K blocks
                let blen = kblocks * npan * KCP * NR;
                if bbuf.len() < blen {
                    bbuf.resize(blen, 0);
                }
                let pack_b_panel = |(q, dst): (usize, &mut [u32])| {
                    let (kb, pj) = (q / npan, q % npan);
                    let (pc, cols) = (kb * KCP, NR.min(nc - pj * NR));
                    let kcp = KCP.min(kp - pc);
                    // SAFETY: the features of this function are present.
                    unsafe { pack_b(dst, b, pc, kcp, jc + pj * NR, cols, k) }
                };
                let bpk = &mut bbuf[..blen];
                if serial {
                    bpk.chunks_mut(KCP * NR).enumerate().for_each(pack_b_panel);
                } else {
                    bpk.par_chunks_mut(KCP * NR)
                        .enumerate()
                        .for_each(pack_b_panel);
                }
                let bpk = &*bpk;
                // tasks: equal runs of row panels (a multiple of the threads, at most
                // MAX_ROW_PANELS each); too few rows for two per thread: column groups too
                let row_tasks = mpan
                    .div_ceil(MAX_ROW_PANELS)
                    .next_multiple_of(threads)
                    .min(mpan);
                let col_tasks = (2 * threads).div_ceil(row_tasks).min(npan);
                let group = npan.div_ceil(col_tasks);
                let run = |t: usize| {
                    let (ri, cj) = (t % row_tasks, t / row_tasks);
                    let (p0, p1) = (ri * mpan / row_tasks, (ri + 1) * mpan / row_tasks);
                    PACKED_A.with(|cell| {
                        let mut guard = cell.try_borrow_mut();
                        let mut fresh = Vec::new();
                        let abuf = match guard.as_mut() {
                            Ok(g) => &mut **g,
                            Err(_) => &mut fresh,
                        };
                        let alen = (p1 - p0) * MR * KCP;
                        if abuf.len() < alen {
                            abuf.resize(alen, 0);
                        }
                        for kb in 0..kblocks {
                            let pc = kb * KCP;
                            let kcp = KCP.min(kp - pc);
                            // this chunk of A's rows, packed where it stays in L2
                            for (q, dst) in abuf[..alen].chunks_mut(MR * KCP).enumerate() {
                                let pi = p0 + q;
                                let rows = MR.min(m - pi * MR);
                                // SAFETY: the features of this function are present.
                                unsafe { pack_a(dst, a, pc, kcp, pi * MR, rows, k, by_rows) }
                            }
                            let load_c = accumulate || kb > 0;
                            for pj in cj * group..((cj + 1) * group).min(npan) {
                                let bp = &bpk[(kb * npan + pj) * KCP * NR..];
                                let cols = NR.min(nc - pj * NR);
                                for pi in p0..p1 {
                                    let rows = MR.min(m - pi * MR);
                                    let ap = &abuf[(pi - p0) * MR * KCP..];
                                    // SAFETY: this task owns the output rows of its row
                                    // panels and the columns of its column group; the tile
                                    // lies inside (m, n).
                                    unsafe {
                                        let c = out.get().add(pi * MR * out_rs + jc + pj * NR);
                                        tile(ap, bp, kcp, c, out_rs, rows, cols, load_c, by_rows);
                                    }
                                }
                            }
                        }
                    });
                };
                let tasks = row_tasks * col_tasks;
                if serial {
                    (0..tasks).for_each(run);
                } else {
                    (0..tasks).into_par_iter().with_max_len(1).for_each(run);
                }
            }
        });
    }

    /// One MR x NR output tile (a partial one through a local buffer).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(crate) unsafe fn tile(
        ap: &[u32],
        bp: &[u32],
        kcp: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        load_c: bool,
        by_rows: bool,
    ) {
        let kernel = |c: *mut f32, ldc: usize| {
            // SAFETY: the panels hold MR x KCP and KCP x NR pairs; c is an MR x NR tile.
            unsafe {
                if by_rows {
                    kernel::<KCP, 1>(kcp, ap.as_ptr(), bp.as_ptr(), c, ldc, load_c)
                } else {
                    kernel::<1, MR>(kcp, ap.as_ptr(), bp.as_ptr(), c, ldc, load_c)
                }
            }
        };
        if rows == MR && cols == NR {
            kernel(c, ldc);
            return;
        }
        let mut t = [0.0f32; MR * NR];
        if load_c {
            for i in 0..rows {
                for j in 0..cols {
                    t[i * NR + j] = *c.add(i * ldc + j);
                }
            }
        }
        kernel(t.as_mut_ptr(), NR);
        for i in 0..rows {
            for j in 0..cols {
                *c.add(i * ldc + j) = t[i * NR + j];
            }
        }
    }

    /// The register tile: `c (MR, NR) [+]= A panel @ B panel` over `kcp` pairs. A pair of row
    /// i is at `a[i * AR + p * AP]`, B's at `b[p * NR..p * NR + NR]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn kernel<const AR: usize, const AP: usize>(
        kcp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        if load_c {
            for i in 0..MR {
                acc[2 * i] = _mm512_loadu_ps(c.add(i * ldc));
                acc[2 * i + 1] = _mm512_loadu_ps(c.add(i * ldc + 16));
            }
        }
        for p in 0..kcp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_epi32(b.add(p * NR) as *const i32));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_epi32(b.add(p * NR + 16) as *const i32));
            for i in 0..MR {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(i * AR + p * AP) as i32));
                acc[2 * i] = _mm512_dpbf16_ps(acc[2 * i], av, b0);
                acc[2 * i + 1] = _mm512_dpbf16_ps(acc[2 * i + 1], av, b1);
            }
        }
        for i in 0..MR {
            _mm512_storeu_ps(c.add(i * ldc), acc[2 * i]);
            _mm512_storeu_ps(c.add(i * ldc + 16), acc[2 * i + 1]);
        }
    }

    /// 16 lanes of `lo` and 16 of `hi` rounded to bf16 and interleaved: pair j = (lo[j], hi[j]).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn interleave(lo: __m512, hi: __m512) -> __m512i {
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        _mm512_permutexvar_epi16(idx, both)
    }

    /// 32 consecutive floats as 16 consecutive pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs16(src: *const f32) -> __m512i {
        std::mem::transmute(_mm512_cvtne2ps_pbh(
            _mm512_loadu_ps(src.add(16)),
            _mm512_loadu_ps(src),
        ))
    }

    /// Packs rows r0..r0+rows of A, pairs pc..pc+kcp, into one MR-row panel (zeros past M).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(crate) unsafe fn pack_a(
        dst: &mut [u32],
        a: &View,
        pc: usize,
        kcp: usize,
        r0: usize,
        rows: usize,
        k: usize,
        by_rows: bool,
    ) {
        let k0 = 2 * pc;
        let whole = 2 * (pc + kcp) <= k;
        if by_rows {
            for i in 0..MR {
                let d = &mut dst[i * KCP..i * KCP + kcp];
                if i >= rows {
                    d.fill(0);
                    continue;
                }
                let mut p = 0;
                if a.cs == 1 && whole {
                    let src = a.data.as_ptr().add((r0 + i) * a.rs + k0);
                    while p + 16 <= kcp {
                        _mm512_storeu_epi32(
                            d.as_mut_ptr().add(p) as *mut i32,
                            pairs16(src.add(2 * p)),
                        );
                        p += 16;
                    }
                }
                for (q, x) in d.iter_mut().enumerate().skip(p) {
                    *x = pair_at(a, r0 + i, pc + q, k, false);
                }
            }
        } else {
            // a.rs == 1: consecutive rows are consecutive floats
            let mask: __mmask16 = ((1u32 << rows) - 1) as u16;
            for p in 0..kcp {
                let d = &mut dst[p * MR..p * MR + MR];
                let kk = k0 + 2 * p;
                if kk + 1 < k {
                    let src = a.data.as_ptr().add(r0 + kk * a.cs);
                    let lo = _mm512_maskz_loadu_ps(mask, src);
                    let hi = _mm512_maskz_loadu_ps(mask, src.add(a.cs));
                    let mut v = [0u32; 16];
                    _mm512_storeu_epi32(v.as_mut_ptr() as *mut i32, interleave(lo, hi));
                    d.copy_from_slice(&v[..MR]);
                } else {
                    for (i, x) in d.iter_mut().enumerate() {
                        *x = if i < rows {
                            pair_at(a, r0 + i, pc + p, k, false)
                        } else {
                            0
                        };
                    }
                }
            }
        }
    }

    /// Packs columns j0..j0+cols of B, pairs pc..pc+kcp, into one NR-column panel
    /// `[pair][column]` (zeros past N).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(crate) unsafe fn pack_b(
        dst: &mut [u32],
        b: &View,
        pc: usize,
        kcp: usize,
        j0: usize,
        cols: usize,
        k: usize,
    ) {
        let k0 = 2 * pc;
        let whole = 2 * (pc + kcp) <= k;
        if b.cs == 1 && cols == NR && whole {
            for p in 0..kcp {
                let src = b.data.as_ptr().add((k0 + 2 * p) * b.rs + j0);
                let d = dst.as_mut_ptr().add(p * NR) as *mut i32;
                for h in 0..2 {
                    let lo = _mm512_loadu_ps(src.add(16 * h));
                    let hi = _mm512_loadu_ps(src.add(b.rs + 16 * h));
                    _mm512_storeu_epi32(d.add(16 * h), interleave(lo, hi));
                }
            }
        } else if b.rs == 1 && whole && kcp.is_multiple_of(16) {
            // columns contiguous along K: convert a column's pairs, then transpose
            let mut col = [0u32; KCP];
            for j in 0..NR {
                if j >= cols {
                    for p in 0..kcp {
                        dst[p * NR + j] = 0;
                    }
                    continue;
                }
                let src = b.data.as_ptr().add((j0 + j) * b.cs + k0);
                for p in (0..kcp).step_by(16) {
                    _mm512_storeu_epi32(
                        col.as_mut_ptr().add(p) as *mut i32,
                        pairs16(src.add(2 * p)),
                    );
                }
                for p in 0..kcp {
                    dst[p * NR + j] = col[p];
                }
            }
        } else {
            for p in 0..kcp {
                for j in 0..NR {
                    dst[p * NR + j] = if j < cols {
                        pair_at(b, j0 + j, pc + p, k, true)
                    } else {
                        0
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
    }

    #[test]
    fn round_is_nearest_even_and_flushes_subnormals() {
        assert_eq!(round(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0)
        assert_eq!(round(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up
        assert_eq!(round(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(round(-1e-40), 0x8000);
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(widen(round(f32::INFINITY)), f32::INFINITY);
        assert_eq!(widen(round(f32::MAX)), f32::INFINITY);
        assert_eq!(widen(round(3.0e38)), 3.0040553e38);
    }

    #[test]
    fn dot_step_adds_the_high_product_first() {
        // acc = 1, hi product = 2^-24 (lost alone: ties to even), lo = 2^-24: lost too.
        let (one, tiny) = (1.0f32, 2f32.powi(-12));
        let a = pair(tiny, tiny);
        let b = pair(tiny, tiny);
        assert_eq!(dot_step(one, a, b), 1.0);
        // the same products summed first would have given 1 + 2^-23
        assert_eq!(one + 2.0 * 2f32.powi(-24), 1.0 + 2f32.powi(-23));
        // order: hi first: 2^24 + 1 (lost), then - 2^24 leaves 0; lo first would leave 1
        let a = pair(-4096.0, 1.0);
        let b = pair(4096.0, 1.0);
        assert_eq!(dot_step(2f32.powi(24), a, b), 0.0);
    }

    /// Every layout, odd and even K, partial tiles, K over several blocks, accumulate on and
    /// off: the fast path (on this host) equals the scalar reference bit for bit.
    #[test]
    fn matmul_equals_the_reference_in_every_layout() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (14, 32, 256),
            (37, 45, 301),
            (29, 70, 2 * KCP * 2 + 3),
            (60, 33, 64),
            (3, 130, 17),
        ] {
            let a = random(m * k, 1 + m as u64);
            let b = random(k * n, 2 + n as u64);
            let c0 = random(m * n, 3);
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for accumulate in [false, true] {
                    let av = View::new(&a, if ta { m } else { k }, ta);
                    let bv = View::new(&b, if tb { k } else { n }, tb);
                    let mut want = c0.clone();
                    matmul_reference(&mut want, n, av, bv, m, n, k, accumulate);
                    let mut got = c0.clone();
                    matmul(&mut got, &a, ta, &b, tb, m, n, k, accumulate);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "m={m} n={n} k={k} ta={ta} tb={tb} acc={accumulate}");
                }
            }
        }
    }

    /// Operands over the whole exponent range (products that underflow, sums that overflow,
    /// subnormal accumulators): the hardware lane and [`dot_step`] agree.
    #[test]
    fn extreme_exponents_match_the_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut bits = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    let x = f32::from_bits(rng.gen::<u32>());
                    if x.is_finite() {
                        x
                    } else {
                        1.0
                    }
                })
                .collect()
        };
        let (m, n, k) = (64, 64, 6);
        let (a, b, c0) = (bits(m * k), bits(k * n), bits(m * n));
        let mut want = c0.clone();
        let (av, bv) = (View::new(&a, k, false), View::new(&b, n, false));
        matmul_reference(&mut want, n, av, bv, m, n, k, true);
        let mut got = c0.clone();
        matmul(&mut got, &a, false, &b, false, m, n, k, true);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{g:e} vs {w:e}"
            );
        }
    }

    /// The path of CPUs without AVX512-BF16 gives the definition's bits too, and so does the
    /// dispatched entry (`matmul_raw`, the AVX512-BF16 kernel where present), in every layout,
    /// with operands that are column ranges of wider matrices (as attention's per-head views)
    /// and into rows wider than N (left untouched past N). The expected values come from
    /// contiguous row-major copies, so a view read wrongly cannot agree with itself.
    #[test]
    fn fallback_equals_the_reference() {
        for &(m, n, k) in &[(5, 7, 0), (9, 33, 41), (20, 3, 64), (4, 17, 1)] {
            let pad = 3;
            let a = random((m + pad) * (k + pad), 21);
            let b = random((k + pad) * (n + pad), 22);
            let layouts = [(false, false), (true, false), (false, true), (true, true)];
            for ((ta, tb), strided) in layouts.into_iter().flat_map(|l| [(l, false), (l, true)]) {
                // element (i, p) of a (rows, cols) operand at i * rs + p * cs, the slice
                // ending at its last element (a read past it would panic)
                fn view(data: &[f32], rows: usize, cols: usize, t: bool, pad: usize) -> View<'_> {
                    let (rs, cs) = if t { (1, rows + pad) } else { (cols + pad, 1) };
                    let end = if rows * cols == 0 {
                        0
                    } else {
                        (rows - 1) * rs + (cols - 1) * cs + 1
                    };
                    View {
                        data: &data[pad..pad + end],
                        rs,
                        cs,
                    }
                }
                let pad_of = if strided { pad } else { 0 };
                let (av, bv) = (view(&a, m, k, ta, pad_of), view(&b, k, n, tb, pad_of));
                let dense = |v: &View, rows: usize, cols: usize| -> Vec<f32> {
                    (0..rows * cols)
                        .map(|q| v.data[q / cols * v.rs + q % cols * v.cs])
                        .collect()
                };
                let (ac, bc) = (dense(&av, m, k), dense(&bv, k, n));
                let out_rs = n + 2;
                let c0 = random(m * out_rs, 23);
                for accumulate in [false, true] {
                    let mut want = c0.clone();
                    let (acv, bcv) = (View::new(&ac, k, false), View::new(&bc, n, false));
                    matmul_reference(&mut want, out_rs, acv, bcv, m, n, k, accumulate);
                    let what = format!("m={m} n={n} k={k} ta={ta} tb={tb} strided={strided}");
                    for path in ["fallback serial", "fallback parallel", "dispatched"] {
                        let mut got = c0.clone();
                        let p = got.as_mut_ptr();
                        // SAFETY: `got` holds m rows of out_rs >= n; a and b cover the views.
                        unsafe {
                            match path {
                                "dispatched" => matmul_raw(p, out_rs, av, bv, m, n, k, accumulate),
                                _ => reference_rows(
                                    p,
                                    out_rs,
                                    av,
                                    bv,
                                    m,
                                    n,
                                    k,
                                    accumulate,
                                    path == "fallback serial",
                                ),
                            }
                        }
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{path}: {what} acc={accumulate}");
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_is_close_to_f32() {
        let (m, n, k) = (40, 50, 300);
        let a = random(m * k, 7);
        let b = random(k * n, 8);
        let mut want = vec![0.0; m * n];
        crate::matmul::matmul(&mut want, &a, false, &b, false, m, n, k, false);
        let mut got = vec![0.0; m * n];
        matmul(&mut got, &a, false, &b, false, m, n, k, false);
        // bf16 keeps 8 bits: relative error per product ~2^-8, random signs over K terms
        let scale = (k as f32).sqrt() * 4.0 / 256.0;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < scale, "{g} vs {w}");
        }
    }

    #[test]
    fn matmul_is_thread_count_independent() {
        let (m, n, k) = (150, 200, 333);
        let a = random(m * k, 11);
        let b = random(n * k, 12);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0.0; m * n];
            let (av, bv) = (View::new(&a, k, false), View::new(&b, k, true));
            // parallel inside the pool (whose worker the caller now is)
            // SAFETY: `out` is (m, n), a and b are (m, k) and (k, n).
            pool.install(|| unsafe {
                run(out.as_mut_ptr(), n, av, bv, m, n, k, false, threads == 1)
            });
            out
        };
        let one = run(1);
        let mut serial = vec![0.0; m * n];
        matmul(&mut serial, &a, false, &b, true, m, n, k, false);
        for t in [2, 3, 4] {
            assert_eq!(run(t), one, "{t} threads");
        }
        assert_eq!(serial, one);
    }
}

#[cfg(test)]
mod timing {
    type Mm = fn(&mut [f32], &[f32], bool, &[f32], bool, usize, usize, usize, bool);

    /// `RAYON_NUM_THREADS=2 cargo test --release -p kernels bf16_vs_f32_shapes -- --ignored
    /// --nocapture`: GFLOP/s of the bf16 and f32 matmuls at small-moe's shapes (2,048 tokens,
    /// 512 rows per expert), operands in cache (repeated calls) and from memory (a 64 MiB
    /// sweep before the call, as in a training step whose weights do not fit in L3).
    #[test]
    #[ignore]
    fn bf16_vs_f32_shapes() {
        // (name, m, n, k, ta, tb)
        let shapes = [
            ("lm head fwd", 2048, 4096, 256, false, true),
            ("lm head dx", 2048, 256, 4096, false, false),
            ("lm head dw", 4096, 256, 2048, true, false),
            ("qkv fwd", 2048, 768, 256, false, true),
            ("qkv dw", 768, 256, 2048, true, false),
            ("expert gu", 512, 512, 256, false, true),
            ("expert down", 512, 256, 256, false, true),
            ("expert dw", 512, 256, 512, true, false),
        ];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut junk = vec![0u8; 64 << 20];
        for threads in [1, 2] {
            println!("{threads} thread(s)  (in cache | from memory)");
            for (name, m, n, k, ta, tb) in shapes {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7919) % 1000) as f32 / 1e3)
                    .collect();
                let b: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 104729) % 1000) as f32 / 1e3)
                    .collect();
                let mut out = vec![0f32; m * n];
                // [hot, cold] x [bf16, f32]
                let mut best = [[f64::MAX; 2]; 2];
                let fs: [Mm; 2] = [crate::bf16::matmul, crate::matmul::matmul];
                for it in 0..20 {
                    for (x, f) in fs.iter().enumerate() {
                        if it % 2 == 1 {
                            junk.iter_mut().for_each(|v| *v = v.wrapping_add(1));
                        }
                        let t0 = std::time::Instant::now();
                        if threads == 1 {
                            pool.install(|| f(&mut out, &a, ta, &b, tb, m, n, k, false));
                        } else {
                            f(&mut out, &a, ta, &b, tb, m, n, k, false);
                        }
                        let dt = t0.elapsed().as_secs_f64();
                        best[it % 2][x] = best[it % 2][x].min(dt);
                    }
                }
                let gf = 2.0 * (m * n * k) as f64 / 1e9;
                let [h, c] = best;
                println!(
                    "{name:12} {m}x{n}x{k}: bf16 {:3.0} | {:3.0} GFLOP/s, f32 {:3.0} | {:3.0}, \
                     bf16/f32 {:.2} | {:.2}",
                    gf / h[0],
                    gf / c[0],
                    gf / h[1],
                    gf / c[1],
                    h[1] / h[0],
                    c[1] / c[0]
                );
            }
        }
    }
}
