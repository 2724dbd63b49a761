//! The continuous-batching core shared by [`crate::generate`] (offline, all requests known)
//! and [`crate::Engine`] (online, requests arrive on a channel): a [`BatchDecoder`] whose
//! slots are taken by sequences that are fed their prompt (in chunks of a batched forward,
//! sharing each step with the other slots' decode rows) and then their own samples, one
//! token per step, and leave as soon as they finish, when the next sequence may take the slot.
//!
//! Each sequence samples with its own seeded [`Sampler`], and the decoder computes every row
//! on its own (fixed-order dot products), so a sequence's output does not depend on the
//! others in the batch: batched generation gives the same tokens as generating alone.

use crate::sampling::{Sampler, SamplingParams};
use model::decode::{BatchDecoder, PREFILL_CHUNK};
use model::ModelConfig;

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was generated (it is the last token reported).
    Stop,
    /// `max_tokens` or the context length was reached (or the prompt did not fit).
    Length,
    /// The receiver asked to stop (e.g. the client went away).
    Cancelled,
}

/// What a sequence reports after a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The log-probabilities of the token reported next (only when the sequence asked
    /// for them, [`Seq::logprobs`]).
    Logprobs(Box<TokenLogprobs>),
    Token(u32),
    Done(Finish),
}

/// A generated token's log-probability under the model (its distribution before
/// temperature, top-k and top-p) and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub id: u32,
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// Log-softmax of `logits` (in f64) at `id`, and its `n` most likely tokens.
    pub fn of(logits: &[f32], id: u32, n: usize) -> TokenLogprobs {
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + logits
            .iter()
            .map(|&x| (x as f64 - m).exp())
            .sum::<f64>()
            .ln();
        let lp = |i: usize| (logits[i] as f64 - lse) as f32;
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let n = n.min(idx.len());
        let by = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if n > 0 && n < idx.len() {
            idx.select_nth_unstable_by(n - 1, by);
        }
        idx.truncate(n);
        idx.sort_by(by);
        TokenLogprobs {
            id,
            logprob: lp(id as usize),
            top: idx.into_iter().map(|i| (i as u32, lp(i))).collect(),
        }
    }
}

/// A sequence to generate.
#[derive(Clone, Debug)]
pub struct Seq {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Generated tokens at most (the stop token included).
    pub max_tokens: usize,
    /// Tokens that end the sequence.
    pub stop: Vec<u32>,
    /// Report each token's log-probability and this many alternatives
    /// ([`Event::Logprobs`] before each [`Event::Token`]); None: no log-probabilities.
    pub logprobs: Option<usize>,
}

impl Seq {
    /// Whether the sequence can start at all in a context of `max_seq_len` tokens.
    pub fn fits(&self, max_seq_len: usize) -> bool {
        !self.prompt.is_empty() && self.prompt.len() < max_seq_len && self.max_tokens > 0
    }
}

struct Active<K> {
    key: K,
    seq: Seq,
    /// Tokens fed so far (prompt and generated): the slot's cache length.
    fed: usize,
    next: u32,
    generated: usize,
    sampler: Sampler,
}

/// Up to `slots` sequences decoding together; `K` identifies a sequence to the caller.
pub struct Batch<K> {
    dec: BatchDecoder,
    active: Vec<Option<Active<K>>>,
    /// This step's inputs: (slot, tokens fed), the tokens from the prompt or `next`.
    inputs: Vec<(usize, usize)>,
}

impl<K: Copy> Batch<K> {
    pub fn new(cfg: &ModelConfig, slots: usize) -> Batch<K> {
        let dec = BatchDecoder::new(cfg, slots.max(1));
        let active = (0..dec.slots()).map(|_| None).collect();
        Batch {
            dec,
            active,
            inputs: vec![],
        }
    }

    /// Multiply by quantized copies of the matrices ([`BatchDecoder::set_quant`]).
    pub fn set_quant(&mut self, q: Option<std::sync::Arc<model::quant::QuantWeights>>) {
        self.dec.set_quant(q);
    }

    /// Keep keys and values as `t` ([`BatchDecoder::set_kv_type`]); before any sequence.
    pub fn set_kv_type(&mut self, t: model::decode::KvType) {
        assert!(
            self.is_empty(),
            "the KV cache type changes before any sequence"
        );
        self.dec.set_kv_type(t);
    }

    /// Sequences decoding now.
    pub fn len(&self) -> usize {
        self.active.iter().filter(|a| a.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.active.iter().all(|a| a.is_none())
    }

    pub fn is_full(&self) -> bool {
        self.active.iter().all(|a| a.is_some())
    }

    /// Takes a free slot for `seq`. Returns `Err(Finish::Length)` without taking one when the
    /// sequence cannot start (empty prompt, prompt fills the context, `max_tokens` 0).
    /// Panics when the batch is full (check [`Batch::is_full`]).
    pub fn admit(&mut self, key: K, seq: Seq) -> Result<(), Finish> {
        if !seq.fits(self.dec.config().max_seq_len) {
            return Err(Finish::Length);
        }
        let s = self
            .active
            .iter()
            .position(|a| a.is_none())
            .expect("admit into a full batch");
        self.dec.reset(s);
        self.active[s] = Some(Active {
            key,
            next: seq.prompt[0],
            sampler: Sampler::new(seq.params),
            seq,
            fed: 0,
            generated: 0,
        });
        Ok(())
    }

    /// Drops the sequence `key` (its slot frees; nothing more is reported for it). False
    /// when no active sequence has that key.
    pub fn cancel(&mut self, key: K) -> bool
    where
        K: PartialEq,
    {
        match self
            .active
            .iter()
            .position(|a| a.as_ref().is_some_and(|a| a.key == key))
        {
            Some(s) => {
                self.active[s] = None;
                true
            }
            None => false,
        }
    }

    /// One decode step over every active sequence: a sequence still reading its prompt is
    /// fed its next chunk (the prompts share [`PREFILL_CHUNK`] extra rows per step, in slot
    /// order), the others their next token. `on(key, event)` receives each generated token
    /// and then the end of each sequence that finished; returning `false` from a token event
    /// cancels that sequence (it is then reported `Done(Cancelled)`).
    pub fn step(&mut self, params: &[f32], on: &mut dyn FnMut(K, Event) -> bool) {
        let (v, max_seq_len) = {
            let c = self.dec.config();
            (c.vocab_size, c.max_seq_len)
        };
        self.inputs.clear();
        let mut extra = PREFILL_CHUNK;
        for (s, a) in self.active.iter().enumerate() {
            let Some(a) = a else { continue };
            let left = a.seq.prompt.len().saturating_sub(a.fed);
            let take = left.clamp(1, 1 + extra);
            extra -= take - 1;
            self.inputs.push((s, take));
        }
        if self.inputs.is_empty() {
            return;
        }
        let feeds: Vec<(usize, &[u32])> = self
            .inputs
            .iter()
            .map(|&(s, take)| {
                let a = self.active[s].as_ref().expect("active slot");
                let toks = if a.fed < a.seq.prompt.len() {
                    &a.seq.prompt[a.fed..a.fed + take]
                } else {
                    std::slice::from_ref(&a.next)
                };
                (s, toks)
            })
            .collect();
        let logits = self.dec.forward(params, &feeds, false);
        for (row, &(s, take)) in self.inputs.iter().enumerate() {
            let a = self.active[s].as_mut().expect("active slot");
            a.fed += take;
            if a.fed < a.seq.prompt.len() {
                // still reading the prompt
                continue;
            }
            let row = &logits[row * v..(row + 1) * v];
            let tok = a.sampler.sample(row);
            a.generated += 1;
            a.next = tok;
            let cancelled = match a.seq.logprobs {
                Some(n) => !on(
                    a.key,
                    Event::Logprobs(Box::new(TokenLogprobs::of(row, tok, n))),
                ),
                None => false,
            };
            let done = if cancelled || !on(a.key, Event::Token(tok)) {
                Some(Finish::Cancelled)
            } else if a.seq.stop.contains(&tok) {
                Some(Finish::Stop)
            } else if a.generated >= a.seq.max_tokens || a.fed >= max_seq_len {
                Some(Finish::Length)
            } else {
                None
            };
            if let Some(f) = done {
                let a = self.active[s].take().expect("active slot");
                on(a.key, Event::Done(f));
            }
        }
    }
}
