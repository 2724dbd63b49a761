//! Sampling the next token from logits. Deterministic for a given seed: the generator is a
//! named ChaCha8 stream, candidates are ordered by (logit desc, id asc).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches top_p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            seed: 0,
        }
    }
}

pub struct Sampler {
    p: SamplingParams,
    rng: ChaCha8Rng,
    idx: Vec<u32>,
    probs: Vec<f32>,
}

impl Sampler {
    pub fn new(p: SamplingParams) -> Sampler {
        Sampler {
            p,
            rng: ChaCha8Rng::seed_from_u64(p.seed),
            idx: vec![],
            probs: vec![],
        }
    }

    /// Next token id from `logits (V)`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let v = logits.len();
        let better =
            |a: usize, b: usize| logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
        if self.p.temperature <= 0.0 {
            return (0..v).fold(0, |best, i| if better(i, best) { i } else { best }) as u32;
        }
        self.idx.clear();
        self.idx.extend(0..v as u32);
        self.idx.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let k = if self.p.top_k == 0 {
            v
        } else {
            self.p.top_k.min(v)
        };
        self.idx.truncate(k);
        let mx = logits[self.idx[0] as usize];
        self.probs.clear();
        self.probs.extend(
            self.idx
                .iter()
                .map(|&i| ((logits[i as usize] - mx) / self.p.temperature).exp()),
        );
        let total: f32 = self.probs.iter().sum();
        // top-p: cut after the cumulative probability reaches top_p
        let mut cum = 0.0;
        let mut keep = self.probs.len();
        for (i, p) in self.probs.iter().enumerate() {
            cum += p / total;
            if cum >= self.p.top_p {
                keep = i + 1;
                break;
            }
        }
        let mass: f32 = self.probs[..keep].iter().sum();
        let mut r = self.rng.gen::<f32>() * mass;
        for i in 0..keep {
            r -= self.probs[i];
            if r <= 0.0 {
                return self.idx[i];
            }
        }
        self.idx[keep - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_seeds() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut g = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(g.sample(&logits), 1);
        let mut k1 = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 5,
        });
        assert!((0..20).all(|_| k1.sample(&logits) == 1));
        let mut a = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 9,
        });
        let mut b = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 9,
        });
        let sa: Vec<u32> = (0..50).map(|_| a.sample(&logits)).collect();
        let sb: Vec<u32> = (0..50).map(|_| b.sample(&logits)).collect();
        assert_eq!(sa, sb);
        assert!(
            sa.contains(&2) && sa.contains(&1),
            "both likely tokens should appear: {sa:?}"
        );
        let mut p = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.3,
            seed: 1,
        });
        assert!(
            (0..20).all(|_| p.sample(&logits) == 1),
            "top_p 0.3 keeps only the top token"
        );
    }
}
