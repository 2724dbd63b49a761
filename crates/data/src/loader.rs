//! Batches for training and evaluation.
//!
//! Training batches are random windows (as nanoGPT's `get_batch`), but batch k is drawn from
//! its own ChaCha8 stream k of the seed: a batch depends only on (seed, k), so the loader's
//! whole state is the next batch index, saved in checkpoints, and resuming needs no replay.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A target that contributes nothing to the loss; the same value as `kernels::IGNORE_INDEX`
/// (this crate does not depend on kernels).
pub const IGNORE_INDEX: u32 = u32::MAX;

/// Random-window batches over a token stream.
pub struct Loader<'a> {
    tokens: &'a [u32],
    b: usize,
    t: usize,
    seed: u64,
}

impl<'a> Loader<'a> {
    /// Needs at least t + 1 tokens.
    pub fn new(tokens: &'a [u32], b: usize, t: usize, seed: u64) -> Option<Self> {
        (tokens.len() > t).then_some(Loader { tokens, b, t, seed })
    }

    /// Fills `x (B*T)` and `y (B*T)` with batch number `k`.
    pub fn batch(&self, k: u64, x: &mut [u32], y: &mut [u32]) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(k);
        let t = self.t;
        for i in 0..self.b {
            let off = rng.gen_range(0..self.tokens.len() - t);
            x[i * t..(i + 1) * t].copy_from_slice(&self.tokens[off..off + t]);
            y[i * t..(i + 1) * t].copy_from_slice(&self.tokens[off + 1..off + t + 1]);
        }
    }
}

/// Non-overlapping evaluation windows covering every token once as a target: batch `i` of
/// `n_batches(tokens, b, t)`. Rows past the end are padded with ignored targets.
pub fn eval_batch(tokens: &[u32], b: usize, t: usize, i: usize, x: &mut [u32], y: &mut [u32]) {
    x.fill(0);
    y.fill(IGNORE_INDEX);
    for r in 0..b {
        let start = (i * b + r) * t;
        for j in 0..t {
            let p = start + j;
            if p + 1 >= tokens.len() {
                return;
            }
            x[r * t + j] = tokens[p];
            y[r * t + j] = tokens[p + 1];
        }
    }
}

/// Number of evaluation batches for `tokens`.
pub fn eval_batches(tokens: &[u32], b: usize, t: usize) -> usize {
    (tokens.len().saturating_sub(1)).div_ceil(b * t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_depend_only_on_seed_and_index() {
        let toks: Vec<u32> = (0..1000).collect();
        let l = Loader::new(&toks, 4, 16, 7).unwrap();
        let (mut x1, mut y1, mut x2, mut y2) = (vec![0; 64], vec![0; 64], vec![0; 64], vec![0; 64]);
        l.batch(5, &mut x1, &mut y1);
        l.batch(3, &mut x2, &mut y2);
        l.batch(5, &mut x2, &mut y2);
        assert_eq!((x1.clone(), y1.clone()), (x2, y2));
        assert_eq!(y1[0], x1[0] + 1);
    }

    #[test]
    fn eval_windows_cover_every_target_once() {
        let toks: Vec<u32> = (0..100).collect();
        let (b, t) = (2, 8);
        let mut seen: Vec<u32> = vec![];
        for i in 0..eval_batches(&toks, b, t) {
            let (mut x, mut y) = (vec![0; b * t], vec![0; b * t]);
            eval_batch(&toks, b, t, i, &mut x, &mut y);
            seen.extend(y.iter().filter(|&&v| v != IGNORE_INDEX));
        }
        assert_eq!(seen, (1..100).collect::<Vec<u32>>());
    }
}
