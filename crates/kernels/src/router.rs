//! MoE router: scores (softmax or sigmoid), top-k selection with a deterministic tie-break,
//! optional renormalisation, the Switch/GShard load-balancing loss, the ST-MoE router z-loss,
//! and DeepSeek-V3's auxiliary-loss-free bias balancing.
//!
//! References: Fedus et al. 2021 (Switch, aux loss), Zoph et al. 2022 (ST-MoE, z-loss),
//! DeepSeek-AI 2024 (DeepSeek-V3, sigmoid scores + selection bias).
//!
//! Shapes: logits, scores (N,E); top-k indices and weights (N,K).

use crate::par::ROWS_PER_TASK;
use crate::vmath::exp;
use rayon::prelude::*;

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFn {
    Softmax,
    Sigmoid,
}

/// Scores, top-k selection and combine weights for every token.
///
/// Selection ranks `score + bias` (bias only for selection, DeepSeek-V3); ties go to the lower
/// expert index. Weights are the raw scores of the chosen experts, divided by their sum when
/// `renorm`.
#[allow(clippy::too_many_arguments)]
pub fn router_forward(
    scores: &mut [f32],
    idx: &mut [u32],
    w: &mut [f32],
    logits: &[f32],
    bias: Option<&[f32]>,
    e: usize,
    k: usize,
    score_fn: ScoreFn,
    renorm: bool,
) {
    assert!(k <= e && k > 0, "top_k {k} must be in 1..=n_experts {e}");
    scores
        .par_chunks_mut(e * ROWS_PER_TASK)
        .zip(idx.par_chunks_mut(k * ROWS_PER_TASK))
        .zip(w.par_chunks_mut(k * ROWS_PER_TASK))
        .zip(logits.par_chunks(e * ROWS_PER_TASK))
        .for_each(|(((s, idx), w), l)| {
            for (((s, idx), w), l) in s
                .chunks_mut(e)
                .zip(idx.chunks_mut(k))
                .zip(w.chunks_mut(k))
                .zip(l.chunks(e))
            {
                match score_fn {
                    ScoreFn::Softmax => {
                        let mx = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let mut sum = 0.0;
                        for (s, l) in s.iter_mut().zip(l) {
                            *s = exp(l - mx);
                            sum += *s;
                        }
                        let inv = 1.0 / sum;
                        s.iter_mut().for_each(|s| *s *= inv);
                    }
                    ScoreFn::Sigmoid => {
                        for (s, l) in s.iter_mut().zip(l) {
                            *s = 1.0 / (1.0 + exp(-l));
                        }
                    }
                }
                let mut taken = 0u64; // E <= 64 is checked by the model config
                for j in 0..k {
                    let mut best = usize::MAX;
                    let mut best_v = f32::NEG_INFINITY;
                    for x in 0..e {
                        if taken & (1 << x) != 0 {
                            continue;
                        }
                        let v = s[x] + bias.map_or(0.0, |b| b[x]);
                        // strict > keeps the lower index on ties; NaN never wins
                        if best == usize::MAX || v > best_v {
                            best = x;
                            best_v = v;
                        }
                    }
                    taken |= 1 << best;
                    idx[j] = best as u32;
                    w[j] = s[best];
                }
                if renorm {
                    let sum: f32 = w.iter().sum();
                    w.iter_mut().for_each(|x| *x /= sum);
                }
            }
        });
}

/// Gradient of the combine weights into the scores: `dscores (N,E)` is overwritten (zero for
/// experts that were not chosen).
#[allow(clippy::too_many_arguments)]
pub fn topk_weights_backward(
    dscores: &mut [f32],
    dw: &[f32],
    w: &[f32],
    idx: &[u32],
    scores: &[f32],
    e: usize,
    k: usize,
    renorm: bool,
) {
    dscores
        .par_chunks_mut(e * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, ds)| {
            for (i, ds) in ds.chunks_mut(e).enumerate() {
                let r = blk * ROWS_PER_TASK + i;
                ds.fill(0.0);
                let (dw, w, idx) = (
                    &dw[r * k..(r + 1) * k],
                    &w[r * k..(r + 1) * k],
                    &idx[r * k..(r + 1) * k],
                );
                if renorm {
                    // w_j = s_j / S, S = sum of chosen scores
                    let ssum: f32 = idx.iter().map(|&x| scores[r * e + x as usize]).sum();
                    let dot: f32 = dw.iter().zip(w).map(|(a, b)| a * b).sum();
                    for j in 0..k {
                        ds[idx[j] as usize] = (dw[j] - dot) / ssum;
                    }
                } else {
                    for j in 0..k {
                        ds[idx[j] as usize] = dw[j];
                    }
                }
            }
        });
}

/// Backward through the score function: `dlogits (N,E)` is overwritten from `dscores`.
pub fn scores_backward(
    dlogits: &mut [f32],
    dscores: &[f32],
    scores: &[f32],
    e: usize,
    score_fn: ScoreFn,
) {
    dlogits
        .par_chunks_mut(e * ROWS_PER_TASK)
        .zip(dscores.par_chunks(e * ROWS_PER_TASK))
        .zip(scores.par_chunks(e * ROWS_PER_TASK))
        .for_each(|((dl, ds), s)| {
            for ((dl, ds), s) in dl.chunks_mut(e).zip(ds.chunks(e)).zip(s.chunks(e)) {
                match score_fn {
                    ScoreFn::Softmax => {
                        let dot: f32 = ds.iter().zip(s).map(|(a, b)| a * b).sum();
                        for j in 0..e {
                            dl[j] = s[j] * (ds[j] - dot);
                        }
                    }
                    ScoreFn::Sigmoid => {
                        for j in 0..e {
                            dl[j] = ds[j] * s[j] * (1.0 - s[j]);
                        }
                    }
                }
            }
        });
}

/// Tokens routed to each expert: `counts (E)` from `idx (N,K)`.
pub fn expert_counts(counts: &mut [u32], idx: &[u32]) {
    counts.fill(0);
    for &x in idx {
        counts[x as usize] += 1;
    }
}

/// Switch-style load-balancing loss `E * sum_e f_e * P_e`, with `f_e` the fraction of routed
/// slots that chose expert e (no gradient) and `P_e` the mean over tokens of the scores
/// normalised to sum to one per token (for softmax scores: the scores themselves).
pub fn aux_loss_forward(
    scores: &[f32],
    counts: &[u32],
    e: usize,
    k: usize,
    score_fn: ScoreFn,
) -> f32 {
    let n = scores.len() / e;
    let mut p = vec![0.0f64; e];
    for s in scores.chunks(e) {
        let norm = match score_fn {
            ScoreFn::Softmax => 1.0,
            ScoreFn::Sigmoid => s.iter().map(|&x| x as f64).sum::<f64>(),
        };
        for j in 0..e {
            p[j] += s[j] as f64 / norm;
        }
    }
    let mut aux = 0.0f64;
    for j in 0..e {
        let f = counts[j] as f64 / (n * k) as f64;
        aux += f * p[j] / n as f64;
    }
    (aux * e as f64) as f32
}

/// Adds `coef * d(aux)/d(scores)` into `dscores (N,E)`.
pub fn aux_loss_backward(
    dscores: &mut [f32],
    scores: &[f32],
    counts: &[u32],
    e: usize,
    k: usize,
    score_fn: ScoreFn,
    coef: f32,
) {
    let n = scores.len() / e;
    // dP_e = coef * E * f_e; dp_te = dP_e / N
    let dp: Vec<f32> = (0..e)
        .map(|j| (coef as f64 * e as f64 * counts[j] as f64 / (n * k) as f64 / n as f64) as f32)
        .collect();
    dscores
        .par_chunks_mut(e * ROWS_PER_TASK)
        .zip(scores.par_chunks(e * ROWS_PER_TASK))
        .for_each(|(ds, s)| {
            for (ds, s) in ds.chunks_mut(e).zip(s.chunks(e)) {
                match score_fn {
                    ScoreFn::Softmax => {
                        for j in 0..e {
                            ds[j] += dp[j];
                        }
                    }
                    ScoreFn::Sigmoid => {
                        // p_j = s_j / S  =>  ds_j = (dp_j - sum_i dp_i p_i) / S
                        let sum: f32 = s.iter().sum();
                        let dot: f32 = dp.iter().zip(s).map(|(a, b)| a * b).sum::<f32>() / sum;
                        for j in 0..e {
                            ds[j] += (dp[j] - dot) / sum;
                        }
                    }
                }
            }
        });
}

/// Router z-loss `mean_t logsumexp(logits_t)^2` (ST-MoE).
pub fn z_loss_forward(logits: &[f32], e: usize) -> f32 {
    let n = logits.len() / e;
    let mut z = 0.0f64;
    for l in logits.chunks(e) {
        let lse = logsumexp(l);
        z += (lse as f64) * (lse as f64);
    }
    (z / n as f64) as f32
}

/// Adds `coef * d(z)/d(logits)` into `dlogits (N,E)`.
pub fn z_loss_backward(dlogits: &mut [f32], logits: &[f32], e: usize, coef: f32) {
    let n = logits.len() / e;
    dlogits
        .par_chunks_mut(e * ROWS_PER_TASK)
        .zip(logits.par_chunks(e * ROWS_PER_TASK))
        .for_each(|(dl, l)| {
            for (dl, l) in dl.chunks_mut(e).zip(l.chunks(e)) {
                let lse = logsumexp(l);
                let g = coef * 2.0 * lse / n as f32;
                for j in 0..e {
                    dl[j] += g * exp(l[j] - lse);
                }
            }
        });
}

fn logsumexp(l: &[f32]) -> f32 {
    let mx = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    mx + l.iter().map(|x| exp(x - mx)).sum::<f32>().ln()
}

/// DeepSeek-V3 bias balancing: move each expert's selection bias by `rate` toward balance
/// (up when the expert got fewer than the mean number of tokens, down when more).
pub fn bias_update(bias: &mut [f32], counts: &[u32], rate: f32) {
    let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len() as f64;
    for (b, &c) in bias.iter_mut().zip(counts) {
        let c = c as f64;
        if c < mean {
            *b += rate;
        } else if c > mean {
            *b -= rate;
        }
    }
}
