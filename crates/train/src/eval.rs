//! Validation loss over a token stream: non-overlapping windows, every token a target once.

use data::loader::{eval_batch, eval_batches};
use model::Model;

/// Mean loss (nats/token) and the number of targets it covers.
#[derive(Clone, Copy, Debug)]
pub struct EvalResult {
    pub loss: f64,
    pub tokens: usize,
}

/// Evaluates `model` on `tokens`, at most `max_batches` batches (0: all). Expert-load
/// counters are left as they were (evaluation must not move the balancing bias); dropout is
/// off during evaluation.
pub fn evaluate(model: &mut Model, tokens: &[u32], max_batches: u64) -> EvalResult {
    let (b, t) = model.batch_shape();
    let saved = model.take_load();
    let training = std::mem::replace(&mut model.training, false);
    let mut n = eval_batches(tokens, b, t);
    if max_batches > 0 {
        n = n.min(max_batches as usize);
    }
    let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
    let (mut sum, mut count) = (0.0f64, 0usize);
    for i in 0..n {
        eval_batch(tokens, b, t, i, &mut x, &mut y);
        let l = model.forward(&x, &y);
        sum += l.ce as f64 * l.n_targets as f64;
        count += l.n_targets;
    }
    model.load = saved;
    model.training = training;
    EvalResult {
        loss: if count > 0 {
            sum / count as f64
        } else {
            f64::NAN
        },
        tokens: count,
    }
}
