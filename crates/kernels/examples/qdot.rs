//! Single-thread throughput of the quantized matmul kernel for one activation row (decoding)
//! and for 64 rows (prefill), in a cache-resident and a memory-resident weight matrix:
//! `cargo run --release -p kernels --example qdot`.

use kernels::quant::{qlinear_rows, QActs, QMatrix, QType};
use std::time::Instant;

fn main() {
    let threads = std::env::var("THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        for ty in QType::ALL {
            for (rows, cols) in [(1536, 576), (49152, 576)] {
                let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect();
                let m = QMatrix::quantize(ty, &w, rows, cols);
                for n in [1, 64] {
                    let x: Vec<f32> = (0..n * cols).map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0).collect();
                    let mut a = QActs::new();
                    a.quantize(&x, cols);
                    let mut out = vec![0.0; n * rows];
                    let reps = (200_000_000 / (rows * cols * n)).max(1);
                    qlinear_rows(&mut out, &a, m.view(), 0, rows, false);
                    let t = Instant::now();
                    for _ in 0..reps {
                        qlinear_rows(&mut out, &a, m.view(), 0, rows, false);
                    }
                    let s = t.elapsed().as_secs_f64() / reps as f64;
                    let gmac = (rows * cols * n) as f64 / s / 1e9;
                    let gbs = m.bytes().len() as f64 / s / 1e9;
                    println!("{:5} {rows:6}x{cols} n={n:2}: {:8.3} ms  {gmac:6.2} GMAC/s  weights {gbs:6.2} GB/s", ty.name(), s * 1e3);
                }
            }
        }
    });
}
