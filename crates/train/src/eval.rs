//! Validation loss: over a token stream in non-overlapping windows (every token a target
//! once), or over packed chat rows (every assistant token once).

use crate::dataset::Split;
use data::chat::ChatLoader;
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
pub fn evaluate(model: &mut Model, split: &Split, max_batches: u64) -> EvalResult {
    let (b, t) = model.batch_shape();
    let saved = model.take_load();
    let training = std::mem::replace(&mut model.training, false);
    type Fill<'a> = Box<dyn Fn(usize, &mut [u32], &mut [u32]) + 'a>;
    let (mut n, fill): (usize, Fill) = match split {
        Split::Tokens(tokens) => (
            eval_batches(tokens, b, t),
            Box::new(move |i, x, y| eval_batch(tokens, b, t, i, x, y)),
        ),
        Split::Chat(p) => match ChatLoader::new(p, b, 0) {
            Ok(l) => (
                l.eval_batches(),
                Box::new(move |i, x, y| l.eval_batch(i, x, y)),
            ),
            Err(_) => (0, Box::new(|_, _, _| {})), // no rows
        },
    };
    if max_batches > 0 {
        n = n.min(max_batches as usize);
    }
    let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
    let (mut sum, mut count) = (0.0f64, 0usize);
    for i in 0..n {
        fill(i, &mut x, &mut y);
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
