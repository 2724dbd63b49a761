//! Hugging Face model families in moelab's terms: a `config.json` becomes a
//! [`ModelConfig`], and each moelab tensor is one or more Hugging Face tensors stacked along
//! their first dimension (q, k and v projections into `wqkv`; gate and up projections into
//! `w_gate_up`). The golden tests against `transformers` (`tests/hf_golden.rs`) prove the
//! mapping; importing a checkpoint reuses it.
//!
//! Supported so far: Llama (dense, grouped-query attention, tied or untied embeddings),
//! Mixtral (softmax top-k routing, renormalised, fused expert tensors as transformers 5
//! stores them), Qwen2-MoE (q/k/v biases, a gated shared expert of its own width, dense
//! blocks by `decoder_sparse_step` and `mlp_only_layers`),
//! Qwen3-MoE (per-head q/k norm, explicit head_dim, norm_topk_prob) and OLMoE
//! (q/k norm over the whole projections). A config using anything moelab cannot compute yet
//! is refused naming the field (Llama's attention biases, RoPE scaling, sliding windows,
//! q/k/v clipping).

use crate::config::{ModelConfig, QkNorm, RopeScaling, RouterScore};
use crate::error::{cfg_err, Result};
use crate::params::Layout;
use serde_json::Value;

/// The model families moelab maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Olmoe => "olmoe",
        }
    }
}

/// A Hugging Face config read as a moelab model.
#[derive(Clone, Debug)]
pub struct HfModel {
    pub family: Family,
    pub config: ModelConfig,
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_of(v: &Value, key: &str) -> Result<usize> {
    field(v, key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| cfg_err(key, "missing or not a non-negative integer in config.json"))
}

/// The first of `keys` present (transformers renames some keys between versions, e.g.
/// Qwen's `num_experts` is written as `num_local_experts` by transformers 5).
fn usize_any(v: &Value, keys: &[&str]) -> Result<usize> {
    match keys.iter().find(|k| field(v, k).is_some()) {
        Some(k) => usize_of(v, k),
        None => Err(cfg_err(keys[0], "missing in config.json")),
    }
}

fn f32_or(v: &Value, key: &str, default: f32) -> Result<f32> {
    match field(v, key) {
        None => Ok(default),
        Some(x) => x
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| cfg_err(key, "not a number in config.json")),
    }
}

fn refuse_if(cond: bool, key: &str, why: &str) -> Result<()> {
    if cond {
        Err(cfg_err(key, format!("{why}: not supported by moelab yet")))
    } else {
        Ok(())
    }
}

/// The RoPE scaling of a `rope_parameters` (transformers 5) or `rope_scaling` (4.x) object.
fn rope_scaling_from_hf(r: Option<&Value>, max_pos: Option<u64>) -> Result<Option<RopeScaling>> {
    let Some(r) = r else { return Ok(None) };
    let key = "rope_parameters.rope_type";
    let kind = field(r, "rope_type")
        .or(field(r, "type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f32> {
        field(r, k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| cfg_err(k, format!("rope {kind}: missing or not a number")))
    };
    let orig = || -> Result<usize> {
        field(r, "original_max_position_embeddings")
            .and_then(Value::as_u64)
            .or(max_pos)
            .map(|x| x as usize)
            .ok_or_else(|| cfg_err("original_max_position_embeddings", "missing"))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_seq_len: orig()?,
        }),
        "yarn" => {
            let factor = num("factor")?;
            // DeepSeek's mscale pair sets the attention factor when it is not given
            let mscale = |m: f64| {
                if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * m * (factor as f64).ln() + 1.0
                }
            };
            let attention_factor = match (
                field(r, "attention_factor").and_then(Value::as_f64),
                field(r, "mscale").and_then(Value::as_f64),
                field(r, "mscale_all_dim").and_then(Value::as_f64),
            ) {
                (Some(a), ..) => Some(a as f32),
                (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                    Some((mscale(m) / mscale(ma)) as f32)
                }
                _ => None,
            };
            let or = |k: &str, d: f32| field(r, k).and_then(Value::as_f64).map_or(d, |x| x as f32);
            Some(RopeScaling::Yarn {
                factor,
                original_max_seq_len: orig()?,
                beta_fast: or("beta_fast", 32.0),
                beta_slow: or("beta_slow", 1.0),
                attention_factor,
                truncate: field(r, "truncate")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            })
        }
        other => {
            return Err(cfg_err(
                key,
                format!(
                    "RoPE scaling \"{other}\": not supported by moelab yet (linear, yarn, llama3)"
                ),
            ))
        }
    })
}

/// The `rope_parameters` of transformers 5 for `c`.
fn rope_parameters(c: &ModelConfig) -> Value {
    let mut p = serde_json::json!({"rope_type": "default", "rope_theta": c.rope_theta});
    let o = p.as_object_mut().expect("object");
    match &c.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            o.insert("rope_type".into(), "linear".into());
            o.insert("factor".into(), (*factor).into());
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_seq_len,
        }) => {
            o.insert("rope_type".into(), "llama3".into());
            o.insert("factor".into(), (*factor).into());
            o.insert("low_freq_factor".into(), (*low_freq_factor).into());
            o.insert("high_freq_factor".into(), (*high_freq_factor).into());
            o.insert(
                "original_max_position_embeddings".into(),
                (*original_max_seq_len).into(),
            );
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_seq_len,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        }) => {
            o.insert("rope_type".into(), "yarn".into());
            o.insert("factor".into(), (*factor).into());
            o.insert(
                "original_max_position_embeddings".into(),
                (*original_max_seq_len).into(),
            );
            o.insert("beta_fast".into(), (*beta_fast).into());
            o.insert("beta_slow".into(), (*beta_slow).into());
            if let Some(a) = attention_factor {
                o.insert("attention_factor".into(), (*a).into());
            }
            o.insert("truncate".into(), (*truncate).into());
        }
    }
    p
}

/// Reads a Hugging Face `config.json` (transformers 4 or 5 keys).
pub fn config_from_hf(v: &Value) -> Result<HfModel> {
    let model_type = field(v, "model_type").and_then(Value::as_str).unwrap_or("");
    let family = match model_type {
        "llama" => Family::Llama,
        "mixtral" => Family::Mixtral,
        "qwen2_moe" => Family::Qwen2Moe,
        "qwen3_moe" => Family::Qwen3Moe,
        "olmoe" => Family::Olmoe,
        other => {
            return Err(cfg_err(
                "model_type",
                format!("\"{other}\" is not a supported family (llama, mixtral, qwen2_moe, qwen3_moe, olmoe)"),
            ))
        }
    };
    let flag = |key: &str| field(v, key).and_then(Value::as_bool).unwrap_or(false);
    refuse_if(
        flag("attention_bias"),
        "attention_bias",
        "biases on q/k/v/o",
    )?;
    refuse_if(flag("mlp_bias"), "mlp_bias", "biases on the MLP")?;
    let act = field(v, "hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    refuse_if(
        act != "silu",
        "hidden_act",
        &format!("activation \"{act}\""),
    )?;
    let (sliding_window, full_attention_layers) = windows_from_hf(v, family)?;
    refuse_if(
        field(v, "clip_qkv").is_some(),
        "clip_qkv",
        "clipping q, k and v",
    )?;
    // Qwen2/3-MoE: which blocks are MoE
    let moe_every = match field(v, "decoder_sparse_step") {
        Some(_) => usize_of(v, "decoder_sparse_step")?,
        None => 1,
    };
    let dense_layers = match field(v, "mlp_only_layers") {
        None => vec![],
        Some(a) => a
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .ok_or_else(|| cfg_err("mlp_only_layers", "not a list of block indices"))?,
    };
    // transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in rope_theta/rope_scaling
    let rope = field(v, "rope_parameters");
    let rope_theta = match rope {
        Some(r) => f32_or(r, "rope_theta", 10000.0)?,
        None => f32_or(v, "rope_theta", 10000.0)?,
    };
    let rope_scaling = rope_scaling_from_hf(
        rope.or(field(v, "rope_scaling")),
        field(v, "max_position_embeddings").and_then(Value::as_u64),
    )?;
    let (c, heads) = (
        usize_of(v, "hidden_size")?,
        usize_of(v, "num_attention_heads")?,
    );
    let head_dim = match field(v, "head_dim") {
        Some(_) => Some(usize_of(v, "head_dim")?)
            .filter(|&d| heads == 0 || d.checked_mul(heads) != Some(c)),
        None => None,
    };
    let inter = usize_of(v, "intermediate_size")?;
    let (n_experts, top_k, expert_hidden) = match family {
        Family::Llama => (0, 2, 0),
        Family::Mixtral => (
            usize_any(v, &["num_local_experts", "num_experts"])?,
            usize_of(v, "num_experts_per_tok")?,
            inter,
        ),
        Family::Qwen2Moe | Family::Qwen3Moe => (
            usize_any(v, &["num_experts", "num_local_experts"])?,
            usize_of(v, "num_experts_per_tok")?,
            usize_of(v, "moe_intermediate_size")?,
        ),
        Family::Olmoe => (
            usize_any(v, &["num_experts", "num_local_experts"])?,
            usize_of(v, "num_experts_per_tok")?,
            inter,
        ),
    };
    // Mixtral always renormalises the chosen experts' weights; Qwen and OLMoE say whether
    let renormalize = match family {
        Family::Qwen2Moe | Family::Qwen3Moe | Family::Olmoe => flag("norm_topk_prob"),
        _ => true,
    };
    // Qwen2-MoE: one shared expert of its own width behind a sigmoid gate
    let shared_width = match family {
        Family::Qwen2Moe => {
            Some(usize_of(v, "shared_expert_intermediate_size")?).filter(|&f| f > 0)
        }
        _ => None,
    };
    let qk_norm = match family {
        Family::Qwen3Moe => QkNorm::Head,
        Family::Olmoe => QkNorm::Projection,
        _ => QkNorm::None,
    };
    let config = ModelConfig {
        vocab_size: usize_of(v, "vocab_size")?,
        d_model: c,
        n_layers: usize_of(v, "num_hidden_layers")?,
        n_heads: heads,
        head_dim,
        qk_norm,
        // Qwen2 always has them (transformers 5 writes `qkv_bias`; 4.x had none)
        qkv_bias: family == Family::Qwen2Moe
            && field(v, "qkv_bias").is_none_or(|b| b.as_bool() == Some(true)),
        n_kv_heads: match field(v, "num_key_value_heads") {
            Some(_) => usize_of(v, "num_key_value_heads")?,
            None => heads,
        },
        max_seq_len: usize_of(v, "max_position_embeddings")?,
        rope_theta,
        rope_scaling,
        sliding_window,
        full_attention_layers,
        norm_eps: f32_or(v, "rms_norm_eps", 1e-6)?,
        tie_embeddings: flag("tie_word_embeddings"),
        ffn_hidden: inter,
        n_experts,
        top_k,
        expert_hidden,
        n_shared_experts: shared_width.is_some() as usize,
        shared_expert_hidden: shared_width,
        shared_expert_gate: shared_width.is_some(),
        router_score: RouterScore::Softmax,
        renormalize,
        routed_scaling_factor: 1.0,
        n_group: 1,
        topk_group: 1,
        balance: Default::default(),
        aux_loss_coef: f32_or(v, "router_aux_loss_coef", 0.0)?,
        z_loss_coef: 0.0,
        bias_update_rate: 0.0,
        first_dense_layers: 0,
        moe_every,
        dense_layers,
        dropout: 0.0,
        init_std: f32_or(v, "initializer_range", 0.02)?,
    };
    config.validate()?;
    Ok(HfModel { family, config })
}

/// The sliding window and the blocks that do not use it, as transformers 5 computes them:
/// Qwen configs carry a window that only `use_sliding_window` turns on; Mixtral's applies
/// when it is not null; `layer_types` names each block's kind when present, else Qwen2-MoE
/// windows the even blocks below `max_window_layers` and the other families every block.
fn windows_from_hf(v: &Value, family: Family) -> Result<(usize, Vec<usize>)> {
    let on = match field(v, "use_sliding_window") {
        Some(u) => u.as_bool().unwrap_or(false),
        None => field(v, "sliding_window").is_some_and(|w| !w.is_null()),
    };
    if !on {
        return Ok((0, vec![]));
    }
    if matches!(family, Family::Llama | Family::Olmoe) {
        // transformers' Llama and OLMoE ignore the field: a config that sets one was
        // written for another architecture (Mistral), whose outputs this would not give
        return Err(cfg_err(
            "sliding_window",
            format!(
                "{} computes no sliding window; this config is for another architecture",
                family.name()
            ),
        ));
    }
    let w = usize_of(v, "sliding_window")?;
    if w == 0 {
        return Err(cfg_err("sliding_window", "must be at least 1"));
    }
    let n = usize_of(v, "num_hidden_layers")?;
    let full = match field(v, "layer_types") {
        Some(t) => {
            let kinds = t
                .as_array()
                .filter(|a| a.len() == n)
                .ok_or_else(|| cfg_err("layer_types", "not a list of one kind per block"))?;
            let mut full = vec![];
            for (l, k) in kinds.iter().enumerate() {
                match k.as_str() {
                    Some("sliding_attention") => {}
                    Some("full_attention") => full.push(l),
                    _ => {
                        return Err(cfg_err(
                            "layer_types",
                            format!("block {l}: {k} is not sliding_attention or full_attention"),
                        ))
                    }
                }
            }
            full
        }
        None if family == Family::Qwen2Moe => {
            let below = match field(v, "max_window_layers") {
                Some(_) => usize_of(v, "max_window_layers")?,
                None => 28,
            };
            (0..n).filter(|&l| l % 2 == 1 || l >= below).collect()
        }
        None => vec![],
    };
    Ok((w, full))
}

impl HfModel {
    /// For every tensor of moelab's layout, the Hugging Face tensors that stack (along dim 0,
    /// in order) into it.
    pub fn sources(&self, layout: &Layout) -> Vec<(String, Vec<String>)> {
        layout
            .tensors
            .iter()
            .map(|t| (t.name.clone(), self.source(&t.name)))
            .collect()
    }

    fn source(&self, name: &str) -> Vec<String> {
        self.source_alternatives(name)
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    /// The ways a checkpoint may spell a moelab tensor, preferred first: transformers 5
    /// holds experts fused (`mlp.experts.gate_up_proj`, what the golden tests use) but
    /// `save_pretrained` writes them per expert (`experts.{e}.gate_proj` ..., Mixtral's
    /// `block_sparse_moe.experts.{e}.w1/w3/w2`), as older checkpoints on the Hub are.
    fn source_alternatives(&self, name: &str) -> Vec<Vec<String>> {
        let one = |s: &str| vec![vec![s.to_string()]];
        match name {
            "embed.weight" => return one("model.embed_tokens.weight"),
            "norm.weight" => return one("model.norm.weight"),
            "lm_head.weight" => return one("lm_head.weight"),
            _ => {}
        }
        let Some(rest) = name.strip_prefix("layers.") else {
            return vec![];
        };
        let (l, part) = rest.split_once('.').unwrap_or((rest, ""));
        let p = format!("model.layers.{l}");
        let attn = |x: &str| format!("{p}.self_attn.{x}_proj.weight");
        let e = self.config.n_experts;
        let mixtral = self.family == Family::Mixtral;
        let per_expert = |names: &[&str]| -> Vec<String> {
            let mut v = vec![];
            for i in 0..e {
                for n in names {
                    v.push(if mixtral {
                        format!("{p}.block_sparse_moe.experts.{i}.{n}.weight")
                    } else {
                        format!("{p}.mlp.experts.{i}.{n}.weight")
                    });
                }
            }
            v
        };
        let v = match part {
            "attn_norm.weight" => vec![format!("{p}.input_layernorm.weight")],
            "ffn_norm.weight" => vec![format!("{p}.post_attention_layernorm.weight")],
            "attn.wqkv.weight" => vec![attn("q"), attn("k"), attn("v")],
            "attn.wo.weight" => vec![attn("o")],
            "attn.bqkv" => ["q", "k", "v"]
                .iter()
                .map(|x| format!("{p}.self_attn.{x}_proj.bias"))
                .collect(),
            "moe.shared.w_gate_up.weight" => vec![
                format!("{p}.mlp.shared_expert.gate_proj.weight"),
                format!("{p}.mlp.shared_expert.up_proj.weight"),
            ],
            "moe.shared.w_down.weight" => vec![format!("{p}.mlp.shared_expert.down_proj.weight")],
            "moe.shared.gate.weight" => vec![format!("{p}.mlp.shared_expert_gate.weight")],
            "attn.q_norm.weight" => vec![format!("{p}.self_attn.q_norm.weight")],
            "attn.k_norm.weight" => vec![format!("{p}.self_attn.k_norm.weight")],
            "mlp.w_gate_up.weight" => vec![
                format!("{p}.mlp.gate_proj.weight"),
                format!("{p}.mlp.up_proj.weight"),
            ],
            "mlp.w_down.weight" => vec![format!("{p}.mlp.down_proj.weight")],
            "moe.router.weight" => {
                let mut v = vec![vec![format!("{p}.mlp.gate.weight")]];
                if mixtral {
                    v.push(vec![format!("{p}.block_sparse_moe.gate.weight")]);
                }
                return v;
            }
            "moe.experts.w_gate_up" => {
                let legacy = if mixtral {
                    per_expert(&["w1", "w3"])
                } else {
                    per_expert(&["gate_proj", "up_proj"])
                };
                return vec![vec![format!("{p}.mlp.experts.gate_up_proj")], legacy];
            }
            "moe.experts.w_down" => {
                let legacy = per_expert(&[if mixtral { "w2" } else { "down_proj" }]);
                return vec![vec![format!("{p}.mlp.experts.down_proj")], legacy];
            }
            _ => vec![],
        };
        vec![v]
    }

    /// Builds moelab's parameter buffer from a model dir's tensors (fused or per-expert
    /// names, any float dtype the dir holds).
    pub fn load_weights(
        &self,
        layout: &Layout,
        st: &crate::tensors::SafetensorsDir,
    ) -> Result<Vec<f32>> {
        self.try_assemble(layout, |name| st.get_f32(name))
    }

    /// Builds a buffer laid out by `layout` from Hugging Face tensors: `get(name)` returns a
    /// tensor's values in row-major order (None when absent). Every moelab tensor must be
    /// filled exactly; the error names the missing tensor or the size that does not match.
    pub fn assemble<T: Copy + Default>(
        &self,
        layout: &Layout,
        mut get: impl FnMut(&str) -> Option<Vec<T>>,
    ) -> Result<Vec<T>> {
        self.try_assemble(layout, |name| Ok::<_, crate::Error>(get(name)))
    }

    /// [`HfModel::assemble`] with a getter that can fail (a file that cannot be read, a
    /// dtype that cannot be converted): its first error is returned.
    pub fn try_assemble<T: Copy + Default, E: From<crate::Error>>(
        &self,
        layout: &Layout,
        mut get: impl FnMut(&str) -> std::result::Result<Option<Vec<T>>, E>,
    ) -> std::result::Result<Vec<T>, E> {
        let mut out = vec![T::default(); layout.total];
        for t in &layout.tensors {
            let alts = self.source_alternatives(&t.name);
            if alts.is_empty() {
                return Err(cfg_err(
                    &t.name,
                    format!("no {} tensor maps onto it", self.family.name()),
                )
                .into());
            }
            // the first spelling whose first tensor is present (else the preferred one, so
            // the error names it)
            let mut chosen = None;
            for srcs in &alts {
                if let Some(first) = get(&srcs[0])? {
                    chosen = Some((srcs.clone(), first));
                    break;
                }
            }
            let Some((srcs, first)) = chosen else {
                return Err(cfg_err(&alts[0][0], "missing from the weights").into());
            };
            let mut first = Some(first);
            let mut at = t.offset;
            for s in &srcs {
                let vals = match first.take() {
                    Some(v) => v,
                    None => get(s)?.ok_or_else(|| cfg_err(s, "missing from the weights"))?,
                };
                if at + vals.len() > t.offset + t.len {
                    return Err(
                        cfg_err(s, format!("too large for {} {:?}", t.name, t.shape)).into(),
                    );
                }
                out[at..at + vals.len()].copy_from_slice(&vals);
                at += vals.len();
            }
            if at != t.offset + t.len {
                return Err(cfg_err(
                    &t.name,
                    format!("{srcs:?} fill {} of its {} values", at - t.offset, t.len),
                )
                .into());
            }
        }
        Ok(out)
    }
}

/// A `sliding_window` value: null for none.
fn window(w: usize) -> Value {
    if w == 0 {
        Value::Null
    } else {
        w.into()
    }
}

/// A tensor in Hugging Face terms: name, shape, row-major values.
pub type HfTensor = (String, Vec<usize>, Vec<f32>);

/// The Hugging Face family and `config.json` that express `cfg`, or the reason none does.
/// Mixture-of-Experts models choose by their parts: shared experts -> Qwen2-MoE (an
/// ungated shared expert is written with a zero gate, sigmoid(0) = 1/2, and its down
/// projection doubled), per-head q/k norm -> Qwen3-MoE, whole-projection q/k norm -> OLMoE,
/// otherwise Mixtral; dense models -> Llama.
pub fn to_hf(cfg: &ModelConfig) -> Result<(HfModel, Value)> {
    let c = cfg;
    let moe_layers: Vec<bool> = (0..c.n_layers).map(|l| c.is_moe_layer(l)).collect();
    let any_moe = moe_layers.iter().any(|&m| m);
    let no = |what: &str, why: &str| {
        Err(cfg_err(
            what,
            format!("{why}: no Hugging Face family moelab exports expresses it"),
        ))
    };
    if any_moe {
        if c.router_score != RouterScore::Softmax {
            return no("model.router_score", "sigmoid routing (DeepSeek-V3)");
        }
        if c.routed_scaling_factor != 1.0 || c.n_group != 1 {
            return no(
                "model.routed_scaling_factor",
                "scaled or group-limited routing",
            );
        }
    }
    let family = match (any_moe, c.n_shared_experts > 0, c.qk_norm) {
        (false, _, QkNorm::None) if !c.qkv_bias => Family::Llama,
        (false, _, _) => {
            return no(
                "model.qk_norm",
                "a dense model with q/k norm or q/k/v biases",
            )
        }
        (true, true, QkNorm::None) => Family::Qwen2Moe,
        (true, false, QkNorm::None) if !c.qkv_bias => Family::Mixtral,
        (true, false, QkNorm::Head) if !c.qkv_bias => Family::Qwen3Moe,
        (true, false, QkNorm::Projection) if !c.qkv_bias => Family::Olmoe,
        _ => {
            return no(
                "model.qk_norm",
                "this combination of shared experts, q/k norm and biases",
            )
        }
    };
    if c.sliding_window > 0 {
        let ok = match family {
            Family::Mixtral | Family::Qwen3Moe => c.full_attention_layers.is_empty(),
            Family::Qwen2Moe => true,
            Family::Llama | Family::Olmoe => false,
        };
        if !ok {
            return no(
                "model.sliding_window",
                &format!("{} with this sliding window", family.name()),
            );
        }
    }
    let all_moe = moe_layers.iter().all(|&m| m);
    if matches!(family, Family::Mixtral | Family::Olmoe) && !all_moe {
        return no(
            "model.moe_every",
            "dense blocks in a Mixtral or OLMoE model",
        );
    }
    if matches!(family, Family::Mixtral) && !c.renormalize {
        return no("model.renormalize", "Mixtral without renormalised weights");
    }
    let mut v = serde_json::json!({
        "model_type": family.name(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim(),
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": rope_parameters(c),
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": c.init_std,
        "use_cache": true,
    });
    let o = v.as_object_mut().expect("object");
    let arch = match family {
        Family::Llama => "LlamaForCausalLM",
        Family::Mixtral => "MixtralForCausalLM",
        Family::Qwen2Moe => "Qwen2MoeForCausalLM",
        Family::Qwen3Moe => "Qwen3MoeForCausalLM",
        Family::Olmoe => "OlmoeForCausalLM",
    };
    o.insert("architectures".into(), serde_json::json!([arch]));
    let mlp_only: Vec<usize> = (0..c.n_layers).filter(|&l| !moe_layers[l]).collect();
    match family {
        Family::Llama => {
            o.insert("intermediate_size".into(), c.ffn_hidden.into());
            o.insert("mlp_bias".into(), false.into());
        }
        Family::Mixtral => {
            o.insert("intermediate_size".into(), c.expert_hidden.into());
            o.insert("num_local_experts".into(), c.n_experts.into());
            o.insert("num_experts_per_tok".into(), c.top_k.into());
            o.insert("router_aux_loss_coef".into(), c.aux_loss_coef.into());
            o.insert("sliding_window".into(), window(c.sliding_window));
        }
        Family::Qwen2Moe | Family::Qwen3Moe | Family::Olmoe => {
            let inter = if family == Family::Olmoe {
                c.expert_hidden
            } else {
                c.ffn_hidden
            };
            o.insert("intermediate_size".into(), inter.into());
            o.insert("moe_intermediate_size".into(), c.expert_hidden.into());
            o.insert("num_experts".into(), c.n_experts.into());
            o.insert("num_experts_per_tok".into(), c.top_k.into());
            o.insert("norm_topk_prob".into(), c.renormalize.into());
            o.insert("router_aux_loss_coef".into(), c.aux_loss_coef.into());
            o.insert("output_router_logits".into(), false.into());
            if family != Family::Olmoe {
                o.insert("decoder_sparse_step".into(), 1.into());
                o.insert("mlp_only_layers".into(), serde_json::json!(mlp_only));
                o.insert("use_sliding_window".into(), (c.sliding_window > 0).into());
                o.insert("sliding_window".into(), window(c.sliding_window));
            }
            if family == Family::Qwen2Moe && c.sliding_window > 0 {
                let kinds: Vec<&str> = (0..c.n_layers)
                    .map(|l| match c.window(l) {
                        0 => "full_attention",
                        _ => "sliding_attention",
                    })
                    .collect();
                o.insert("layer_types".into(), serde_json::json!(kinds));
                o.insert("max_window_layers".into(), c.n_layers.into());
            }
            if family == Family::Qwen2Moe {
                o.insert(
                    "shared_expert_intermediate_size".into(),
                    c.shared_hidden().into(),
                );
                o.insert("qkv_bias".into(), c.qkv_bias.into());
            }
        }
    }
    // what the config says must read back as this model
    let back = config_from_hf(&v)?;
    let same = |a: &ModelConfig, b: &ModelConfig| {
        let shapes = |x: &ModelConfig| -> Vec<(String, Vec<usize>)> {
            Layout::new(x)
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect()
        };
        let mut a2 = a.clone();
        // an ungated shared expert is exported behind a zero gate
        a2.shared_expert_gate = b.shared_expert_gate;
        a2.shared_expert_hidden = b.shared_expert_hidden;
        a2.n_shared_experts = b.n_shared_experts;
        shapes(&a2) == shapes(b)
            && a.shared_hidden() == b.shared_hidden()
            && (a.rope_theta, a.norm_eps, a.renormalize, a.top_k)
                == (b.rope_theta, b.norm_eps, b.renormalize, b.top_k)
            && (0..a.n_layers).all(|l| a.is_moe_layer(l) == b.is_moe_layer(l))
    };
    if !same(cfg, &back.config) {
        return Err(cfg_err(
            "model",
            format!(
                "exports as {} but does not read back the same",
                family.name()
            ),
        ));
    }
    Ok((
        HfModel {
            family: back.family,
            config: cfg.clone(),
        },
        v,
    ))
}

impl HfModel {
    /// moelab's parameters (laid out by `layout`) as Hugging Face tensors, experts one per
    /// expert as `save_pretrained` writes them.
    pub fn disassemble(&self, layout: &Layout, params: &[f32]) -> Vec<HfTensor> {
        let c = &self.config;
        let (h, g, d) = (c.n_heads, c.n_kv_heads, c.head_dim());
        let mut out: Vec<HfTensor> = vec![];
        for t in &layout.tensors {
            if t.name.ends_with("moe.router.bias") {
                continue; // the selection bias (balance = "bias") is not exported
            }
            let alts = self.source_alternatives(&t.name);
            let srcs = alts.last().expect("every tensor maps").clone();
            let vals = &params[t.offset..t.offset + t.len];
            let cols = *t.shape.last().expect("a shape");
            let rows = t.len / cols;
            let one_d = t.shape.len() == 1;
            // rows of each source: q/k/v split by heads, the rest equally
            let parts: Vec<usize> =
                if t.name.ends_with("attn.wqkv.weight") || t.name.ends_with("attn.bqkv") {
                    vec![h * d, g * d, g * d]
                } else {
                    let n = srcs.len();
                    let per = if one_d { t.len / n } else { rows / n };
                    vec![per; n]
                };
            let ungated = self.family == Family::Qwen2Moe && !c.shared_expert_gate;
            let mut at = 0;
            for (name, r) in srcs.iter().zip(parts) {
                let (shape, len) = if one_d {
                    (vec![r], r)
                } else {
                    (vec![r, cols], r * cols)
                };
                let mut v = vals[at..at + len].to_vec();
                at += len;
                if ungated && t.name.ends_with("moe.shared.w_down.weight") {
                    // behind sigmoid(0) = 1/2: doubled (exact in binary floating point)
                    v.iter_mut().for_each(|x| *x *= 2.0);
                }
                let shape = if srcs.len() == 1 && !one_d {
                    t.shape.clone()
                } else {
                    shape
                };
                out.push((name.clone(), shape, v));
            }
            if ungated && t.name.ends_with("moe.shared.w_down.weight") {
                let l = t.name.split('.').nth(1).expect("layers.L");
                out.push((
                    format!("model.layers.{l}.mlp.shared_expert_gate.weight"),
                    vec![1, c.d_model],
                    vec![0.0; c.d_model],
                ));
            }
        }
        out
    }
}
