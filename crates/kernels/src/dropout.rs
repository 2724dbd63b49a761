//! Dropout (Srivastava et al. 2014), inverted: kept elements are scaled by 1/(1-p).
//!
//! The mask is drawn from a ChaCha8 generator keyed by (seed, stream); chunk c of the mask
//! starts at word position c * CHUNK of that stream, so any thread can draw any chunk and the
//! mask is the same for every thread count.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

const CHUNK: usize = 4096;

/// Fills `mask` with 0 (dropped, probability `p`) or 1/(1-p) (kept).
pub fn dropout_mask(mask: &mut [f32], p: f32, seed: u64, stream: u64) {
    assert!(
        (0.0..1.0).contains(&p),
        "dropout probability {p} must be in [0, 1)"
    );
    let keep = 1.0 / (1.0 - p);
    // P(u32 < threshold) = 1 - p
    let threshold = ((1.0 - p as f64) * 4_294_967_296.0) as u64;
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, m)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        // one u32 per element: a u32 is one 32-bit word of the stream
        rng.set_word_pos((c * CHUNK) as u128);
        for x in m.iter_mut() {
            *x = if (rng.gen::<u32>() as u64) < threshold {
                keep
            } else {
                0.0
            };
        }
    });
}

/// `x *= mask` (forward and backward of dropout alike).
pub fn apply_mask(x: &mut [f32], mask: &[f32]) {
    x.par_chunks_mut(CHUNK)
        .zip(mask.par_chunks(CHUNK))
        .for_each(|(x, m)| {
            for (a, b) in x.iter_mut().zip(m) {
                *a *= b;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_rate_and_thread_independence() {
        let mut a = vec![0.0; 100_000];
        dropout_mask(&mut a, 0.2, 7, 3);
        let dropped = a.iter().filter(|&&x| x == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.2).abs() < 0.01, "dropped fraction {dropped}");
        assert!(a.iter().all(|&x| x == 0.0 || x == 1.25));
        let mut b = vec![0.0; 100_000];
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| dropout_mask(&mut b, 0.2, 7, 3));
        assert_eq!(a, b);
        dropout_mask(&mut b, 0.2, 7, 4);
        assert_ne!(a, b, "another stream gives another mask");
    }
}
