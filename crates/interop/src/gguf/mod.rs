//! A GGUF file (llama.cpp's format) as a moelab run: metadata becomes the model config,
//! tensors are dequantized to the fp32 master copy (the llama architecture's q/k row
//! permutation undone), and the tokenizer is rebuilt from `tokenizer.ggml.*`.
//!
//! The mapping goes through Hugging Face names: the metadata is read as the `config.json`
//! transformers would have, and each Hugging Face tensor is found under its GGUF name. So a
//! GGUF model and its Hugging Face original share `model::hf`'s mapping, which the golden
//! tests prove against transformers.
//!
//! Architectures: `llama` (Llama, SmolLM, Mistral-style dense models and Mixtral, which
//! GGUF stores as llama with experts), `qwen2moe`, `qwen3moe` and `bailingmoe` (what moelab
//! writes for its shared-expert models). Others are refused by name.

pub mod file;
pub mod quant;
mod tokenizer;
pub mod write;

pub use tokenizer::build as tokenizer;

use crate::run::{Imported, Source};
use crate::{ferr, Result};
use file::{GgufFile, Value};
use infer::chat::ChatSpec;
use model::hf::{config_from_hf, HfModel};
use model::Layout;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Reads the GGUF file at `path`; `context` caps the context length as for Hugging Face
/// dirs.
pub fn import_file(path: &Path, context: Option<usize>) -> Result<Imported> {
    let f = GgufFile::open(path)?;
    let arch = f
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(arch) = write::Arch::from_name(&arch) else {
        return Err(ferr(
            path,
            format!("general.architecture \"{arch}\" is not supported (moelab reads llama: Llama, SmolLM, Mixtral; qwen2moe; qwen3moe; bailingmoe)"),
        ));
    };
    let tok = tokenizer::build(&f)?;
    let hf_json = hf_config(&f, arch, tok.vocab_size())?;
    let mut hf = config_from_hf(&hf_json).map_err(|e| ferr(path, e.to_string()))?;
    adapt_config(&f, arch, &mut hf.config)?;
    let mut config = hf.config.clone();
    config.max_seq_len = match context {
        Some(c) => c,
        None => config.max_seq_len.min(crate::hf::DEFAULT_MAX_CONTEXT),
    };
    config.validate().map_err(|e| ferr(path, e.to_string()))?;
    let layout = Layout::new(&config);
    let params = load_weights(&f, &hf, arch, &layout)?;
    let (quant, quant_bytes) = matrix_types(&f, &layout, &params);
    let tokenizer_json = tok
        .to_json()
        .map_err(|e| ferr(path, e.to_string()))?
        .into_bytes();
    let chat = chat_spec(&f, &tok);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Imported {
        config,
        params,
        tokenizer_json,
        chat: Some(chat),
        source: Source {
            format: "gguf".into(),
            family: match arch {
                write::Arch::BailingMoe => arch.name().into(),
                _ => hf.family.name().into(),
            },
            path: std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.to_path_buf())
                .display()
                .to_string(),
            sha256: BTreeMap::from([(name, f.sha256())]),
            code_version: train::manifest::code_version(),
            quant,
        },
        quant_bytes,
    })
}

fn meta_u64(f: &GgufFile, key: &str) -> Result<u64> {
    f.get(key).and_then(Value::as_u64).ok_or_else(|| {
        ferr(
            &f.path,
            format!("metadata {key} is missing or not an integer"),
        )
    })
}

fn meta_f64(f: &GgufFile, key: &str, default: f64) -> f64 {
    f.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// The quantized type each moelab matrix takes to run as the file holds it, with the file's
/// bytes of the matrices that run as K-quants: a fused matrix (q/k/v, gate/up) takes the
/// most precise of its parts' types; Q8_0, Q5_0, Q4_1 and Q4_0 are kept (moelab's quantizers
/// give back the file's bytes from the f32 weights); a K-quant (Q4_K, Q6_K) is kept as the
/// file's bytes when all of a matrix's parts have it, and runs as Q8_0 (at least as precise)
/// beside other types; float tensors stay f32.
fn matrix_types(
    f: &GgufFile,
    layout: &Layout,
    params: &[f32],
) -> (BTreeMap<String, String>, BTreeMap<String, Vec<u8>>) {
    use kernels::quant::QType;
    // precision rank: f32 (None) above Q8_0 above Q6_K above Q5_0 above Q4_K above Q4_1
    // above Q4_0
    let rank = |q: Option<QType>| match q {
        None => 6,
        Some(QType::Q8_0) => 5,
        Some(QType::Q6_K) => 4,
        Some(QType::Q5_0) => 3,
        Some(QType::Q4_K) => 2,
        Some(QType::Q4_1) => 1,
        Some(QType::Q4_0) => 0,
    };
    let of = |name: &str| -> Option<Option<QType>> {
        let t = f.tensor(name)?.ggml_type;
        Some(match t {
            quant::F32 | quant::F16 | quant::BF16 => None,
            _ => Some(QType::from_ggml(t).unwrap_or(QType::Q8_0)),
        })
    };
    let mut out = BTreeMap::new();
    let mut raw = BTreeMap::new();
    for t in &layout.tensors {
        let head = t.offset == layout.lm_head;
        let name = if head {
            "lm_head.weight"
        } else {
            t.name.as_str()
        };
        let parts: Vec<String> = if head {
            let o = if f.tensor("output.weight").is_some() {
                "output.weight"
            } else {
                "token_embd.weight"
            };
            vec![o.to_string()]
        } else {
            let Some((l, part)) = t
                .name
                .strip_prefix("layers.")
                .and_then(|r| r.split_once('.'))
            else {
                continue;
            };
            let g: &[&str] = match part {
                "attn.wqkv.weight" => &["attn_q", "attn_k", "attn_v"],
                "attn.wo.weight" => &["attn_output"],
                "mlp.w_gate_up.weight" => &["ffn_gate", "ffn_up"],
                "mlp.w_down.weight" => &["ffn_down"],
                "moe.experts.w_gate_up" => &["ffn_gate_exps", "ffn_up_exps"],
                "moe.experts.w_down" => &["ffn_down_exps"],
                "moe.shared.w_gate_up.weight" => &["ffn_gate_shexp", "ffn_up_shexp"],
                "moe.shared.w_down.weight" => &["ffn_down_shexp"],
                _ => continue,
            };
            g.iter().map(|p| format!("blk.{l}.{p}.weight")).collect()
        };
        let Some(types) = parts.iter().map(|p| of(p)).collect::<Option<Vec<_>>>() else {
            continue;
        };
        let k = match types[0] {
            Some(q) if !q.quantizable() && types.iter().all(|&t| t == types[0]) => Some(q),
            _ => None,
        };
        let kept = k.and_then(|q| {
            let w = &params[t.offset..t.offset + t.len];
            let bytes = file_rows(f, &parts, q, w, *t.shape.last().unwrap_or(&1))?;
            raw.insert(name.to_string(), bytes);
            Some(q)
        });
        let ty = kept.or_else(|| {
            // K-quants beside other types, or whose rows were not found, run as Q8_0
            let as_q = |q: Option<QType>| q.map(|q| if q.quantizable() { q } else { QType::Q8_0 });
            types
                .into_iter()
                .map(as_q)
                .max_by_key(|&q| rank(q))
                .flatten()
        });
        if let Some(q) = ty {
            out.insert(name.to_string(), q.name().to_string());
        }
    }
    (out, raw)
}

/// The file's bytes of the rows of moelab matrix `w` (`cols` columns), which came from the
/// tensors `parts`, all of K-quant type `ty`: each row is found among the parts' rows by its
/// dequantized values (whatever permutation, fusing or expert order the import applied), so
/// the kernels run on exactly the file's blocks. Rows are dequantized one at a time from the
/// file's bytes (no f32 copy of the parts is kept). None if a row is not found.
fn file_rows(
    f: &GgufFile,
    parts: &[String],
    ty: kernels::quant::QType,
    w: &[f32],
    cols: usize,
) -> Option<Vec<u8>> {
    use std::collections::HashMap;
    use std::hash::{DefaultHasher, Hash, Hasher};
    let key = |r: &[f32]| {
        let mut h = DefaultHasher::new();
        r.iter().for_each(|v| v.to_bits().hash(&mut h));
        h.finish()
    };
    let rb = ty.row_bytes(cols);
    let mut data = vec![];
    for p in parts {
        let info = f.tensor(p)?;
        if info.ggml_type != ty.ggml_type() || info.dims.first().copied() != Some(cols as u64) {
            return None;
        }
        data.push(f.data(info));
    }
    let mut row = vec![0f32; cols];
    let mut index: HashMap<u64, Vec<(usize, usize)>> = HashMap::new();
    for (pi, d) in data.iter().enumerate() {
        for (r, b) in d.chunks_exact(rb).enumerate() {
            kernels::quant::dequantize_row(ty, b, &mut row);
            index.entry(key(&row)).or_default().push((pi, r));
        }
    }
    let mut out = Vec::with_capacity(w.len() / cols * rb);
    for want in w.chunks_exact(cols) {
        let &(pi, r) = index.get(&key(want))?.iter().find(|&&(pi, r)| {
            kernels::quant::dequantize_row(ty, &data[pi][r * rb..(r + 1) * rb], &mut row);
            row.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        })?;
        out.extend_from_slice(&data[pi][r * rb..(r + 1) * rb]);
    }
    Some(out)
}

/// A GGUF file's RoPE scaling as a Hugging Face `rope_scaling` object: linear and YaRN
/// from the metadata (llama.cpp's YaRN multiplies cos and sin by `attn_factor * (1 + 0.1 ln
/// factor)`, transformers' by `attention_factor`), Llama 3's from the per-frequency
/// divisors of a `rope_freqs` tensor (the parameters that reproduce them; refused when none
/// do).
fn rope_scaling(
    f: &GgufFile,
    k: &dyn Fn(&str) -> String,
    heads: u64,
    hidden: u64,
) -> Result<Option<serde_json::Value>> {
    let refuse = |key: &str, why: String| Err(ferr(&f.path, format!("{}: {why}", k(key))));
    let ctx = f.get(&k("context_length")).and_then(Value::as_u64);
    let orig = f
        .get(&k("rope.scaling.original_context_length"))
        .and_then(Value::as_u64)
        .or(ctx);
    let factor = f
        .get(&k("rope.scaling.factor"))
        .or(f.get(&k("rope.scale_linear")))
        .and_then(Value::as_f64)
        .filter(|&x| x != 0.0);
    let kind = f
        .get(&k("rope.scaling.type"))
        .and_then(Value::as_str)
        .unwrap_or("linear");
    let scaled = match (kind, factor) {
        ("none", _) | ("linear", None) => None,
        ("linear", Some(1.0)) => None,
        ("linear", Some(x)) => Some(json!({"rope_type": "linear", "factor": x})),
        ("yarn", Some(x)) => {
            if f
                .get(&k("rope.scaling.yarn_log_multiplier"))
                .and_then(Value::as_f64)
                .is_some_and(|m| m != 0.0)
            {
                return refuse(
                    "rope.scaling.yarn_log_multiplier",
                    "DeepSeek's YaRN attention scaling is not supported yet".into(),
                );
            }
            let mut r = json!({"rope_type": "yarn", "factor": x});
            if let Some(o) = orig {
                r["original_max_position_embeddings"] = json!(o);
            }
            if let Some(af) = f.get(&k("rope.scaling.attn_factor")).and_then(Value::as_f64) {
                if af != 1.0 {
                    r["attention_factor"] = json!(af * (1.0 + 0.1 * x.ln()));
                }
            }
            for (key, name) in [
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ] {
                if let Some(b) = f.get(&k(key)).and_then(Value::as_f64) {
                    r[name] = json!(b);
                }
            }
            Some(r)
        }
        (t, _) => {
            return refuse(
                "rope.scaling.type",
                format!("RoPE scaling \"{t}\" is not supported yet (linear, yarn, and Llama 3's rope_freqs)"),
            )
        }
    };
    let Some(div) = f.f32("rope_freqs.weight")? else {
        return Ok(scaled);
    };
    if scaled.is_some() {
        return refuse(
            "rope.scaling.type",
            "both scaling metadata and a rope_freqs tensor".into(),
        );
    }
    let d = f
        .get(&k("rope.dimension_count"))
        .and_then(Value::as_u64)
        .unwrap_or(hidden.checked_div(heads).unwrap_or(0)) as usize;
    let theta = meta_f64(f, &k("rope.freq_base"), 10000.0) as f32;
    match llama3_from_divisors(&div, d, theta, orig.unwrap_or(8192) as usize) {
        Some(None) => Ok(None),
        Some(Some(s)) => {
            let model::config::RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_seq_len,
            } = s
            else {
                unreachable!()
            };
            Ok(Some(json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_seq_len,
            })))
        }
        None => Err(ferr(
            &f.path,
            "rope_freqs.weight: per-frequency RoPE divisors that do not follow Llama 3's rule are not supported",
        )),
    }
}

/// Llama 3's RoPE scaling parameters that give the per-frequency divisors `div` (of head
/// dim `d`, base `theta`), with `original_max_seq_len` = `orig` (any value gives the same
/// frequencies with matching low/high factors). `Some(None)`: all divisors are 1; `None`:
/// no parameters reproduce them (to 1e-4).
pub fn llama3_from_divisors(
    div: &[f32],
    d: usize,
    theta: f32,
    orig: usize,
) -> Option<Option<model::config::RopeScaling>> {
    use model::config::RopeScaling;
    if div.len() != d / 2 || div.is_empty() || div.iter().any(|&x| !(x >= 1.0 && x.is_finite())) {
        return None;
    }
    let factor = div.iter().fold(1.0f32, |m, &x| m.max(x)) as f64;
    if factor == 1.0 {
        return Some(None);
    }
    let (plain, _) = RopeScaling::inv_freq(None, d, theta);
    // x = 1 / wavelength; the blend s = (1/r - 1/factor) / (1 - 1/factor) is linear in x
    // between the kept (r = 1, high x) and the divided (r = factor, low x) frequencies
    let x: Vec<f64> = plain
        .iter()
        .map(|f| f / (2.0 * std::f64::consts::PI))
        .collect();
    let r: Vec<f64> = div.iter().map(|&v| v as f64).collect();
    let tol = 1e-5 * factor;
    let mid: Vec<usize> = (0..r.len())
        .filter(|&i| r[i] > 1.0 + tol && r[i] < factor - tol)
        .collect();
    let blend = |i: usize| (1.0 / r[i] - 1.0 / factor) / (1.0 - 1.0 / factor);
    let divided_x = (0..r.len())
        .filter(|&i| r[i] >= factor - tol)
        .map(|i| x[i])
        .fold(f64::MIN, f64::max);
    let kept_x = (0..r.len())
        .filter(|&i| r[i] <= 1.0 + tol)
        .map(|i| x[i])
        .fold(f64::MAX, f64::min);
    let lo_x = if divided_x == f64::MIN {
        x.iter().fold(f64::MAX, |m, &v| m.min(v)) / 2.0
    } else {
        divided_x
    };
    let hi_x = if kept_x == f64::MAX {
        x.iter().fold(0.0, |m: f64, &v| m.max(v)) * 2.0
    } else {
        kept_x
    };
    // where the blend is 0 (x0) and 1 (x1)
    let (x0, x1) = match mid.len() {
        0 => (lo_x + (hi_x - lo_x) / 3.0, lo_x + 2.0 * (hi_x - lo_x) / 3.0),
        1 => {
            let (p, sp) = (x[mid[0]], blend(mid[0]));
            let delta = 0.5 * (p - lo_x).min(hi_x - p);
            (p - sp * delta, p + (1.0 - sp) * delta)
        }
        n => {
            // least squares s = a x - b
            let (mx, ms) = (
                mid.iter().map(|&i| x[i]).sum::<f64>() / n as f64,
                mid.iter().map(|&i| blend(i)).sum::<f64>() / n as f64,
            );
            let cov: f64 = mid.iter().map(|&i| (x[i] - mx) * (blend(i) - ms)).sum();
            let var: f64 = mid.iter().map(|&i| (x[i] - mx).powi(2)).sum();
            let a = cov / var;
            let b = a * mx - ms;
            (b / a, (1.0 + b) / a)
        }
    };
    if !(x0 > 0.0 && x1 > x0) {
        return None;
    }
    let o = orig as f64;
    let s = RopeScaling::Llama3 {
        factor: factor as f32,
        low_freq_factor: (x0 * o) as f32,
        high_freq_factor: (x1 * o) as f32,
        original_max_seq_len: orig,
    };
    let (scaled, _) = RopeScaling::inv_freq(Some(&s), d, theta);
    let fits = plain
        .iter()
        .zip(&scaled)
        .zip(&r)
        .all(|((p, q), r)| ((p / q) / r - 1.0).abs() < 1e-4);
    fits.then_some(Some(s))
}

/// The metadata as the Hugging Face `config.json` of the same model (bailingmoe reads as
/// Qwen2-MoE, whose tensor names it shares; `adapt_config` then makes its shared experts
/// ungated).
fn hf_config(f: &GgufFile, arch: write::Arch, vocab: usize) -> Result<serde_json::Value> {
    use write::Arch;
    let k = |s: &str| format!("{}.{s}", arch.name());
    let heads = meta_u64(f, &k("attention.head_count"))?;
    let experts = f
        .get(&k("expert_count"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let hidden = meta_u64(f, &k("embedding_length"))?;
    let model_type = match arch {
        Arch::Llama if experts > 1 => "mixtral",
        Arch::Llama => "llama",
        Arch::Qwen2Moe | Arch::BailingMoe => "qwen2_moe",
        Arch::Qwen3Moe => "qwen3_moe",
    };
    let mut c = json!({
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta_u64(f, &k("feed_forward_length"))?,
        "num_hidden_layers": meta_u64(f, &k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": f.get(&k("attention.head_count_kv")).and_then(Value::as_u64).unwrap_or(heads),
        "max_position_embeddings": meta_u64(f, &k("context_length"))?,
        "rms_norm_eps": meta_f64(f, &k("attention.layer_norm_rms_epsilon"), 1e-5),
        "rope_theta": meta_f64(f, &k("rope.freq_base"), 10000.0),
        "tie_word_embeddings": f.tensor("output.weight").is_none(),
        "hidden_act": "silu",
    });
    if let Some(hd) = f.get(&k("attention.key_length")).and_then(Value::as_u64) {
        c["head_dim"] = json!(hd);
    }
    if let Some(r) = rope_scaling(f, &k, heads, hidden)? {
        c["rope_scaling"] = r;
    }
    if arch != Arch::Llama && experts == 0 {
        return Err(ferr(
            &f.path,
            format!("{}: an MoE architecture without experts", k("expert_count")),
        ));
    }
    if experts > 1 || arch != Arch::Llama {
        c["num_local_experts"] = json!(experts);
        c["num_experts_per_tok"] = json!(meta_u64(f, &k("expert_used_count"))?);
        let ff = f
            .get(&k("expert_feed_forward_length"))
            .and_then(Value::as_u64);
        match arch {
            Arch::Llama => {
                if let Some(ff) = ff {
                    c["intermediate_size"] = json!(ff);
                }
            }
            _ => {
                c["moe_intermediate_size"] =
                    json!(ff.unwrap_or(c["intermediate_size"].as_u64().unwrap_or(0)))
            }
        }
        let ff = c["moe_intermediate_size"].as_u64().unwrap_or(0);
        match arch {
            Arch::Qwen2Moe => {
                c["norm_topk_prob"] = json!(false);
                c["shared_expert_intermediate_size"] = json!(f
                    .get(&k("expert_shared_feed_forward_length"))
                    .and_then(Value::as_u64)
                    .unwrap_or(c["intermediate_size"].as_u64().unwrap_or(0)));
            }
            Arch::BailingMoe => {
                c["norm_topk_prob"] = json!(f
                    .get(&k("expert_weights_norm"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false));
                c["shared_expert_intermediate_size"] =
                    json!(meta_u64(f, &k("expert_shared_count"))?.saturating_mul(ff));
            }
            Arch::Qwen3Moe => c["norm_topk_prob"] = json!(true),
            Arch::Llama => {}
        }
    }
    Ok(c)
}

/// What the Hugging Face config cannot say: bailingmoe's shared experts are ungated (and
/// counted, and its routed weights scaled); q/k/v biases are there when their tensors are.
fn adapt_config(f: &GgufFile, arch: write::Arch, c: &mut model::ModelConfig) -> Result<()> {
    let k = |s: &str| format!("{}.{s}", arch.name());
    if arch == write::Arch::BailingMoe {
        if meta_u64(f, &k("leading_dense_block_count")).unwrap_or(0) != 0 {
            return Err(ferr(
                &f.path,
                format!(
                    "{}: leading dense blocks are not supported",
                    k("leading_dense_block_count")
                ),
            ));
        }
        c.shared_expert_gate = false;
        c.n_shared_experts = meta_u64(f, &k("expert_shared_count"))? as usize;
        c.shared_expert_hidden = None;
        let scale = meta_f64(f, &k("expert_weights_scale"), 0.0) as f32;
        // llama.cpp scales only by a factor other than 0 and 1
        c.routed_scaling_factor = if scale == 0.0 { 1.0 } else { scale };
    }
    c.qkv_bias = f.tensor("blk.0.attn_q.bias").is_some();
    Ok(())
}

/// GGUF's name of a Hugging Face tensor name (llama architecture).
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = fixed {
        return Some(s.into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (l, part) = rest.split_once('.')?;
    let g = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight" => "ffn_gate_inp_shexp.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "mlp.gate.weight" => "ffn_gate_inp.weight",
        "mlp.experts.down_proj" => "ffn_down_exps.weight",
        _ => return None,
    };
    Some(format!("blk.{l}.{g}"))
}

/// Undoes convert_hf_to_gguf.py's permutation of q/k rows (llama.cpp's RoPE pairs
/// adjacent elements, Hugging Face's pairs halves): GGUF row `h*hd + 2i + j` is Hugging
/// Face row `h*hd + j*hd/2 + i`.
fn unpermute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * hd / 2 + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn load_weights(
    f: &GgufFile,
    hf: &HfModel,
    arch: write::Arch,
    layout: &Layout,
) -> Result<Vec<f32>> {
    let c = &hf.config;
    let get = |name: &str| -> Result<Option<Vec<f32>>> {
        // fused experts: per expert, its gate rows then its up rows
        if let Some(l) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.strip_suffix(".mlp.experts.gate_up_proj"))
        {
            let (Some(g), Some(u)) = (
                f.f32(&format!("blk.{l}.ffn_gate_exps.weight"))?,
                f.f32(&format!("blk.{l}.ffn_up_exps.weight"))?,
            ) else {
                return Ok(None);
            };
            if g.len() != u.len() || !g.len().is_multiple_of(c.n_experts) {
                return Err(ferr(
                    &f.path,
                    format!(
                        "blk.{l}.ffn_gate_exps ({} values) and ffn_up_exps ({}) do not split into {} experts alike",
                        g.len(),
                        u.len(),
                        c.n_experts
                    ),
                ));
            }
            let per = g.len() / c.n_experts;
            let mut v = Vec::with_capacity(2 * g.len());
            for e in 0..c.n_experts {
                v.extend_from_slice(&g[e * per..(e + 1) * per]);
                v.extend_from_slice(&u[e * per..(e + 1) * per]);
            }
            return Ok(Some(v));
        }
        let Some(g) = gguf_name(name) else {
            return Ok(None);
        };
        let Some(w) = f.f32(&g)? else {
            return Ok(None);
        };
        let heads = if name.contains("self_attn.q_proj.") {
            c.n_heads
        } else if name.contains("self_attn.k_proj.") {
            c.n_kv_heads
        } else {
            0
        };
        // (a tensor not of whole heads is left as it is, for the shape check to name)
        let whole = heads > 0 && !w.is_empty() && w.len().is_multiple_of(heads * c.head_dim());
        Ok(Some(if whole && arch.pairs_adjacent() {
            unpermute(&w, heads, w.len() / (heads * c.head_dim()))
        } else {
            w
        }))
    };
    // a mapping error (a missing or misshapen tensor) names the file
    hf.try_assemble(layout, get).map_err(|e| match e {
        crate::Error::Model(m) => ferr(&f.path, m.to_string()),
        e => e,
    })
}

/// The chat format from `tokenizer.chat_template` and the EOS (plus, as llama.cpp does,
/// the end-of-turn token `tokenizer.ggml.eot_token_id` when set).
fn chat_spec(f: &GgufFile, tok: &::tokenizer::Tokenizer) -> ChatSpec {
    let tname = |key: &str| {
        f.get(key)
            .and_then(Value::as_u64)
            .and_then(|id| tok.id_to_token(id as u32))
    };
    let bos = tname("tokenizer.ggml.bos_token_id").unwrap_or_default();
    let eos = tname("tokenizer.ggml.eos_token_id").unwrap_or_default();
    let mut stop = vec![];
    for s in [Some(eos.clone()), tname("tokenizer.ggml.eot_token_id")]
        .into_iter()
        .flatten()
    {
        if !s.is_empty() && !stop.contains(&s) {
            stop.push(s);
        }
    }
    let think = match (tok.special("<think>"), tok.special("</think>")) {
        (Some(_), Some(_)) => Some(["<think>".to_string(), "</think>".to_string()]),
        _ => None,
    };
    ChatSpec {
        template: f
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        bos_token: bos,
        eos_token: eos,
        stop,
        think,
        prefix: tok
            .text_prefix()
            .into_iter()
            .filter_map(|id| tok.id_to_token(id))
            .collect(),
    }
}
