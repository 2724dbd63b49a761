//! Model and training configuration: plain serde structs read from TOML, with presets in
//! `configs/`. Unknown fields are refused; [`Config::validate`] names the field at fault.

use crate::error::{cfg_err, Error, Result};
use kernels::router::ScoreFn;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A whole config file: `[model]` and `[train]` tables.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
}

/// The transformer's shape. Head dim D = d_model / n_heads unless `head_dim` is set.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size V (must match the tokenizer).
    pub vocab_size: usize,
    /// Model width C.
    pub d_model: usize,
    /// Number of transformer blocks L.
    pub n_layers: usize,
    /// Query heads H. Unless `head_dim` is set, H must divide d_model and the head dim is
    /// D = d_model / n_heads; D must be even (RoPE).
    pub n_heads: usize,
    /// Head dim D when it differs from d_model / n_heads (Qwen3: 128 with d_model 2048 and
    /// 32 heads; Gemma). The q projection is then H*D wide, not d_model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm on the queries and keys after their projections, before RoPE: "none",
    /// "head" (per head over D, one weight [D] each for q and k: Qwen3) or "projection"
    /// (over the whole projection, weights [H*D] and [G*D]: OLMoE).
    #[serde(default, skip_serializing_if = "QkNorm::is_none")]
    pub qk_norm: QkNorm,
    /// Biases on the q, k and v projections (Qwen2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub qkv_bias: bool,
    /// Key/value heads G (grouped-query attention); must divide n_heads. Equal to n_heads
    /// gives standard multi-head attention.
    pub n_kv_heads: usize,
    /// Longest sequence T the model is built for (RoPE table size, KV cache length).
    pub max_seq_len: usize,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    /// RoPE scaling for contexts past the one a model was trained at (`[model.rope_scaling]`
    /// with `type = "linear" | "yarn" | "llama3"`, fields as in Hugging Face configs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding-window attention (Mistral, Qwen2): a query sees itself and the
    /// `sliding_window - 1` keys before it; 0: every earlier key.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sliding_window: usize,
    /// With a sliding window, the blocks that still attend to every earlier key (Qwen2-MoE's
    /// `layer_types` "full_attention"); empty: every block uses the window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub full_attention_layers: Vec<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
    /// Share the token embedding with the LM head.
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Hidden width F of the dense SwiGLU FFN (dense blocks only).
    pub ffn_hidden: usize,
    /// Routed experts E per MoE block; 0 makes every block dense.
    #[serde(default)]
    pub n_experts: usize,
    /// Experts chosen per token K.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Hidden width of each routed (and shared) expert.
    #[serde(default)]
    pub expert_hidden: usize,
    /// Always-on shared experts per MoE block (DeepSeekMoE), each of width expert_hidden.
    #[serde(default)]
    pub n_shared_experts: usize,
    /// Total width of the shared experts when it is not n_shared_experts * expert_hidden
    /// (Qwen2-MoE: `shared_expert_intermediate_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_hidden: Option<usize>,
    /// Scale the shared experts' output per token by sigmoid(h . w_gate), a learned [C]
    /// gate (Qwen2-MoE).
    #[serde(default, skip_serializing_if = "is_false")]
    pub shared_expert_gate: bool,
    /// Router score function: "softmax" or "sigmoid".
    #[serde(default)]
    pub router_score: RouterScore,
    /// Divide the chosen experts' scores by their sum.
    #[serde(default = "default_true")]
    pub renormalize: bool,
    /// Factor on the chosen experts' weights (DeepSeek-V3's `routed_scaling_factor`).
    #[serde(default = "default_one_f32", skip_serializing_if = "is_one_f32")]
    pub routed_scaling_factor: f32,
    /// Group-limited routing (DeepSeek-V3): experts form `n_group` equal groups, a group
    /// scores the sum of its two best experts, and a token chooses its top_k experts among
    /// the `topk_group` best groups only. 1 and 1: plain top-k.
    #[serde(default = "default_one", skip_serializing_if = "is_one")]
    pub n_group: usize,
    #[serde(default = "default_one", skip_serializing_if = "is_one")]
    pub topk_group: usize,
    /// Load balancing: "aux_loss" (Switch/GShard loss), "bias" (DeepSeek-V3 selection bias,
    /// auxiliary-loss-free) or "none".
    #[serde(default)]
    pub balance: Balance,
    /// Coefficient of the load-balancing loss (balance = "aux_loss").
    #[serde(default = "default_aux_coef")]
    pub aux_loss_coef: f32,
    /// Coefficient of the router z-loss (0 disables it).
    #[serde(default)]
    pub z_loss_coef: f32,
    /// Per-step change of the selection bias (balance = "bias").
    #[serde(default = "default_bias_rate")]
    pub bias_update_rate: f32,
    /// The first k blocks use a dense FFN even in an MoE model.
    #[serde(default)]
    pub first_dense_layers: usize,
    /// Only every k-th block is MoE, counting from 1: block l is MoE when (l + 1) % k == 0
    /// (Qwen2-MoE's `decoder_sparse_step`; 1: every block).
    #[serde(default = "default_one", skip_serializing_if = "is_one")]
    pub moe_every: usize,
    /// Blocks that use a dense FFN whatever the rules above say (Qwen2-MoE's
    /// `mlp_only_layers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dense_layers: Vec<usize>,
    /// Residual dropout probability on the attention and FFN outputs during training (0: off).
    #[serde(default)]
    pub dropout: f32,
    /// Standard deviation of the normal initialisation (residual projections are scaled by
    /// 1/sqrt(2 * n_layers), as in GPT-2).
    #[serde(default = "default_init_std")]
    pub init_std: f32,
}

/// Optimisation settings. Later stages (training loop, schedules) extend this table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per micro-batch B.
    pub batch_size: usize,
    /// Tokens per sequence T (at most model.max_seq_len).
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// AdamW betas.
    pub beta1: f32,
    pub beta2: f32,
    /// AdamW epsilon.
    pub eps: f32,
    /// Decoupled weight decay (not applied to norms and biases).
    pub weight_decay: f32,
    /// Global-norm gradient clipping threshold (0 disables).
    pub grad_clip: f32,
    /// Seed for initialisation and data order.
    pub seed: u64,
    /// Optimizer steps of a training run.
    pub steps: u64,
    /// Linear warm-up steps, then the decay `schedule` names, to `min_lr_ratio * lr` at
    /// `steps`.
    pub warmup_steps: u64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f32,
    /// After the warm-up: "cosine" decay over all remaining steps, or "wsd"
    /// (warmup-stable-decay: `lr` held, then a linear decay over the last `decay_frac` of the
    /// steps after the warm-up).
    #[serde(skip_serializing_if = "Schedule::is_cosine")]
    pub schedule: Schedule,
    /// The share of the post-warm-up steps a "wsd" schedule spends decaying, in (0, 1].
    #[serde(skip_serializing_if = "is_default_decay_frac")]
    pub decay_frac: f32,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub grad_accum: u64,
    /// Evaluate on the validation split every N steps (0: only at the end).
    pub eval_every: u64,
    /// Validation batches per periodic evaluation (0: the whole split).
    pub eval_batches: u64,
    /// Write a checkpoint every N steps (0: only at the end and on Ctrl-C).
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (the newest K).
    pub keep_checkpoints: usize,
    /// Data-parallel runs: every N steps the processes compare weights hashes and stop if one
    /// differs (0: never).
    pub agree_every: u64,
    /// A step whose loss exceeds this factor times the running mean loss is an anomaly, as
    /// is a non-finite loss or gradient (0: only non-finite values are).
    pub spike_factor: f32,
    /// What an anomalous step does: "skip" (drop its update, go on with the next batch) or
    /// "rollback" (return to the last checkpoint and replay, skipping that step).
    pub on_anomaly: OnAnomaly,
    /// "adamw" for every tensor, or "muon": Muon for the hidden 2-D weights (attention
    /// projections, dense and expert FFN matrices, each orthogonalised on its own) and AdamW
    /// (at `lr`) for embeddings, head, norms, biases and routers.
    #[serde(skip_serializing_if = "OptimizerKind::is_adamw")]
    pub optimizer: OptimizerKind,
    /// Muon's peak learning rate (the schedule scales it as it scales `lr`).
    #[serde(skip_serializing_if = "is_default_muon_lr")]
    pub muon_lr: f32,
    /// Muon's momentum (Nesterov).
    #[serde(skip_serializing_if = "is_default_muon_momentum")]
    pub muon_momentum: f32,
    /// Newton–Schulz iterations per Muon update.
    #[serde(skip_serializing_if = "is_default_ns_steps")]
    pub muon_ns_steps: usize,
    /// Arithmetic of the linear layers' matmuls: "fp32", or "bf16" (operands rounded to
    /// bf16, products summed in f32; weights, gradients, optimizer state and activations
    /// stay f32, routers stay f32). Fast on CPUs with AVX512-BF16; exact but slow elsewhere.
    #[serde(skip_serializing_if = "TrainPrecision::is_fp32")]
    pub precision: TrainPrecision,
}

/// `train.precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainPrecision {
    #[default]
    Fp32,
    Bf16,
}

impl TrainPrecision {
    fn is_fp32(&self) -> bool {
        *self == TrainPrecision::Fp32
    }

    /// The kernels' name for it.
    pub fn kernels(self) -> kernels::matmul::Precision {
        match self {
            TrainPrecision::Fp32 => kernels::matmul::Precision::F32,
            TrainPrecision::Bf16 => kernels::matmul::Precision::Bf16,
        }
    }
}

/// `train.optimizer`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Adamw,
    Muon,
}

impl OptimizerKind {
    fn is_adamw(&self) -> bool {
        *self == OptimizerKind::Adamw
    }

    /// The optimizer's name as people write it ("AdamW", "Muon").
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Adamw => "AdamW",
            OptimizerKind::Muon => "Muon",
        }
    }
}

/// `train.schedule`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Cosine,
    Wsd,
}

impl Schedule {
    fn is_cosine(&self) -> bool {
        *self == Schedule::Cosine
    }
}

const DECAY_FRAC: f32 = 0.2;

fn is_default_decay_frac(x: &f32) -> bool {
    *x == DECAY_FRAC
}

const MUON_LR: f32 = 0.02;
const MUON_MOMENTUM: f32 = 0.95;
const MUON_NS_STEPS: usize = 5;

fn is_default_muon_lr(x: &f32) -> bool {
    *x == MUON_LR
}

fn is_default_muon_momentum(x: &f32) -> bool {
    *x == MUON_MOMENTUM
}

fn is_default_ns_steps(x: &usize) -> bool {
    *x == MUON_NS_STEPS
}

/// How RoPE frequencies are stretched (Hugging Face's `rope_type`), computed as transformers'
/// `modeling_rope_utils` does.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Position interpolation (Chen et al. 2023): every frequency divided by `factor`.
    Linear { factor: f32 },
    /// YaRN (Peng et al. 2023): high frequencies kept, low ones interpolated by `factor`, a
    /// linear ramp between the dims that turn `beta_fast` and `beta_slow` times over the
    /// original context; cos and sin scaled by `attention_factor` (default
    /// 0.1 ln(factor) + 1).
    Yarn {
        factor: f32,
        original_max_seq_len: usize,
        #[serde(default = "default_beta_fast")]
        beta_fast: f32,
        #[serde(default = "default_one_f32")]
        beta_slow: f32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attention_factor: Option<f32>,
        /// Round the ramp's ends outwards to whole dims (transformers' `truncate`).
        #[serde(default = "default_true")]
        truncate: bool,
    },
    /// Llama 3.1: wavelengths longer than original/low_freq_factor divided by `factor`,
    /// shorter than original/high_freq_factor kept, a smooth blend between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_seq_len: usize,
    },
}

fn default_beta_fast() -> f32 {
    32.0
}

impl RopeScaling {
    /// The inverse frequencies of a head of `d` dims (one per pair) and the factor on cos
    /// and sin.
    pub fn inv_freq(scaling: Option<&RopeScaling>, d: usize, theta: f32) -> (Vec<f64>, f64) {
        let base = theta as f64;
        let plain: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / d as f64))
            .collect();
        match scaling {
            None => (plain, 1.0),
            Some(RopeScaling::Linear { factor }) => {
                (plain.iter().map(|f| f / *factor as f64).collect(), 1.0)
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_seq_len,
            }) => {
                let (factor, lo, hi) = (
                    *factor as f64,
                    *low_freq_factor as f64,
                    *high_freq_factor as f64,
                );
                let old = *original_max_seq_len as f64;
                let (low_wl, high_wl) = (old / lo, old / hi);
                let f = plain
                    .iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f64::consts::PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let smooth = (old / wl - lo) / (hi - lo);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (f, 1.0)
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_seq_len,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            }) => {
                let factor = *factor as f64;
                let dim = d as f64;
                let corr = |rot: f64| {
                    dim * (*original_max_seq_len as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let (mut lo, mut hi) = (corr(*beta_fast as f64), corr(*beta_slow as f64));
                if *truncate {
                    (lo, hi) = (lo.floor(), hi.ceil());
                }
                let (lo, mut hi) = (lo.max(0.0), hi.min(dim - 1.0));
                if lo == hi {
                    hi += 0.001;
                }
                let f = plain
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        let extra = 1.0 - ramp;
                        f / factor * (1.0 - extra) + f * extra
                    })
                    .collect();
                let af = attention_factor
                    .map(|a| a as f64)
                    .unwrap_or(if factor <= 1.0 {
                        1.0
                    } else {
                        0.1 * factor.ln() + 1.0
                    });
                (f, af)
            }
        }
    }

    fn validate(&self) -> Result<()> {
        let (factor, orig) = match self {
            RopeScaling::Linear { factor } => (*factor, 1),
            RopeScaling::Yarn {
                factor,
                original_max_seq_len,
                ..
            } => (*factor, *original_max_seq_len),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_seq_len,
            } => {
                if !(*low_freq_factor > 0.0 && high_freq_factor > low_freq_factor) {
                    return Err(cfg_err(
                        "model.rope_scaling",
                        "needs 0 < low_freq_factor < high_freq_factor",
                    ));
                }
                (*factor, *original_max_seq_len)
            }
        };
        if !(factor.is_finite() && factor > 0.0) || orig == 0 {
            return Err(cfg_err(
                "model.rope_scaling",
                "factor must be > 0 and original_max_seq_len >= 1",
            ));
        }
        Ok(())
    }
}

fn default_rope_theta() -> f32 {
    10000.0
}
fn default_norm_eps() -> f32 {
    1e-5
}
fn default_top_k() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn default_one() -> usize {
    1
}
fn is_zero(k: &usize) -> bool {
    *k == 0
}

fn is_one(k: &usize) -> bool {
    *k == 1
}
fn default_one_f32() -> f32 {
    1.0
}
fn is_one_f32(x: &f32) -> bool {
    *x == 1.0
}
fn default_aux_coef() -> f32 {
    0.01
}
fn default_bias_rate() -> f32 {
    0.001
}
fn default_init_std() -> f32 {
    0.02
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 16,
            seq_len: 128,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            seed: 1337,
            steps: 1000,
            warmup_steps: 100,
            min_lr_ratio: 0.1,
            schedule: Schedule::Cosine,
            decay_frac: DECAY_FRAC,
            grad_accum: 1,
            eval_every: 200,
            eval_batches: 20,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            agree_every: 50,
            spike_factor: 0.0,
            on_anomaly: OnAnomaly::Skip,
            optimizer: OptimizerKind::Adamw,
            muon_lr: MUON_LR,
            muon_momentum: MUON_MOMENTUM,
            muon_ns_steps: MUON_NS_STEPS,
            precision: TrainPrecision::Fp32,
        }
    }
}

/// Router score function (`model.router_score`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterScore {
    /// Softmax over all experts, then top-k (Mixtral, Switch, OLMoE).
    #[default]
    Softmax,
    /// Independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

impl From<RouterScore> for ScoreFn {
    fn from(s: RouterScore) -> ScoreFn {
        match s {
            RouterScore::Softmax => ScoreFn::Softmax,
            RouterScore::Sigmoid => ScoreFn::Sigmoid,
        }
    }
}

/// Query/key normalisation (`model.qk_norm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    #[default]
    None,
    /// Per head, over D (Qwen3).
    Head,
    /// Over the whole q (H*D) and k (G*D) projections (OLMoE).
    Projection,
}

impl QkNorm {
    pub fn is_none(&self) -> bool {
        *self == QkNorm::None
    }
}

/// Load-balancing strategy (`model.balance`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The Switch/GShard auxiliary loss.
    #[default]
    AuxLoss,
    /// DeepSeek-V3's selection bias (auxiliary-loss-free).
    Bias,
    None,
}

/// What an anomalous training step does (`train.on_anomaly`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAnomaly {
    /// Drop the step's update and go on with the next batch.
    #[default]
    Skip,
    /// Return to the last checkpoint and replay, skipping that step.
    Rollback,
}

impl Config {
    /// Reads and validates a TOML config file.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::ConfigParse { msg, .. } => Error::ConfigParse {
                path: path.into(),
                msg,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::ConfigParse {
            path: "<toml>".into(),
            msg: one_line(text, &e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let t = &self.train;
        if t.batch_size == 0 {
            return Err(cfg_err("train.batch_size", "must be at least 1"));
        }
        if t.seq_len == 0 || t.seq_len > self.model.max_seq_len {
            return Err(cfg_err(
                "train.seq_len",
                format!(
                    "{} must be in 1..=model.max_seq_len ({})",
                    t.seq_len, self.model.max_seq_len
                ),
            ));
        }
        // NOTE: refused up front, before a run dir exists: zero steps left a run dir that
        // could be neither resumed (no checkpoint) nor restarted (issue 11); a zero learning
        // rate trains nothing while looking like a run.
        if t.steps == 0 {
            return Err(cfg_err("train.steps", "must be at least 1"));
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(cfg_err(
                "train.lr",
                format!("{} must be a finite number > 0", t.lr),
            ));
        }
        for (name, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(cfg_err(name, format!("{b} must be in [0, 1)")));
            }
        }
        if !positive(t.eps) {
            return Err(cfg_err("train.eps", "must be a finite number > 0"));
        }
        if !(t.muon_lr.is_finite() && t.muon_lr > 0.0) {
            return Err(cfg_err(
                "train.muon_lr",
                format!("{} must be a finite number > 0", t.muon_lr),
            ));
        }
        if !(0.0..1.0).contains(&t.muon_momentum) {
            return Err(cfg_err(
                "train.muon_momentum",
                format!("{} must be in [0, 1)", t.muon_momentum),
            ));
        }
        if !(1..=50).contains(&t.muon_ns_steps) {
            return Err(cfg_err(
                "train.muon_ns_steps",
                format!("{} must be in 1..=50", t.muon_ns_steps),
            ));
        }
        if !(t.spike_factor == 0.0 || t.spike_factor > 1.0) {
            return Err(cfg_err("train.spike_factor", "must be 0 (off) or > 1"));
        }
        if t.grad_accum == 0 {
            return Err(cfg_err("train.grad_accum", "must be at least 1"));
        }
        if t.keep_checkpoints == 0 {
            return Err(cfg_err("train.keep_checkpoints", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(cfg_err(
                "train.min_lr_ratio",
                format!("{} must be in [0, 1]", t.min_lr_ratio),
            ));
        }
        if !(t.decay_frac > 0.0 && t.decay_frac <= 1.0) {
            return Err(cfg_err(
                "train.decay_frac",
                format!("{} must be in (0, 1]", t.decay_frac),
            ));
        }
        if !non_negative(t.weight_decay) || !non_negative(t.grad_clip) {
            return Err(cfg_err(
                if non_negative(t.weight_decay) {
                    "train.grad_clip"
                } else {
                    "train.weight_decay"
                },
                "must be a finite number >= 0",
            ));
        }
        Ok(())
    }
}

/// True for finite x > 0 (false for NaN and infinity: `init_std = inf` is valid TOML, and a
/// config.json's 1e39 rounds to an infinite f32; either would panic deep in the run or
/// train to NaN).
fn positive(x: f32) -> bool {
    x.is_finite() && x > 0.0
}

/// True for finite x >= 0 (false for NaN and infinity).
fn non_negative(x: f32) -> bool {
    x.is_finite() && x >= 0.0
}

/// At most `max` characters of `s`, with "..." where it was cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// A TOML error on one line: "line N: message (at `excerpt of the source line`)". The excerpt
/// is at most 60 characters around the error (a config may be one 50 MB line: issue 11).
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let msg = clip(&e.message().trim().replace('\n', " "), 200);
    match e.span() {
        Some(span) => {
            let mut start = span.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let line_no = text[..start].matches('\n').count() + 1;
            let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            let line = &text[line_start..line_end];
            // from up to 20 characters before the error, 60 characters in all
            let col = line[..start - line_start].chars().count();
            let skip = col.saturating_sub(20);
            let from = line.char_indices().nth(skip).map_or(line.len(), |(i, _)| i);
            let lead = if skip > 0 { "..." } else { "" };
            let excerpt = clip(line[from..].trim_end(), 60);
            // serde's messages for a bad enum value or type do not name the field
            // ("unknown variant `ignore`, expected ..."): name it from the line's key and
            // the table above it, e.g. `train.on_anomaly: `.
            let field = field_at(&text[..line_start], line)
                .map(|f| format!("{f}: "))
                .unwrap_or_default();
            format!(
                "line {line_no}: {field}{msg} (at `{lead}{}`)",
                excerpt.trim_start()
            )
        }
        None => msg,
    }
}

/// `table.key` of a `key = value` line, given the text before it (for its `[table]`).
fn field_at(before: &str, line: &str) -> Option<String> {
    let key = line.split_once('=')?.0.trim();
    let simple = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
    };
    if !simple(key) {
        return None;
    }
    let table = before.lines().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('[')?.strip_suffix(']').map(str::trim)
    });
    Some(match table {
        Some(t) if simple(t) => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

impl ModelConfig {
    /// The RoPE cos/sin table for positions below `max_t`, with the config's scaling.
    pub fn rope_table(&self, max_t: usize) -> kernels::rope::RopeTable {
        let d = self.head_dim();
        let (inv, scale) = RopeScaling::inv_freq(self.rope_scaling.as_ref(), d, self.rope_theta);
        kernels::rope::RopeTable::from_inv_freq(max_t, d, &inv, scale)
    }

    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("model.vocab_size", self.vocab_size),
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.n_kv_heads", self.n_kv_heads),
            ("model.max_seq_len", self.max_seq_len),
        ];
        if !self.full_attention_layers.is_empty() && self.sliding_window == 0 {
            return Err(cfg_err(
                "model.full_attention_layers",
                "needs a sliding_window (the other blocks' window)",
            ));
        }
        if let Some(l) = self
            .full_attention_layers
            .iter()
            .find(|&&l| l >= self.n_layers)
        {
            return Err(cfg_err(
                "model.full_attention_layers",
                format!("block {l} does not exist (n_layers {})", self.n_layers),
            ));
        }
        for (name, v) in nonzero {
            if v == 0 {
                return Err(cfg_err(name, "must be at least 1"));
            }
        }
        // NOTE: bounds far past any real model, so that a corrupt or mistyped size (a GGUF's
        // block_count with a flipped bit, d_model = 1000000000) is this error and not an
        // allocation that aborts the process, or a layout of billions of tensors, after the
        // run dir exists
        let bounded = [
            ("model.vocab_size", self.vocab_size, 1 << 24),
            ("model.d_model", self.d_model, 1 << 16),
            ("model.n_layers", self.n_layers, 1 << 12),
            ("model.n_heads", self.n_heads, 1 << 12),
            ("model.n_kv_heads", self.n_kv_heads, 1 << 12),
            ("model.head_dim", self.head_dim.unwrap_or(0), 1 << 12),
            ("model.max_seq_len", self.max_seq_len, 1 << 24),
            ("model.ffn_hidden", self.ffn_hidden, 1 << 20),
            ("model.expert_hidden", self.expert_hidden, 1 << 20),
        ];
        for (name, v, max) in bounded {
            if v > max {
                return Err(cfg_err(
                    name,
                    format!("{v} is more than moelab supports ({max})"),
                ));
            }
        }
        // the matrices' sizes (embedding and head, attention, the widest FFN), bounded by what
        // a process can hold
        let (v, c, l) = (
            self.vocab_size as u128,
            self.d_model as u128,
            self.n_layers as u128,
        );
        let hd = self.head_dim() as u128;
        let attn = c * hd * (2 * self.n_heads as u128 + 2 * self.n_kv_heads as u128);
        let ffn = 3
            * c
            * (self.ffn_hidden as u128).max(
                (self.n_experts as u128 + self.n_shared_experts as u128)
                    * self.expert_hidden as u128,
            );
        let total = 2 * v * c + l * (attn + ffn);
        if total > 1 << 38 {
            return Err(cfg_err(
                "model",
                format!("about {total} parameters: more than moelab can hold in memory (2^38)"),
            ));
        }
        match self.head_dim {
            Some(d) if d < 2 || !d.is_multiple_of(2) => {
                return Err(cfg_err(
                    "model.head_dim",
                    format!("{d} must be even and at least 2 (RoPE rotates pairs)"),
                ));
            }
            Some(_) => {}
            None if !self.d_model.is_multiple_of(self.n_heads) => {
                return Err(cfg_err(
                    "model.n_heads",
                    format!(
                        "{} does not divide d_model {} (or set model.head_dim)",
                        self.n_heads, self.d_model
                    ),
                ));
            }
            None if !self.head_dim().is_multiple_of(2) => {
                return Err(cfg_err(
                    "model.n_heads",
                    format!(
                        "head dim d_model/n_heads = {} must be even for RoPE (or set model.head_dim)",
                        self.head_dim()
                    ),
                ));
            }
            None => {}
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(cfg_err(
                "model.n_kv_heads",
                format!(
                    "{} does not divide n_heads {}",
                    self.n_kv_heads, self.n_heads
                ),
            ));
        }
        if self.vocab_size > u32::MAX as usize - 1 {
            return Err(cfg_err("model.vocab_size", "too large"));
        }
        if let Some(r) = &self.rope_scaling {
            r.validate()?;
        }
        if !positive(self.rope_theta) {
            return Err(cfg_err("model.rope_theta", "must be a finite number > 0"));
        }
        if !positive(self.norm_eps) {
            return Err(cfg_err("model.norm_eps", "must be a finite number > 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(cfg_err(
                "model.dropout",
                format!("{} must be in [0, 1)", self.dropout),
            ));
        }
        if !positive(self.init_std) {
            return Err(cfg_err("model.init_std", "must be a finite number > 0"));
        }
        if self.moe_every == 0 {
            return Err(cfg_err("model.moe_every", "must be at least 1"));
        }
        if let Some(&l) = self.dense_layers.iter().find(|&&l| l >= self.n_layers) {
            return Err(cfg_err(
                "model.dense_layers",
                format!("block {l} does not exist (n_layers {})", self.n_layers),
            ));
        }
        let any_dense = (0..self.n_layers).any(|l| !self.is_moe_layer(l));
        if any_dense && self.ffn_hidden == 0 {
            return Err(cfg_err(
                "model.ffn_hidden",
                "must be at least 1 (the model has dense blocks)",
            ));
        }
        if self.n_experts > 0 {
            if self.n_experts > kernels::router::MAX_EXPERTS {
                return Err(cfg_err(
                    "model.n_experts",
                    format!(
                        "{} exceeds the supported maximum of {}",
                        self.n_experts,
                        kernels::router::MAX_EXPERTS
                    ),
                ));
            }
            if self.n_group == 0 || !self.n_experts.is_multiple_of(self.n_group) {
                return Err(cfg_err(
                    "model.n_group",
                    format!("{} must divide n_experts {}", self.n_group, self.n_experts),
                ));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return Err(cfg_err(
                    "model.topk_group",
                    format!(
                        "{} must be in 1..=n_group ({})",
                        self.topk_group, self.n_group
                    ),
                ));
            }
            if self.top_k > self.topk_group * (self.n_experts / self.n_group) {
                return Err(cfg_err(
                    "model.top_k",
                    format!(
                        "{} exceeds the {} experts of topk_group {} groups",
                        self.top_k,
                        self.topk_group * (self.n_experts / self.n_group),
                        self.topk_group
                    ),
                ));
            }
            if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
                return Err(cfg_err(
                    "model.routed_scaling_factor",
                    "must be a finite number > 0",
                ));
            }
            if self.top_k == 0 || self.top_k > self.n_experts {
                return Err(cfg_err(
                    "model.top_k",
                    format!(
                        "{} must be in 1..=n_experts ({})",
                        self.top_k, self.n_experts
                    ),
                ));
            }
            if self.expert_hidden == 0 {
                return Err(cfg_err(
                    "model.expert_hidden",
                    "must be at least 1 in an MoE model",
                ));
            }
            if self.first_dense_layers > self.n_layers {
                return Err(cfg_err(
                    "model.first_dense_layers",
                    format!(
                        "{} exceeds n_layers {}",
                        self.first_dense_layers, self.n_layers
                    ),
                ));
            }
            if self.shared_expert_hidden == Some(0) {
                return Err(cfg_err("model.shared_expert_hidden", "must be at least 1"));
            }
            if self.n_shared_experts == 0
                && (self.shared_expert_hidden.is_some() || self.shared_expert_gate)
            {
                return Err(cfg_err(
                    if self.shared_expert_gate {
                        "model.shared_expert_gate"
                    } else {
                        "model.shared_expert_hidden"
                    },
                    "needs n_shared_experts >= 1",
                ));
            }
            if !non_negative(self.aux_loss_coef) {
                return Err(cfg_err(
                    "model.aux_loss_coef",
                    "must be a finite number >= 0",
                ));
            }
            if !non_negative(self.z_loss_coef) {
                return Err(cfg_err("model.z_loss_coef", "must be a finite number >= 0"));
            }
            if !non_negative(self.bias_update_rate) {
                return Err(cfg_err(
                    "model.bias_update_rate",
                    "must be a finite number >= 0",
                ));
            }
        }
        Ok(())
    }

    /// Head dim D: `head_dim` when set, else d_model / n_heads.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads)
    }

    /// The sliding window of block `l`'s attention (0: full causal attention).
    pub fn window(&self, l: usize) -> usize {
        if self.full_attention_layers.contains(&l) {
            0
        } else {
            self.sliding_window
        }
    }

    /// Whether block `l` has an MoE FFN.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.n_experts > 0
            && l >= self.first_dense_layers
            && (l + 1).is_multiple_of(self.moe_every.max(1))
            && !self.dense_layers.contains(&l)
    }

    /// The router's score function, as the kernels take it.
    pub fn score_fn(&self) -> ScoreFn {
        self.router_score.into()
    }

    /// Width of the fused shared-expert FFN (the shared experts summed are one SwiGLU of
    /// n_shared_experts * expert_hidden units).
    pub fn shared_hidden(&self) -> usize {
        match (self.n_shared_experts, self.shared_expert_hidden) {
            (0, _) => 0,
            (_, Some(f)) => f,
            (n, None) => n * self.expert_hidden,
        }
    }

    /// Weights touched by matmuls for one token: all attention and dense weights, the router,
    /// shared experts, top_k routed experts and the LM head (embedding lookups excluded).
    pub fn active_matmul_params(&self) -> usize {
        let (c, d) = (self.d_model, self.head_dim());
        let attn = (self.n_heads + 2 * self.n_kv_heads) * d * c + c * self.n_heads * d;
        let mut n = self.vocab_size * c;
        for l in 0..self.n_layers {
            n += attn;
            if self.is_moe_layer(l) {
                n += self.n_experts * c
                    + 3 * c * (self.top_k * self.expert_hidden + self.shared_hidden());
            } else {
                n += 3 * c * self.ffn_hidden;
            }
        }
        n
    }

    /// Training FLOPs per token at sequence length `t`: 6 per active matmul weight (forward +
    /// backward) plus attention scores and mixing, 12 * L * H * D * T (PaLM appendix B,
    /// counting the full T x T product as most implementations compute it).
    pub fn train_flops_per_token(&self, t: usize) -> f64 {
        6.0 * self.active_matmul_params() as f64
            + 12.0 * (self.n_layers * self.n_heads * self.head_dim() * t) as f64
    }
}
