//! The MoE decoder-only transformer: forward and backward over one micro-batch, llm.c style.
//!
//! Block l: `x_mid = x + Attn(RMSNorm(x))`, `x_next = x_mid + FFN(RMSNorm(x_mid))`, where the
//! FFN is dense SwiGLU or MoE (routed SwiGLU experts + optional shared experts). Final
//! RMSNorm, LM head, cross-entropy. The backward pass calls the kernels in exactly reverse
//! order. All buffers are sized at [`Model::new`] for a (B, T) and reused every step.
//!
//! References: Llama (RMSNorm, RoPE, SwiGLU), Mixtral / DeepSeekMoE / DeepSeek-V3 (routing),
//! llm.c `train_gpt2.c` (structure).

use crate::config::{Balance, ModelConfig};
use crate::moe::{experts_backward, experts_forward, ExpertActs, ExpertScratch, ExpertShape};
use crate::params::{FfnIdx, Layout};
use crate::profile::Profiler;
use kernels::attention::{attention_backward, attention_forward, AttnShape};
use kernels::dropout::{apply_mask, dropout_mask};
use kernels::embedding::{embedding_backward, embedding_forward};
use kernels::loss::{
    cross_entropy_backward, cross_entropy_distill_backward, cross_entropy_forward, distill_forward,
};
use kernels::matmul::{linear_backward, linear_forward, matmul};
use kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use kernels::rope::{rope_apply, RopeTable};
use kernels::router::{self, ScoreFn};
use kernels::swiglu::{swiglu_backward, swiglu_forward};

/// Saved activations of one block.
struct LayerActs {
    rstd1: Vec<f32>, // (N)
    h1: Vec<f32>,    // (N,C)
    qkv: Vec<f32>,   // (N,(H+2G)D) after RoPE
    att: Vec<f32>,   // (B,H,T,T)
    o: Vec<f32>,     // (N,HD)
    x_mid: Vec<f32>, // (N,C)
    rstd2: Vec<f32>, // (N)
    h2: Vec<f32>,    // (N,C)
    ffn: FfnActs,
    // residual dropout (empty when model.dropout = 0)
    br: Vec<f32>,        // (N,C) branch output
    mask_attn: Vec<f32>, // (N,C)
    mask_ffn: Vec<f32>,  // (N,C)
}

enum FfnActs {
    Dense {
        gu: Vec<f32>, // (N,2F)
        a: Vec<f32>,  // (N,F)
    },
    Moe(Box<MoeActs>),
}

struct MoeActs {
    logits: Vec<f32>, // (N,E)
    scores: Vec<f32>, // (N,E)
    idx: Vec<u32>,    // (N,K)
    w: Vec<f32>,      // (N,K)
    counts: Vec<u32>, // (E) this micro-batch
    ex: ExpertActs,
    sgu: Vec<f32>, // (N,2Fs) shared experts
    sa: Vec<f32>,  // (N,Fs)
}

/// Gradient scratch shared by all blocks (the backward pass visits one block at a time).
struct Grads {
    dres: Vec<f32>,    // (N,C) gradient of the residual stream
    dh: Vec<f32>,      // (N,C)
    dqkv: Vec<f32>,    // (N,(H+2G)D)
    datt: Vec<f32>,    // (B,H,T,T)
    do_: Vec<f32>,     // (N,HD)
    dgu: Vec<f32>,     // (max(N*2F, NK*2Fe, N*2Fs))
    da: Vec<f32>,      // (max(N*F, NK*Fe, N*Fs))
    dxe: Vec<f32>,     // (NK,C)
    dye: Vec<f32>,     // (NK,C)
    dlog_r: Vec<f32>,  // (N,E)
    dscores: Vec<f32>, // (N,E)
    dw: Vec<f32>,      // (N,K)
    dxf: Vec<f32>,     // (N,C)
    dbr: Vec<f32>,     // (N,C) masked branch gradient (dropout only)
}

/// Losses of the last forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Losses {
    /// Objective that backward differentiates: ce + aux_coef * aux + z_coef * z.
    pub total: f32,
    /// Mean cross-entropy over counted targets (nats/token).
    pub ce: f32,
    /// Load-balancing loss summed over MoE blocks, before its coefficient (a diagnostic when
    /// balance is not "aux_loss"; 1.0 per block is perfect balance).
    pub aux: f32,
    /// Router z-loss summed over MoE blocks, before its coefficient.
    pub z: f32,
    /// Targets counted in `ce`.
    pub n_targets: usize,
}

/// A model with its parameters, gradients and activation buffers for a fixed (B, T).
/// Logit distillation targets for [`Model::backward_distill`]: a teacher's logits for the
/// same batch (B*T, V), the weight W of the distillation term and the temperature T.
pub struct Distill<'a> {
    pub teacher_logits: &'a [f32],
    pub weight: f32,
    pub temperature: f32,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub layout: Layout,
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    /// Tokens routed to each expert since the last [`Model::take_load`], per MoE block (E each;
    /// empty for dense blocks).
    pub load: Vec<Vec<u64>>,
    /// Time per kernel group when enabled (`prof.enable()`).
    pub prof: Profiler,
    /// Training mode: residual dropout is applied (when model.dropout > 0). Off by default;
    /// the trainer turns it on, evaluation and inference leave it off.
    pub training: bool,
    /// Keys the dropout masks of the next forward (the trainer sets it to the micro-batch
    /// index, so masks are a function of the batch and resume stays exact). NOTE: not of
    /// `train.seed`: runs with different seeds share their masks. Keying by the seed too
    /// would change the weights of every existing dropout run, so it waits for a
    /// checkpoint format that records the key scheme.
    pub dropout_key: u64,
    /// The loads of the last optimizer step (set by [`Model::update_balance_bias`]).
    pub last_load: Vec<Vec<u64>>,
    b: usize,
    t: usize,
    score_fn: ScoreFn,
    balance: Balance,
    rope: RopeTable,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    res: Vec<Vec<f32>>, // L+1 residual streams (N,C)
    acts: Vec<LayerActs>,
    rstdf: Vec<f32>,
    xf: Vec<f32>,
    logits: Vec<f32>, // (N,V); holds dlogits after backward
    lse: Vec<f32>,
    losses: Vec<f32>,
    last: Losses,
    g: Grads,
}

impl Model {
    /// Builds a model for micro-batches of `b` sequences of `t` tokens, parameters initialised
    /// from `seed`. `cfg` must be validated.
    pub fn new(cfg: &ModelConfig, b: usize, t: usize, seed: u64) -> Model {
        let layout = Layout::new(cfg);
        let mut params = vec![0.0; layout.total];
        layout.init(&mut params, seed);
        Model::with_params(cfg, layout, params, b, t)
    }

    /// Builds a model around existing parameters (e.g. loaded from a file).
    pub fn with_params(
        cfg: &ModelConfig,
        layout: Layout,
        params: Vec<f32>,
        b: usize,
        t: usize,
    ) -> Model {
        cfg.validate()
            .expect("config must be validated before building a model");
        assert!(
            t >= 1 && t <= cfg.max_seq_len,
            "seq len {t} must be in 1..={}",
            cfg.max_seq_len
        );
        assert_eq!(params.len(), layout.total, "parameter buffer size");
        let n = b * t;
        let (c, v, d, h, g) = (
            cfg.d_model,
            cfg.vocab_size,
            cfg.head_dim(),
            cfg.n_heads,
            cfg.n_kv_heads,
        );
        let r = (h + 2 * g) * d;
        let z = |len: usize| vec![0.0f32; len];
        let (e, k, fe, fs) = (
            cfg.n_experts,
            cfg.top_k,
            cfg.expert_hidden,
            cfg.shared_hidden(),
        );
        let mut max_gu = 0;
        let nd = if cfg.dropout > 0.0 { n * c } else { 0 };
        let mut acts = vec![];
        let mut load = vec![];
        for l in 0..cfg.n_layers {
            let ffn = if cfg.is_moe_layer(l) {
                max_gu = max_gu.max(n * k * fe).max(n * fs);
                load.push(vec![0; e]);
                FfnActs::Moe(Box::new(MoeActs {
                    logits: z(n * e),
                    scores: z(n * e),
                    idx: vec![0; n * k],
                    w: z(n * k),
                    counts: vec![0; e],
                    ex: ExpertActs::new(ExpertShape { n, e, k, c, f: fe }),
                    sgu: z(n * 2 * fs),
                    sa: z(n * fs),
                }))
            } else {
                max_gu = max_gu.max(n * cfg.ffn_hidden);
                load.push(vec![]);
                FfnActs::Dense {
                    gu: z(n * 2 * cfg.ffn_hidden),
                    a: z(n * cfg.ffn_hidden),
                }
            };
            acts.push(LayerActs {
                rstd1: z(n),
                h1: z(n * c),
                qkv: z(n * r),
                att: z(b * h * t * t),
                o: z(n * h * d),
                x_mid: z(n * c),
                rstd2: z(n),
                h2: z(n * c),
                ffn,
                br: z(nd),
                mask_attn: z(nd),
                mask_ffn: z(nd),
            });
        }
        let any_moe = (0..cfg.n_layers).any(|l| cfg.is_moe_layer(l));
        let nk = if any_moe { n * k } else { 0 };
        let ne = if any_moe { n * e } else { 0 };
        let g_ = Grads {
            dres: z(n * c),
            dh: z(n * c),
            dqkv: z(n * r),
            datt: z(b * h * t * t),
            do_: z(n * h * d),
            dgu: z(2 * max_gu),
            da: z(max_gu),
            dxe: z(nk * c),
            dye: z(nk * c),
            dlog_r: z(ne),
            dscores: z(ne),
            dw: z(nk),
            dxf: z(n * c),
            dbr: z(if cfg.dropout > 0.0 { n * c } else { 0 }),
        };
        Model {
            score_fn: cfg.score_fn(),
            balance: cfg.balance,
            rope: RopeTable::new(cfg.max_seq_len, d, cfg.rope_theta),
            grads: vec![0.0; layout.total],
            cfg: cfg.clone(),
            layout,
            params,
            last_load: load.clone(),
            prof: Profiler::default(),
            training: false,
            dropout_key: 0,
            load,
            b,
            t,
            tokens: vec![0; n],
            targets: vec![0; n],
            res: (0..=cfg.n_layers).map(|_| z(n * c)).collect(),
            acts,
            rstdf: z(n),
            xf: z(n * c),
            logits: z(n * v),
            lse: z(n),
            losses: z(n),
            last: Losses::default(),
            g: g_,
        }
    }

    /// (B, T) the buffers are sized for.
    pub fn batch_shape(&self) -> (usize, usize) {
        (self.b, self.t)
    }

    /// Logits (N,V) of the last forward pass (before `backward`, which overwrites them).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Router choices (N,K) of MoE block `l` in the last forward pass.
    pub fn router_choices(&self, l: usize) -> Option<&[u32]> {
        match &self.acts[l].ffn {
            FfnActs::Moe(m) => Some(&m.idx),
            FfnActs::Dense { .. } => None,
        }
    }

    /// Forward pass over `tokens (B*T)`, loss against `targets (B*T)` (IGNORE_INDEX masks a
    /// position). Adds this batch's expert loads to [`Model::load`].
    pub fn forward(&mut self, tokens: &[u32], targets: &[u32]) -> Losses {
        let cfg = self.cfg.clone();
        let (b, t) = (self.b, self.t);
        let n = b * t;
        assert_eq!(tokens.len(), n, "tokens must be B*T = {n}");
        assert_eq!(targets.len(), n, "targets must be B*T = {n}");
        self.tokens.copy_from_slice(tokens);
        self.targets.copy_from_slice(targets);
        let (c, v, d, h, g) = (
            cfg.d_model,
            cfg.vocab_size,
            cfg.head_dim(),
            cfg.n_heads,
            cfg.n_kv_heads,
        );
        let r = (h + 2 * g) * d;
        let lay = self.layout.clone();
        let ashape = AttnShape { b, t, h, g, d };
        let drop = self.dropping();
        self.prof.start();
        embedding_forward(
            &mut self.res[0],
            tokens,
            &self.params[lay.embed..lay.embed + v * c],
            c,
        );
        self.prof.lap("embedding");
        let (mut aux_sum, mut z_sum) = (0.0f32, 0.0f32);
        for l in 0..cfg.n_layers {
            let li = &lay.layers[l];
            let (head, tail) = self.res.split_at_mut(l + 1);
            let x = &head[l];
            let x_next = &mut tail[0];
            let a = &mut self.acts[l];
            let params = &self.params;
            let p = |off: usize, len: usize| &params[off..off + len];
            // attention
            rmsnorm_forward(&mut a.h1, &mut a.rstd1, x, p(li.attn_norm, c), cfg.norm_eps);
            self.prof.lap("rmsnorm");
            linear_forward(&mut a.qkv, &a.h1, p(li.wqkv, r * c), n, c, r);
            self.prof.lap("matmul: attention");
            rope_apply(&mut a.qkv, r, 0, h + g, t, &self.rope, false);
            self.prof.lap("rope");
            attention_forward(&mut a.o, &mut a.att, &a.qkv, ashape);
            self.prof.lap("attention: softmax, QK^T, PV");
            if drop {
                linear_forward(&mut a.br, &a.o, p(li.wo, c * h * d), n, h * d, c);
                self.prof.lap("matmul: attention");
                dropout_mask(
                    &mut a.mask_attn,
                    cfg.dropout,
                    self.dropout_key,
                    2 * l as u64,
                );
                apply_mask(&mut a.br, &a.mask_attn);
                add(&mut a.x_mid, x, &a.br);
                self.prof.lap("dropout");
            } else {
                a.x_mid.copy_from_slice(x);
                matmul(
                    &mut a.x_mid,
                    &a.o,
                    false,
                    p(li.wo, c * h * d),
                    true,
                    n,
                    c,
                    h * d,
                    true,
                );
                self.prof.lap("matmul: attention");
            }
            // FFN
            rmsnorm_forward(
                &mut a.h2,
                &mut a.rstd2,
                &a.x_mid,
                p(li.ffn_norm, c),
                cfg.norm_eps,
            );
            self.prof.lap("rmsnorm");
            let ffn_out: &mut [f32] = if drop {
                a.br.fill(0.0);
                &mut a.br
            } else {
                x_next.copy_from_slice(&a.x_mid);
                &mut *x_next
            };
            match (&li.ffn, &mut a.ffn) {
                (FfnIdx::Dense { w_gu, w_down }, FfnActs::Dense { gu, a: act }) => {
                    let f = cfg.ffn_hidden;
                    linear_forward(gu, &a.h2, p(*w_gu, 2 * f * c), n, c, 2 * f);
                    self.prof.lap("matmul: ffn");
                    swiglu_forward(act, gu, f);
                    self.prof.lap("swiglu");
                    matmul(ffn_out, act, false, p(*w_down, c * f), true, n, c, f, true);
                    self.prof.lap("matmul: ffn");
                }
                (
                    FfnIdx::Moe {
                        router,
                        bias,
                        w_gu,
                        w_down,
                        shared,
                    },
                    FfnActs::Moe(m),
                ) => {
                    let (e, k, f) = (cfg.n_experts, cfg.top_k, cfg.expert_hidden);
                    linear_forward(&mut m.logits, &a.h2, p(*router, e * c), n, c, e);
                    self.prof.lap("router");
                    let bias = bias.map(|o| p(o, e));
                    router::router_forward(
                        &mut m.scores,
                        &mut m.idx,
                        &mut m.w,
                        &m.logits,
                        bias,
                        e,
                        k,
                        self.score_fn,
                        cfg.renormalize,
                    );
                    router::expert_counts(&mut m.counts, &m.idx);
                    self.prof.lap("router");
                    for (acc, &cnt) in self.load[l].iter_mut().zip(&m.counts) {
                        *acc += cnt as u64;
                    }
                    if let Some((sgu_w, sd_w)) = shared {
                        let fs = cfg.shared_hidden();
                        linear_forward(&mut m.sgu, &a.h2, p(*sgu_w, 2 * fs * c), n, c, 2 * fs);
                        self.prof.lap("matmul: ffn");
                        swiglu_forward(&mut m.sa, &m.sgu, fs);
                        self.prof.lap("swiglu");
                        matmul(
                            ffn_out,
                            &m.sa,
                            false,
                            p(*sd_w, c * fs),
                            true,
                            n,
                            c,
                            fs,
                            true,
                        );
                        self.prof.lap("matmul: ffn");
                    }
                    let es = ExpertShape { n, e, k, c, f };
                    experts_forward(
                        ffn_out,
                        &a.h2,
                        &m.idx,
                        &m.w,
                        p(*w_gu, e * 2 * f * c),
                        p(*w_down, e * c * f),
                        es,
                        &mut m.ex,
                    );
                    self.prof.lap("experts: dispatch, matmuls, swiglu");
                    // Both are computed for every MoE block as balance diagnostics; they enter
                    // the objective only with their coefficients.
                    aux_sum += router::aux_loss_forward(&m.scores, &m.counts, e, k, self.score_fn);
                    z_sum += router::z_loss_forward(&m.logits, e);
                    self.prof.lap("router");
                }
                _ => unreachable!("layout and activations agree on block kinds"),
            }
            if drop {
                dropout_mask(
                    &mut a.mask_ffn,
                    cfg.dropout,
                    self.dropout_key,
                    2 * l as u64 + 1,
                );
                apply_mask(&mut a.br, &a.mask_ffn);
                add(x_next, &a.x_mid, &a.br);
                self.prof.lap("dropout");
            }
        }
        let lay_norm = lay.norm;
        rmsnorm_forward(
            &mut self.xf,
            &mut self.rstdf,
            &self.res[cfg.n_layers],
            &self.params[lay_norm..lay_norm + c],
            cfg.norm_eps,
        );
        self.prof.lap("rmsnorm");
        linear_forward(
            &mut self.logits,
            &self.xf,
            &self.params[lay.lm_head..lay.lm_head + v * c],
            n,
            c,
            v,
        );
        self.prof.lap("matmul: lm head");
        let (sum, count) =
            cross_entropy_forward(&mut self.losses, &mut self.lse, &self.logits, targets, v);
        self.prof.lap("cross-entropy");
        let ce = if count > 0 {
            (sum / count as f64) as f32
        } else {
            0.0
        };
        let aux_coef = if self.balance == Balance::AuxLoss {
            cfg.aux_loss_coef
        } else {
            0.0
        };
        self.last = Losses {
            total: ce + aux_coef * aux_sum + cfg.z_loss_coef * z_sum,
            ce,
            aux: aux_sum,
            z: z_sum,
            n_targets: count,
        };
        self.last
    }

    /// Backward pass of the last forward, ACCUMULATING into `self.grads` the gradient of
    /// `loss_scale * total`. Use `loss_scale = 1 / micro_steps` for gradient accumulation.
    /// Overwrites the logits buffer.
    pub fn backward(&mut self, loss_scale: f32) {
        self.backward_distill(loss_scale, None);
    }

    /// Mean distillation loss `T^2 KL(teacher || student)` at temperature T over the last
    /// forward's counted targets (the logits must not have been overwritten by a backward).
    pub fn distill_loss(&self, kd: &Distill) -> f32 {
        let (sum, count) = distill_forward(
            &self.logits,
            kd.teacher_logits,
            &self.targets,
            self.cfg.vocab_size,
            kd.temperature,
        );
        (sum / count.max(1) as f64) as f32
    }

    /// As [`Model::backward`], with logit distillation: the cross-entropy part of the loss
    /// becomes `(1 - W) CE + W T^2 KL(teacher || student)`.
    pub fn backward_distill(&mut self, loss_scale: f32, kd: Option<&Distill>) {
        let cfg = self.cfg.clone();
        let (b, t) = (self.b, self.t);
        let n = b * t;
        let (c, v, d, h, g) = (
            cfg.d_model,
            cfg.vocab_size,
            cfg.head_dim(),
            cfg.n_heads,
            cfg.n_kv_heads,
        );
        let r = (h + 2 * g) * d;
        let lay = self.layout.clone();
        let ashape = AttnShape { b, t, h, g, d };
        let count = self.last.n_targets.max(1);
        let aux_coef = if self.balance == Balance::AuxLoss {
            cfg.aux_loss_coef * loss_scale
        } else {
            0.0
        };
        let z_coef = cfg.z_loss_coef * loss_scale;
        let drop = self.dropping();
        let gr = &mut self.g;
        let params = &self.params;
        let grads = &mut self.grads;
        let p = |off: usize, len: usize| &params[off..off + len];
        macro_rules! dp {
            ($off:expr, $len:expr) => {
                &mut grads[$off..$off + $len]
            };
        }

        self.prof.start();
        let scale = loss_scale / count as f32;
        match kd {
            None => cross_entropy_backward(&mut self.logits, &self.lse, &self.targets, v, scale),
            Some(kd) => cross_entropy_distill_backward(
                &mut self.logits,
                &self.lse,
                &self.targets,
                kd.teacher_logits,
                v,
                (1.0 - kd.weight) * scale,
                kd.weight * scale,
                kd.temperature,
            ),
        }
        self.prof.lap("cross-entropy bwd");
        linear_backward(
            Some(&mut gr.dxf),
            dp!(lay.lm_head, v * c),
            &self.logits,
            &self.xf,
            p(lay.lm_head, v * c),
            n,
            c,
            v,
            false,
        );
        self.prof.lap("matmul: lm head bwd");
        gr.dres.fill(0.0);
        rmsnorm_backward(
            &mut gr.dres,
            dp!(lay.norm, c),
            &gr.dxf,
            &self.res[cfg.n_layers],
            p(lay.norm, c),
            &self.rstdf,
        );
        self.prof.lap("rmsnorm bwd");

        for l in (0..cfg.n_layers).rev() {
            let li = &lay.layers[l];
            let a = &self.acts[l];
            // FFN: x_next = x_mid + dropout(ffn(h2)); gr.dres holds d(x_next)
            if drop {
                gr.dbr.copy_from_slice(&gr.dres);
                apply_mask(&mut gr.dbr, &a.mask_ffn);
            }
            let dy: &[f32] = if drop { &gr.dbr } else { &gr.dres };
            match (&li.ffn, &a.ffn) {
                (FfnIdx::Dense { w_gu, w_down }, FfnActs::Dense { gu, a: act }) => {
                    let f = cfg.ffn_hidden;
                    let da = &mut gr.da[..n * f];
                    let dgu = &mut gr.dgu[..n * 2 * f];
                    linear_backward(
                        Some(da),
                        dp!(*w_down, c * f),
                        dy,
                        act,
                        p(*w_down, c * f),
                        n,
                        f,
                        c,
                        false,
                    );
                    self.prof.lap("matmul: ffn bwd");
                    swiglu_backward(dgu, &gr.da[..n * f], gu, f);
                    self.prof.lap("swiglu bwd");
                    linear_backward(
                        Some(&mut gr.dh),
                        dp!(*w_gu, 2 * f * c),
                        &gr.dgu[..n * 2 * f],
                        &a.h2,
                        p(*w_gu, 2 * f * c),
                        n,
                        c,
                        2 * f,
                        false,
                    );
                    self.prof.lap("matmul: ffn bwd");
                }
                (
                    FfnIdx::Moe {
                        router,
                        bias: _,
                        w_gu,
                        w_down,
                        shared,
                    },
                    FfnActs::Moe(m),
                ) => {
                    let (e, k, f) = (cfg.n_experts, cfg.top_k, cfg.expert_hidden);
                    if let Some((sgu_w, sd_w)) = shared {
                        let fs = cfg.shared_hidden();
                        linear_backward(
                            Some(&mut gr.da[..n * fs]),
                            dp!(*sd_w, c * fs),
                            dy,
                            &m.sa,
                            p(*sd_w, c * fs),
                            n,
                            fs,
                            c,
                            false,
                        );
                        self.prof.lap("matmul: ffn bwd");
                        swiglu_backward(&mut gr.dgu[..n * 2 * fs], &gr.da[..n * fs], &m.sgu, fs);
                        self.prof.lap("swiglu bwd");
                        linear_backward(
                            Some(&mut gr.dh),
                            dp!(*sgu_w, 2 * fs * c),
                            &gr.dgu[..n * 2 * fs],
                            &a.h2,
                            p(*sgu_w, 2 * fs * c),
                            n,
                            c,
                            2 * fs,
                            false,
                        );
                        self.prof.lap("matmul: ffn bwd");
                    } else {
                        gr.dh.fill(0.0);
                    }
                    let nk = n * k;
                    let es = ExpertShape { n, e, k, c, f };
                    let scratch = ExpertScratch {
                        dye: &mut gr.dye,
                        da: &mut gr.da[..nk * f],
                        dgu: &mut gr.dgu[..nk * 2 * f],
                        dxe: &mut gr.dxe,
                    };
                    let (dw_gu, dw_down) = {
                        // w_gu and w_down are adjacent, w_gu first (see params::Layout)
                        let (lo, hi) = grads.split_at_mut(*w_down);
                        (&mut lo[*w_gu..*w_gu + e * 2 * f * c], &mut hi[..e * c * f])
                    };
                    experts_backward(
                        &mut gr.dh,
                        &mut gr.dw,
                        dw_gu,
                        dw_down,
                        dy,
                        &m.w,
                        p(*w_gu, e * 2 * f * c),
                        p(*w_down, e * c * f),
                        es,
                        &m.ex,
                        scratch,
                    );
                    self.prof.lap("experts: dispatch, matmuls, swiglu bwd");
                    // router
                    router::topk_weights_backward(
                        &mut gr.dscores,
                        &gr.dw,
                        &m.w,
                        &m.idx,
                        &m.scores,
                        e,
                        k,
                        cfg.renormalize,
                    );
                    if aux_coef > 0.0 {
                        router::aux_loss_backward(
                            &mut gr.dscores,
                            &m.scores,
                            &m.counts,
                            e,
                            k,
                            self.score_fn,
                            aux_coef,
                        );
                    }
                    router::scores_backward(
                        &mut gr.dlog_r,
                        &gr.dscores,
                        &m.scores,
                        e,
                        self.score_fn,
                    );
                    if z_coef > 0.0 {
                        router::z_loss_backward(&mut gr.dlog_r, &m.logits, e, z_coef);
                    }
                    linear_backward(
                        Some(&mut gr.dh),
                        dp!(*router, e * c),
                        &gr.dlog_r,
                        &a.h2,
                        p(*router, e * c),
                        n,
                        c,
                        e,
                        true,
                    );
                    self.prof.lap("router bwd");
                }
                _ => unreachable!("layout and activations agree on block kinds"),
            }
            rmsnorm_backward(
                &mut gr.dres,
                dp!(li.ffn_norm, c),
                &gr.dh,
                &a.x_mid,
                p(li.ffn_norm, c),
                &a.rstd2,
            );
            self.prof.lap("rmsnorm bwd");
            // attention: x_mid = x + dropout(o Wo^T); gr.dres holds d(x_mid)
            if drop {
                gr.dbr.copy_from_slice(&gr.dres);
                apply_mask(&mut gr.dbr, &a.mask_attn);
            }
            linear_backward(
                Some(&mut gr.do_),
                dp!(li.wo, c * h * d),
                if drop { &gr.dbr } else { &gr.dres },
                &a.o,
                p(li.wo, c * h * d),
                n,
                h * d,
                c,
                false,
            );
            self.prof.lap("matmul: attention bwd");
            attention_backward(&mut gr.dqkv, &mut gr.datt, &gr.do_, &a.qkv, &a.att, ashape);
            self.prof.lap("attention: softmax, QK^T, PV bwd");
            rope_apply(&mut gr.dqkv, r, 0, h + g, t, &self.rope, true);
            self.prof.lap("rope bwd");
            linear_backward(
                Some(&mut gr.dh),
                dp!(li.wqkv, r * c),
                &gr.dqkv,
                &a.h1,
                p(li.wqkv, r * c),
                n,
                c,
                r,
                false,
            );
            self.prof.lap("matmul: attention bwd");
            rmsnorm_backward(
                &mut gr.dres,
                dp!(li.attn_norm, c),
                &gr.dh,
                &self.res[l],
                p(li.attn_norm, c),
                &a.rstd1,
            );
            self.prof.lap("rmsnorm bwd");
        }
        embedding_backward(dp!(lay.embed, v * c), &self.tokens, &gr.dres, c);
        self.prof.lap("embedding bwd");
    }

    fn dropping(&self) -> bool {
        self.training && self.cfg.dropout > 0.0
    }

    /// Zeroes the gradient buffer.
    pub fn zero_grad(&mut self) {
        self.grads.fill(0.0);
    }

    /// Returns and resets the per-block expert loads counted since the last call.
    pub fn take_load(&mut self) -> Vec<Vec<u64>> {
        let out = self.load.clone();
        self.load.iter_mut().for_each(|l| l.fill(0));
        out
    }

    /// max/mean expert load of the last optimizer step over the MoE blocks (1.0 is perfect
    /// balance; 0.0 for a dense model).
    pub fn load_imbalance(&self) -> f64 {
        self.last_load
            .iter()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let mean = l.iter().sum::<u64>() as f64 / l.len() as f64;
                *l.iter().max().unwrap_or(&0) as f64 / mean.max(1.0)
            })
            .fold(0.0, f64::max)
    }

    /// Ends an optimizer step: moves the loads counted since the last call into
    /// [`Model::last_load`] and, with DeepSeek-V3 bias balancing, moves each MoE block's
    /// selection bias toward balance.
    pub fn update_balance_bias(&mut self) {
        let load = self.take_load();
        self.apply_load(load);
    }

    /// [`Model::update_balance_bias`] with the step's loads given (e.g. summed over the
    /// processes of a data-parallel run).
    pub fn apply_load(&mut self, load: Vec<Vec<u64>>) {
        self.last_load.clone_from(&load);
        if self.balance != Balance::Bias {
            return;
        }
        for (l, li) in self.layout.layers.iter().enumerate() {
            if let FfnIdx::Moe {
                bias: Some(off), ..
            } = li.ffn
            {
                let e = self.cfg.n_experts;
                let counts: Vec<u32> = load[l]
                    .iter()
                    .map(|&x| x.min(u32::MAX as u64) as u32)
                    .collect();
                router::bias_update(
                    &mut self.params[off..off + e],
                    &counts,
                    self.cfg.bias_update_rate,
                );
            }
        }
    }
}

/// `out = a + b`, elementwise.
fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    use rayon::prelude::*;
    out.par_chunks_mut(4096)
        .zip(a.par_chunks(4096))
        .zip(b.par_chunks(4096))
        .for_each(|((o, a), b)| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}
