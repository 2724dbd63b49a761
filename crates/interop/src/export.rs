//! A moelab run as a Hugging Face model dir that `transformers` loads with
//! `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`: config.json
//! (the family `model::hf::to_hf` picks), model.safetensors (f32, f16 or bf16; experts per
//! expert, as `save_pretrained` writes them), tokenizer.json, tokenizer_config.json (with
//! the chat template: the run's own, or moelab's format written as Jinja) and
//! generation_config.json. Written into a temp dir renamed into place.

use crate::run::map_data;
use crate::{ferr, Result};
use infer::chat::ChatSpec;
use model::hf::to_hf;
use model::{Layout, ModelConfig};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use tokenizer::Tokenizer;

/// moelab's chat format as a Jinja template (what `infer::chat::render_prompt` emits).
pub const MOELAB_TEMPLATE: &str = "{% for m in messages %}{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}{% elif m['role'] == 'assistant' %}<|assistant|><think></think>{{ m['content'] }}<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
    Bf16,
}

impl ExportDtype {
    pub fn parse(s: &str) -> Option<ExportDtype> {
        match s {
            "f32" | "float32" => Some(ExportDtype::F32),
            "f16" | "float16" => Some(ExportDtype::F16),
            "bf16" | "bfloat16" => Some(ExportDtype::Bf16),
            _ => None,
        }
    }
    fn torch(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::F16 => "float16",
            ExportDtype::Bf16 => "bfloat16",
        }
    }
}

fn bytes(v: &[f32], dt: ExportDtype) -> (Dtype, Vec<u8>) {
    match dt {
        ExportDtype::F32 => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ExportDtype::F16 => (
            Dtype::F16,
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
        ),
        ExportDtype::Bf16 => (
            Dtype::BF16,
            v.iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        ),
    }
}

/// Writes the model `cfg` / `params` with tokenizer `tok` (and chat format `chat`, None
/// for moelab's) as a Hugging Face dir at `out` (which must not exist). Returns the family.
pub fn write_hf(
    cfg: &ModelConfig,
    params: &[f32],
    tok: &Tokenizer,
    chat: Option<&ChatSpec>,
    dtype: ExportDtype,
    out: &Path,
) -> Result<&'static str> {
    let (hf, mut config) = to_hf(cfg).map_err(|e| ferr(out, format!("cannot export: {e}")))?;
    if out.exists() {
        return Err(ferr(out, "already exists; choose a new --out"));
    }
    config["dtype"] = json!(dtype.torch());
    config["transformers_version"] = json!("5.24.0");
    // special tokens: moelab's format, or the imported model's own
    let (template, bos, eos, stops): (String, String, String, Vec<String>) = match chat {
        Some(c) => (
            c.template.clone(),
            c.bos_token.clone(),
            c.eos_token.clone(),
            c.stop.clone(),
        ),
        None => (
            MOELAB_TEMPLATE.to_string(),
            String::new(),
            "<|end|>".to_string(),
            vec!["<|end|>".to_string()],
        ),
    };
    let id = |s: &str| tok.special(s).map(|i| json!(i)).unwrap_or(json!(null));
    let eos_ids: Vec<serde_json::Value> = stops.iter().map(|s| id(s)).collect();
    config["bos_token_id"] = if bos.is_empty() {
        json!(null)
    } else {
        id(&bos)
    };
    config["eos_token_id"] = id(&eos);

    let layout = Layout::new(cfg);
    let tensors = hf.disassemble(&layout, params);
    let encoded: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| {
            let (dt, b) = bytes(&v, dtype);
            (n, s, dt, b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, s, dt, b)| {
            (
                n.clone(),
                TensorView::new(*dt, s.clone(), b).expect("shape fits"),
            )
        })
        .collect();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st = safetensors::serialize(views, &Some(meta))
        .map_err(|e| ferr(out, format!("safetensors: {e}")))?;

    let tok_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": if bos.is_empty() { json!(null) } else { json!(bos) },
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": null,
        "chat_template": template,
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": false,
    });
    let gen = json!({
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": eos_ids,
    });
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| ferr(&parent, e.to_string()))?;
    let name = out.file_name().ok_or_else(|| ferr(out, "not a dir name"))?;
    let tmp = parent.join(format!(
        ".{}.export-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let res = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| ferr(&tmp, e.to_string()))?;
        // each file synced, then the dir and (after the rename) its parent: a finished export
        // does not come back after a power loss with an empty model.safetensors
        let put = |f: &str, b: &[u8]| data::write_atomic(&tmp.join(f), b).map_err(map_data);
        put(
            "config.json",
            serde_json::to_string_pretty(&config)
                .expect("json")
                .as_bytes(),
        )?;
        put("model.safetensors", &st)?;
        put("tokenizer.json", tok.to_json()?.as_bytes())?;
        put(
            "tokenizer_config.json",
            serde_json::to_string_pretty(&tok_config)
                .expect("json")
                .as_bytes(),
        )?;
        put(
            "generation_config.json",
            serde_json::to_string_pretty(&gen).expect("json").as_bytes(),
        )?;
        data::sync_dir(&tmp).map_err(map_data)?;
        std::fs::rename(&tmp, out)
            .map_err(|e| ferr(out, format!("cannot move into place ({e})")))?;
        data::sync_dir(&parent).map_err(map_data)
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res.map(|_| hf.family.name())
}
