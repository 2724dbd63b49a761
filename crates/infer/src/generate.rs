//! Batched generation with continuous batching over a [`BatchDecoder`]: requests wait in a
//! queue, take a free slot, are fed their prompt and then their own samples one token per
//! step, and leave the batch as soon as they finish, when the next request takes the slot.
//!
//! Each request samples with its own seeded [`Sampler`], and the decoder computes every row
//! on its own (fixed-order dot products), so a request's output does not depend on the other
//! requests in the batch: batched generation gives the same tokens as generating alone.

use crate::sampling::{Sampler, SamplingParams};
use model::decode::BatchDecoder;
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was generated (it ends `tokens`).
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

#[derive(Clone, Debug)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

struct Active {
    req: usize,
    /// Tokens fed so far (prompt and generated): the slot's cache length.
    fed: usize,
    next: u32,
    out: Vec<u32>,
    sampler: Sampler,
}

/// Generates every request with up to `slots` in flight. `stop` tokens end a request.
/// `on_done(i, &g)` is called as request i finishes (for progress bars). A prompt that does
/// not fit in the context (or is empty) finishes at once with no tokens and `Length`.
pub fn generate(
    cfg: &ModelConfig,
    params: &[f32],
    reqs: &[Request],
    slots: usize,
    stop: &[u32],
    on_done: &mut dyn FnMut(usize, &Generated),
) -> Vec<Generated> {
    let mut dec = BatchDecoder::new(cfg, slots.max(1).min(reqs.len().max(1)));
    let mut results: Vec<Option<Generated>> = vec![None; reqs.len()];
    let mut queue: VecDeque<usize> = (0..reqs.len()).collect();
    let mut active: Vec<Option<Active>> = (0..dec.slots()).map(|_| None).collect();
    let mut inputs: Vec<(usize, u32)> = vec![];
    let mut finish = |i: usize, g: Generated, results: &mut Vec<Option<Generated>>| {
        on_done(i, &g);
        results[i] = Some(g);
    };
    loop {
        for (s, a) in active.iter_mut().enumerate() {
            while a.is_none() {
                let Some(i) = queue.pop_front() else { break };
                let r = &reqs[i];
                if r.prompt.is_empty() || r.prompt.len() >= cfg.max_seq_len || r.max_tokens == 0 {
                    let g = Generated {
                        tokens: vec![],
                        finish: Finish::Length,
                    };
                    finish(i, g, &mut results);
                    continue;
                }
                dec.reset(s);
                *a = Some(Active {
                    req: i,
                    fed: 0,
                    next: r.prompt[0],
                    out: vec![],
                    sampler: Sampler::new(r.params),
                });
            }
        }
        inputs.clear();
        inputs.extend(
            active
                .iter()
                .enumerate()
                .filter_map(|(s, a)| a.as_ref().map(|a| (s, a.next))),
        );
        if inputs.is_empty() {
            break;
        }
        let v = cfg.vocab_size;
        let logits = dec.step(params, &inputs);
        for (row, &(s, _)) in inputs.iter().enumerate() {
            let a = active[s].as_mut().expect("active slot");
            let r = &reqs[a.req];
            a.fed += 1;
            if a.fed < r.prompt.len() {
                // still reading the prompt
                a.next = r.prompt[a.fed];
                continue;
            }
            let tok = a.sampler.sample(&logits[row * v..(row + 1) * v]);
            a.out.push(tok);
            a.next = tok;
            let full = a.fed >= cfg.max_seq_len;
            let done = if stop.contains(&tok) {
                Some(Finish::Stop)
            } else if a.out.len() >= r.max_tokens || full {
                Some(Finish::Length)
            } else {
                None
            };
            if let Some(f) = done {
                let a = active[s].take().expect("active slot");
                let g = Generated {
                    tokens: a.out,
                    finish: f,
                };
                finish(a.req, g, &mut results);
            }
        }
    }
    results
        .into_iter()
        .map(|g| g.expect("every request finishes"))
        .collect()
}
