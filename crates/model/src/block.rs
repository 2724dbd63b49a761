//! One transformer block as forward/backward pairs over named views, llm.c style:
//!
//! - attention: `x_mid = x + drop(o_proj(attn(rope(qkv_proj(rmsnorm(x))))))`
//!   ([`attention_forward`] / [`attention_backward`]);
//! - FFN: `x_next = x_mid + drop(ffn(rmsnorm(x_mid)))` ([`ffn_forward`] /
//!   [`ffn_backward`]), where ffn is a dense SwiGLU ([`mlp_forward`] / [`mlp_backward`]) or
//!   an MoE ([`moe_forward`] / [`moe_backward`]: router, shared experts, routed experts,
//!   auxiliary and z losses).
//!
//! Each pair is the kernels of its formula in order and reversed. Weights come in as
//! `*W` views of the parameter buffer, gradients go out through `*G` views of the gradient
//! buffer (accumulated, as the kernels do), activations are the block's own (`*Acts`).
//! [`crate::model::Model`] calls them per layer; it owns the embedding and the head.
//!
//! References: Llama (RMSNorm, RoPE, SwiGLU; `LlamaDecoderLayer`), Mixtral / DeepSeekMoE /
//! DeepSeek-V3 (routing, shared experts, bias balancing).

use crate::config::{ModelConfig, QkNorm};
use crate::moe::{experts_backward, experts_forward, ExpertActs, ExpertScratch, ExpertShape};
use crate::params::{FfnIdx, LayerIdx};
use crate::profile::Profiler;
use kernels::attention::{self as attn_k, AttnShape};
use kernels::dropout::{apply_mask, dropout_mask};
use kernels::matmul::{linear_backward, linear_forward, Precision};
use kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use kernels::rope::{rope_apply, RopeTable};
use kernels::router::{self, Route, ScoreFn};
use kernels::swiglu::{swiglu_backward, swiglu_forward};

/// The sizes every block function needs, fixed when a model is built (B, T) and copied.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    /// Rows N = B*T.
    pub n: usize,
    /// Width C.
    pub c: usize,
    /// Query heads H, key/value heads G, head dim D.
    pub h: usize,
    pub g: usize,
    pub d: usize,
    /// Width of the fused q/k/v projection, (H + 2G) D.
    pub r: usize,
    pub eps: f32,
    /// Dense FFN width F.
    pub f: usize,
    /// Routed experts E, chosen per token K, expert width Fe, fused shared-expert width Fs.
    pub e: usize,
    pub k: usize,
    pub fe: usize,
    pub fs: usize,
    pub score: ScoreFn,
    pub renormalize: bool,
    pub qk_norm: QkNorm,
    pub shared_gate: bool,
    pub routed_scale: f32,
    pub n_group: usize,
    pub topk_group: usize,
    /// Attention by tiles with an online softmax (memory O(T)) instead of stored (T, T)
    /// probabilities: for sequences of [`FLASH_MIN_T`] tokens and more, where it is also
    /// the faster of the two (measured, `kernels::flash` timing test).
    pub flash: bool,
    /// Arithmetic of the linear layers' matmuls (`train.precision`); routers and the shared
    /// expert's gate stay f32.
    pub precision: Precision,
}

/// Shortest sequence trained with the tiled attention kernel.
pub const FLASH_MIN_T: usize = 256;

impl Dims {
    /// The sizes of `cfg` for micro-batches of `b` sequences of `t` tokens.
    pub fn of(cfg: &ModelConfig, b: usize, t: usize) -> Dims {
        let (h, g, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim());
        Dims {
            b,
            t,
            n: b * t,
            c: cfg.d_model,
            h,
            g,
            d,
            r: (h + 2 * g) * d,
            eps: cfg.norm_eps,
            f: cfg.ffn_hidden,
            e: cfg.n_experts,
            k: cfg.top_k,
            fe: cfg.expert_hidden,
            fs: cfg.shared_hidden(),
            score: cfg.score_fn(),
            renormalize: cfg.renormalize,
            qk_norm: cfg.qk_norm,
            shared_gate: cfg.n_shared_experts > 0 && cfg.shared_expert_gate,
            routed_scale: cfg.routed_scaling_factor,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            flash: t >= FLASH_MIN_T || cfg.sliding_window > 0,
            precision: Precision::F32,
        }
    }

    /// The column groups of a fused qkv row that the q and k norms normalise, as
    /// (first column, groups, width): per head, or one group over the whole projection.
    fn qk_groups(&self) -> [(usize, usize, usize); 2] {
        let (h, g, d) = (self.h, self.g, self.d);
        match self.qk_norm {
            QkNorm::Head => [(0, h, d), (h * d, g, d)],
            QkNorm::Projection | QkNorm::None => [(0, 1, h * d), (h * d, 1, g * d)],
        }
    }

    /// How the MoE blocks' routers choose.
    pub fn route(&self) -> Route {
        Route {
            e: self.e,
            k: self.k,
            score: self.score,
            renorm: self.renormalize,
            scale: self.routed_scale,
            n_group: self.n_group,
            topk_group: self.topk_group,
        }
    }

    fn attn(&self) -> AttnShape {
        AttnShape {
            b: self.b,
            t: self.t,
            h: self.h,
            g: self.g,
            d: self.d,
        }
    }

    fn experts(&self) -> ExpertShape {
        ExpertShape {
            n: self.n,
            e: self.e,
            k: self.k,
            c: self.c,
            f: self.fe,
            precision: self.precision,
        }
    }
}

/// Residual dropout of one branch: on in training when model.dropout > 0; the mask is a
/// function of (key, stream) only.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dropout {
    pub on: bool,
    pub p: f32,
    pub key: u64,
    pub stream: u64,
}

/// RMSNorm output and its per-row reciprocal RMS.
pub(crate) struct Normed {
    pub rstd: Vec<f32>, // (N)
    pub h: Vec<f32>,    // (N,C)
}

/// Saved activations of the attention half of a block.
pub(crate) struct AttnActs {
    pub ln: Normed,
    pub qk: Option<QkActs>,
    pub qkv: Vec<f32>,  // (N,R) after RoPE
    pub att: Vec<f32>,  // (B,H,T,T), or (B,H,T) log-sum-exps when flash
    pub o: Vec<f32>,    // (N,HD)
    pub mask: Vec<f32>, // (N,C) dropout only
}

/// The q and k norms' inputs (gathered into rows of their width) and reciprocal RMS, and
/// a scratch row buffer.
pub(crate) struct QkActs {
    x: [Vec<f32>; 2],
    rstd: [Vec<f32>; 2],
    y: Vec<f32>,
}

impl QkActs {
    /// For `n` rows of qkv, or None when the model has no q/k norm.
    pub fn new(s: &Dims, n: usize) -> Option<QkActs> {
        if s.qk_norm.is_none() {
            return None;
        }
        let [(_, gq, wq), (_, gk, wk)] = s.qk_groups();
        Some(QkActs {
            x: [vec![0.0; n * gq * wq], vec![0.0; n * gk * wk]],
            rstd: [vec![0.0; n * gq], vec![0.0; n * gk]],
            y: vec![0.0; n * gq * wq],
        })
    }
}

/// Saved activations of the FFN half of a block.
pub(crate) struct FfnActs {
    pub ln: Normed,
    pub mask: Vec<f32>, // (N,C) dropout only
    pub kind: FfnKind,
}

pub(crate) enum FfnKind {
    Dense(MlpActs),
    Moe(Box<MoeActs>),
}

pub(crate) struct MlpActs {
    pub gu: Vec<f32>, // (N,2F)
    pub a: Vec<f32>,  // (N,F)
}

pub(crate) struct MoeActs {
    pub logits: Vec<f32>, // (N,E)
    pub scores: Vec<f32>, // (N,E)
    pub idx: Vec<u32>,    // (N,K)
    pub w: Vec<f32>,      // (N,K)
    pub counts: Vec<u32>, // (E) this micro-batch
    pub ex: ExpertActs,
    pub sgu: Vec<f32>, // (N,2Fs) shared experts
    pub sa: Vec<f32>,  // (N,Fs)
    pub sy: Vec<f32>,  // (N,C) shared experts' output (gated only)
    pub sg: Vec<f32>,  // (N) the shared-expert gate sigmoid(h . w_gate) (gated only)
}

impl AttnActs {
    pub fn new(s: &Dims, dropout: bool) -> AttnActs {
        let (n, c) = (s.n, s.c);
        AttnActs {
            ln: Normed::new(s),
            qk: QkActs::new(s, n),
            qkv: vec![0.0; n * s.r],
            att: vec![0.0; s.b * s.h * s.t * if s.flash { 1 } else { s.t }],
            o: vec![0.0; n * s.h * s.d],
            mask: vec![0.0; if dropout { n * c } else { 0 }],
        }
    }
}

impl Normed {
    fn new(s: &Dims) -> Normed {
        Normed {
            rstd: vec![0.0; s.n],
            h: vec![0.0; s.n * s.c],
        }
    }
}

impl FfnActs {
    pub fn new(s: &Dims, moe: bool, dropout: bool) -> FfnActs {
        let (n, z) = (s.n, |len: usize| vec![0.0f32; len]);
        let kind = if moe {
            FfnKind::Moe(Box::new(MoeActs {
                logits: z(n * s.e),
                scores: z(n * s.e),
                idx: vec![0; n * s.k],
                w: z(n * s.k),
                counts: vec![0; s.e],
                ex: ExpertActs::new(s.experts()),
                sgu: z(n * 2 * s.fs),
                sa: z(n * s.fs),
                sy: z(if s.shared_gate { n * s.c } else { 0 }),
                sg: z(if s.shared_gate { n } else { 0 }),
            }))
        } else {
            FfnKind::Dense(MlpActs {
                gu: z(n * 2 * s.f),
                a: z(n * s.f),
            })
        };
        FfnActs {
            ln: Normed::new(s),
            mask: z(if dropout { n * s.c } else { 0 }),
            kind,
        }
    }
}

/// Gradient scratch shared by all blocks (the backward pass visits one block at a time).
pub(crate) struct Scratch {
    pub dh: Vec<f32>,       // (N,C)
    pub dqkv: Vec<f32>,     // (N,R)
    pub datt: Vec<f32>,     // (B,H,T,T)
    pub do_: Vec<f32>,      // (N,HD)
    pub dgu: Vec<f32>,      // (max(N*2F, NK*2Fe, N*2Fs))
    pub da: Vec<f32>,       // (max(N*F, NK*Fe, N*Fs))
    pub dxe: Vec<f32>,      // (NK,C)
    pub dye: Vec<f32>,      // (NK,C)
    pub dlog_r: Vec<f32>,   // (N,E)
    pub dscores: Vec<f32>,  // (N,E)
    pub dw: Vec<f32>,       // (N,K)
    pub dqk: [Vec<f32>; 2], // (N*H*D) q/k norm backward rows (q/k norm only)
    pub dsy: Vec<f32>,      // (N,C) gated shared experts: d(shared output)
    pub dsg: Vec<f32>,      // (N) d(gate logit)
}

impl Scratch {
    /// Sized for the widest block of the model: `dense`/`moe` say which kinds it has.
    pub fn new(s: &Dims, dense: bool, moe: bool) -> Scratch {
        let (n, z) = (s.n, |len: usize| vec![0.0f32; len]);
        let mut max_gu = 0;
        if dense {
            max_gu = max_gu.max(n * s.f);
        }
        let (nk, ne) = if moe {
            max_gu = max_gu.max(n * s.k * s.fe).max(n * s.fs);
            (n * s.k, n * s.e)
        } else {
            (0, 0)
        };
        Scratch {
            dh: z(n * s.c),
            dqkv: z(n * s.r),
            datt: z(if s.flash { 0 } else { s.b * s.h * s.t * s.t }),
            do_: z(n * s.h * s.d),
            dgu: z(2 * max_gu),
            da: z(max_gu),
            dxe: z(nk * s.c),
            dye: z(nk * s.c),
            dlog_r: z(ne),
            dscores: z(ne),
            dw: z(nk),
            dqk: if s.qk_norm.is_none() {
                [vec![], vec![]]
            } else {
                [z(n * s.h * s.d), z(n * s.h * s.d)]
            },
            dsy: z(if moe && s.shared_gate { n * s.c } else { 0 }),
            dsg: z(if moe && s.shared_gate { n } else { 0 }),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Parameter and gradient views

pub(crate) struct AttnW<'a> {
    pub norm: &'a [f32],                         // (C)
    pub wqkv: &'a [f32],                         // (R,C)
    pub bqkv: Option<&'a [f32]>,                 // (R)
    pub qk_norm: Option<(&'a [f32], &'a [f32])>, // (D),(D) per head or (HD),(GD)
    pub wo: &'a [f32],                           // (C,HD)
    pub window: usize,                           // sliding window (0: none)
}

pub(crate) struct AttnG<'a> {
    pub norm: &'a mut [f32],
    pub wqkv: &'a mut [f32],
    pub bqkv: Option<&'a mut [f32]>,
    pub qk_norm: Option<(&'a mut [f32], &'a mut [f32])>,
    pub wo: &'a mut [f32],
}

pub(crate) struct MlpW<'a> {
    pub w_gu: &'a [f32],   // (2F,C)
    pub w_down: &'a [f32], // (C,F)
}

pub(crate) struct MlpG<'a> {
    pub w_gu: &'a mut [f32],
    pub w_down: &'a mut [f32],
}

pub(crate) struct MoeW<'a> {
    pub router: &'a [f32],                      // (E,C)
    pub bias: Option<&'a [f32]>, // (E) selection bias (balance = "bias"), not trained
    pub w_gu: &'a [f32],         // (E,2Fe,C)
    pub w_down: &'a [f32],       // (E,C,Fe)
    pub shared: Option<(&'a [f32], &'a [f32])>, // (2Fs,C), (C,Fs)
    pub shared_gate: Option<&'a [f32]>, // (1,C)
}

pub(crate) struct MoeG<'a> {
    pub router: &'a mut [f32],
    pub w_gu: &'a mut [f32],
    pub w_down: &'a mut [f32],
    pub shared: Option<(&'a mut [f32], &'a mut [f32])>,
    pub shared_gate: Option<&'a mut [f32]>,
}

/// The FFN's weights: its norm and a dense or an MoE FFN.
pub(crate) struct FfnW<'a> {
    pub norm: &'a [f32],
    pub kind: FfnWKind<'a>,
}

pub(crate) enum FfnWKind<'a> {
    Dense(MlpW<'a>),
    Moe(MoeW<'a>),
}

pub(crate) struct FfnG<'a> {
    pub norm: &'a mut [f32],
    pub kind: FfnGKind<'a>,
}

pub(crate) enum FfnGKind<'a> {
    Dense(MlpG<'a>),
    Moe(MoeG<'a>),
}

/// Disjoint mutable views of `buf` at `(offset, len)` ranges given in any order (empty
/// ranges are allowed anywhere). Panics when two non-empty ranges overlap.
pub(crate) fn carve<'a, const K: usize>(
    mut buf: &'a mut [f32],
    ranges: [(usize, usize); K],
) -> [&'a mut [f32]; K] {
    let mut order: [usize; K] = std::array::from_fn(|i| i);
    order.sort_by_key(|&i| ranges[i].0);
    let mut out: [Option<&'a mut [f32]>; K] = std::array::from_fn(|_| None);
    let mut at = 0;
    for i in order {
        let (off, len) = ranges[i];
        if len == 0 {
            out[i] = Some(&mut []);
            continue;
        }
        assert!(off >= at, "parameter ranges overlap at {off}");
        let (_, tail) = std::mem::take(&mut buf).split_at_mut(off - at);
        let (mid, tail) = tail.split_at_mut(len);
        out[i] = Some(mid);
        buf = tail;
        at = off + len;
    }
    out.map(|o| o.expect("every range carved"))
}

impl LayerIdx {
    /// (offset, len) of the attention half's tensors: norm, wqkv, wo, q norm, k norm (empty
    /// when absent).
    fn attn_ranges(&self, s: &Dims) -> [(usize, usize); 6] {
        let [(_, _, wq), (_, _, wk)] = s.qk_groups();
        let (qn, kn) = self
            .qk_norm
            .map_or(((0, 0), (0, 0)), |(q, k)| ((q, wq), (k, wk)));
        [
            (self.attn_norm, s.c),
            (self.wqkv, s.r * s.c),
            (self.wo, s.c * s.h * s.d),
            qn,
            kn,
            self.bqkv.map_or((0, 0), |b| (b, s.r)),
        ]
    }

    /// (offset, len) of the FFN half's trained tensors: norm, then dense (w_gu, w_down) or
    /// MoE (router, w_gu, w_down, shared w_gu, shared w_down, shared gate; empty when
    /// absent).
    fn ffn_ranges(&self, s: &Dims) -> [(usize, usize); 7] {
        let (c, norm) = (s.c, (self.ffn_norm, s.c));
        match self.ffn {
            FfnIdx::Dense { w_gu, w_down } => [
                norm,
                (w_gu, 2 * s.f * c),
                (w_down, c * s.f),
                (0, 0),
                (0, 0),
                (0, 0),
                (0, 0),
            ],
            FfnIdx::Moe {
                router,
                w_gu,
                w_down,
                shared,
                shared_gate,
                ..
            } => {
                let (sgu, sd) = shared.map_or(((0, 0), (0, 0)), |(a, b)| {
                    ((a, 2 * s.fs * c), (b, c * s.fs))
                });
                [
                    norm,
                    (router, s.e * c),
                    (w_gu, s.e * 2 * s.fe * c),
                    (w_down, s.e * c * s.fe),
                    sgu,
                    sd,
                    shared_gate.map_or((0, 0), |o| (o, c)),
                ]
            }
        }
    }

    pub(crate) fn attn_w<'a>(&self, p: &'a [f32], s: &Dims) -> AttnW<'a> {
        let [norm, wqkv, wo, qn, kn, b] = self.attn_ranges(s).map(|(o, l)| &p[o..o + l]);
        let qk_norm = self.qk_norm.map(|_| (qn, kn));
        AttnW {
            norm,
            wqkv,
            bqkv: self.bqkv.map(|_| b),
            qk_norm,
            wo,
            window: self.window,
        }
    }

    pub(crate) fn attn_g<'a>(&self, grads: &'a mut [f32], s: &Dims) -> AttnG<'a> {
        let [norm, wqkv, wo, qn, kn, b] = carve(grads, self.attn_ranges(s));
        let qk_norm = self.qk_norm.map(|_| (qn, kn));
        AttnG {
            norm,
            wqkv,
            bqkv: self.bqkv.map(|_| b),
            qk_norm,
            wo,
        }
    }

    pub(crate) fn ffn_w<'a>(&self, p: &'a [f32], s: &Dims) -> FfnW<'a> {
        let [norm, a, b, c, d, e, sg] = self.ffn_ranges(s).map(|(o, l)| &p[o..o + l]);
        let kind = match self.ffn {
            FfnIdx::Dense { .. } => FfnWKind::Dense(MlpW { w_gu: a, w_down: b }),
            FfnIdx::Moe {
                bias,
                shared,
                shared_gate,
                ..
            } => FfnWKind::Moe(MoeW {
                router: a,
                bias: bias.map(|o| &p[o..o + s.e]),
                w_gu: b,
                w_down: c,
                shared: shared.map(|_| (d, e)),
                shared_gate: shared_gate.map(|_| sg),
            }),
        };
        FfnW { norm, kind }
    }

    pub(crate) fn ffn_g<'a>(&self, grads: &'a mut [f32], s: &Dims) -> FfnG<'a> {
        let [norm, a, b, c, d, e, sg] = carve(grads, self.ffn_ranges(s));
        let kind = match self.ffn {
            FfnIdx::Dense { .. } => FfnGKind::Dense(MlpG { w_gu: a, w_down: b }),
            FfnIdx::Moe {
                shared,
                shared_gate,
                ..
            } => FfnGKind::Moe(MoeG {
                router: a,
                w_gu: b,
                w_down: c,
                shared: shared.map(|_| (d, e)),
                shared_gate: shared_gate.map(|_| sg),
            }),
        };
        FfnG { norm, kind }
    }
}

// ---------------------------------------------------------------------------------------
// Attention

/// `x_mid = x + drop(o_proj(attn(rope(qkv_proj(rmsnorm(x))))))`. `br` (N,C) is scratch for
/// the branch output when dropping.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_forward(
    x_mid: &mut [f32],
    x: &[f32],
    w: &AttnW,
    a: &mut AttnActs,
    br: &mut [f32],
    s: &Dims,
    rope: &RopeTable,
    drop: Dropout,
    prof: &mut Profiler,
) {
    let (n, c, hd) = (s.n, s.c, s.h * s.d);
    rmsnorm_forward(&mut a.ln.h, &mut a.ln.rstd, x, w.norm, s.eps);
    prof.lap("rmsnorm");
    s.precision
        .linear_forward(&mut a.qkv, &a.ln.h, w.wqkv, n, c, s.r);
    if let Some(b) = w.bqkv {
        add_bias(&mut a.qkv, b);
    }
    prof.lap("matmul: attention");
    if let (Some(wn), Some(qa)) = (w.qk_norm, a.qk.as_mut()) {
        qk_norm_forward(&mut a.qkv, n, s, wn, qa);
        prof.lap("rmsnorm");
    }
    rope_apply(&mut a.qkv, s.r, 0, s.h + s.g, s.t, rope, false);
    prof.lap("rope");
    if s.flash {
        kernels::flash::flash_forward(
            &mut a.o,
            &mut a.att,
            &a.qkv,
            s.attn(),
            w.window,
            s.precision,
        );
    } else {
        assert_eq!(w.window, 0, "sliding windows need the tiled kernel");
        attn_k::attention_forward(&mut a.o, &mut a.att, &a.qkv, s.attn());
    }
    prof.lap("attention: softmax, QK^T, PV");
    if drop.on {
        s.precision.linear_forward(br, &a.o, w.wo, n, hd, c);
        prof.lap("matmul: attention");
        dropout_mask(&mut a.mask, drop.p, drop.key, drop.stream);
        apply_mask(br, &a.mask);
        add(x_mid, x, br);
        prof.lap("dropout");
    } else {
        // NOTE: the residual is the output's initial value and the projection accumulates
        // into it; the dropout path adds instead (both kept: their bits differ).
        x_mid.copy_from_slice(x);
        s.precision
            .matmul(x_mid, &a.o, false, w.wo, true, n, c, hd, true);
        prof.lap("matmul: attention");
    }
}

/// Backward of [`attention_forward`]: `dres` holds d(x_mid) and gets d(x) added; `dbr`
/// (N,C) is scratch for the masked branch gradient when dropping.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    dres: &mut [f32],
    dbr: &mut [f32],
    g: AttnG,
    x: &[f32],
    w: &AttnW,
    a: &AttnActs,
    sc: &mut Scratch,
    s: &Dims,
    rope: &RopeTable,
    drop: bool,
    prof: &mut Profiler,
) {
    let (n, c, hd) = (s.n, s.c, s.h * s.d);
    if drop {
        dbr.copy_from_slice(dres);
        apply_mask(dbr, &a.mask);
    }
    let dy: &[f32] = if drop { dbr } else { dres };
    s.precision
        .linear_backward(Some(&mut sc.do_), g.wo, dy, &a.o, w.wo, n, hd, c, false);
    prof.lap("matmul: attention bwd");
    if s.flash {
        kernels::flash::flash_backward(
            &mut sc.dqkv,
            &sc.do_,
            &a.qkv,
            &a.o,
            &a.att,
            s.attn(),
            w.window,
            s.precision,
        );
    } else {
        attn_k::attention_backward(
            &mut sc.dqkv,
            &mut sc.datt,
            &sc.do_,
            &a.qkv,
            &a.att,
            s.attn(),
        );
    }
    prof.lap("attention: softmax, QK^T, PV bwd");
    rope_apply(&mut sc.dqkv, s.r, 0, s.h + s.g, s.t, rope, true);
    prof.lap("rope bwd");
    if let (Some(gn), Some(wn), Some(qa)) = (g.qk_norm, w.qk_norm, a.qk.as_ref()) {
        let [dy, dx] = &mut sc.dqk;
        qk_norm_backward(&mut sc.dqkv, n, s, wn, gn, qa, dy, dx);
        prof.lap("rmsnorm bwd");
    }
    if let Some(gb) = g.bqkv {
        bias_backward(gb, &sc.dqkv);
    }
    s.precision.linear_backward(
        Some(&mut sc.dh),
        g.wqkv,
        &sc.dqkv,
        &a.ln.h,
        w.wqkv,
        n,
        c,
        s.r,
        false,
    );
    prof.lap("matmul: attention bwd");
    rmsnorm_backward(dres, g.norm, &sc.dh, x, w.norm, &a.ln.rstd);
    prof.lap("rmsnorm bwd");
}

/// Copies column group `grp` = (col0, groups, width) of each of `n` rows of `src` (rows of
/// `r`) into consecutive rows of `width` in `dst`; [`scatter`] is the reverse.
fn gather(
    dst: &mut [f32],
    src: &[f32],
    n: usize,
    r: usize,
    (col0, groups, width): (usize, usize, usize),
) {
    let span = groups * width;
    for (i, d) in dst[..n * span].chunks_mut(span).enumerate() {
        d.copy_from_slice(&src[i * r + col0..i * r + col0 + span]);
    }
}

fn scatter(
    dst: &mut [f32],
    src: &[f32],
    n: usize,
    r: usize,
    (col0, groups, width): (usize, usize, usize),
) {
    let span = groups * width;
    for (i, x) in src[..n * span].chunks(span).enumerate() {
        dst[i * r + col0..i * r + col0 + span].copy_from_slice(x);
    }
}

/// In place on `n` fused qkv rows: q and k replaced by their RMSNorm (per head or over the
/// whole projection, `s.qk_norm`) with weights `w` = (q, k); inputs and reciprocal RMS are
/// kept in `a` for the backward.
pub(crate) fn qk_norm_forward(
    qkv: &mut [f32],
    n: usize,
    s: &Dims,
    w: (&[f32], &[f32]),
    a: &mut QkActs,
) {
    for (i, (grp, wt)) in s.qk_groups().into_iter().zip([w.0, w.1]).enumerate() {
        let (_, groups, width) = grp;
        let len = n * groups * width;
        gather(&mut a.x[i], qkv, n, s.r, grp);
        rmsnorm_forward(
            &mut a.y[..len],
            &mut a.rstd[i][..n * groups],
            &a.x[i][..len],
            wt,
            s.eps,
        );
        scatter(qkv, &a.y, n, s.r, grp);
    }
}

/// Backward of [`qk_norm_forward`]: the q and k columns of `dqkv` hold d(normed) and are
/// replaced by d(input); the weights' gradients are added to `g`. `dy`, `dx` are scratch.
#[allow(clippy::too_many_arguments)]
fn qk_norm_backward(
    dqkv: &mut [f32],
    n: usize,
    s: &Dims,
    w: (&[f32], &[f32]),
    g: (&mut [f32], &mut [f32]),
    a: &QkActs,
    dy: &mut [f32],
    dx: &mut [f32],
) {
    for (i, ((grp, wt), gw)) in s
        .qk_groups()
        .into_iter()
        .zip([w.0, w.1])
        .zip([g.0, g.1])
        .enumerate()
    {
        let (_, groups, width) = grp;
        let len = n * groups * width;
        gather(dy, dqkv, n, s.r, grp);
        dx[..len].fill(0.0);
        rmsnorm_backward(
            &mut dx[..len],
            gw,
            &dy[..len],
            &a.x[i][..len],
            wt,
            &a.rstd[i][..n * groups],
        );
        scatter(dqkv, dx, n, s.r, grp);
    }
}

// ---------------------------------------------------------------------------------------
// FFN: norm and residual around a dense or an MoE FFN

/// `x_next = x_mid + drop(ffn(rmsnorm(x_mid)))`. Returns the MoE's (aux, z) losses before
/// their coefficients ((0, 0) for a dense FFN) and adds its expert loads to `load`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ffn_forward(
    x_next: &mut [f32],
    x_mid: &[f32],
    w: &FfnW,
    a: &mut FfnActs,
    br: &mut [f32],
    load: &mut [u64],
    s: &Dims,
    drop: Dropout,
    prof: &mut Profiler,
) -> (f32, f32) {
    rmsnorm_forward(&mut a.ln.h, &mut a.ln.rstd, x_mid, w.norm, s.eps);
    prof.lap("rmsnorm");
    // the branch accumulates into the residual stream itself, or into a zeroed buffer that
    // is masked and added when dropping
    let out: &mut [f32] = if drop.on {
        br.fill(0.0);
        &mut *br
    } else {
        x_next.copy_from_slice(x_mid);
        &mut *x_next
    };
    let losses = match (&w.kind, &mut a.kind) {
        (FfnWKind::Dense(w), FfnKind::Dense(m)) => {
            mlp_forward(out, &a.ln.h, w, m, s, prof);
            (0.0, 0.0)
        }
        (FfnWKind::Moe(w), FfnKind::Moe(m)) => moe_forward(out, &a.ln.h, w, m, load, s, prof),
        _ => unreachable!("layout and activations agree on block kinds"),
    };
    if drop.on {
        dropout_mask(&mut a.mask, drop.p, drop.key, drop.stream);
        apply_mask(br, &a.mask);
        add(x_next, x_mid, br);
        prof.lap("dropout");
    }
    losses
}

/// Backward of [`ffn_forward`]: `dres` holds d(x_next) and gets d(x_mid) added. `aux_coef`
/// and `z_coef` are the MoE losses' coefficients times the loss scale (0 skips them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn ffn_backward(
    dres: &mut [f32],
    dbr: &mut [f32],
    g: FfnG,
    x_mid: &[f32],
    w: &FfnW,
    a: &FfnActs,
    sc: &mut Scratch,
    s: &Dims,
    (aux_coef, z_coef): (f32, f32),
    drop: bool,
    prof: &mut Profiler,
) {
    if drop {
        dbr.copy_from_slice(dres);
        apply_mask(dbr, &a.mask);
    }
    let dy: &[f32] = if drop { dbr } else { dres };
    match (g.kind, &w.kind, &a.kind) {
        (FfnGKind::Dense(g), FfnWKind::Dense(w), FfnKind::Dense(m)) => {
            mlp_backward(sc, g, dy, &a.ln.h, w, m, s, prof)
        }
        (FfnGKind::Moe(g), FfnWKind::Moe(w), FfnKind::Moe(m)) => {
            moe_backward(sc, g, dy, &a.ln.h, w, m, s, aux_coef, z_coef, prof)
        }
        _ => unreachable!("layout and activations agree on block kinds"),
    }
    rmsnorm_backward(dres, g.norm, &sc.dh, x_mid, w.norm, &a.ln.rstd);
    prof.lap("rmsnorm bwd");
}

// ---------------------------------------------------------------------------------------
// Dense SwiGLU FFN

/// `out += down(silu(gate(h)) * up(h))`.
pub(crate) fn mlp_forward(
    out: &mut [f32],
    h: &[f32],
    w: &MlpW,
    m: &mut MlpActs,
    s: &Dims,
    prof: &mut Profiler,
) {
    let (n, c, f) = (s.n, s.c, s.f);
    s.precision
        .linear_forward(&mut m.gu, h, w.w_gu, n, c, 2 * f);
    prof.lap("matmul: ffn");
    swiglu_forward(&mut m.a, &m.gu, f);
    prof.lap("swiglu");
    s.precision
        .matmul(out, &m.a, false, w.w_down, true, n, c, f, true);
    prof.lap("matmul: ffn");
}

/// Backward of [`mlp_forward`] given d(out) = `dy`: writes d(h) to `sc.dh`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mlp_backward(
    sc: &mut Scratch,
    g: MlpG,
    dy: &[f32],
    h: &[f32],
    w: &MlpW,
    m: &MlpActs,
    s: &Dims,
    prof: &mut Profiler,
) {
    let (n, c, f) = (s.n, s.c, s.f);
    let (da, dgu) = (&mut sc.da[..n * f], &mut sc.dgu[..n * 2 * f]);
    s.precision
        .linear_backward(Some(&mut *da), g.w_down, dy, &m.a, w.w_down, n, f, c, false);
    prof.lap("matmul: ffn bwd");
    swiglu_backward(dgu, da, &m.gu, f);
    prof.lap("swiglu bwd");
    s.precision
        .linear_backward(Some(&mut sc.dh), g.w_gu, dgu, h, w.w_gu, n, c, 2 * f, false);
    prof.lap("matmul: ffn bwd");
}

// ---------------------------------------------------------------------------------------
// Mixture of experts

/// `out += shared(h) + sum_k w_k expert_{i_k}(h)`, routed by top-k of the router's scores
/// (plus the selection bias, for choosing only). Returns (aux, z) before their coefficients;
/// both are computed for every MoE block as balance diagnostics.
pub(crate) fn moe_forward(
    out: &mut [f32],
    h: &[f32],
    w: &MoeW,
    m: &mut MoeActs,
    load: &mut [u64],
    s: &Dims,
    prof: &mut Profiler,
) -> (f32, f32) {
    let (n, c, e, k) = (s.n, s.c, s.e, s.k);
    linear_forward(&mut m.logits, h, w.router, n, c, e);
    prof.lap("router");
    router::router_forward(
        &mut m.scores,
        &mut m.idx,
        &mut m.w,
        &m.logits,
        w.bias,
        &s.route(),
    );
    router::expert_counts(&mut m.counts, &m.idx);
    prof.lap("router");
    for (acc, &cnt) in load.iter_mut().zip(&m.counts) {
        *acc += cnt as u64;
    }
    if let Some((sgu_w, sd_w)) = w.shared {
        let fs = s.fs;
        s.precision
            .linear_forward(&mut m.sgu, h, sgu_w, n, c, 2 * fs);
        prof.lap("matmul: ffn");
        swiglu_forward(&mut m.sa, &m.sgu, fs);
        prof.lap("swiglu");
        match w.shared_gate {
            None => s
                .precision
                .matmul(out, &m.sa, false, sd_w, true, n, c, fs, true),
            Some(gw) => {
                // out += sigmoid(h . w_gate) * shared(h), per token (Qwen2-MoE)
                s.precision.linear_forward(&mut m.sy, &m.sa, sd_w, n, fs, c);
                linear_forward(&mut m.sg, h, gw, n, c, 1);
                for ((o, y), g) in out.chunks_mut(c).zip(m.sy.chunks(c)).zip(m.sg.iter_mut()) {
                    *g = 1.0 / (1.0 + (-*g).exp());
                    o.iter_mut().zip(y).for_each(|(o, y)| *o += *g * y);
                }
            }
        }
        prof.lap("matmul: ffn");
    }
    experts_forward(
        out,
        h,
        &m.idx,
        &m.w,
        w.w_gu,
        w.w_down,
        s.experts(),
        &mut m.ex,
    );
    prof.lap("experts: dispatch, matmuls, swiglu");
    let aux = router::aux_loss_forward(&m.scores, &m.counts, e, k, s.score);
    let z = router::z_loss_forward(&m.logits, e);
    prof.lap("router");
    (aux, z)
}

/// Backward of [`moe_forward`] given d(out) = `dy`: writes d(h) to `sc.dh`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_backward(
    sc: &mut Scratch,
    g: MoeG,
    dy: &[f32],
    h: &[f32],
    w: &MoeW,
    m: &MoeActs,
    s: &Dims,
    aux_coef: f32,
    z_coef: f32,
    prof: &mut Profiler,
) {
    let (n, c, e, k, f) = (s.n, s.c, s.e, s.k, s.fe);
    match (g.shared, w.shared) {
        (Some((dsgu, dsd)), Some((sgu_w, sd_w))) => {
            let fs = s.fs;
            // gated: d(shared out) = g * dy, d(gate logit) = (dy . shared out) g (1 - g)
            let dy_shared: &[f32] = if w.shared_gate.is_some() {
                let rows = sc.dsy.chunks_mut(c).zip(dy.chunks(c)).zip(m.sy.chunks(c));
                for (i, ((ds, d), y)) in rows.enumerate() {
                    let gi = m.sg[i];
                    let mut dot = 0.0f32;
                    for ((ds, d), y) in ds.iter_mut().zip(d).zip(y) {
                        *ds = gi * d;
                        dot += d * y;
                    }
                    sc.dsg[i] = dot * gi * (1.0 - gi);
                }
                &sc.dsy
            } else {
                dy
            };
            s.precision.linear_backward(
                Some(&mut sc.da[..n * fs]),
                dsd,
                dy_shared,
                &m.sa,
                sd_w,
                n,
                fs,
                c,
                false,
            );
            prof.lap("matmul: ffn bwd");
            swiglu_backward(&mut sc.dgu[..n * 2 * fs], &sc.da[..n * fs], &m.sgu, fs);
            prof.lap("swiglu bwd");
            let dgu = &sc.dgu[..n * 2 * fs];
            s.precision
                .linear_backward(Some(&mut sc.dh), dsgu, dgu, h, sgu_w, n, c, 2 * fs, false);
            if let (Some(dgw), Some(gw)) = (g.shared_gate, w.shared_gate) {
                linear_backward(Some(&mut sc.dh), dgw, &sc.dsg, h, gw, n, c, 1, true);
            }
            prof.lap("matmul: ffn bwd");
        }
        _ => sc.dh.fill(0.0),
    }
    let nk = n * k;
    let scratch = ExpertScratch {
        dye: &mut sc.dye,
        da: &mut sc.da[..nk * f],
        dgu: &mut sc.dgu[..nk * 2 * f],
        dxe: &mut sc.dxe,
    };
    experts_backward(
        &mut sc.dh,
        &mut sc.dw,
        g.w_gu,
        g.w_down,
        dy,
        &m.w,
        w.w_gu,
        w.w_down,
        s.experts(),
        &m.ex,
        scratch,
    );
    prof.lap("experts: dispatch, matmuls, swiglu bwd");
    router::topk_weights_backward(&mut sc.dscores, &sc.dw, &m.w, &m.idx, &m.scores, &s.route());
    if aux_coef > 0.0 {
        router::aux_loss_backward(
            &mut sc.dscores,
            &m.scores,
            &m.counts,
            e,
            k,
            s.score,
            aux_coef,
        );
    }
    router::scores_backward(&mut sc.dlog_r, &sc.dscores, &m.scores, e, s.score);
    if z_coef > 0.0 {
        router::z_loss_backward(&mut sc.dlog_r, &m.logits, e, z_coef);
    }
    linear_backward(
        Some(&mut sc.dh),
        g.router,
        &sc.dlog_r,
        h,
        w.router,
        n,
        c,
        e,
        true,
    );
    prof.lap("router bwd");
}

/// Adds `b` (R) to every row of `x` (rows of R).
pub(crate) fn add_bias(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(x, b)| *x += b);
    }
}

/// `db += column sums of dx` (rows of db.len()), rows summed in order (the same bits for
/// any thread count).
fn bias_backward(db: &mut [f32], dx: &[f32]) {
    use rayon::prelude::*;
    let r = db.len();
    db.par_chunks_mut(64).enumerate().for_each(|(j, dbj)| {
        let c0 = j * 64;
        for row in dx.chunks(r) {
            for (d, x) in dbj.iter_mut().zip(&row[c0..]) {
                *d += x;
            }
        }
    });
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

#[cfg(test)]
mod tests {
    use super::carve;

    #[test]
    fn carve_hands_out_ranges_in_any_order() {
        let mut buf: Vec<f32> = (0..10).map(|x| x as f32).collect();
        let [a, b, e, c] = carve(&mut buf, [(6, 2), (1, 3), (0, 0), (8, 2)]);
        assert_eq!(
            (&*a, &*b, &*e, &*c),
            (
                &[6.0, 7.0][..],
                &[1.0, 2.0, 3.0][..],
                &[][..],
                &[8.0, 9.0][..]
            )
        );
        b[0] = -1.0;
        assert_eq!(buf[1], -1.0);
    }

    #[test]
    #[should_panic(expected = "overlap")]
    fn carve_refuses_overlaps() {
        let mut buf = vec![0.0f32; 10];
        let _ = carve(&mut buf, [(0, 4), (3, 2)]);
    }
}
