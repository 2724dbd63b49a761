//! bf16 vs f32 matmul speed at moelab's training shapes (the three products of a linear
//! layer: forward x W^T, input gradient dy W, weight gradient dy^T x).
//!
//! Usage: cargo run --release -p kernels --example bf16_speed [-- N C O ...]
use kernels::{bf16, matmul};
use std::time::Instant;

fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut reps = 0;
        while t.elapsed().as_secs_f64() < 0.3 {
            f();
            reps += 1;
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let shapes: Vec<[usize; 3]> = if args.is_empty() {
        vec![
            [2048, 256, 768],
            [2048, 256, 4096],
            [2048, 256, 2048],
            [2048, 1024, 256],
            [512, 256, 512],
            [512, 256, 256],
        ]
    } else {
        args.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
    };
    println!(
        "threads {}, bf16 hardware {}",
        rayon::current_num_threads(),
        bf16::has_hardware()
    );
    for [n, i, o] in shapes {
        let x: Vec<f32> = (0..n * i).map(|v| (v % 13) as f32 * 0.1 - 0.6).collect();
        let w: Vec<f32> = (0..o * i).map(|v| (v % 7) as f32 * 0.1 - 0.3).collect();
        let dy: Vec<f32> = (0..n * o).map(|v| (v % 5) as f32 * 0.1 - 0.2).collect();
        let mut y = vec![0.0; n * o];
        let mut dx = vec![0.0; n * i];
        let mut dw = vec![0.0; o * i];
        let flop = 2.0 * (n * i * o) as f64;
        let mut line = format!("N={n:5} I={i:5} O={o:5}");
        for (name, f32t, bf16t) in [
            (
                "fwd",
                time(|| matmul::matmul(&mut y, &x, false, &w, true, n, o, i, false)),
                time(|| bf16::matmul(&mut y, &x, false, &w, true, n, o, i, false)),
            ),
            (
                "dx",
                time(|| matmul::matmul(&mut dx, &dy, false, &w, false, n, i, o, false)),
                time(|| bf16::matmul(&mut dx, &dy, false, &w, false, n, i, o, false)),
            ),
            (
                "dw",
                time(|| matmul::matmul(&mut dw, &dy, true, &x, false, o, i, n, true)),
                time(|| bf16::matmul(&mut dw, &dy, true, &x, false, o, i, n, true)),
            ),
        ] {
            line += &format!(
                "  {name} f32 {:5.1} bf16 {:5.1} GF/s ({:.2}x)",
                flop / f32t / 1e9,
                flop / bf16t / 1e9,
                f32t / bf16t
            );
        }
        println!("{line}");
    }
}
