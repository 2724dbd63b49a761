//! Incremental decoding with a KV cache: one token at a time through the same kernels as the
//! training forward, attending over cached keys and values. The cache is one preallocated
//! buffer per block with a position that advances (as nanoGPT/nanochat do).
//!
//! "Every path agrees": for every position, the logits equal those of a full forward over
//! the sequence so far (`tests/decode.rs`).

use crate::config::{Balance, ModelConfig};
use crate::params::{FfnIdx, Layout};
use kernels::matmul::{linear_forward, matmul};
use kernels::rmsnorm::rmsnorm_forward;
use kernels::rope::{rope_apply_at, RopeTable};
use kernels::router::{self, ScoreFn};
use kernels::swiglu::swiglu_forward;
use kernels::vmath::{dot, exp, max};

/// KV-cache decoder for one sequence.
pub struct Decoder {
    cfg: ModelConfig,
    layout: Layout,
    rope: RopeTable,
    score_fn: ScoreFn,
    balance: Balance,
    k: Vec<Vec<f32>>, // per block (Tmax, G*D)
    v: Vec<Vec<f32>>,
    pos: usize,
    x: Vec<f32>,
    h: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    scores: Vec<f32>,
    gu: Vec<f32>,
    a: Vec<f32>,
    y: Vec<f32>,
    r_logits: Vec<f32>,
    r_scores: Vec<f32>,
    r_idx: Vec<u32>,
    r_w: Vec<f32>,
    logits: Vec<f32>,
}

impl Decoder {
    pub fn new(cfg: &ModelConfig) -> Decoder {
        let layout = Layout::new(cfg);
        let (c, d, g, t) = (cfg.d_model, cfg.head_dim(), cfg.n_kv_heads, cfg.max_seq_len);
        let r = (cfg.n_heads + 2 * g) * d;
        let fmax = cfg
            .ffn_hidden
            .max(cfg.expert_hidden)
            .max(cfg.shared_hidden());
        let (e, k) = (cfg.n_experts.max(1), cfg.top_k.max(1));
        Decoder {
            rope: RopeTable::new(t, d, cfg.rope_theta),
            score_fn: cfg.score_fn().unwrap_or(ScoreFn::Softmax),
            balance: cfg.balance().unwrap_or(Balance::None),
            k: (0..cfg.n_layers).map(|_| vec![0.0; t * g * d]).collect(),
            v: (0..cfg.n_layers).map(|_| vec![0.0; t * g * d]).collect(),
            pos: 0,
            x: vec![0.0; c],
            h: vec![0.0; c],
            rstd: vec![0.0; 1],
            qkv: vec![0.0; r],
            o: vec![0.0; cfg.n_heads * d],
            scores: vec![0.0; t],
            gu: vec![0.0; 2 * fmax],
            a: vec![0.0; fmax],
            y: vec![0.0; c],
            r_logits: vec![0.0; e],
            r_scores: vec![0.0; e],
            r_idx: vec![0; k],
            r_w: vec![0.0; k],
            logits: vec![0.0; cfg.vocab_size],
            cfg: cfg.clone(),
            layout,
        }
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Room left before max_seq_len.
    pub fn remaining(&self) -> usize {
        self.cfg.max_seq_len - self.pos
    }

    /// Empties the cache.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Feeds `token` at the next position and returns the logits (V) for the one after it.
    /// Panics when the cache is full (check [`Decoder::remaining`]).
    pub fn step(&mut self, params: &[f32], token: u32) -> &[f32] {
        let cfg = &self.cfg;
        assert!(
            self.pos < cfg.max_seq_len,
            "KV cache full ({} tokens)",
            cfg.max_seq_len
        );
        assert!(
            (token as usize) < cfg.vocab_size,
            "token {token} outside the vocab"
        );
        assert_eq!(
            params.len(),
            self.layout.total,
            "parameter buffer does not match the config"
        );
        let (c, d, h, g) = (cfg.d_model, cfg.head_dim(), cfg.n_heads, cfg.n_kv_heads);
        let (r, hpg, pos) = ((h + 2 * g) * d, h / g, self.pos);
        let p = |off: usize, len: usize| &params[off..off + len];
        let lay = &self.layout;
        self.x.copy_from_slice(p(lay.embed + token as usize * c, c));
        let scale = 1.0 / (d as f32).sqrt();
        for (l, li) in lay.layers.iter().enumerate() {
            rmsnorm_forward(
                &mut self.h,
                &mut self.rstd,
                &self.x,
                p(li.attn_norm, c),
                cfg.norm_eps,
            );
            linear_forward(&mut self.qkv, &self.h, p(li.wqkv, r * c), 1, c, r);
            rope_apply_at(&mut self.qkv, 0, h + g, pos, &self.rope);
            let gd = g * d;
            self.k[l][pos * gd..(pos + 1) * gd].copy_from_slice(&self.qkv[h * d..h * d + gd]);
            self.v[l][pos * gd..(pos + 1) * gd]
                .copy_from_slice(&self.qkv[h * d + gd..h * d + 2 * gd]);
            for hi in 0..h {
                let gi = hi / hpg;
                let q = &self.qkv[hi * d..(hi + 1) * d];
                let s = &mut self.scores[..=pos];
                for (j, sj) in s.iter_mut().enumerate() {
                    *sj = dot(q, &self.k[l][j * gd + gi * d..j * gd + (gi + 1) * d]) * scale;
                }
                let mx = max(s);
                let mut sum = 0.0;
                for sj in s.iter_mut() {
                    *sj = exp(*sj - mx);
                    sum += *sj;
                }
                let o = &mut self.o[hi * d..(hi + 1) * d];
                o.fill(0.0);
                for (j, sj) in s.iter().enumerate() {
                    let pj = sj / sum;
                    for (oo, vv) in o
                        .iter_mut()
                        .zip(&self.v[l][j * gd + gi * d..j * gd + (gi + 1) * d])
                    {
                        *oo += pj * vv;
                    }
                }
            }
            matmul(
                &mut self.x,
                &self.o,
                false,
                p(li.wo, c * h * d),
                true,
                1,
                c,
                h * d,
                true,
            );
            rmsnorm_forward(
                &mut self.h,
                &mut self.rstd,
                &self.x,
                p(li.ffn_norm, c),
                cfg.norm_eps,
            );
            match &li.ffn {
                FfnIdx::Dense { w_gu, w_down } => {
                    let f = cfg.ffn_hidden;
                    swiglu_ffn(
                        &mut self.x,
                        &self.h,
                        p(*w_gu, 2 * f * c),
                        p(*w_down, c * f),
                        f,
                        &mut self.gu,
                        &mut self.a,
                        None,
                        &mut self.y,
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
                    linear_forward(&mut self.r_logits, &self.h, p(*rw, e * c), 1, c, e);
                    let bias = bias
                        .filter(|_| self.balance == Balance::Bias)
                        .map(|o| p(o, e));
                    router::router_forward(
                        &mut self.r_scores,
                        &mut self.r_idx,
                        &mut self.r_w,
                        &self.r_logits,
                        bias,
                        e,
                        k,
                        self.score_fn,
                        cfg.renormalize,
                    );
                    if let Some((sg, sd)) = shared {
                        let fs = cfg.shared_hidden();
                        swiglu_ffn(
                            &mut self.x,
                            &self.h,
                            p(*sg, 2 * fs * c),
                            p(*sd, c * fs),
                            fs,
                            &mut self.gu,
                            &mut self.a,
                            None,
                            &mut self.y,
                        );
                    }
                    for slot in 0..k {
                        let j = self.r_idx[slot] as usize;
                        let wg = p(w_gu + j * 2 * f * c, 2 * f * c);
                        let wd = p(w_down + j * c * f, c * f);
                        swiglu_ffn(
                            &mut self.x,
                            &self.h,
                            wg,
                            wd,
                            f,
                            &mut self.gu,
                            &mut self.a,
                            Some(self.r_w[slot]),
                            &mut self.y,
                        );
                    }
                }
            }
        }
        rmsnorm_forward(
            &mut self.h,
            &mut self.rstd,
            &self.x,
            p(lay.norm, c),
            cfg.norm_eps,
        );
        linear_forward(
            &mut self.logits,
            &self.h,
            p(lay.lm_head, cfg.vocab_size * c),
            1,
            c,
            cfg.vocab_size,
        );
        self.pos += 1;
        &self.logits
    }
}

/// `x += weight * SwiGLU(h)` for one token (weight None: added by an accumulating matmul,
/// as the training forward does for dense and shared FFNs).
#[allow(clippy::too_many_arguments)]
fn swiglu_ffn(
    x: &mut [f32],
    h: &[f32],
    w_gu: &[f32],
    w_down: &[f32],
    f: usize,
    gu: &mut [f32],
    a: &mut [f32],
    weight: Option<f32>,
    y: &mut [f32],
) {
    let c = x.len();
    linear_forward(&mut gu[..2 * f], h, w_gu, 1, c, 2 * f);
    swiglu_forward(&mut a[..f], &gu[..2 * f], f);
    match weight {
        None => matmul(x, &a[..f], false, w_down, true, 1, c, f, true),
        Some(w) => {
            linear_forward(y, &a[..f], w_down, 1, f, c);
            for (xx, yy) in x.iter_mut().zip(y.iter()) {
                *xx += w * yy;
            }
        }
    }
}
