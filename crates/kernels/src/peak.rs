//! Measured fp32 FMA peak of one core: 12 independent vector FMA chains, long enough to hide
//! FMA latency, for a fixed number of iterations. Used to state MFU against what the core
//! really sustains (the nominal clock x FLOP/cycle figure can be far off on boosting or
//! double-pumping CPUs).

use std::time::Instant;

/// GFLOP/s of fp32 FMAs on the calling thread (about 0.1 s of work), using the widest FMA
/// this CPU has (AVX-512, else AVX2+FMA); `None` on CPUs with neither.
pub fn fma_gflops() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let iters = 10_000_000u64;
        let t = Instant::now();
        let flops = if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            let s = unsafe { x86::fma512(iters) };
            assert!(s.is_finite());
            iters * 12 * 16 * 2
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            let s = unsafe { x86::fma256(iters) };
            assert!(s.is_finite());
            iters * 12 * 8 * 2
        } else {
            return None;
        };
        Some(flops as f64 / t.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = Instant::now();
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 12];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256(iters: u64) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut out = [0.0f32; 8];
        let mut s = 0.0;
        for x in acc {
            _mm256_storeu_ps(out.as_mut_ptr(), x);
            s += out.iter().sum::<f32>();
        }
        s
    }
}
