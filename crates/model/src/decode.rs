//! Incremental decoding with KV caches: tokens go through the same kernels as the training
//! forward, attending over cached keys and values. A [`BatchDecoder`] holds several
//! independent sequences ("slots"), each with its own preallocated cache and position; one
//! step feeds one token to any subset of slots, so matmuls see a batch of rows (the weights
//! are read once per step, not once per sequence) and sequences can join and leave between
//! steps (continuous batching). [`Decoder`] is the one-slot case.
//!
//! "Every path agrees": for every position, the logits equal those of a full forward over
//! the sequence so far, and a slot's logits do not depend on which other slots share its
//! steps (`tests/decode.rs`).

use crate::config::{Balance, ModelConfig};
use crate::params::{FfnIdx, Layout};
use kernels::matmul::linear_rows;
use kernels::rmsnorm::rmsnorm_forward;
use kernels::rope::{rope_apply_at, RopeTable};
use kernels::router::{self, ScoreFn};
use kernels::swiglu::swiglu_forward;
use kernels::vmath::{dot, exp, max};
use rayon::prelude::*;

/// KV-cache decoder for up to `slots` sequences at once.
pub struct BatchDecoder {
    cfg: ModelConfig,
    layout: Layout,
    rope: RopeTable,
    score_fn: ScoreFn,
    balance: Balance,
    slots: usize,
    k: Vec<Vec<f32>>, // per block (slots, Tmax, G*D)
    v: Vec<Vec<f32>>,
    pos: Vec<usize>,
    // scratch for up to `slots` rows
    x: Vec<f32>,
    h: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    scores: Vec<f32>,
    gu: Vec<f32>,
    a: Vec<f32>,
    hx: Vec<f32>,
    y: Vec<f32>,
    r_logits: Vec<f32>,
    r_scores: Vec<f32>,
    r_idx: Vec<u32>,
    r_w: Vec<f32>,
    logits: Vec<f32>,
}

impl BatchDecoder {
    pub fn new(cfg: &ModelConfig, slots: usize) -> BatchDecoder {
        let layout = Layout::new(cfg);
        let s = slots.max(1);
        let (c, d, g, t) = (cfg.d_model, cfg.head_dim(), cfg.n_kv_heads, cfg.max_seq_len);
        let r = (cfg.n_heads + 2 * g) * d;
        let fmax = cfg
            .ffn_hidden
            .max(cfg.expert_hidden)
            .max(cfg.shared_hidden());
        let (e, k) = (cfg.n_experts.max(1), cfg.top_k.max(1));
        BatchDecoder {
            rope: RopeTable::new(t, d, cfg.rope_theta),
            score_fn: cfg.score_fn(),
            balance: cfg.balance,
            slots: s,
            k: (0..cfg.n_layers)
                .map(|_| vec![0.0; s * t * g * d])
                .collect(),
            v: (0..cfg.n_layers)
                .map(|_| vec![0.0; s * t * g * d])
                .collect(),
            pos: vec![0; s],
            x: vec![0.0; s * c],
            h: vec![0.0; s * c],
            rstd: vec![0.0; s],
            qkv: vec![0.0; s * r],
            o: vec![0.0; s * cfg.n_heads * d],
            scores: vec![0.0; s * cfg.n_heads * t],
            gu: vec![0.0; s * 2 * fmax],
            a: vec![0.0; s * fmax],
            hx: vec![0.0; s * c],
            y: vec![0.0; s * c],
            r_logits: vec![0.0; s * e],
            r_scores: vec![0.0; s * e],
            r_idx: vec![0; s * k],
            r_w: vec![0.0; s * k],
            logits: vec![0.0; s * cfg.vocab_size],
            cfg: cfg.clone(),
            layout,
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Tokens in a slot's cache.
    pub fn len(&self, slot: usize) -> usize {
        self.pos[slot]
    }

    /// Room left in a slot before max_seq_len.
    pub fn remaining(&self, slot: usize) -> usize {
        self.cfg.max_seq_len - self.pos[slot]
    }

    /// Empties a slot's cache.
    pub fn reset(&mut self, slot: usize) {
        self.pos[slot] = 0;
    }

    /// Feeds `inputs[i] = (slot, token)` (distinct slots) at each slot's next position and
    /// returns the logits (len(inputs), V), row i for the token after `inputs[i]`.
    /// Panics when a slot's cache is full (check [`BatchDecoder::remaining`]).
    pub fn step(&mut self, params: &[f32], inputs: &[(usize, u32)]) -> &[f32] {
        let cfg = &self.cfg;
        let n = inputs.len();
        assert!(n <= self.slots, "{n} inputs for {} slots", self.slots);
        assert_eq!(
            params.len(),
            self.layout.total,
            "parameter buffer does not match the config"
        );
        for (i, &(s, tok)) in inputs.iter().enumerate() {
            assert!(s < self.slots, "slot {s} out of range");
            assert!(
                inputs[..i].iter().all(|&(o, _)| o != s),
                "slot {s} given twice"
            );
            assert!(
                self.pos[s] < cfg.max_seq_len,
                "KV cache of slot {s} full ({} tokens)",
                cfg.max_seq_len
            );
            assert!(
                (tok as usize) < cfg.vocab_size,
                "token {tok} outside the vocab"
            );
        }
        let (c, d, h, g) = (cfg.d_model, cfg.head_dim(), cfg.n_heads, cfg.n_kv_heads);
        let (r, hpg, tmax) = ((h + 2 * g) * d, h / g, cfg.max_seq_len);
        let gd = g * d;
        let p = |off: usize, len: usize| &params[off..off + len];
        let lay = &self.layout;
        for (i, &(_, tok)) in inputs.iter().enumerate() {
            self.x[i * c..(i + 1) * c].copy_from_slice(p(lay.embed + tok as usize * c, c));
        }
        let x = &mut self.x[..n * c];
        let hb = &mut self.h[..n * c];
        let rstd = &mut self.rstd[..n];
        let scale = 1.0 / (d as f32).sqrt();
        for (l, li) in lay.layers.iter().enumerate() {
            rmsnorm_forward(hb, rstd, x, p(li.attn_norm, c), cfg.norm_eps);
            let qkv = &mut self.qkv[..n * r];
            linear_rows(qkv, hb, p(li.wqkv, r * c), n, c, r, false);
            for (i, &(s, _)) in inputs.iter().enumerate() {
                let row = &mut qkv[i * r..(i + 1) * r];
                rope_apply_at(row, 0, h + g, self.pos[s], &self.rope);
                let at = (s * tmax + self.pos[s]) * gd;
                self.k[l][at..at + gd].copy_from_slice(&row[h * d..h * d + gd]);
                self.v[l][at..at + gd].copy_from_slice(&row[h * d + gd..h * d + 2 * gd]);
            }
            let (kc, vc, pos) = (&self.k[l], &self.v[l], &self.pos);
            let qkv = &self.qkv[..n * r];
            self.o[..n * h * d]
                .par_chunks_mut(h * d)
                .zip(self.scores[..n * h * tmax].par_chunks_mut(h * tmax))
                .enumerate()
                .for_each(|(i, (o, sc))| {
                    let s = inputs[i].0;
                    let len = pos[s] + 1;
                    let kc = &kc[s * tmax * gd..(s * tmax + len) * gd];
                    let vc = &vc[s * tmax * gd..(s * tmax + len) * gd];
                    for hi in 0..h {
                        let gi = hi / hpg;
                        let q = &qkv[i * r + hi * d..i * r + (hi + 1) * d];
                        let sc = &mut sc[hi * tmax..hi * tmax + len];
                        for (j, sj) in sc.iter_mut().enumerate() {
                            *sj = dot(q, &kc[j * gd + gi * d..j * gd + (gi + 1) * d]) * scale;
                        }
                        let mx = max(sc);
                        let mut sum = 0.0;
                        for sj in sc.iter_mut() {
                            *sj = exp(*sj - mx);
                            sum += *sj;
                        }
                        let o = &mut o[hi * d..(hi + 1) * d];
                        o.fill(0.0);
                        for (j, sj) in sc.iter().enumerate() {
                            let pj = sj / sum;
                            let vv = &vc[j * gd + gi * d..j * gd + (gi + 1) * d];
                            for (oo, vv) in o.iter_mut().zip(vv) {
                                *oo += pj * vv;
                            }
                        }
                    }
                });
            linear_rows(
                x,
                &self.o[..n * h * d],
                p(li.wo, c * h * d),
                n,
                h * d,
                c,
                true,
            );
            rmsnorm_forward(hb, rstd, x, p(li.ffn_norm, c), cfg.norm_eps);
            match &li.ffn {
                FfnIdx::Dense { w_gu, w_down } => {
                    let f = cfg.ffn_hidden;
                    swiglu_rows(
                        x,
                        hb,
                        p(*w_gu, 2 * f * c),
                        p(*w_down, c * f),
                        f,
                        &mut self.gu,
                        &mut self.a,
                    );
                }
                FfnIdx::Moe {
                    router: rw,
                    bias,
                    w_gu,
                    w_down,
                    shared,
                } => {
                    let (e, k, f) = (cfg.n_experts, cfg.top_k, cfg.expert_hidden);
                    let r_logits = &mut self.r_logits[..n * e];
                    linear_rows(r_logits, hb, p(*rw, e * c), n, c, e, false);
                    let bias = bias
                        .filter(|_| self.balance == Balance::Bias)
                        .map(|o| p(o, e));
                    router::router_forward(
                        &mut self.r_scores[..n * e],
                        &mut self.r_idx[..n * k],
                        &mut self.r_w[..n * k],
                        r_logits,
                        bias,
                        e,
                        k,
                        self.score_fn,
                        cfg.renormalize,
                    );
                    if let Some((sg, sd)) = shared {
                        let fs = cfg.shared_hidden();
                        swiglu_rows(
                            x,
                            hb,
                            p(*sg, 2 * fs * c),
                            p(*sd, c * fs),
                            fs,
                            &mut self.gu,
                            &mut self.a,
                        );
                    }
                    // each expert runs once on the rows routed to it
                    for j in 0..e {
                        let rows: Vec<(usize, f32)> = (0..n * k)
                            .filter(|&q| self.r_idx[q] as usize == j)
                            .map(|q| (q / k, self.r_w[q]))
                            .collect();
                        if rows.is_empty() {
                            continue;
                        }
                        let m = rows.len();
                        for (q, &(i, _)) in rows.iter().enumerate() {
                            self.hx[q * c..(q + 1) * c].copy_from_slice(&hb[i * c..(i + 1) * c]);
                        }
                        let y = &mut self.y[..m * c];
                        y.fill(0.0);
                        swiglu_rows(
                            y,
                            &self.hx[..m * c],
                            p(w_gu + j * 2 * f * c, 2 * f * c),
                            p(w_down + j * c * f, c * f),
                            f,
                            &mut self.gu,
                            &mut self.a,
                        );
                        for (q, &(i, w)) in rows.iter().enumerate() {
                            for (xx, yy) in x[i * c..(i + 1) * c].iter_mut().zip(&y[q * c..]) {
                                *xx += w * yy;
                            }
                        }
                    }
                }
            }
        }
        rmsnorm_forward(hb, rstd, x, p(lay.norm, c), cfg.norm_eps);
        let v = cfg.vocab_size;
        linear_rows(
            &mut self.logits[..n * v],
            hb,
            p(lay.lm_head, v * c),
            n,
            c,
            v,
            false,
        );
        for &(s, _) in inputs {
            self.pos[s] += 1;
        }
        &self.logits[..n * v]
    }
}

/// `x (M,C) += SwiGLU(h (M,C))` through `w_gu (2F,C)` and `w_down (C,F)`.
fn swiglu_rows(
    x: &mut [f32],
    h: &[f32],
    w_gu: &[f32],
    w_down: &[f32],
    f: usize,
    gu: &mut [f32],
    a: &mut [f32],
) {
    let c = w_down.len() / f;
    let m = h.len() / c;
    linear_rows(&mut gu[..m * 2 * f], h, w_gu, m, c, 2 * f, false);
    swiglu_forward(&mut a[..m * f], &gu[..m * 2 * f], f);
    linear_rows(x, &a[..m * f], w_down, m, f, c, true);
}

/// KV-cache decoder for one sequence.
pub struct Decoder {
    inner: BatchDecoder,
}

impl Decoder {
    pub fn new(cfg: &ModelConfig) -> Decoder {
        Decoder {
            inner: BatchDecoder::new(cfg, 1),
        }
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.inner.len(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room left before max_seq_len.
    pub fn remaining(&self) -> usize {
        self.inner.remaining(0)
    }

    /// Empties the cache.
    pub fn reset(&mut self) {
        self.inner.reset(0);
    }

    /// Feeds `token` at the next position and returns the logits (V) for the one after it.
    /// Panics when the cache is full (check [`Decoder::remaining`]).
    pub fn step(&mut self, params: &[f32], token: u32) -> &[f32] {
        self.inner.step(params, &[(0, token)])
    }
}
