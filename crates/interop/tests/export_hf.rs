//! `moelab export --format hf` of moelab's own models, checked against transformers:
//! a DeepSeekMoE-style model like the small-moe preset (8 routed experts, top-2, 2 ungated
//! shared experts: exported as Qwen2-MoE behind a zero gate) and a dense one with tied
//! embeddings (Llama), each with a moelab tokenizer and moelab's chat format as a Jinja
//! template.
//!
//! The exported dirs are committed (tests/golden/export/<name>, MOELAB_BLESS=1 rewrites
//! them) with transformers' logits for them (expected.json, by
//! reference/make_hf_export.py): the test re-exports and requires the same bytes, so
//! transformers' numbers hold for today's exporter, then compares moelab's own logits and
//! chat-template ids with transformers'. Exports of imported models of every family are
//! round-tripped too.

use infer::chat::{ChatFormat, Message, Role};
use interop::export::{write_hf, ExportDtype};
use model::decode::Decoder;
use model::ModelConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizer::Tokenizer;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/export")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moelab-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tokenizer() -> Tokenizer {
    let text = "The quick brown fox jumps over the lazy dog. What is 12 + 34? It is 46. \
                Mixture of experts routes each token to a few experts.";
    Tokenizer::train_with([text; 8].into_iter(), 300, true).unwrap()
}

fn config(moe: bool, vocab: usize) -> ModelConfig {
    let toml = if moe {
        "[model]\nvocab_size = V\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nmax_seq_len = 64\nffn_hidden = 64\nn_experts = 8\ntop_k = 2\nexpert_hidden = 16\nn_shared_experts = 2\nrouter_score = \"softmax\"\nrenormalize = true\ninit_std = 0.2\n"
    } else {
        "[model]\nvocab_size = V\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 2\nmax_seq_len = 64\nffn_hidden = 64\nn_experts = 0\ntie_embeddings = true\ninit_std = 0.2\n"
    };
    let toml = toml.replace('V', &vocab.to_string()) + "[train]\nseq_len = 32\n";
    model::Config::from_toml(&toml).unwrap().model
}

fn logprobs(cfg: &ModelConfig, params: &[f32], ids: &[u32]) -> Vec<f64> {
    let mut d = Decoder::new(cfg);
    let mut l = vec![];
    for &t in ids {
        l = d.step(params, t).to_vec();
    }
    let m = l.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let z: f64 = l.iter().map(|&x| (x as f64 - m).exp()).sum();
    l.iter().map(|&x| x as f64 - m - z.ln()).collect()
}

fn files(d: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "expected.json")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn moelab_models_export_to_what_transformers_computes() {
    let tok = tokenizer();
    for (name, moe, family) in [("moe-shared", true, "qwen2_moe"), ("dense", false, "llama")] {
        let cfg = config(moe, tok.vocab_size());
        let params = model::Model::new(&cfg, 1, 1, 7).params;
        let out = tmp(name);
        let fam = write_hf(&cfg, &params, &tok, None, ExportDtype::F32, &out).unwrap();
        assert_eq!(fam, family);
        let g = golden(name);
        if std::env::var_os("MOELAB_BLESS").is_some() {
            std::fs::create_dir_all(&g).unwrap();
            for (f, b) in files(&out) {
                std::fs::write(g.join(f), b).unwrap();
            }
            continue; // then reference/make_hf_export.py writes expected.json
        }
        assert!(
            files(&out) == files(&g),
            "{name}: the export differs from tests/golden/export/{name}: if intended, re-bless (MOELAB_BLESS=1) and re-run reference/make_hf_export.py"
        );
        let exp: Value =
            serde_json::from_slice(&std::fs::read(g.join("expected.json")).unwrap()).unwrap();
        // moelab's chat format, written as Jinja, renders in transformers what moelab renders
        let chat = ChatFormat::moelab(Arc::new(tok.clone())).unwrap();
        let msgs: Vec<Message> = exp["chat"]["messages"]
            .as_array()
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
            .collect();
        let ids: Vec<u32> = exp["chat"]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(chat.render(&msgs).unwrap(), ids, "{name}: chat template");
        // every position's log-probabilities: transformers' within 1e-4
        let want = exp["logprobs"].as_array().unwrap();
        let got = logprobs(&cfg, &params, &ids);
        let mut worst = 0f64;
        for (i, w) in want.iter().enumerate() {
            worst = worst.max((got[i] - w.as_f64().unwrap()).abs());
        }
        assert!(
            worst < 1e-4,
            "{name}: logprobs differ from transformers' by {worst}"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn imported_models_of_every_family_export_and_import_back_unchanged() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/import");
    for name in [
        "llama",
        "mixtral-sharded",
        "qwen2_moe-bf16",
        "qwen3_moe",
        "olmoe",
    ] {
        let imp = interop::hf::import_dir(&root.join(name), None).unwrap();
        let tok = Tokenizer::from_bytes(Path::new(name), &imp.tokenizer_json).unwrap();
        let out = tmp(&format!("rt-{name}"));
        write_hf(
            &imp.config,
            &imp.params,
            &tok,
            imp.chat.as_ref(),
            ExportDtype::F32,
            &out,
        )
        .unwrap();
        let back = interop::hf::import_dir(&out, None).unwrap();
        assert!(
            back.params == imp.params,
            "{name}: weights changed in the round trip"
        );
        assert_eq!(back.chat, imp.chat, "{name}: chat format");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn what_no_family_expresses_is_refused() {
    let tok = tokenizer();
    let mut cfg = config(true, tok.vocab_size());
    cfg.router_score = model::RouterScore::Sigmoid;
    let out = tmp("refused");
    let e = write_hf(
        &cfg,
        &vec![0.0; model::Layout::new(&cfg).total],
        &tok,
        None,
        ExportDtype::F32,
        &out,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("router_score") && e.contains("sigmoid"), "{e}");
    assert!(!out.exists());
}
