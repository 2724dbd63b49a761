//! Single-thread throughput of the quantized matmul kernel for one activation row (decoding)
//! and for 64 rows (prefill), in a cache-resident and a memory-resident weight matrix, for
//! every type (the K-quants on random blocks, which moelab cannot make from f32 weights):
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
        for ty in QType::ALL.into_iter().chain(QType::K) {
            // whole 256-value super-blocks for the K-quants
            for (rows, cols) in [(1536, 768), (49152, 768)] {
                let m = if ty.quantizable() {
                    let w: Vec<f32> = (0..rows * cols)
                        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
                        .collect();
                    QMatrix::quantize(ty, &w, rows, cols)
                } else {
                    let n = QMatrix::size(ty, rows, cols);
                    let mut b: Vec<u8> = (0..n).map(|i| ((i * 2654435761usize) >> 13) as u8).collect();
                    // finite f16 scales (d, and Q4_K's dmin) of 2^-10
                    let at: &[usize] = if ty == QType::Q4_K { &[0, 2] } else { &[208] };
                    for blk in b.chunks_exact_mut(ty.block_bytes()) {
                        for &a in at {
                            blk[a..a + 2].copy_from_slice(&0x1400u16.to_le_bytes());
                        }
                    }
                    QMatrix::from_bytes(ty, rows, cols, b)
                };
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
