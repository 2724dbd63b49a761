//! Fused softmax + cross-entropy over the vocabulary, with ignored positions
//! ([`crate::IGNORE_INDEX`]) for masked targets.

use crate::par::ROWS_PER_TASK;
use crate::simd;
use crate::vmath::{exp, max};
use crate::IGNORE_INDEX;
use rayon::prelude::*;

simd! {
    /// log-sum-exp of one row, summing exp in LANES fixed-order partial sums.
    fn row_lse(row: &[f32]) -> f32 {
        let mx = max(row);
        let mut acc = [0.0f32; crate::vmath::LANES];
        let it = row.chunks_exact(crate::vmath::LANES);
        let rem = it.remainder();
        for c in it {
            for j in 0..crate::vmath::LANES {
                acc[j] += exp(c[j] - mx);
            }
        }
        let mut tail = [0.0f32; crate::vmath::LANES];
        for (j, r) in rem.iter().enumerate() {
            tail[j] = exp(r - mx);
        }
        let s = crate::vmath::sum(&acc) + crate::vmath::sum(&tail[..rem.len()]);
        mx + s.ln()
    }
}

simd! {
    fn row_grad(row: &mut [f32], lse: f32, scale: f32) {
        for x in row.iter_mut() {
            *x = exp(*x - lse) * scale;
        }
    }
}

/// Per-row `losses (N)` and `lse (N)` (log-sum-exp, kept for the backward pass) of
/// `logits (N,V)`. Returns (sum of losses, number of counted rows); ignored rows get loss 0.
pub fn cross_entropy_forward(
    losses: &mut [f32],
    lse: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    v: usize,
) -> (f64, usize) {
    losses
        .par_chunks_mut(ROWS_PER_TASK)
        .zip(lse.par_chunks_mut(ROWS_PER_TASK))
        .zip(logits.par_chunks(v * ROWS_PER_TASK))
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .for_each(|(((ls, lse), lg), tg)| {
            for (((l, z), row), &t) in ls.iter_mut().zip(lse.iter_mut()).zip(lg.chunks(v)).zip(tg) {
                *z = row_lse(row);
                *l = if t == IGNORE_INDEX {
                    0.0
                } else {
                    assert!((t as usize) < v, "target {t} out of range for vocab {v}");
                    *z - row[t as usize]
                };
            }
        });
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    (losses.iter().map(|&x| x as f64).sum(), count)
}

/// In place: `logits (N,V)` becomes `dlogits = (softmax - onehot) * scale` (zero on ignored
/// rows). `scale` is d(loss)/d(row loss), e.g. 1 / counted rows for a mean.
pub fn cross_entropy_backward(
    logits: &mut [f32],
    lse: &[f32],
    targets: &[u32],
    v: usize,
    scale: f32,
) {
    logits
        .par_chunks_mut(v * ROWS_PER_TASK)
        .zip(lse.par_chunks(ROWS_PER_TASK))
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .for_each(|((lg, lse), tg)| {
            for ((row, &z), &t) in lg.chunks_mut(v).zip(lse).zip(tg) {
                if t == IGNORE_INDEX {
                    row.fill(0.0);
                    continue;
                }
                row_grad(row, z, scale);
                row[t as usize] -= scale;
            }
        });
}

/// log-sum-exp of `row * inv_t` (a temperature-scaled row), in fixed order.
fn row_lse_scaled(row: &[f32], inv_t: f32) -> f32 {
    let mx = max(row);
    let s: f32 = row.iter().map(|&x| exp((x - mx) * inv_t)).sum();
    mx * inv_t + s.ln()
}

/// Logit distillation (Hinton et al.) per counted row: `T^2 KL(p || q)` with
/// `p = softmax(teacher / T)`, `q = softmax(student / T)`. Rows with an ignored target are
/// skipped (distillation covers the same tokens as the cross-entropy). Returns (sum over
/// counted rows, number of counted rows).
pub fn distill_forward(
    student: &[f32],
    teacher: &[f32],
    targets: &[u32],
    v: usize,
    temp: f32,
) -> (f64, usize) {
    let inv_t = 1.0 / temp;
    let per_row: Vec<f32> = student
        .par_chunks(v)
        .zip(teacher.par_chunks(v))
        .zip(targets.par_iter())
        .map(|((s, t), &tg)| {
            if tg == IGNORE_INDEX {
                return 0.0;
            }
            let (ls, lt) = (row_lse_scaled(s, inv_t), row_lse_scaled(t, inv_t));
            let kl: f32 = s
                .iter()
                .zip(t)
                .map(|(&zs, &zt)| {
                    let log_p = zt * inv_t - lt;
                    exp(log_p) * (log_p - (zs * inv_t - ls))
                })
                .sum();
            kl * temp * temp
        })
        .collect();
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    (per_row.iter().map(|&x| x as f64).sum(), count)
}

/// In place: `logits (N,V)` becomes the gradient of `ce_scale * CE + kd_scale * T^2 KL` per
/// counted row: `ce_scale (softmax(z) - onehot) + kd_scale T (softmax(z/T) - softmax(zt/T))`
/// (zero on ignored rows). `lse` is the cross-entropy forward's.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_distill_backward(
    logits: &mut [f32],
    lse: &[f32],
    targets: &[u32],
    teacher: &[f32],
    v: usize,
    ce_scale: f32,
    kd_scale: f32,
    temp: f32,
) {
    let inv_t = 1.0 / temp;
    logits
        .par_chunks_mut(v)
        .zip(lse.par_iter())
        .zip(targets.par_iter())
        .zip(teacher.par_chunks(v))
        .for_each(|(((row, &z), &tg), t)| {
            if tg == IGNORE_INDEX {
                row.fill(0.0);
                return;
            }
            let (ls, lt) = (row_lse_scaled(row, inv_t), row_lse_scaled(t, inv_t));
            let k = kd_scale * temp;
            for (x, &zt) in row.iter_mut().zip(t) {
                let q = exp(*x * inv_t - ls);
                let p = exp(zt * inv_t - lt);
                *x = ce_scale * exp(*x - z) + k * (q - p);
            }
            row[tg as usize] -= ce_scale;
        });
}
