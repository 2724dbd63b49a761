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

/// How a router chooses: E experts, K per token, the score function, whether the chosen
/// weights are renormalised to sum to 1, a factor on the final weights (DeepSeek-V3's
/// `routed_scaling_factor`), and group-limited selection (DeepSeek-V3's `n_group` /
/// `topk_group`: experts form `n_group` equal groups, a group scores the sum of its two best
/// experts, and only the `topk_group` best groups are eligible; 1 / 1 is plain top-k).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Route {
    pub e: usize,
    pub k: usize,
    pub score: ScoreFn,
    pub renorm: bool,
    pub scale: f32,
    pub n_group: usize,
    pub topk_group: usize,
}

/// Most experts a router can choose among.
pub const MAX_EXPERTS: usize = 256;

impl Route {
    /// Plain top-k: no scaling, one group.
    pub fn new(e: usize, k: usize, score: ScoreFn, renorm: bool) -> Route {
        Route {
            e,
            k,
            score,
            renorm,
            scale: 1.0,
            n_group: 1,
            topk_group: 1,
        }
    }
}

/// A set of expert indices below [`MAX_EXPERTS`].
#[derive(Clone, Copy, Default)]
struct Set([u64; MAX_EXPERTS / 64]);

impl Set {
    fn has(&self, x: usize) -> bool {
        self.0[x / 64] & (1 << (x % 64)) != 0
    }
    fn add(&mut self, x: usize) {
        self.0[x / 64] |= 1 << (x % 64);
    }
}

/// Index of the largest `v(x)` over `x` in `0..n` with `ok(x)`; ties go to the lower index,
/// NaN never wins (None when nothing is eligible).
fn argmax(n: usize, ok: impl Fn(usize) -> bool, v: impl Fn(usize) -> f32) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for x in (0..n).filter(|&x| ok(x)) {
        let vx = v(x);
        // strict > keeps the lower index on ties
        if best.is_none_or(|(_, bv)| vx > bv) {
            best = Some((x, vx));
        }
    }
    best.map(|b| b.0)
}

/// Scores, top-k selection and combine weights for every token.
///
/// Selection ranks `score + bias` (bias only for selection, DeepSeek-V3), within the best
/// groups when `r.n_group > 1`; ties go to the lower expert index. Weights are the raw
/// scores of the chosen experts, divided by their sum when `r.renorm`, times `r.scale`.
pub fn router_forward(
    scores: &mut [f32],
    idx: &mut [u32],
    w: &mut [f32],
    logits: &[f32],
    bias: Option<&[f32]>,
    r: &Route,
) {
    let (e, k) = (r.e, r.k);
    assert!(k <= e && k > 0, "top_k {k} must be in 1..=n_experts {e}");
    assert!(e <= MAX_EXPERTS, "{e} experts: at most {MAX_EXPERTS}");
    assert!(
        r.n_group >= 1 && e.is_multiple_of(r.n_group) && (1..=r.n_group).contains(&r.topk_group),
        "expert groups {} / {} do not fit {e} experts",
        r.n_group,
        r.topk_group
    );
    assert!(
        k <= r.topk_group * (e / r.n_group),
        "top_k {k} exceeds the experts of {} of {} groups",
        r.topk_group,
        r.n_group
    );
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
                match r.score {
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
                let choice = |x: usize| s[x] + bias.map_or(0.0, |b| b[x]);
                // the experts eligible for this token: all, or those of the best groups
                let mut eligible = Set::default();
                if r.n_group > 1 {
                    let gsize = e / r.n_group;
                    let group_score = |gi: usize| {
                        let x0 = gi * gsize;
                        let in_g = |x: usize| (x0..x0 + gsize).contains(&x);
                        let a = argmax(e, in_g, choice).expect("a group has experts");
                        let b = argmax(e, |x| in_g(x) && x != a, choice);
                        choice(a) + b.map_or(0.0, choice)
                    };
                    let mut groups = Set::default();
                    for _ in 0..r.topk_group {
                        let gi = argmax(r.n_group, |g| !groups.has(g), group_score)
                            .expect("topk_group <= n_group");
                        groups.add(gi);
                        (gi * gsize..(gi + 1) * gsize).for_each(|x| eligible.add(x));
                    }
                } else {
                    (0..e).for_each(|x| eligible.add(x));
                }
                let mut taken = Set::default();
                for j in 0..k {
                    let best = argmax(e, |x| eligible.has(x) && !taken.has(x), choice)
                        .expect("k <= experts of the eligible groups (asserted above)");
                    taken.add(best);
                    idx[j] = best as u32;
                    w[j] = s[best];
                }
                if r.renorm {
                    let sum: f32 = w.iter().sum();
                    w.iter_mut().for_each(|x| *x /= sum);
                }
                if r.scale != 1.0 {
                    w.iter_mut().for_each(|x| *x *= r.scale);
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
    r: &Route,
) {
    let (e, k, renorm, scale) = (r.e, r.k, r.renorm, r.scale);
    dscores
        .par_chunks_mut(e * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, ds)| {
            for (i, ds) in ds.chunks_mut(e).enumerate() {
                let row = blk * ROWS_PER_TASK + i;
                ds.fill(0.0);
                let (dw, w, idx) = (
                    &dw[row * k..(row + 1) * k],
                    &w[row * k..(row + 1) * k],
                    &idx[row * k..(row + 1) * k],
                );
                if renorm {
                    // w_j = a s_j / S, S = sum of chosen scores, a = scale:
                    // ds_j = (a dw_j - sum_i dw_i w_i) / S
                    let ssum: f32 = idx.iter().map(|&x| scores[row * e + x as usize]).sum();
                    let dot: f32 = dw.iter().zip(w).map(|(a, b)| a * b).sum();
                    for j in 0..k {
                        ds[idx[j] as usize] = (scale * dw[j] - dot) / ssum;
                    }
                } else {
                    for j in 0..k {
                        ds[idx[j] as usize] = scale * dw[j];
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
