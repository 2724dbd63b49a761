//! The parameter layout: every tensor of the model as a named view into one contiguous f32
//! buffer (as llm.c does). Gradients and optimizer moments use the same layout.
//!
//! Names follow a Hugging Face-like state dict so that the PyTorch reference in `reference/`
//! loads our safetensors files without renaming.

use crate::config::{Balance, ModelConfig, QkNorm};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// One named tensor in the buffer.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// Updated by the optimizer (the bias-balancing vector is state, not a parameter).
    pub trainable: bool,
    /// Gets weight decay (matrices; not norms, biases or the balancing vector).
    pub decay: bool,
    /// A hidden weight made of 2-D matrices that Muon orthogonalises one by one: the rows of
    /// each consecutive block (all `shape.last()` columns wide), e.g. q, k, v of a fused
    /// projection or gate, up of every expert. Empty: not one (embeddings, head, router,
    /// norms, biases keep AdamW).
    pub blocks: Vec<usize>,
    init: Init,
}

#[derive(Clone, Copy, Debug)]
enum Init {
    Normal(f32),
    Ones,
    Zeros,
}

/// Offsets of one block's tensors.
#[derive(Clone, Debug)]
pub struct LayerIdx {
    pub attn_norm: usize,
    pub wqkv: usize,
    /// q/k/v projection biases (model.qkv_bias).
    pub bqkv: Option<usize>,
    /// q and k norm weights (model.qk_norm).
    pub qk_norm: Option<(usize, usize)>,
    pub wo: usize,
    pub ffn_norm: usize,
    pub ffn: FfnIdx,
    /// The attention's sliding window (0: every earlier key): not a tensor, but a property
    /// of the block every pass over it needs.
    pub window: usize,
}

#[derive(Clone, Debug)]
pub enum FfnIdx {
    Dense {
        w_gu: usize,
        w_down: usize,
    },
    Moe {
        router: usize,
        bias: Option<usize>,
        w_gu: usize,
        w_down: usize,
        shared: Option<(usize, usize)>,
        /// The shared experts' sigmoid gate [1, C] (model.shared_expert_gate).
        shared_gate: Option<usize>,
    },
}

/// The whole layout.
#[derive(Clone, Debug)]
pub struct Layout {
    pub tensors: Vec<TensorSpec>,
    pub total: usize,
    pub embed: usize,
    pub layers: Vec<LayerIdx>,
    pub norm: usize,
    pub lm_head: usize,
}

struct Builder {
    tensors: Vec<TensorSpec>,
    total: usize,
}

impl Builder {
    fn add(
        &mut self,
        name: String,
        shape: &[usize],
        init: Init,
        trainable: bool,
        decay: bool,
    ) -> usize {
        let len = shape.iter().product();
        let offset = self.total;
        self.tensors.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            offset,
            len,
            trainable,
            decay,
            blocks: vec![],
            init,
        });
        self.total += len;
        offset
    }
    fn matrix(&mut self, name: String, shape: &[usize], std: f32) -> usize {
        self.add(name, shape, Init::Normal(std), true, true)
    }
    /// A [`Builder::matrix`] of hidden 2-D blocks with these row counts (see
    /// [`TensorSpec::blocks`]).
    fn hidden(&mut self, name: String, shape: &[usize], std: f32, blocks: Vec<usize>) -> usize {
        let offset = self.matrix(name, shape, std);
        let t = self.tensors.last_mut().expect("just added");
        debug_assert_eq!(blocks.iter().sum::<usize>() * shape[shape.len() - 1], t.len);
        t.blocks = blocks;
        offset
    }
    fn norm(&mut self, name: String, c: usize) -> usize {
        self.add(name, &[c], Init::Ones, true, false)
    }
}

impl Layout {
    pub fn new(cfg: &ModelConfig) -> Layout {
        let (c, v, d) = (cfg.d_model, cfg.vocab_size, cfg.head_dim());
        let (h, g) = (cfg.n_heads, cfg.n_kv_heads);
        let std = cfg.init_std;
        let resid_std = std / (2.0 * cfg.n_layers as f32).sqrt();
        let mut b = Builder {
            tensors: vec![],
            total: 0,
        };
        let embed = b.matrix("embed.weight".into(), &[v, c], std);
        let mut layers = vec![];
        for l in 0..cfg.n_layers {
            let p = format!("layers.{l}");
            let attn_norm = b.norm(format!("{p}.attn_norm.weight"), c);
            let wqkv = b.hidden(
                format!("{p}.attn.wqkv.weight"),
                &[(h + 2 * g) * d, c],
                std,
                vec![h * d, g * d, g * d],
            );
            // NOTE: created after wqkv and only when configured, so the tensors (and init
            // streams) of configs without them do not move
            let bqkv = cfg.qkv_bias.then(|| {
                b.add(
                    format!("{p}.attn.bqkv"),
                    &[(h + 2 * g) * d],
                    Init::Zeros,
                    true,
                    false,
                )
            });
            let qk_norm = match cfg.qk_norm {
                QkNorm::None => None,
                QkNorm::Head => Some((
                    b.norm(format!("{p}.attn.q_norm.weight"), d),
                    b.norm(format!("{p}.attn.k_norm.weight"), d),
                )),
                QkNorm::Projection => Some((
                    b.norm(format!("{p}.attn.q_norm.weight"), h * d),
                    b.norm(format!("{p}.attn.k_norm.weight"), g * d),
                )),
            };
            let wo = b.hidden(
                format!("{p}.attn.wo.weight"),
                &[c, h * d],
                resid_std,
                vec![c],
            );
            let ffn_norm = b.norm(format!("{p}.ffn_norm.weight"), c);
            let ffn = if cfg.is_moe_layer(l) {
                let (e, f) = (cfg.n_experts, cfg.expert_hidden);
                let router = b.matrix(format!("{p}.moe.router.weight"), &[e, c], std);
                let bias = (cfg.balance == Balance::Bias).then(|| {
                    b.add(
                        format!("{p}.moe.router.bias"),
                        &[e],
                        Init::Zeros,
                        false,
                        false,
                    )
                });
                let w_gu = b.hidden(
                    format!("{p}.moe.experts.w_gate_up"),
                    &[e, 2 * f, c],
                    std,
                    vec![f; 2 * e],
                );
                let w_down = b.hidden(
                    format!("{p}.moe.experts.w_down"),
                    &[e, c, f],
                    resid_std,
                    vec![c; e],
                );
                let shared = (cfg.n_shared_experts > 0).then(|| {
                    let fs = cfg.shared_hidden();
                    (
                        b.hidden(
                            format!("{p}.moe.shared.w_gate_up.weight"),
                            &[2 * fs, c],
                            std,
                            vec![fs, fs],
                        ),
                        b.hidden(
                            format!("{p}.moe.shared.w_down.weight"),
                            &[c, fs],
                            resid_std,
                            vec![c],
                        ),
                    )
                });
                let shared_gate = (cfg.n_shared_experts > 0 && cfg.shared_expert_gate)
                    .then(|| b.matrix(format!("{p}.moe.shared.gate.weight"), &[1, c], std));
                FfnIdx::Moe {
                    router,
                    bias,
                    w_gu,
                    w_down,
                    shared,
                    shared_gate,
                }
            } else {
                let f = cfg.ffn_hidden;
                FfnIdx::Dense {
                    w_gu: b.hidden(
                        format!("{p}.mlp.w_gate_up.weight"),
                        &[2 * f, c],
                        std,
                        vec![f, f],
                    ),
                    w_down: b.hidden(
                        format!("{p}.mlp.w_down.weight"),
                        &[c, f],
                        resid_std,
                        vec![c],
                    ),
                }
            };
            layers.push(LayerIdx {
                attn_norm,
                wqkv,
                bqkv,
                qk_norm,
                wo,
                ffn_norm,
                ffn,
                window: cfg.window(l),
            });
        }
        let norm = b.norm("norm.weight".into(), c);
        let lm_head = if cfg.tie_embeddings {
            embed
        } else {
            b.matrix("lm_head.weight".into(), &[v, c], std)
        };
        Layout {
            tensors: b.tensors,
            total: b.total,
            embed,
            layers,
            norm,
            lm_head,
        }
    }

    /// Fills `buf` with the seeded initialisation: tensor i draws from a ChaCha8 stream
    /// numbered i, so a tensor's values do not depend on the tensors before it.
    pub fn init(&self, buf: &mut [f32], seed: u64) {
        assert_eq!(buf.len(), self.total);
        for (i, t) in self.tensors.iter().enumerate() {
            let dst = &mut buf[t.offset..t.offset + t.len];
            match t.init {
                Init::Ones => dst.fill(1.0),
                Init::Zeros => dst.fill(0.0),
                Init::Normal(std) => {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream(i as u64);
                    let dist = Normal::new(0.0f32, std).expect("std > 0 is validated");
                    dst.iter_mut().for_each(|x| *x = dist.sample(&mut rng));
                }
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Tensor `name`'s values in `buf` (a buffer laid out by this layout). Panics when the
    /// layout has no such tensor.
    pub fn slice<'a>(&self, buf: &'a [f32], name: &str) -> &'a [f32] {
        let t = self
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name} in the layout"));
        &buf[t.offset..t.offset + t.len]
    }

    /// Number of stored parameters (excluding non-trainable state).
    pub fn n_params(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| t.trainable)
            .map(|t| t.len)
            .sum()
    }
}
