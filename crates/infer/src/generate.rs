//! Offline batched generation: every request is known up front; up to `slots` decode
//! together over a [`Batch`] and the next request takes a slot as soon as one frees up.
//! A request's tokens do not depend on the batch it shares (see `batch.rs`).

use crate::batch::{Batch, Event, Finish, Seq};
use crate::sampling::SamplingParams;
use model::quant::QuantWeights;
use model::ModelConfig;
use std::collections::VecDeque;

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Generated tokens at most (the stop token included).
    pub max_tokens: usize,
}

#[derive(Clone, Debug)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

/// Generates every request with up to `slots` in flight, multiplying by `quant` where it
/// has a matrix (None: f32 throughout). `stop` tokens end a request.
/// `on_done(i, &g)` is called as request i finishes (for progress bars). A prompt that does
/// not fit in the context (or is empty) finishes at once with no tokens and `Length`.
pub fn generate(
    cfg: &ModelConfig,
    params: &[f32],
    quant: Option<&std::sync::Arc<QuantWeights>>,
    reqs: &[Request],
    slots: usize,
    stop: &[u32],
    on_done: &mut dyn FnMut(usize, &Generated),
) -> Vec<Generated> {
    let mut batch = Batch::new(cfg, slots.max(1).min(reqs.len().max(1)));
    batch.set_quant(quant.cloned());
    let mut out: Vec<Vec<u32>> = vec![vec![]; reqs.len()];
    let mut results: Vec<Option<Generated>> = vec![None; reqs.len()];
    let mut queue: VecDeque<usize> = (0..reqs.len()).collect();
    loop {
        while !batch.is_full() {
            let Some(i) = queue.pop_front() else { break };
            let r = &reqs[i];
            let seq = Seq {
                prompt: r.prompt.clone(),
                params: r.params,
                max_tokens: r.max_tokens,
                stop: stop.to_vec(),
                logprobs: None,
            };
            if let Err(finish) = batch.admit(i, seq) {
                let g = Generated {
                    tokens: vec![],
                    finish,
                };
                on_done(i, &g);
                results[i] = Some(g);
            }
        }
        if batch.is_empty() {
            break;
        }
        batch.step(params, &mut |i, ev| {
            match ev {
                Event::Logprobs(_) => {}
                Event::Token(t) => out[i].push(t),
                Event::Done(finish) => {
                    let g = Generated {
                        tokens: std::mem::take(&mut out[i]),
                        finish,
                    };
                    on_done(i, &g);
                    results[i] = Some(g);
                }
            }
            true
        });
    }
    results
        .into_iter()
        .map(|g| g.expect("every request finishes"))
        .collect()
}
