//! Matrix multiplication on the `gemm` crate (AVX-512 kernels via its `x86-v4` feature).
//!
//! Every matmul in moelab goes through [`matmul`] or [`matmul_strided`]. `gemm` splits work
//! across threads along the output rows/columns only and walks the reduction dimension in a
//! fixed blocked order, so results do not depend on the thread count (checked by the
//! `determinism` tests).

use crate::par::in_worker;

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
    assert_eq!(out.len(), m * n, "matmul out len {} != {m}x{n}", out.len());
    assert_eq!(a.len(), m * k, "matmul a len {} != {m}x{k}", a.len());
    assert_eq!(b.len(), k * n, "matmul b len {} != {k}x{n}", b.len());
    let av = View::new(a, if ta { m } else { k }, ta);
    let bv = View::new(b, if tb { k } else { n }, tb);
    matmul_strided(out, n, av, bv, m, n, k, accumulate);
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
    assert!(
        (m - 1) * a.rs + (k - 1) * a.cs < a.data.len(),
        "matmul a too small"
    );
    assert!(
        (k - 1) * b.rs + (n - 1) * b.cs < b.data.len(),
        "matmul b too small"
    );
    // SAFETY: the asserts above bound every index gemm reads; the caller guarantees `out`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
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

/// Linear layer forward, PyTorch convention: `out (N,O) [+]= x (N,I) @ w (O,I)^T`.
pub fn linear_forward(out: &mut [f32], x: &[f32], w: &[f32], n: usize, i: usize, o: usize) {
    matmul(out, x, false, w, true, n, o, i, false);
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
    if let Some(dx) = dx {
        matmul(dx, dout, false, w, false, n, i, o, accumulate_dx);
    }
    matmul(dw, dout, true, x, false, o, i, n, true);
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
}
