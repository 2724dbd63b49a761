//! One-row f32 matmul speed (`linear_rows`, width 128 x 512 outputs, the student's shapes)
//! by how much weight memory a sequence of calls cycles through: from a quarter MiB (in a
//! core's L2) to 32 MiB (streamed from L3). A decode step touches every active weight once,
//! so this bounds how fast an f32 model of a given size can decode on this host.
//!
//! Usage: RAYON_NUM_THREADS=2 cargo run --release -p kernels --example gemv_cache [-- team]
//! (`team`: inside `par::with_team`, as the decoder runs; else one thread).
use std::time::Instant;

mod common;

fn main() {
    common::on_pool_maybe_team(run);
}

fn run() {
    let (k, o) = (128usize, 512usize);
    let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0.0f32; o];
    println!(
        "{} threads, team {}",
        rayon::current_num_threads(),
        kernels::par::in_team()
    );
    for mib in [0.25f64, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 32.0] {
        let mats = ((mib * 1048576.0) / (k * o * 4) as f64).ceil() as usize;
        let ws: Vec<Vec<f32>> = (0..mats)
            .map(|m| (0..k * o).map(|i| ((i + m) as f32 * 0.001).cos()).collect())
            .collect();
        // about 64 MiB of weights read per timing
        let calls = (64.0 * 1048576.0 / (mats * k * o * 4) as f64).ceil() as usize * mats;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for c in 0..calls {
                kernels::matmul::linear_rows(&mut out, &x, &ws[c % mats], 1, k, o, false);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let bytes = (calls * k * o * 4) as f64;
        println!(
            "weights cycled {mib:5.2} MiB: {:6.1} GB/s  {:6.2} GMAC/s",
            bytes / best / 1e9,
            bytes / 4.0 / best / 1e9
        );
    }
}
