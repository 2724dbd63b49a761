//! moelab's CPU compute kernels: every layer of the MoE transformer as a pair of free
//! functions, `foo_forward` / `foo_backward`, in the style of llm.c.
//!
//! What this crate is: plain functions over `&[f32]` / `&mut [f32]` slices with explicit
//! shapes. What it is not: a tensor library, an autograd engine, or anything that knows about
//! models, configs or files.
//!
//! Shape letters, used in every shape comment of this crate and of `model`:
//! B batch, T time (sequence), N = B*T rows (tokens), C channels (model width),
//! H query heads, G key/value heads (grouped-query attention), D head dim,
//! E routed experts, K top-k, F FFN/expert hidden width, V vocabulary.
//!
//! Determinism contract: every function gives bit-identical results for any rayon thread
//! count. Work is split across threads only along dimensions that are not summed over; sums
//! over tokens (weight gradients) are computed per output element in a fixed order.
//!
//! Gradient convention: `*_backward` functions ACCUMULATE (`+=`) into parameter gradients,
//! so gradient accumulation over micro-batches needs no extra buffers. Input gradients are
//! overwritten unless a function's doc says it accumulates.

pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod dispatch;
pub mod dropout;
pub mod embedding;
pub mod flash;
#[cfg(target_arch = "x86_64")]
mod flash_bf16;
pub mod loss;
pub mod matmul;
pub mod muon;
pub mod par;
pub mod peak;
pub mod quant;
pub mod rmsnorm;
pub mod rope;
pub mod router;
pub mod swiglu;
pub mod vmath;

/// Target id that contributes nothing to the loss (masked position).
pub const IGNORE_INDEX: u32 = u32::MAX;

#[cfg(test)]
mod cpu_tests {
    /// The CPU features the dispatching kernels see, printed. `MOELAB_EXPECT_CPU` (set by
    /// `scripts/test-cpus.sh`, which runs kernel tests on emulated CPUs) lists features that
    /// must be present (`avx2`) or absent (`-avx512f`), comma-separated: an emulator that
    /// showed other features than asked for would fail the run instead of testing other paths
    /// than the ones it claims to.
    #[test]
    fn cpu_features_are_as_expected() {
        #[cfg(target_arch = "x86_64")]
        let features: Vec<(&str, bool)> = {
            use std::arch::is_x86_feature_detected as has;
            vec![
                ("avx", has!("avx")),
                ("avx2", has!("avx2")),
                ("fma", has!("fma")),
                ("f16c", has!("f16c")),
                ("avx512f", has!("avx512f")),
                ("avx512bw", has!("avx512bw")),
                ("avx512vnni", has!("avx512vnni")),
                ("avx512bf16", has!("avx512bf16")),
            ]
        };
        #[cfg(not(target_arch = "x86_64"))]
        let features: Vec<(&str, bool)> = Vec::new();
        println!(
            "cpu: {:?}, quantized path {:?}",
            features,
            crate::quant::QPath::best()
        );
        let Ok(expect) = std::env::var("MOELAB_EXPECT_CPU") else {
            return;
        };
        for want in expect.split(',').filter(|w| !w.is_empty()) {
            let (name, present) = match want.strip_prefix('-') {
                Some(n) => (n, false),
                None => (want, true),
            };
            let seen = features.iter().find(|f| f.0 == name).map(|f| f.1);
            assert_eq!(seen, Some(present), "feature {name}: {features:?}");
        }
    }
}
