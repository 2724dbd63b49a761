//! One-row f32 matmul from the (O, K) row layout against the same weights interleaved 16
//! rows at a time (the same products and sums in the same order), by weight memory cycled.
//! The experiment behind BENCHMARKS.md's "Nineteenth session" (the layout was not kept).
//!
//! Usage: RAYON_NUM_THREADS=2 cargo run --release -p kernels --example gemv_layout [-- team]
use std::arch::x86_64::*;
use std::time::Instant;

mod common;

fn main() {
    common::on_pool_maybe_team(run);
}

/// `out[c0..c1]`, 16 outputs at a time, each the lanes of its dot summed. `INTER`: w
/// interleaved, block b of 16 rows stored as [k/16][16 rows][16]; else the (O, K) rows.
#[target_feature(enable = "avx512f")]
unsafe fn gemv<const INTER: bool>(
    out: *mut f32,
    x: &[f32],
    w: &[f32],
    k: usize,
    c0: usize,
    c1: usize,
) {
    let xp = x.as_ptr();
    let mut c = c0;
    while c < c1 {
        let base = w.as_ptr().add(c * k);
        let mut a = [_mm512_setzero_ps(); 16];
        let mut p = 0;
        while p < k {
            let xv = _mm512_loadu_ps(xp.add(p));
            for (j, a) in a.iter_mut().enumerate() {
                let at = if INTER { p * 16 + j * 16 } else { j * k + p };
                *a = _mm512_add_ps(*a, _mm512_mul_ps(xv, _mm512_loadu_ps(base.add(at))));
            }
            p += 16;
        }
        let mut s = [0f32; 16];
        for j in 0..16 {
            s[j] = _mm512_reduce_add_ps(a[j]);
        }
        std::ptr::copy_nonoverlapping(s.as_ptr(), out.add(c), 16);
        c += 16;
    }
}

#[derive(Clone, Copy)]
struct P(*mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}
impl P {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn run() {
    let (k, o) = (128usize, 512usize);
    let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0.0f32; o];
    let team = kernels::par::in_team();
    println!("{} threads, team {}", rayon::current_num_threads(), team);
    for mib in [1.0f64, 2.0, 3.0, 4.0, 6.0, 8.0, 32.0] {
        let mats = ((mib * 1048576.0) / (k * o * 4) as f64).ceil() as usize;
        let ws: Vec<Vec<f32>> = (0..mats)
            .map(|m| (0..k * o).map(|i| ((i + m) as f32 * 0.001).cos()).collect())
            .collect();
        let calls = (64.0 * 1048576.0 / (mats * k * o * 4) as f64).ceil() as usize * mats;
        let bytes = (calls * k * o * 4) as f64;
        let mut line = format!("{mib:5.2} MiB:");
        for (name, f) in [
            ("rows", gemv::<false> as unsafe fn(_, _, _, _, _, _)),
            ("inter", gemv::<true>),
        ] {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for c in 0..calls {
                    let w = &ws[c % mats];
                    let ptr = P(out.as_mut_ptr());
                    let run = |t: usize| {
                        let half = o / 2;
                        let (c0, c1) = if team {
                            (t * half, (t + 1) * half)
                        } else {
                            (0, o)
                        };
                        unsafe { f(ptr.get(), &x, w, k, c0, c1) }
                    };
                    if !(team && kernels::par::team_for_each(2, &run)) {
                        run(0);
                    }
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            line += &format!("  {name} {:6.1} GB/s", bytes / best / 1e9);
        }
        println!("{line}");
    }
}
