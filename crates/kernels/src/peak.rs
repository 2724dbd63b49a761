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

/// GFLOP/s of AVX512-BF16 dot products (`vdpbf16ps`, 2 multiply-adds per lane) on the
/// calling thread, as [`fma_gflops`] measures FMAs; `None` without AVX512-BF16.
pub fn bf16_gflops() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !crate::bf16::has_hardware() {
            return None;
        }
        let iters = 10_000_000u64;
        let t = Instant::now();
        // SAFETY: has_hardware checked AVX512-BF16 (and AVX512-BW) at run time.
        let s = unsafe { x86::dpbf16(iters) };
        assert!(s.is_finite());
        Some((iters * 12 * 16 * 4) as f64 / t.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether bf16 matmuls outrun fp32 ones on this CPU: its `vdpbf16ps` rate is at least
/// 1.4x its fp32 FMA rate (AMD Zen 4: 2x; the Intel Xeon this was measured on: 0.5x, one
/// `vdpbf16ps` every other cycle beside two FMAs a cycle, where bf16 training runs at 0.57x
/// of fp32). Measured once per process (~0.6 s).
pub fn bf16_pays() -> bool {
    static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAYS.get_or_init(|| {
        // the best of three of each, alternating: a moment of load elsewhere does not
        // decide it (the two kinds of host measured are 4x apart: 2.0 and 0.5)
        let (mut b, mut f) = (0f64, 0f64);
        for _ in 0..3 {
            b = b.max(bf16_gflops().unwrap_or(0.0));
            f = f.max(fma_gflops().unwrap_or(f64::INFINITY));
        }
        b >= 1.4 * f
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 12];
        // 1.0 and 2^-24 as bf16 pairs
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3f80));
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3380));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

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
