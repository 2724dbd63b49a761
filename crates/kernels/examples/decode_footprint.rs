//! One decode thread's matmuls as the student's team runs them (the caller's share of one
//! layer: its q, k and v rows, its 68 output-projection columns, a whole expert's gate/up
//! and down products), over L distinct layers laid out one after another as in the
//! parameters, repeated: time per layer and weight bytes per second by how much memory the
//! sequence cycles through. It separates a step's cost with its weights in the core's L2
//! from the cost with them streamed from L3 (the student's step cycles more than a 2 MB L2
//! per core: BENCHMARKS.md, "Twenty-first session").
//!
//! Usage: RAYON_NUM_THREADS=1 cargo run --release -p kernels --example decode_footprint
//! With PF=N (x86_64), before each matrix the first N floats of the next one are prefetched
//! into L2 (`prefetcht1`, one per cache line).
use std::time::Instant;

fn main() {
    // (inputs, outputs, accumulate) of the caller's matmuls in one layer
    let layer: &[(usize, usize, bool)] = &[
        (128, 64, false),
        (128, 64, false),
        (128, 64, false),
        (128, 68, true),
        (128, 352, false),
        (176, 128, true),
    ];
    let layer_floats: usize = layer.iter().map(|&(k, o, _)| k * o).sum();
    let pf: usize = std::env::var("PF").map_or(0, |v| v.parse().expect("PF: a number"));
    let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin() * 0.1).collect();
    let mut out = vec![0.0f32; 512];
    for layers in [1usize, 2, 4, 6, 8, 16] {
        let params: Vec<f32> = (0..layers * layer_floats)
            .map(|i| ((i % 1000) as f32 * 0.001).cos())
            .collect();
        let n = params.len();
        let bytes = (n * 4) as f64;
        // about 200 MB of weights per timing
        let steps = (200e6 / bytes) as usize + 1;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..steps {
                let mut off = 0;
                for _ in 0..layers {
                    for &(k, o, acc) in layer {
                        if pf > 0 {
                            prefetch_l2(&params[(off + k * o) % n..], pf.min(k * o));
                        }
                        let w = &params[off..off + k * o];
                        kernels::matmul::linear_rows(&mut out[..o], &x[..k], w, 1, k, o, acc);
                        off += k * o;
                    }
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "layers {layers:2}, {:5.2} MiB cycled: {:5.1} GB/s, {:5.2} us per layer",
            bytes / 1048576.0,
            bytes * steps as f64 / best / 1e9,
            best / steps as f64 / layers as f64 * 1e6
        );
    }
}

/// Prefetches the cache lines of the first `len` floats of `a` into L2.
fn prefetch_l2(a: &[f32], len: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in (0..len.min(a.len())).step_by(16) {
        // SAFETY: a prefetch of an address inside `a`; it reads nothing architecturally.
        unsafe {
            use std::arch::x86_64::*;
            _mm_prefetch::<_MM_HINT_T1>(a.as_ptr().add(i) as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (a, len);
}
