//! A Hugging Face model dir as `save_pretrained` writes it: `config.json` (transformers 4 or
//! 5 keys), `model.safetensors` or shards with `model.safetensors.index.json` (f32, f16 or
//! bf16; experts fused or per expert), `tokenizer.json`, and the chat template
//! (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) with the special
//! tokens it uses (`tokenizer_config.json`, `generation_config.json`).

use crate::run::{Imported, Source};
use crate::{ferr, Result};
use infer::chat::ChatSpec;
use model::hf::config_from_hf;
use model::tensors::SafetensorsDir;
use model::Layout;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use tokenizer::Tokenizer;

/// Contexts longer than this are capped on import unless asked for (`--context`): the KV
/// cache of every serving slot is allocated for the whole context.
pub const DEFAULT_MAX_CONTEXT: usize = 8192;

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ferr(path, format!("cannot read ({e})")))
}

fn read_json(path: &Path) -> Result<Option<(Value, Vec<u8>)>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read(path)?;
    let v = serde_json::from_slice(&bytes).map_err(|e| ferr(path, format!("not JSON ({e})")))?;
    Ok(Some((v, bytes)))
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A token as `tokenizer_config.json` spells it: a string or `{"content": ...}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Reads the model dir `dir`; `context` caps the context length (default: the model's,
/// at most [`DEFAULT_MAX_CONTEXT`]).
pub fn import_dir(dir: &Path, context: Option<usize>) -> Result<Imported> {
    let cfg_path = dir.join("config.json");
    let (cfg_json, cfg_bytes) = read_json(&cfg_path)?
        .ok_or_else(|| ferr(dir, "no config.json: not a Hugging Face model dir"))?;
    let mut sha256 = BTreeMap::new();
    sha256.insert("config.json".to_string(), sha(&cfg_bytes));
    let hf = config_from_hf(&cfg_json).map_err(|e| ferr(&cfg_path, e.to_string()))?;
    let mut config = hf.config.clone();
    config.max_seq_len = match context {
        Some(c) => c,
        None => config.max_seq_len.min(DEFAULT_MAX_CONTEXT),
    };
    config
        .validate()
        .map_err(|e| ferr(&cfg_path, e.to_string()))?;

    // tokenizer first: a mismatch is found before the weights are read
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(ferr(
            dir,
            "no tokenizer.json (moelab reads the fast-tokenizer file; older sentencepiece-only dirs are not supported)",
        ));
    }
    let tok_bytes = read(&tok_path)?;
    sha256.insert("tokenizer.json".to_string(), sha(&tok_bytes));
    let tok = Tokenizer::from_bytes(&tok_path, &tok_bytes)?;
    if tok.vocab_size() > config.vocab_size {
        return Err(ferr(
            &tok_path,
            format!(
                "has {} tokens but the model's vocab_size is {}: not this model's tokenizer",
                tok.vocab_size(),
                config.vocab_size
            ),
        ));
    }
    let chat = chat_spec(dir, &tok, &mut sha256)?;

    let st = SafetensorsDir::open(dir)?;
    for (name, h) in st.file_hashes() {
        sha256.insert(name, h);
    }
    let layout = Layout::new(&config);
    let params = hf.load_weights(&layout, &st)?;
    Ok(Imported {
        config,
        params,
        tokenizer_json: tok_bytes,
        chat: Some(chat),
        source: Source {
            format: "hf".into(),
            family: hf.family.name().into(),
            path: std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
                .to_string(),
            sha256,
            code_version: train::manifest::code_version(),
            quant: Default::default(),
        },
        quant_bytes: Default::default(),
    })
}

/// The chat format of a model dir: its template, the stop tokens (the EOS of
/// `tokenizer_config.json` and every `eos_token_id` of `generation_config.json`), the
/// reasoning markers when the vocabulary has `<think>` and `</think>`, and the text prefix
/// the tokenizer adds (a BOS).
fn chat_spec(
    dir: &Path,
    tok: &Tokenizer,
    sha256: &mut BTreeMap<String, String>,
) -> Result<ChatSpec> {
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json(&tc_path)?;
    if let Some((_, b)) = &tc {
        sha256.insert("tokenizer_config.json".into(), sha(b));
    }
    let tc = tc.map(|(v, _)| v).unwrap_or(Value::Null);
    let jinja = dir.join("chat_template.jinja");
    let template = if jinja.exists() {
        let b = read(&jinja)?;
        sha256.insert("chat_template.jinja".into(), sha(&b));
        String::from_utf8(b).map_err(|_| ferr(&jinja, "not UTF-8"))?
    } else {
        match tc.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            // a list of named templates: the default one
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        }
    };
    let bos = token_str(tc.get("bos_token")).unwrap_or_default();
    let eos = token_str(tc.get("eos_token")).unwrap_or_default();
    let mut stop: Vec<String> = vec![];
    let mut add = |s: String| {
        if !s.is_empty() && !stop.contains(&s) {
            stop.push(s);
        }
    };
    add(eos.clone());
    let gc_path = dir.join("generation_config.json");
    if let Some((gc, b)) = read_json(&gc_path)? {
        sha256.insert("generation_config.json".into(), sha(&b));
        let ids: Vec<u64> = match gc.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
            _ => vec![],
        };
        for id in ids {
            if let Some(s) = tok.id_to_token(id as u32) {
                add(s);
            }
        }
    }
    if stop.is_empty() {
        return Err(ferr(
            dir,
            "names no end-of-sequence token (tokenizer_config.json eos_token, generation_config.json eos_token_id): replies would never end",
        ));
    }
    let think = match (tok.special("<think>"), tok.special("</think>")) {
        (Some(_), Some(_)) => Some(["<think>".to_string(), "</think>".to_string()]),
        _ => None,
    };
    let prefix = tok
        .text_prefix()
        .into_iter()
        .filter_map(|id| tok.id_to_token(id))
        .collect();
    Ok(ChatSpec {
        template,
        bos_token: bos,
        eos_token: eos,
        stop,
        think,
        prefix,
    })
}
