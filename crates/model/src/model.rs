//! The MoE decoder-only transformer: forward and backward over one micro-batch, llm.c style.
//!
//! The forward pass is the list: embedding; per block `attention_forward` and
//! `ffn_forward` (dense SwiGLU or MoE, in `block`); final RMSNorm, LM head,
//! cross-entropy. The backward pass is the same list reversed. All buffers are sized at
//! [`Model::new`] for a (B, T) and reused every step.
//!
//! References: Llama (RMSNorm, RoPE, SwiGLU), Mixtral / DeepSeekMoE / DeepSeek-V3 (routing),
//! llm.c `train_gpt2.c` (structure).

use crate::block::{
    attention_backward, attention_forward, ffn_backward, ffn_forward, AttnActs, Dims, Dropout,
    FfnActs, FfnKind, Scratch,
};
use crate::config::{Balance, ModelConfig};
use crate::params::{FfnIdx, Layout};
use crate::profile::Profiler;
use kernels::embedding::{embedding_backward, embedding_forward};
use kernels::loss::{
    cross_entropy_backward, cross_entropy_distill_backward, cross_entropy_forward, distill_forward,
};
use kernels::matmul::Precision;

use kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use kernels::rope::RopeTable;
use kernels::router;

/// Saved activations of one block.
struct LayerActs {
    attn: AttnActs,
    x_mid: Vec<f32>, // (N,C) the residual stream between the two halves
    ffn: FfnActs,
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
    dims: Dims,
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
    br: Vec<f32>,   // (N,C) a branch's output before dropout (dropout only)
    dres: Vec<f32>, // (N,C) gradient of the residual stream
    dbr: Vec<f32>,  // (N,C) masked branch gradient (dropout only)
    dxf: Vec<f32>,  // (N,C)
    sc: Scratch,
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
        let (c, v) = (cfg.d_model, cfg.vocab_size);
        let dims = Dims::of(cfg, b, t);
        let z = |len: usize| vec![0.0f32; len];
        let dropout = cfg.dropout > 0.0;
        let nd = if dropout { n * c } else { 0 };
        let moe = |l: usize| cfg.is_moe_layer(l);
        let acts = (0..cfg.n_layers)
            .map(|l| LayerActs {
                attn: AttnActs::new(&dims, dropout),
                x_mid: z(n * c),
                ffn: FfnActs::new(&dims, moe(l), dropout),
            })
            .collect();
        let load: Vec<Vec<u64>> = (0..cfg.n_layers)
            .map(|l| vec![0; if moe(l) { cfg.n_experts } else { 0 }])
            .collect();
        let sc = Scratch::new(
            &dims,
            (0..cfg.n_layers).any(|l| !moe(l)),
            (0..cfg.n_layers).any(moe),
        );
        Model {
            dims,
            balance: cfg.balance,
            rope: cfg.rope_table(cfg.max_seq_len),
            grads: vec![0.0; layout.total],
            cfg: cfg.clone(),
            layout,
            params,
            last_load: load.clone(),
            prof: Profiler::default(),
            training: false,
            dropout_key: 0,
            load,
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
            br: z(nd),
            dres: z(n * c),
            dbr: z(nd),
            dxf: z(n * c),
            sc,
        }
    }

    /// Chooses the attention kernel whatever T says: tiled with an online softmax (`true`)
    /// or stored (T, T) probabilities. For tests that hold the two to each other and
    /// benchmarks that time them; a model picks by T ([`crate::block::FLASH_MIN_T`]).
    pub fn set_flash_attention(&mut self, flash: bool) {
        let s = &mut self.dims;
        s.flash = flash;
        let att = s.b * s.h * s.t * if flash { 1 } else { s.t };
        for a in &mut self.acts {
            a.attn.att = vec![0.0; att];
        }
        self.sc.datt = vec![0.0; if flash { 0 } else { s.b * s.h * s.t * s.t }];
    }

    /// Arithmetic of the linear layers' matmuls (`train.precision`): f32 (the default) or
    /// bf16 operands with f32 accumulation; weights, gradients and activations stay f32.
    pub fn set_precision(&mut self, precision: Precision) {
        self.dims.precision = precision;
    }

    pub fn precision(&self) -> Precision {
        self.dims.precision
    }

    /// (B, T) the buffers are sized for.
    pub fn batch_shape(&self) -> (usize, usize) {
        (self.dims.b, self.dims.t)
    }

    /// Logits (N,V) of the last forward pass (before `backward`, which overwrites them).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Router choices (N,K) of MoE block `l` in the last forward pass.
    pub fn router_choices(&self, l: usize) -> Option<&[u32]> {
        match &self.acts[l].ffn.kind {
            FfnKind::Moe(m) => Some(&m.idx),
            FfnKind::Dense(_) => None,
        }
    }

    /// Forward pass over `tokens (B*T)`, loss against `targets (B*T)` (IGNORE_INDEX masks a
    /// position). Adds this batch's expert loads to [`Model::load`].
    pub fn forward(&mut self, tokens: &[u32], targets: &[u32]) -> Losses {
        let s = self.dims;
        let (n, c, v) = (s.n, s.c, self.cfg.vocab_size);
        assert_eq!(tokens.len(), n, "tokens must be B*T = {n}");
        assert_eq!(targets.len(), n, "targets must be B*T = {n}");
        self.tokens.copy_from_slice(tokens);
        self.targets.copy_from_slice(targets);
        let lay = &self.layout;
        let params = &self.params;
        let drop = |stream: u64| Dropout {
            on: self.training && self.cfg.dropout > 0.0,
            p: self.cfg.dropout,
            key: self.dropout_key,
            stream,
        };
        let prof = &mut self.prof;
        prof.start();
        embedding_forward(
            &mut self.res[0],
            tokens,
            &params[lay.embed..lay.embed + v * c],
            c,
        );
        prof.lap("embedding");
        let (mut aux_sum, mut z_sum) = (0.0f32, 0.0f32);
        for (l, li) in lay.layers.iter().enumerate() {
            let (head, tail) = self.res.split_at_mut(l + 1);
            let a = &mut self.acts[l];
            let w = li.attn_w(params, &s);
            let x_mid = &mut a.x_mid;
            attention_forward(
                x_mid,
                &head[l],
                &w,
                &mut a.attn,
                &mut self.br,
                &s,
                &self.rope,
                drop(2 * l as u64),
                prof,
            );
            let w = li.ffn_w(params, &s);
            let (aux, z) = ffn_forward(
                &mut tail[0],
                x_mid,
                &w,
                &mut a.ffn,
                &mut self.br,
                &mut self.load[l],
                &s,
                drop(2 * l as u64 + 1),
                prof,
            );
            if let FfnIdx::Moe { .. } = li.ffn {
                aux_sum += aux;
                z_sum += z;
            }
        }
        rmsnorm_forward(
            &mut self.xf,
            &mut self.rstdf,
            &self.res[self.cfg.n_layers],
            &params[lay.norm..lay.norm + c],
            s.eps,
        );
        prof.lap("rmsnorm");
        s.precision.linear_forward(
            &mut self.logits,
            &self.xf,
            &params[lay.lm_head..lay.lm_head + v * c],
            n,
            c,
            v,
        );
        prof.lap("matmul: lm head");
        let (sum, count) =
            cross_entropy_forward(&mut self.losses, &mut self.lse, &self.logits, targets, v);
        prof.lap("cross-entropy");
        let ce = if count > 0 {
            (sum / count as f64) as f32
        } else {
            0.0
        };
        let aux_coef = if self.balance == Balance::AuxLoss {
            self.cfg.aux_loss_coef
        } else {
            0.0
        };
        self.last = Losses {
            total: ce + aux_coef * aux_sum + self.cfg.z_loss_coef * z_sum,
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
        let s = self.dims;
        let (n, c, v) = (s.n, s.c, self.cfg.vocab_size);
        let count = self.last.n_targets.max(1);
        let aux_coef = if self.balance == Balance::AuxLoss {
            self.cfg.aux_loss_coef * loss_scale
        } else {
            0.0
        };
        let coefs = (aux_coef, self.cfg.z_loss_coef * loss_scale);
        let drop = self.dropping();
        let lay = &self.layout;
        let params = &self.params;
        let grads = &mut self.grads;
        let prof = &mut self.prof;

        prof.start();
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
        prof.lap("cross-entropy bwd");
        let head = lay.lm_head..lay.lm_head + v * c;
        self.dims.precision.linear_backward(
            Some(&mut self.dxf),
            &mut grads[head.clone()],
            &self.logits,
            &self.xf,
            &params[head],
            n,
            c,
            v,
            false,
        );
        prof.lap("matmul: lm head bwd");
        self.dres.fill(0.0);
        let norm = lay.norm..lay.norm + c;
        rmsnorm_backward(
            &mut self.dres,
            &mut grads[norm.clone()],
            &self.dxf,
            &self.res[self.cfg.n_layers],
            &params[norm],
            &self.rstdf,
        );
        prof.lap("rmsnorm bwd");

        for (l, li) in lay.layers.iter().enumerate().rev() {
            let a = &self.acts[l];
            // self.dres holds d(x_next), then d(x_mid), then d(x)
            ffn_backward(
                &mut self.dres,
                &mut self.dbr,
                li.ffn_g(grads, &s),
                &a.x_mid,
                &li.ffn_w(params, &s),
                &a.ffn,
                &mut self.sc,
                &s,
                coefs,
                drop,
                prof,
            );
            attention_backward(
                &mut self.dres,
                &mut self.dbr,
                li.attn_g(grads, &s),
                &self.res[l],
                &li.attn_w(params, &s),
                &a.attn,
                &mut self.sc,
                &s,
                &self.rope,
                drop,
                prof,
            );
        }
        embedding_backward(
            &mut grads[lay.embed..lay.embed + v * c],
            &self.tokens,
            &self.dres,
            c,
        );
        prof.lap("embedding bwd");
    }

    fn dropping(&self) -> bool {
        self.training && self.cfg.dropout > 0.0
    }

    /// Zeroes the gradient buffer (in parallel: one thread writing 44 MB took 3-4 ms of a
    /// small-moe step).
    pub fn zero_grad(&mut self) {
        use rayon::prelude::*;
        self.grads.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
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
