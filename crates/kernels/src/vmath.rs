//! Vectorisable math for the elementwise kernels: an exp of our own and fixed-order lane
//! reductions.
//!
//! Why our own `exp`: libm's `expf` is a scalar call (4% of a training step under perf) that
//! blocks vectorisation, and its last bit may differ between libm versions. This one is
//! branch-free (LLVM vectorises loops that call it) and gives the same bits on every machine.
//!
//! Why lane reductions: a plain `iter().sum()` is a serial dependency chain. [`sum`] keeps
//! [`LANES`] partial sums and combines them in a fixed order, so the result is the same for
//! any thread count and any SIMD width (the order is in the code, not in the hardware).
//!
//! [`simd!`] wraps a row kernel in runtime dispatch (AVX-512 / AVX2 / baseline) with the
//! `multiversion` crate; rustc never contracts `a * b + c` into an FMA, so every version
//! computes the same bits.

/// Partial sums kept by the lane reductions.
pub const LANES: usize = 16;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding it rounds a float of magnitude < 2^22 to the nearest integer, which
/// then sits in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

/// e^x with about 2 ulp error on [-87.3, 88.7]; clamps outside (underflows to ~1e-38 instead
/// of 0, overflows to ~3e38 instead of inf); NaN propagates. Cephes' `expf` polynomial.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    let out = y * scale;
    if x.is_nan() {
        x
    } else {
        out
    }
}

/// Logistic sigmoid via [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
pub(crate) fn combine(mut acc: [f32; LANES], rem: &[f32], op: impl Fn(f32, f32) -> f32) -> f32 {
    for (j, r) in rem.iter().enumerate() {
        acc[j] = op(acc[j], *r);
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] = op(acc[j], acc[j + w]);
        }
    }
    acc[0]
}

/// Sum in a fixed order: LANES strided partial sums, then a pairwise tree.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let it = x.chunks_exact(LANES);
    let rem = it.remainder();
    for c in it {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    combine(acc, rem, |a, b| a + b)
}

/// Dot product in the same fixed order as [`sum`].
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let ia = a.chunks_exact(LANES);
    let ib = b.chunks_exact(LANES);
    let (rem_a, rem_b) = (ia.remainder(), ib.remainder());
    for (ca, cb) in ia.zip(ib) {
        for j in 0..LANES {
            acc[j] += ca[j] * cb[j];
        }
    }
    let mut tail = [0.0f32; LANES];
    for j in 0..rem_a.len() {
        tail[j] = rem_a[j] * rem_b[j];
    }
    combine(acc, &tail[..rem_a.len()], |a, b| a + b)
}

/// Maximum (exact in any order; NaN-ignoring like `f32::max`).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let it = x.chunks_exact(LANES);
    let rem = it.remainder();
    for c in it {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    combine(acc, rem, f32::max)
}

/// Marks a function for runtime dispatch to AVX-512, AVX2 or the baseline.
#[macro_export]
macro_rules! simd {
    ($($item:tt)*) => {
        #[multiversion::multiversion(targets(
            "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+avx+fma+sse4.2+sse4.1+ssse3+sse3",
            "x86_64+avx2+avx+fma+sse4.2+sse4.1+ssse3+sse3",
        ))]
        $($item)*
    };
}

/// Eight `hsum8`s at once: lane t of the result is the sum of `r[t]`'s 8 lanes in hsum8's
/// order (lane j + lane j + 4, then (0 + 2) + (1 + 3)), so a transposed reduction gives each
/// vector's bits exactly.
///
/// # Safety
/// AVX must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
pub(crate) unsafe fn hsum8_x8(r: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // [T_t | T_t+4] with T = low half + high half: lanes (0+4, 1+5, 2+6, 3+7)
    let half = |a, b| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    };
    let (x, y) = (half(r[0], r[4]), half(r[1], r[5]));
    let (z, w) = (half(r[2], r[6]), half(r[3], r[7]));
    // (0+4)+(2+6) and (1+5)+(3+7) per vector
    let pairs = |a, b| {
        let (a, b) = (_mm256_castps_pd(a), _mm256_castps_pd(b));
        _mm256_add_ps(
            _mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
            _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)),
        )
    };
    let (xy, zw) = (pairs(x, y), pairs(z, w));
    _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(xy, zw),
        _mm256_shuffle_ps::<0b11_01_11_01>(xy, zw),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64) - want).abs() / want;
            worst = worst.max(rel);
            x += 0.0137;
        }
        println!("exp worst relative error {worst:.2e}");
        assert!(worst < 3e-7, "exp relative error {worst:.2e}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn reductions() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 17.5) * 0.25).collect();
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum(&x) as f64 - s).abs() < 1e-5);
        assert_eq!(max(&x), 4.625);
        let d: f64 = x.iter().map(|&v| (v * v) as f64).sum();
        assert!((dot(&x, &x) as f64 - d).abs() < 1e-3);
        assert_eq!(sum(&[]), 0.0);
    }
}
