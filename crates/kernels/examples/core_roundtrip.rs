//! Core-to-core latency: two threads hand one cache line back and forth; prints the round
//! trip. The two-thread decode paths (`kernels::par::with_team`, rayon's loops) move with it,
//! and on our VMs it changes by the hour (~65-150 ns or ~320-420 ns).
//!
//! Usage: cargo run --release -p kernels --example core_roundtrip
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn main() {
    let line = Arc::new(AtomicU64::new(0));
    let other = line.clone();
    let n = 200_000u64;
    let peer = std::thread::spawn(move || {
        for i in 0..n {
            while other.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            other.store(2 * i + 2, Ordering::Release);
        }
    });
    let t = std::time::Instant::now();
    for i in 0..n {
        line.store(2 * i + 1, Ordering::Release);
        while line.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    peer.join().expect("peer thread");
    println!("round trip {ns:.0} ns");
}
