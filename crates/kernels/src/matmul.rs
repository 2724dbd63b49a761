//! Matrix multiplication on the `gemm` crate (AVX-512 kernels via its `x86-v4` feature).
//!
//! Every matmul in moelab goes through [`matmul`] or [`matmul_strided`]. `gemm` splits work
//! across threads along the output rows/columns only and walks the reduction dimension in a
//! fixed blocked order, so results do not depend on the thread count (checked by the
//! `determinism` tests).

use crate::par::in_worker;
use crate::simd;
use rayon::prelude::*;

/// Row-major operand view: `ptr[i * rs + j * cs]` is element (i, j).
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A contiguous row-major (rows, cols) matrix, optionally transposed.
    pub fn new(data: &'a [f32], cols: usize, trans: bool) -> Self {
        if trans {
            View {
                data,
                rs: 1,
                cs: cols,
            }
        } else {
            View {
                data,
                rs: cols,
                cs: 1,
            }
        }
    }
}

fn parallelism() -> gemm::Parallelism {
    let n = rayon::current_num_threads();
    if n <= 1 || in_worker() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(n)
    }
}

/// `out (M,N) [+]= op(a) (M,K) @ op(b) (K,N)` with contiguous row-major operands.
/// `a` is stored (M,K), or (K,M) when `ta`; `b` is stored (K,N), or (N,K) when `tb`.
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
    let (av, bv) = views(out.len(), a, ta, b, tb, m, n, k);
    matmul_strided(out, n, av, bv, m, n, k, accumulate);
}

/// The operands of a contiguous matmul as views, their lengths checked (f32 and bf16).
#[allow(clippy::too_many_arguments)]
pub(crate) fn views<'a>(
    out_len: usize,
    a: &'a [f32],
    ta: bool,
    b: &'a [f32],
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
) -> (View<'a>, View<'a>) {
    assert_eq!(out_len, m * n, "matmul out len {out_len} != {m}x{n}");
    assert_eq!(a.len(), m * k, "matmul a len {} != {m}x{k}", a.len());
    assert_eq!(b.len(), k * n, "matmul b len {} != {k}x{n}", b.len());
    let av = View::new(a, if ta { m } else { k }, ta);
    let bv = View::new(b, if tb { k } else { n }, tb);
    (av, bv)
}

/// Strided form of [`matmul`]: `out[i*out_rs + j] [+]= sum_p a(i,p) * b(p,j)`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    out: &mut [f32],
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
    assert!((m - 1) * out_rs + n <= out.len(), "matmul out too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                out[i * out_rs..i * out_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: `out` is a unique borrow large enough for (m, n) at stride out_rs (asserted).
    unsafe { matmul_raw(out.as_mut_ptr(), out_rs, a, b, m, n, k, accumulate) }
}

/// [`matmul_strided`] into a raw destination, for kernels whose parallel tasks write disjoint
/// but interleaved elements of one buffer (attention heads share rows).
///
/// # Safety
/// `out` must be valid for writes at `i*out_rs + j` for i < m, j < n, and no other thread may
/// touch those elements during the call.
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
    if m == 0 || n == 0 || k == 0 {
        if k == 0 && !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(out.add(i * out_rs), n).fill(0.0);
            }
        }
        return;
    }
    check_operands(&a, &b, m, n, k);
    // NOTE: the same bits on every CPU with FMA (a replay of a run on another host gives its
    // weights). gemm sums small outputs (m*n <= 256) and matrix-vector products of this
    // layout in vectors of the CPU's width: those are fixed-order dot products here. And for
    // outputs wider than 64 it blocks k by a size it derives from the L1 cache (512 on the
    // AVX-512 hosts this was measured on; 1024 on an AVX2 CPU with a 12-way L1): k is cut
    // here into the equal blocks of at most 512 it makes on those hosts, so gemm sees one
    // block and sums in the same groups everywhere.
    if a.cs == 1 && b.rs == 1 && (m * n <= 256 || m == 1 || n == 1) {
        // SAFETY: as for gemm below; rows of a and columns of b are contiguous (cs, rs 1).
        unsafe { dots_nt(out, out_rs, &a, &b, m, n, k, accumulate) };
        return;
    }
    // (up to 64 x 64 outputs gemm's blocks are a fixed 512; its matrix-vector kernels add
    // into the output step by step, so blocks of k do not change their bits)
    let kc = if k <= GEMM_KC || m.max(n) <= 64 {
        k
    } else {
        k.div_ceil(k.div_ceil(GEMM_KC))
    };
    for k0 in (0..k).step_by(kc) {
        let kb = kc.min(k - k0);
        // SAFETY: the asserts above bound every index gemm reads (a block reads a subset);
        // the caller guarantees `out`.
        unsafe {
            gemm::gemm(
                m,
                n,
                kb,
                out,
                1,
                out_rs as isize,
                accumulate || k0 > 0,
                a.data.as_ptr().add(k0 * a.cs),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr().add(k0 * b.rs),
                b.cs as isize,
                b.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            );
        }
    }
}

/// The k-block gemm 0.19 uses on the AVX-512 hosts (its `kernel_params` with a 32 or 48
/// KiB, 8- or 12-way L1; at least 512 on any CPU).
const GEMM_KC: usize = 512;

simd! {
    /// `out[i][j] (+)= dot(a row i, b column j)` for a row-major `a` and column-major `b`
    /// ([`crate::vmath::dot`]'s fixed order: the same bits on every CPU).
    ///
    /// SAFETY (caller): as [`matmul_raw`]; `a.cs == 1`, `b.rs == 1` and the operands checked.
    #[allow(clippy::too_many_arguments)]
    unsafe fn dots_nt(
        out: *mut f32,
        out_rs: usize,
        a: &View,
        b: &View,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) {
        for i in 0..m {
            let x = &a.data[i * a.rs..][..k];
            for j in 0..n {
                let v = crate::vmath::dot(x, &b.data[j * b.cs..][..k]);
                // SAFETY: i < m, j < n: in the caller's range
                let o = unsafe { &mut *out.add(i * out_rs + j) };
                *o = if accumulate { *o + v } else { v };
            }
        }
    }
}

/// Asserts that strided operands cover (m, k) and (k, n) (none of m, n, k zero: nothing is
/// read then).
pub(crate) fn check_operands(a: &View, b: &View, m: usize, n: usize, k: usize) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        (m - 1) * a.rs + (k - 1) * a.cs < a.data.len(),
        "matmul a too small"
    );
    assert!(
        (k - 1) * b.rs + (n - 1) * b.cs < b.data.len(),
        "matmul b too small"
    );
}

/// Linear layer forward, PyTorch convention: `out (N,O) [+]= x (N,I) @ w (O,I)^T`.
pub fn linear_forward(out: &mut [f32], x: &[f32], w: &[f32], n: usize, i: usize, o: usize) {
    Precision::F32.linear_forward(out, x, w, n, i, o);
}

/// Linear layer backward: `dx (N,I) = dout @ w` (overwritten, or accumulated with
/// `accumulate_dx`), `dw (O,I) += dout^T @ x`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    i: usize,
    o: usize,
    accumulate_dx: bool,
) {
    Precision::F32.linear_backward(dx, dw, dout, x, w, n, i, o, accumulate_dx);
}

/// Arithmetic of the training matmuls: f32, or bf16 operands with f32 accumulation
/// ([`crate::bf16`]). The free functions of this module are the f32 ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// [`matmul`] in this precision.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        self,
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
        match self {
            Precision::F32 => matmul(out, a, ta, b, tb, m, n, k, accumulate),
            Precision::Bf16 => crate::bf16::matmul(out, a, ta, b, tb, m, n, k, accumulate),
        }
    }

    /// [`matmul_raw`] in this precision.
    ///
    /// # Safety
    /// As [`matmul_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_raw(
        self,
        out: *mut f32,
        out_rs: usize,
        a: View,
        b: View,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller's guarantees are the callees'.
        unsafe {
            match self {
                Precision::F32 => matmul_raw(out, out_rs, a, b, m, n, k, accumulate),
                Precision::Bf16 => crate::bf16::matmul_raw(out, out_rs, a, b, m, n, k, accumulate),
            }
        }
    }

    /// [`linear_forward`] in this precision.
    pub fn linear_forward(
        self,
        out: &mut [f32],
        x: &[f32],
        w: &[f32],
        n: usize,
        i: usize,
        o: usize,
    ) {
        self.matmul(out, x, false, w, true, n, o, i, false);
    }

    /// [`linear_backward`] in this precision.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_backward(
        self,
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        n: usize,
        i: usize,
        o: usize,
        accumulate_dx: bool,
    ) {
        if let Some(dx) = dx {
            self.matmul(dx, dout, false, w, false, n, i, o, accumulate_dx);
        }
        self.matmul(dw, dout, true, x, false, o, i, n, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_in_all_layouts() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let want = naive(&a, &b, m, n, k);
        let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = vec![1.0; m * n];
            let aa = if ta { &at } else { &a };
            let bb = if tb { &bt } else { &b };
            matmul(&mut c, aa, ta, bb, tb, m, n, k, false);
            let worst = c
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-4, "ta={ta} tb={tb} worst abs diff {worst}");
            matmul(&mut c, aa, ta, bb, tb, m, n, k, true);
            let worst = c
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - 2.0 * y).abs())
                .fold(0.0, f32::max);
            assert!(
                worst < 2e-4,
                "accumulate ta={ta} tb={tb} worst abs diff {worst}"
            );
        }
    }

    /// Shapes where gemm's summation order depends on the CPU: small outputs and
    /// matrix-vector products (vector width), k past one block (L1 geometry). (m, n, k, a
    /// transposed, b transposed).
    const CPU_SHAPES: [(usize, usize, usize, bool, bool); 12] = [
        (16, 16, 40, false, true), // attention scores at T = 16
        (64, 4, 96, false, true),  // a router: 64 tokens, 4 experts
        (3, 70, 33, false, true),  // an expert given 3 tokens
        (1, 300, 64, false, true), // an expert given 1 token
        (200, 1, 64, false, true), // a one-output gate
        (100, 90, 1000, false, false),
        (100, 90, 1000, true, false),
        (40, 30, 1300, true, false), // dW of a small matrix over many tokens
        (130, 70, 2100, false, true),
        (5, 7, 3, false, false),
        (40, 30, 1026, true, false), // k = 2 past the blocks of 512
        (1, 100, 1500, false, false),
    ];

    fn cpu_shapes_output(accumulate: bool) -> Vec<Vec<f32>> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        CPU_SHAPES
            .iter()
            .map(|&(m, n, k, ta, tb)| {
                let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                let mut c: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
                matmul(&mut c, &a, ta, &b, tb, m, n, k, accumulate);
                c
            })
            .collect()
    }

    /// The bits of every shape above are one fixed value on any CPU with FMA: the test runs
    /// natively and under emulated AVX2 (scripts/test-cpus.sh), against the same digest. Before
    /// the fixed-order dots and k-blocks, an emulated Haswell gave other bits (and a run at
    /// seq_len 16 another weights hash).
    #[test]
    fn matmul_bits_are_the_same_on_every_cpu_with_fma() {
        let mut h = 0xcbf2_9ce4_8422_2325u64; // FNV-1a over the output bits
        for c in cpu_shapes_output(false)
            .iter()
            .chain(&cpu_shapes_output(true))
        {
            for v in c {
                for byte in v.to_bits().to_le_bytes() {
                    h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        let fma = std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let fma = true;
        if fma {
            assert_eq!(
                h, 12_934_025_342_182_325_547,
                "matmul bits differ from the other CPUs'"
            );
        }
    }

    /// The k-blocks reproduce gemm's own blocking where it blocks by 512 (the AVX-512 hosts
    /// the published hashes come from): same bits as one gemm call over all of k.
    #[test]
    fn k_blocks_keep_gemms_bits_on_avx512_hosts() {
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for (i, &(m, n, k, ta, tb)) in CPU_SHAPES.iter().enumerate().filter(|(_, s)| s.2 > GEMM_KC)
        {
            let a: Vec<f32> = (0..m * k)
                .map(|x| ((x * 7919 % 1000) as f32 - 500.0) / 300.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|x| ((x * 104_729 % 997) as f32 - 498.0) / 250.0)
                .collect();
            let mut ours = vec![0.0; m * n];
            matmul(&mut ours, &a, ta, &b, tb, m, n, k, false);
            let (av, bv) = (
                View::new(&a, if ta { m } else { k }, ta),
                View::new(&b, if tb { k } else { n }, tb),
            );
            let mut theirs = vec![0.0; m * n];
            // SAFETY: operands and output sized for (m, n, k) as matmul checks them
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    theirs.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    av.data.as_ptr(),
                    av.cs as isize,
                    av.rs as isize,
                    bv.data.as_ptr(),
                    bv.cs as isize,
                    bv.rs as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            let same = ours
                .iter()
                .zip(&theirs)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "shape {i} ({m}, {n}, {k}) differs from one gemm call");
        }
    }
}

/// Output columns per parallel task in [`linear_rows`].
const ROWS_COLS_PER_TASK: usize = 32;

/// True where [`rows_block`] may use AVX registers.
fn has_avx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

simd! {
    /// `out[r][c] (+)= dot(x[r], w[c])` for all rows r and columns c in `c0..c1`, in 4 x 4
    /// register blocks. Each dot product keeps LANES partial sums combined as
    /// [`crate::vmath::dot`] does, so a value does not depend on the blocking or on n.
    ///
    /// The kernel of CPUs without AVX-512 (those run [`rows512::rows_block`]); `avx` (the CPU
    /// has AVX) selects the register form of the one-row blocks, which tests also run with
    /// `avx` false.
    ///
    /// SAFETY (caller): `out` points to an (n, o) buffer of which this call writes only
    /// columns c0..c1; AVX is present when `avx`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_block(
        out: *mut f32,
        x: &[f32],
        w: &[f32],
        n: usize,
        k: usize,
        o: usize,
        c0: usize,
        c1: usize,
        accumulate: bool,
        avx: bool,
    ) {
        use crate::vmath::{combine, LANES};
        let full = k / LANES * LANES;
        let finish = |acc: [f32; LANES], xr: &[f32], wc: &[f32]| -> f32 {
            let mut tail = [0.0f32; LANES];
            for j in full..k {
                tail[j - full] = xr[j] * wc[j];
            }
            combine(acc, &tail[..k - full], |a, b| a + b)
        };
        // NOTE: one accumulator array for all blocks, only the entries a block uses zeroed
        // (a fresh 1 KiB array per block was a memset as costly as a one-row block's FLOPs)
        let mut acc = [[0.0f32; LANES]; 16];
        let mut r = 0;
        while r < n {
            let rn = (n - r).min(4);
            let mut c = c0;
            while c < c1 {
                let cn = (c1 - c).min(4);
                for ri in 0..rn {
                    for ci in 0..cn {
                        acc[ri * 4 + ci] = [0.0; LANES];
                    }
                }
                if rn == 4 && cn == 4 {
                    let mut p = 0;
                    while p < full {
                        for ri in 0..4 {
                            let xr = &x[(r + ri) * k + p..(r + ri) * k + p + LANES];
                            for ci in 0..4 {
                                let wc = &w[(c + ci) * k + p..(c + ci) * k + p + LANES];
                                let a = &mut acc[ri * 4 + ci];
                                for j in 0..LANES {
                                    a[j] += xr[j] * wc[j];
                                }
                            }
                        }
                        p += LANES;
                    }
                } else if cn == 4 && avx {
                    // fewer than 4 rows (decoding): each row against 4 columns with the
                    // 4 x 16 accumulators in registers (independent add chains)
                    for ri in 0..rn {
                        // SAFETY: AVX is present (the caller's contract), row r + ri and
                        // columns c..c+4 hold `full` <= k elements.
                        unsafe { block1x4_avx(&mut acc, ri, x, w, r + ri, c, k, full) };
                    }
                } else {
                    for ri in 0..rn {
                        for ci in 0..cn {
                            let a = &mut acc[ri * 4 + ci];
                            let xr = &x[(r + ri) * k..(r + ri) * k + full];
                            let wc = &w[(c + ci) * k..(c + ci) * k + full];
                            for (xc, wcc) in xr.chunks_exact(LANES).zip(wc.chunks_exact(LANES)) {
                                for j in 0..LANES {
                                    a[j] += xc[j] * wcc[j];
                                }
                            }
                        }
                    }
                }
                for ri in 0..rn {
                    for ci in 0..cn {
                        let xr = &x[(r + ri) * k..(r + ri + 1) * k];
                        let wc = &w[(c + ci) * k..(c + ci + 1) * k];
                        let v = finish(acc[ri * 4 + ci], xr, wc);
                        // SAFETY: column c + ci is in c0..c1, owned by this call.
                        let dst = unsafe { &mut *out.add((r + ri) * o + c + ci) };
                        *dst = if accumulate { *dst + v } else { v };
                    }
                }
                c += 4;
            }
            r += 4;
        }
    }
}

/// One row (`r`) against 4 columns of [`rows_block`], the 4 x 16 accumulators in AVX
/// registers, into `acc[ri * 4..ri * 4 + 4]`. Multiply then add, never fused, as the
/// portable code computes.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx")]
unsafe fn block1x4_avx(
    acc: &mut [[f32; crate::vmath::LANES]; 16],
    ri: usize,
    x: &[f32],
    w: &[f32],
    r: usize,
    c: usize,
    k: usize,
    full: usize,
) {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 8];
    let (xp, wp) = (x.as_ptr().add(r * k), w.as_ptr().add(c * k));
    let mut p = 0;
    while p < full {
        let x0 = _mm256_loadu_ps(xp.add(p));
        let x1 = _mm256_loadu_ps(xp.add(p + 8));
        for ci in 0..4 {
            let wc = wp.add(ci * k + p);
            a[2 * ci] = _mm256_add_ps(a[2 * ci], _mm256_mul_ps(x0, _mm256_loadu_ps(wc)));
            a[2 * ci + 1] =
                _mm256_add_ps(a[2 * ci + 1], _mm256_mul_ps(x1, _mm256_loadu_ps(wc.add(8))));
        }
        p += 16;
    }
    for ci in 0..4 {
        let dst = acc[ri * 4 + ci].as_mut_ptr();
        _mm256_storeu_ps(dst, a[2 * ci]);
        _mm256_storeu_ps(dst.add(8), a[2 * ci + 1]);
    }
}

/// [`rows_block`] on AVX-512 with the same bits and no per-output horizontal sums: the 16
/// lane accumulators of 16 outputs are reduced together in registers ([`rows512::reduce16`]:
/// the pairwise tree of [`crate::vmath::combine`] for all 16 at once, 15 adds and 30
/// shuffles instead of 16 stores and 240 scalar adds). At width 128 the per-output sums were
/// half of the kernel's time.
#[cfg(target_arch = "x86_64")]
mod rows512 {
    use crate::vmath::LANES;
    use std::arch::x86_64::*;

    /// Lane n of the result is `combine(a[n])` exactly: lane j + lane j + 8, then + 4, + 2,
    /// + 1, the lower lane always the first operand.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn reduce16(a: &[__m512; 16]) -> __m512 {
        // s[p]: lanes 0..8 are a[2p]'s lanes j + j+8, lanes 8..16 a[2p+1]'s
        let mut s = [_mm512_setzero_ps(); 8];
        for (p, s) in s.iter_mut().enumerate() {
            let (x, y) = (a[2 * p], a[2 * p + 1]);
            *s = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            );
        }
        // t[q]: 128-bit block b holds a[4q + b]'s four partials after + 4
        let mut t = [_mm512_setzero_ps(); 4];
        for (q, t) in t.iter_mut().enumerate() {
            let (x, y) = (s[2 * q], s[2 * q + 1]);
            *t = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            );
        }
        // u[r]: block b holds a[8r + b]'s two partials after + 2, then a[8r + 4 + b]'s
        let mut u = [_mm512_setzero_ps(); 2];
        for (r, u) in u.iter_mut().enumerate() {
            let (x, y) = (_mm512_castps_pd(t[2 * r]), _mm512_castps_pd(t[2 * r + 1]));
            *u = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
            );
        }
        // v: block b holds a[b], a[4 + b], a[8 + b], a[12 + b]
        let v = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(u[0], u[1]),
            _mm512_shuffle_ps::<0xDD>(u[0], u[1]),
        );
        // a[n] sits in lane 4 (n % 4) + n / 4
        let idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
        _mm512_permutexvar_ps(idx, v)
    }

    /// `acc += x[j] * w[j]` for the lanes j < rem of the last partial chunk (combine's tail).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tail(acc: __m512, x: *const f32, w: *const f32, mask: __mmask16) -> __m512 {
        let prod = _mm512_mul_ps(
            _mm512_maskz_loadu_ps(mask, x),
            _mm512_maskz_loadu_ps(mask, w),
        );
        _mm512_mask_add_ps(acc, mask, acc, prod)
    }

    /// Stores the first `cn` lanes of `v` to `dst..dst + cn`, added to what is there when
    /// accumulating (`dst + v`, as the portable kernel).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(v: __m512, dst: *mut f32, cn: usize, acc: bool) {
        let mask: __mmask16 = ((1u32 << cn) - 1) as u16;
        let v = if acc {
            _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), v)
        } else {
            v
        };
        _mm512_mask_storeu_ps(dst, mask, v);
    }

    /// As [`super::rows_block`] (same arguments, same bits): blocks of 4 rows x 4 columns,
    /// then the rows left over (all of them when decoding) one at a time against 16 columns.
    /// Columns past `c1` in a block repeat the last one and are not stored.
    ///
    /// # Safety
    /// AVX-512F must be present; `out` points to an (n, o) buffer of which this call writes
    /// only columns c0..c1; x is (n, k), w is (o, k).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_block(
        out: *mut f32,
        x: &[f32],
        w: &[f32],
        n: usize,
        k: usize,
        o: usize,
        c0: usize,
        c1: usize,
        accumulate: bool,
    ) {
        debug_assert!(x.len() >= n * k && w.len() >= o * k && c1 <= o);
        let full = k / LANES * LANES;
        let mask: __mmask16 = ((1u32 << (k - full)) - 1) as u16;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut r = 0;
        while r + 4 <= n {
            let mut c = c0;
            while c < c1 {
                let cn = (c1 - c).min(4);
                let mut col = [wp; 4];
                let mut row = [xp; 4];
                for j in 0..4 {
                    col[j] = wp.add((c + j.min(cn - 1)) * k);
                    row[j] = xp.add((r + j) * k);
                }
                let mut a = [_mm512_setzero_ps(); 16];
                let mut p = 0;
                while p < full {
                    let xs = [0, 1, 2, 3].map(|ri| _mm512_loadu_ps(row[ri].add(p)));
                    for ci in 0..4 {
                        let wc = _mm512_loadu_ps(col[ci].add(p));
                        for ri in 0..4 {
                            a[4 * ri + ci] =
                                _mm512_add_ps(a[4 * ri + ci], _mm512_mul_ps(xs[ri], wc));
                        }
                    }
                    p += LANES;
                }
                if mask != 0 {
                    for ri in 0..4 {
                        for ci in 0..4 {
                            a[4 * ri + ci] =
                                tail(a[4 * ri + ci], row[ri].add(full), col[ci].add(full), mask);
                        }
                    }
                }
                // lanes 4 ri.. are row r + ri's columns c..c + 4
                let mut v = [0.0f32; LANES];
                _mm512_storeu_ps(v.as_mut_ptr(), reduce16(&a));
                for ri in 0..4 {
                    for ci in 0..cn {
                        let dst = out.add((r + ri) * o + c + ci);
                        let val = v[4 * ri + ci];
                        *dst = if accumulate { *dst + val } else { val };
                    }
                }
                c += 4;
            }
            r += 4;
        }
        while r < n {
            let xr = xp.add(r * k);
            let mut c = c0;
            while c < c1 {
                let cn = (c1 - c).min(16);
                let mut col = [wp; 16];
                for (j, col) in col.iter_mut().enumerate() {
                    *col = wp.add((c + j.min(cn - 1)) * k);
                }
                let mut a = [_mm512_setzero_ps(); 16];
                let mut p = 0;
                while p < full {
                    let xv = _mm512_loadu_ps(xr.add(p));
                    for (a, col) in a.iter_mut().zip(col) {
                        *a = _mm512_add_ps(*a, _mm512_mul_ps(xv, _mm512_loadu_ps(col.add(p))));
                    }
                    p += LANES;
                }
                if mask != 0 {
                    for (a, col) in a.iter_mut().zip(col) {
                        *a = tail(*a, xr.add(full), col.add(full), mask);
                    }
                }
                store(reduce16(&a), out.add(r * o + c), cn, accumulate);
                c += 16;
            }
            r += 1;
        }
    }
}

/// Linear layer for a few rows (decoding): `out (N,O) [+]= x (N,I) @ w (O,I)^T` without
/// gemm's packing, which dominates when N is small. Each output is a fixed-order dot product
/// (as [`crate::vmath::dot`]), so a row's result does not depend on the other rows, on N or
/// on the thread count: batched decoding gives the same bits as decoding one sequence.
pub fn linear_rows(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    i: usize,
    o: usize,
    accumulate: bool,
) {
    assert_eq!(out.len(), n * o, "linear_rows out len");
    assert_eq!(x.len(), n * i, "linear_rows x len");
    assert_eq!(w.len(), o * i, "linear_rows w len");
    let ptr = crate::par::SendPtr(out.as_mut_ptr());
    // in a team (one helper thread, see par::with_team) two tasks (each claim of a task
    // costs a cache-line transfer between the cores: 32-column tasks decoded the student 9%
    // slower, 16-column ones 20%); otherwise rayon's tasks
    let team = n * o * i >= 1 << 12 && crate::par::in_team();
    let per = if team {
        // the calling thread's task first and a little larger (17/32 of the columns, up to
        // whole 16-column blocks): the helper starts a hand-off later. Against equal halves,
        // 1-5% faster student decoding in each of 8 alternating rounds.
        (o * 17).div_ceil(32 * 16) * 16
    } else {
        ROWS_COLS_PER_TASK
    };
    let tasks = o.div_ceil(per);
    let run = |t: usize| {
        let (c0, c1) = (t * per, ((t + 1) * per).min(o));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked); tasks own disjoint column ranges.
            unsafe { rows512::rows_block(ptr.get(), x, w, n, i, o, c0, c1, accumulate) };
            return;
        }
        // SAFETY: tasks own disjoint column ranges of `out`; AVX is checked.
        unsafe { rows_block(ptr.get(), x, w, n, i, o, c0, c1, accumulate, has_avx()) }
    };
    // NOTE: parallel also inside a rayon worker (the serving engine decodes on one): a
    // decode step has no outer parallel loop to leave the other cores to.
    let teamed = team && tasks > 1 && crate::par::team_for_each(tasks, &run);
    if teamed {
        return;
    }
    if n * o * i < 1 << 16 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

#[cfg(test)]
mod rows_tests {
    use super::*;

    /// Every output is `vmath::dot` of its row and column exactly (the order the docs state),
    /// whichever kernel runs: row blocks and leftover rows, K with and without a partial
    /// last chunk, column counts that leave partial blocks, accumulate on and off. Besides
    /// `linear_rows` (AVX-512 on our hosts), the kernel of CPUs without AVX-512 is called
    /// directly, with and without AVX, over two column ranges (as two tasks). Called here its
    /// copy compiled for this CPU runs; `scripts/test-cpus.sh` runs the AVX2 and baseline
    /// copies on emulated CPUs.
    #[test]
    fn linear_rows_equals_the_fixed_order_dot() {
        let mut paths: Vec<&str> = vec!["linear_rows", "rows_block", "rows_block, no AVX"];
        if !has_avx() {
            paths.retain(|p| *p != "rows_block");
        }
        for &(n, i, o) in &[
            (1, 128, 384),
            (1, 37, 45),
            (2, 16, 17),
            (3, 5, 3),
            (4, 128, 33),
            (5, 130, 64),
            (9, 64, 100),
            (200, 128, 70),
        ] {
            let x: Vec<f32> = (0..n * i)
                .map(|v| ((v * 7919 % 1013) as f32 - 506.0) * 1e-3)
                .collect();
            let w: Vec<f32> = (0..o * i)
                .map(|v| ((v * 104729 % 997) as f32 - 498.0) * 1e-3)
                .collect();
            let init: Vec<f32> = (0..n * o).map(|v| (v % 17) as f32 * 0.25 - 2.0).collect();
            for (path, accumulate) in paths.iter().flat_map(|p| [(p, false), (p, true)]) {
                let mut got = init.clone();
                // rows_block over two column ranges, the first ending mid-block (odd)
                let cut = ((o / 3) | 1).min(o);
                match *path {
                    "linear_rows" => linear_rows(&mut got, &x, &w, n, i, o, accumulate),
                    // SAFETY: the ranges are disjoint and cover 0..o; AVX only where present.
                    _ => unsafe {
                        let avx = *path == "rows_block";
                        let p = got.as_mut_ptr();
                        rows_block(p, &x, &w, n, i, o, 0, cut, accumulate, avx);
                        rows_block(p, &x, &w, n, i, o, cut, o, accumulate, avx);
                    },
                }
                for r in 0..n {
                    for c in 0..o {
                        let d = crate::vmath::dot(&x[r * i..(r + 1) * i], &w[c * i..(c + 1) * i]);
                        let want = if accumulate { init[r * o + c] + d } else { d };
                        assert_eq!(
                            got[r * o + c].to_bits(),
                            want.to_bits(),
                            "{path}: n={n} i={i} o={o} r={r} c={c} accumulate={accumulate}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn linear_rows_matches_matmul_and_is_row_independent() {
        let (n, i, o) = (7, 37, 45);
        let x: Vec<f32> = (0..n * i)
            .map(|v| ((v * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let w: Vec<f32> = (0..o * i)
            .map(|v| ((v * 5 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let mut want = vec![0.0; n * o];
        linear_forward(&mut want, &x, &w, n, i, o);
        let mut got = vec![1.0; n * o];
        linear_rows(&mut got, &x, &w, n, i, o, true);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - 1.0 - w).abs() < 1e-4, "{g} vs {w} + 1");
        }
        linear_rows(&mut got, &x, &w, n, i, o, false);
        // each row alone gives the same bits
        for r in 0..n {
            let mut one = vec![0.0; o];
            linear_rows(&mut one, &x[r * i..(r + 1) * i], &w, 1, i, o, false);
            assert_eq!(one, got[r * o..(r + 1) * o]);
        }
    }
}
