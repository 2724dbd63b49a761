//! Writing GGUF (version 3) for llama.cpp: a moelab model with its byte-level BPE tokenizer
//! and chat template, as the llama.cpp architecture that computes the same function:
//!
//! - `llama`: dense, or Mixtral-style routed experts (softmax top-k, renormalised);
//! - `bailingmoe`: routed experts plus always-on shared experts (moelab's DeepSeekMoE
//!   blocks, small-moe), renormalised or not, with a routed scaling factor;
//! - `qwen2moe`: a shared expert behind a sigmoid gate, weights not renormalised
//!   (Qwen1.5/Qwen2-MoE);
//! - `qwen3moe`: per-head q/k RMSNorm, routed experts renormalised (Qwen3-MoE).
//!
//! The inverse of the import: q/k rows permuted back to llama.cpp's RoPE pairing where the
//! architecture pairs adjacent elements (llama, bailingmoe), experts stacked into
//! `ffn_{gate,up,down}_exps`, norms in F32 and matrices in F32, F16 or a block format.

use super::quant;
use crate::{ferr, Result};
use infer::chat::ChatSpec;
use model::config::{QkNorm, RopeScaling, RouterScore};
use model::{Layout, ModelConfig};
use serde_json::Value as Json;
use std::path::Path;
use tokenizer::Tokenizer;

/// A metadata value to write.
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn put_meta(b: &mut Vec<u8>, key: &str, v: &Meta) {
    put_str(b, key);
    match v {
        Meta::U32(x) => {
            b.extend(4u32.to_le_bytes());
            b.extend(x.to_le_bytes());
        }
        Meta::F32(x) => {
            b.extend(6u32.to_le_bytes());
            b.extend(x.to_le_bytes());
        }
        Meta::Bool(x) => {
            b.extend(7u32.to_le_bytes());
            b.push(*x as u8);
        }
        Meta::Str(s) => {
            b.extend(8u32.to_le_bytes());
            put_str(b, s);
        }
        Meta::Strs(v) => {
            b.extend(9u32.to_le_bytes());
            b.extend(8u32.to_le_bytes());
            b.extend((v.len() as u64).to_le_bytes());
            for s in v {
                put_str(b, s);
            }
        }
        Meta::I32s(v) => {
            b.extend(9u32.to_le_bytes());
            b.extend(5u32.to_le_bytes());
            b.extend((v.len() as u64).to_le_bytes());
            for x in v {
                b.extend(x.to_le_bytes());
            }
        }
    }
}

/// A tensor to write: GGUF name, ggml dims (row length first), type, data.
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

const ALIGN: usize = 32;

/// The bytes of a GGUF v3 file.
pub fn encode(meta: &[(String, Meta)], tensors: &[Tensor]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(super::file::MAGIC);
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_meta(&mut b, k, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.ggml_type.to_le_bytes());
        b.extend((offset as u64).to_le_bytes());
        offset += t.data.len().div_ceil(ALIGN) * ALIGN;
    }
    b.resize(b.len().div_ceil(ALIGN) * ALIGN, 0);
    for t in tensors {
        b.extend(&t.data);
        b.resize(b.len().div_ceil(ALIGN) * ALIGN, 0);
    }
    b
}

/// The `tokenizer.ggml.pre` of a tokenizer.json's pre-tokenizer, if llama.cpp has one for it.
fn pre_name(tok_json: &Json) -> Option<&'static str> {
    let p = &tok_json["pre_tokenizer"];
    let byte_level = |x: &Json| x["type"] == "ByteLevel" && x["use_regex"] != false;
    match p["type"].as_str()? {
        "ByteLevel" if byte_level(p) => Some("gpt-2"),
        "Sequence" => {
            let s = p["pretokenizers"].as_array()?;
            match &s[..] {
                [d, bl]
                    if d["type"] == "Digits"
                        && d["individual_digits"] == true
                        && byte_level(bl) =>
                {
                    Some("smollm")
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// GGUF bytes of `cfg` / `params` with tokenizer `tok` and chat format `chat` (None:
/// moelab's, written as Jinja), matrices as `mat_type` (F32, F16, Q8_0, Q5_0, Q4_1 or Q4_0;
/// a quantized type applies to matrices whose rows are whole 32-value blocks, the others
/// are F16), norms in F32.
pub fn export(
    cfg: &ModelConfig,
    params: &[f32],
    tok: &Tokenizer,
    chat: Option<&ChatSpec>,
    mat_type: u32,
    what: &Path,
) -> Result<Vec<u8>> {
    let (meta, ts) = export_parts(cfg, params, tok, chat, mat_type, what)?;
    Ok(encode(&meta, &ts))
}

/// A GGUF file before encoding: its metadata and tensors.
pub type Parts = (Vec<(String, Meta)>, Vec<Tensor>);

/// The metadata and tensors [`export`] encodes (tests give some tensors other types, e.g.
/// K-quant blocks moelab cannot make itself).
pub fn export_parts(
    cfg: &ModelConfig,
    params: &[f32],
    tok: &Tokenizer,
    chat: Option<&ChatSpec>,
    mat_type: u32,
    what: &Path,
) -> Result<Parts> {
    if ![
        quant::F32,
        quant::F16,
        quant::Q8_0,
        quant::Q4_0,
        quant::Q4_1,
        quant::Q5_0,
    ]
    .contains(&mat_type)
    {
        return Err(ferr(
            what,
            format!("cannot write matrices as {}", quant::type_name(mat_type)),
        ));
    }
    let c = cfg;
    let refuse = |why: &str| {
        Err(ferr(
            what,
            format!("cannot export to GGUF: {why} (llama.cpp runs moelab models as llama, bailingmoe, qwen2moe or qwen3moe)"),
        ))
    };
    let arch = match Arch::of(c) {
        Ok(a) => a,
        Err(why) => return refuse(&why),
    };
    let tj: Json = serde_json::from_str(&tok.to_json()?).expect("tokenizer JSON");
    if tj["model"]["type"] != "BPE" {
        return refuse("a tokenizer that is not byte-level BPE");
    }
    let Some(pre) = pre_name(&tj) else {
        return refuse("a pre-tokenizer llama.cpp has no name for");
    };
    // vocabulary: every id's token string; ids past the tokenizer (a padded embedding) are
    // unused placeholders
    let mut tokens = vec![];
    let mut types = vec![];
    for id in 0..c.vocab_size as u32 {
        match tok.id_to_token(id) {
            Some(t) if (id as usize) < tok.vocab_size() => {
                types.push(if tok.is_control(id) {
                    3
                } else if tok.special(&t) == Some(id) {
                    4
                } else {
                    1
                });
                tokens.push(t);
            }
            _ => {
                tokens.push(format!("[PAD{id}]"));
                types.push(5);
            }
        }
    }
    let merges: Vec<String> = tj["model"]["merges"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| match m {
                    Json::String(s) => Some(s.clone()),
                    Json::Array(p) => Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let (template, bos, eos, eot) = match chat {
        Some(ch) => (
            ch.template.clone(),
            tok.special(&ch.bos_token),
            tok.special(&ch.eos_token),
            ch.stop.iter().find_map(|s| tok.special(s)),
        ),
        None => (
            crate::export::MOELAB_TEMPLATE.to_string(),
            // moelab starts a text with <|end|> (documents are separated by it in
            // training): llama.cpp adds it as the BOS token
            tok.special("<|end|>"),
            tok.special("<|end|>"),
            tok.special("<|end|>"),
        ),
    };
    let d = c.head_dim();
    let moe = c.n_experts > 0;
    let a = arch.name();
    let mut meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str(a.into())),
        (
            "general.name".into(),
            Meta::Str(
                what.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        ),
        (
            "general.file_type".into(),
            // llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q4_0, MOSTLY_Q4_1, MOSTLY_Q5_0,
            // MOSTLY_Q8_0
            Meta::U32(match mat_type {
                quant::F32 => 0,
                quant::F16 => 1,
                quant::Q4_0 => 2,
                quant::Q4_1 => 3,
                quant::Q5_0 => 8,
                _ => 7,
            }),
        ),
        (format!("{a}.vocab_size"), Meta::U32(c.vocab_size as u32)),
        (
            format!("{a}.context_length"),
            Meta::U32(c.max_seq_len as u32),
        ),
        (format!("{a}.embedding_length"), Meta::U32(c.d_model as u32)),
        (format!("{a}.block_count"), Meta::U32(c.n_layers as u32)),
        (
            format!("{a}.feed_forward_length"),
            Meta::U32(if moe { c.expert_hidden } else { c.ffn_hidden } as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            Meta::U32(c.n_heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Meta::U32(c.n_kv_heads as u32),
        ),
        (format!("{a}.attention.key_length"), Meta::U32(d as u32)),
        (format!("{a}.attention.value_length"), Meta::U32(d as u32)),
        (format!("{a}.rope.dimension_count"), Meta::U32(d as u32)),
        (format!("{a}.rope.freq_base"), Meta::F32(c.rope_theta)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Meta::F32(c.norm_eps),
        ),
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type".into(), Meta::I32s(types)),
        ("tokenizer.ggml.merges".into(), Meta::Strs(merges)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Meta::Bool(chat.is_none() || !tok.text_prefix().is_empty()),
        ),
        ("tokenizer.chat_template".into(), Meta::Str(template)),
    ];
    if moe {
        meta.push((format!("{a}.expert_count"), Meta::U32(c.n_experts as u32)));
        meta.push((format!("{a}.expert_used_count"), Meta::U32(c.top_k as u32)));
        meta.push((
            format!("{a}.expert_feed_forward_length"),
            Meta::U32(c.expert_hidden as u32),
        ));
    }
    // RoPE scaling as llama.cpp reads it: linear and YaRN as metadata (llama.cpp's YaRN
    // multiplies cos and sin by attn_factor * (1 + 0.1 ln factor)); Llama 3's as per-frequency
    // divisors in a rope_freqs tensor (below), as convert_hf_to_gguf.py writes it
    match &c.rope_scaling {
        None | Some(RopeScaling::Llama3 { .. }) => {}
        Some(RopeScaling::Linear { factor }) => {
            meta.push((format!("{a}.rope.scaling.type"), Meta::Str("linear".into())));
            meta.push((format!("{a}.rope.scaling.factor"), Meta::F32(*factor)));
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_seq_len,
            attention_factor,
            ..
        }) => {
            meta.push((format!("{a}.rope.scaling.type"), Meta::Str("yarn".into())));
            meta.push((format!("{a}.rope.scaling.factor"), Meta::F32(*factor)));
            meta.push((
                format!("{a}.rope.scaling.original_context_length"),
                Meta::U32(*original_max_seq_len as u32),
            ));
            if let Some(af) = attention_factor {
                meta.push((
                    format!("{a}.rope.scaling.attn_factor"),
                    Meta::F32(af / (1.0 + 0.1 * factor.ln())),
                ));
            }
        }
    }
    match arch {
        Arch::BailingMoe => {
            meta.push((
                format!("{a}.expert_shared_count"),
                Meta::U32((c.shared_hidden() / c.expert_hidden) as u32),
            ));
            meta.push((
                format!("{a}.expert_weights_norm"),
                Meta::Bool(c.renormalize),
            ));
            meta.push((
                format!("{a}.expert_weights_scale"),
                Meta::F32(c.routed_scaling_factor),
            ));
            meta.push((format!("{a}.leading_dense_block_count"), Meta::U32(0)));
        }
        Arch::Qwen2Moe => meta.push((
            format!("{a}.expert_shared_feed_forward_length"),
            Meta::U32(c.shared_hidden() as u32),
        )),
        Arch::Llama | Arch::Qwen3Moe => {}
    }
    for (k, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.eot_token_id", eot),
    ] {
        if let Some(id) = id {
            meta.push((k.into(), Meta::U32(id)));
        }
    }

    let layout = Layout::new(c);
    let get = |name: &str| layout.slice(params, name);
    let mat = |name: String, dims: Vec<u64>, v: &[f32]| {
        let t = match mat_type {
            quant::F32 | quant::F16 => mat_type,
            q if dims[0].is_multiple_of(32) => q,
            _ => quant::F16,
        };
        let data = match t {
            quant::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            quant::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            q => quant::quantize(q, v).expect("whole blocks"),
        };
        Tensor {
            name,
            dims,
            ggml_type: t,
            data,
        }
    };
    let vec32 = |name: String, v: &[f32]| Tensor {
        name,
        dims: vec![v.len() as u64],
        ggml_type: quant::F32,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let (cm, v, h, g) = (
        c.d_model as u64,
        c.vocab_size as u64,
        c.n_heads,
        c.n_kv_heads,
    );
    let mut ts = vec![mat(
        "token_embd.weight".into(),
        vec![cm, v],
        get("embed.weight"),
    )];
    // q/k rows (and biases) in llama.cpp's RoPE pairing where it pairs adjacent elements
    let rope = |w: &[f32], heads: usize, cols: usize| {
        if arch.pairs_adjacent() {
            permute(w, heads, cols)
        } else {
            w.to_vec()
        }
    };
    for l in 0..c.n_layers {
        let p = format!("layers.{l}");
        let b = format!("blk.{l}");
        ts.push(vec32(
            format!("{b}.attn_norm.weight"),
            get(&format!("{p}.attn_norm.weight")),
        ));
        let qkv = get(&format!("{p}.attn.wqkv.weight"));
        let (q, rest) = qkv.split_at(h * d * c.d_model);
        let (k, vv) = rest.split_at(g * d * c.d_model);
        ts.push(mat(
            format!("{b}.attn_q.weight"),
            vec![cm, (h * d) as u64],
            &rope(q, h, c.d_model),
        ));
        ts.push(mat(
            format!("{b}.attn_k.weight"),
            vec![cm, (g * d) as u64],
            &rope(k, g, c.d_model),
        ));
        ts.push(mat(
            format!("{b}.attn_v.weight"),
            vec![cm, (g * d) as u64],
            vv,
        ));
        if c.qkv_bias {
            let bias = get(&format!("{p}.attn.bqkv"));
            let (bq, rest) = bias.split_at(h * d);
            let (bk, bv) = rest.split_at(g * d);
            ts.push(vec32(format!("{b}.attn_q.bias"), &rope(bq, h, 1)));
            ts.push(vec32(format!("{b}.attn_k.bias"), &rope(bk, g, 1)));
            ts.push(vec32(format!("{b}.attn_v.bias"), bv));
        }
        if c.qk_norm == QkNorm::Head {
            for x in ["q", "k"] {
                ts.push(vec32(
                    format!("{b}.attn_{x}_norm.weight"),
                    get(&format!("{p}.attn.{x}_norm.weight")),
                ));
            }
        }
        ts.push(mat(
            format!("{b}.attn_output.weight"),
            vec![(h * d) as u64, cm],
            get(&format!("{p}.attn.wo.weight")),
        ));
        ts.push(vec32(
            format!("{b}.ffn_norm.weight"),
            get(&format!("{p}.ffn_norm.weight")),
        ));
        if moe {
            let (e, f) = (c.n_experts, c.expert_hidden);
            ts.push(mat(
                format!("{b}.ffn_gate_inp.weight"),
                vec![cm, e as u64],
                get(&format!("{p}.moe.router.weight")),
            ));
            let gu = get(&format!("{p}.moe.experts.w_gate_up"));
            let per = 2 * f * c.d_model;
            let (mut gate, mut up) = (vec![], vec![]);
            for x in gu.chunks_exact(per) {
                gate.extend_from_slice(&x[..per / 2]);
                up.extend_from_slice(&x[per / 2..]);
            }
            let dims = vec![cm, f as u64, e as u64];
            ts.push(mat(
                format!("{b}.ffn_gate_exps.weight"),
                dims.clone(),
                &gate,
            ));
            ts.push(mat(format!("{b}.ffn_up_exps.weight"), dims, &up));
            ts.push(mat(
                format!("{b}.ffn_down_exps.weight"),
                vec![f as u64, cm, e as u64],
                get(&format!("{p}.moe.experts.w_down")),
            ));
            if c.n_shared_experts > 0 {
                let fs = c.shared_hidden();
                let gu = get(&format!("{p}.moe.shared.w_gate_up.weight"));
                let (gate, up) = gu.split_at(fs * c.d_model);
                ts.push(mat(
                    format!("{b}.ffn_gate_shexp.weight"),
                    vec![cm, fs as u64],
                    gate,
                ));
                ts.push(mat(
                    format!("{b}.ffn_up_shexp.weight"),
                    vec![cm, fs as u64],
                    up,
                ));
                ts.push(mat(
                    format!("{b}.ffn_down_shexp.weight"),
                    vec![fs as u64, cm],
                    get(&format!("{p}.moe.shared.w_down.weight")),
                ));
                if c.shared_expert_gate {
                    ts.push(vec32(
                        format!("{b}.ffn_gate_inp_shexp.weight"),
                        get(&format!("{p}.moe.shared.gate.weight")),
                    ));
                }
            }
        } else {
            let f = c.ffn_hidden;
            let gu = get(&format!("{p}.mlp.w_gate_up.weight"));
            let (gate, up) = gu.split_at(f * c.d_model);
            ts.push(mat(
                format!("{b}.ffn_gate.weight"),
                vec![cm, f as u64],
                gate,
            ));
            ts.push(mat(format!("{b}.ffn_up.weight"), vec![cm, f as u64], up));
            ts.push(mat(
                format!("{b}.ffn_down.weight"),
                vec![f as u64, cm],
                get(&format!("{p}.mlp.w_down.weight")),
            ));
        }
    }
    ts.push(vec32("output_norm.weight".into(), get("norm.weight")));
    if let Some(s @ RopeScaling::Llama3 { .. }) = &c.rope_scaling {
        let (plain, _) = RopeScaling::inv_freq(None, d, c.rope_theta);
        let (scaled, _) = RopeScaling::inv_freq(Some(s), d, c.rope_theta);
        let div: Vec<f32> = plain
            .iter()
            .zip(&scaled)
            .map(|(p, s)| (p / s) as f32)
            .collect();
        ts.push(vec32("rope_freqs.weight".into(), &div));
    }
    // bailingmoe and qwen2moe require an output matrix: a tied one is written out
    if !c.tie_embeddings || arch.needs_output() {
        let name = if c.tie_embeddings {
            "embed.weight"
        } else {
            "lm_head.weight"
        };
        ts.push(mat("output.weight".into(), vec![cm, v], get(name)));
    }
    Ok((meta, ts))
}

/// The llama.cpp architecture a model is written as.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arch {
    Llama,
    BailingMoe,
    Qwen2Moe,
    Qwen3Moe,
}

impl Arch {
    /// `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::BailingMoe => "bailingmoe",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
        }
    }

    /// The architecture named `name`, if moelab reads it.
    pub fn from_name(name: &str) -> Option<Arch> {
        [
            Arch::Llama,
            Arch::BailingMoe,
            Arch::Qwen2Moe,
            Arch::Qwen3Moe,
        ]
        .into_iter()
        .find(|a| a.name() == name)
    }

    /// llama.cpp's RoPE for it pairs adjacent elements (LLAMA_ROPE_TYPE_NORM), so q/k rows
    /// are stored permuted; the Qwen ones pair halves as Hugging Face does (NEOX).
    pub fn pairs_adjacent(self) -> bool {
        matches!(self, Arch::Llama | Arch::BailingMoe)
    }

    fn needs_output(self) -> bool {
        matches!(self, Arch::BailingMoe | Arch::Qwen2Moe)
    }

    /// The architecture that computes `c`'s function, or why none does.
    pub fn of(c: &ModelConfig) -> std::result::Result<Arch, String> {
        let moe: Vec<bool> = (0..c.n_layers).map(|l| c.is_moe_layer(l)).collect();
        let any_moe = moe.iter().any(|&m| m);
        if any_moe && !moe.iter().all(|&m| m) {
            return Err("dense and MoE blocks mixed".into());
        }
        match &c.rope_scaling {
            Some(RopeScaling::Yarn {
                factor,
                beta_fast,
                beta_slow,
                truncate,
                ..
            }) if *factor < 1.0 || *beta_fast != 32.0 || *beta_slow != 1.0 || !*truncate => {
                return Err("YaRN with a factor below 1, beta_fast/beta_slow other than 32/1 or truncate = false (llama.cpp reads none of them from a GGUF file)".into());
            }
            Some(RopeScaling::Llama3 { .. }) if moe.iter().any(|&m| m) => {
                return Err("Llama 3 RoPE scaling in an MoE model (llama.cpp reads its frequency factors for llama blocks only)".into());
            }
            _ => {}
        }
        if c.sliding_window > 0 {
            // llama.cpp's llama, qwen2moe, qwen3moe and bailingmoe graphs attend to every key
            return Err(
                "sliding-window attention (llama.cpp's graphs for these architectures have none)"
                    .into(),
            );
        }
        if c.qk_norm == QkNorm::Projection {
            return Err("q/k norm over the whole projection (OLMoE)".into());
        }
        if any_moe && (c.router_score != RouterScore::Softmax || c.n_group != 1) {
            return Err("routing other than softmax top-k".into());
        }
        let plain = c.renormalize && c.routed_scaling_factor == 1.0;
        if c.qk_norm == QkNorm::Head {
            return match (any_moe, c.n_shared_experts, plain) {
                (true, 0, true) => Ok(Arch::Qwen3Moe),
                (false, ..) => Err("per-head q/k norm in a dense model".into()),
                (_, 0, _) => {
                    Err("per-head q/k norm with routing weights not renormalised or scaled".into())
                }
                _ => Err("per-head q/k norm with shared experts".into()),
            };
        }
        if !any_moe {
            return Ok(Arch::Llama);
        }
        if c.n_shared_experts == 0 {
            return if plain {
                Ok(Arch::Llama)
            } else {
                Err("routed experts whose weights are not renormalised, or scaled, without shared experts".into())
            };
        }
        if c.shared_expert_gate {
            return if !c.renormalize && c.routed_scaling_factor == 1.0 {
                Ok(Arch::Qwen2Moe)
            } else {
                Err("a gated shared expert with renormalised or scaled routing weights".into())
            };
        }
        if !c.shared_hidden().is_multiple_of(c.expert_hidden) {
            return Err("shared experts whose width is not a whole number of experts".into());
        }
        Ok(Arch::BailingMoe)
    }
}

/// Hugging Face q/k rows to llama.cpp's RoPE pairing (convert_hf_to_gguf.py's permute):
/// Hugging Face row `h*hd + j*hd/2 + i` becomes row `h*hd + 2i + j`.
fn permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let hd = w.len() / cols / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = (h * hd + j * hd / 2 + i) * cols;
                let dst = (h * hd + 2 * i + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}
