//! What the interop suites share: fixture paths, temp dirs, JSON helpers, a moelab
//! tokenizer and tiny model shapes, and decoding (log-probabilities, greedy tokens).
#![allow(dead_code)] // each test binary uses its own subset

use infer::chat::{Message, Role};
use model::decode::Decoder;
use model::ModelConfig;
use serde_json::Value;
use std::path::PathBuf;
use tokenizer::Tokenizer;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/golden/<dir>/<name>`.
pub fn golden(dir: &str, name: &str) -> PathBuf {
    root().join("tests/golden").join(dir).join(name)
}

/// A fresh temp path for this process (removed if it exists).
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moelab-interop-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn read_json(p: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A JSON list of `{"role", "content"}` messages.
pub fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            Message::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

/// A moelab tokenizer (digits split) trained on a fixed text: the same bytes every run.
pub fn tokenizer() -> Tokenizer {
    Tokenizer::train_with([TEXT; 8].into_iter(), 300, true).unwrap()
}

const TEXT: &str = "The quick brown fox jumps over the lazy dog. What is 12 + 34? It is 46. \
                    Mixture of experts routes each token to a few experts.";

/// As [`tokenizer`] without splitting digits: GPT-2's pre-tokenization.
#[allow(dead_code)]
pub fn plain_tokenizer() -> Tokenizer {
    Tokenizer::train_with([TEXT; 8].into_iter(), 300, false).unwrap()
}

/// A tiny model: dense with tied embeddings, or 8 routed experts (top-2) with `shared`
/// ungated shared experts; init std 0.2 so the logits are far from uniform.
pub fn config(moe: bool, shared: usize, vocab: usize) -> ModelConfig {
    let toml = if moe {
        format!("[model]\nvocab_size = {vocab}\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nmax_seq_len = 64\nffn_hidden = 64\nn_experts = 8\ntop_k = 2\nexpert_hidden = 16\nn_shared_experts = {shared}\nrouter_score = \"softmax\"\nrenormalize = true\ninit_std = 0.2\n")
    } else {
        format!("[model]\nvocab_size = {vocab}\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nmax_seq_len = 64\nffn_hidden = 64\nn_experts = 0\ntie_embeddings = true\ninit_std = 0.2\n")
    };
    model::Config::from_toml(&(toml + "[train]\nseq_len = 32\n"))
        .unwrap()
        .model
}

/// Log-softmax (f64) of the logits after feeding `prompt`.
pub fn logprobs(cfg: &ModelConfig, params: &[f32], prompt: &[u32]) -> Vec<f64> {
    let mut d = Decoder::new(cfg);
    let l = d.feed(params, prompt).to_vec();
    let m = l.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let z: f64 = l.iter().map(|&x| (x as f64 - m).exp()).sum();
    l.iter().map(|&x| x as f64 - m - z.ln()).collect()
}

/// `n` greedy tokens after `prompt` (ties: the lower id).
pub fn greedy(cfg: &ModelConfig, params: &[f32], prompt: &[u32], n: usize) -> Vec<u32> {
    let mut d = Decoder::new(cfg);
    let mut logits = d.feed(params, prompt).to_vec();
    let mut out = vec![];
    for _ in 0..n {
        let t = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        out.push(t);
        logits = d.step(params, t).to_vec();
    }
    out
}
