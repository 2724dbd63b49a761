//! `moelab import` of Hugging Face model dirs as `save_pretrained` writes them
//! (tests/golden/import, by reference/make_hf_import.py): every family, f32 and bf16, one
//! file and shards, per-expert and fused expert names. The imported run must tokenize like
//! transformers (chat template included) and give its top-5 next-token log-probabilities.
//! The HTTP API's logprobs are checked against the same numbers in the root suite.

mod common;

use common::{ids, messages, read_json, tmp};
use infer::chat::ChatFormat;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizer::Tokenizer;

const VARIANTS: [&str; 13] = [
    "llama",
    "llama-rope-linear",
    "llama-rope-yarn",
    "llama-rope-yarn-af",
    "llama-rope-llama3",
    "llama-bf16-sharded",
    "mixtral-sharded",
    "mixtral-fused",
    "qwen2_moe-bf16",
    "qwen3_moe",
    "olmoe",
    "mixtral-window",
    "qwen2_moe-window",
];

fn golden(name: &str) -> PathBuf {
    common::golden("import", name)
}

/// Log-softmax of the logits of the run at `run` after feeding `prompt`.
fn logprobs(run: &Path, prompt: &[u32]) -> Vec<f64> {
    let lr = train::load_run(run).unwrap();
    common::logprobs(&lr.cfg.model, &lr.params, prompt)
}

fn check_top5(name: &str, got: &[f64], want: &Value) {
    for (k, pair) in want.as_array().unwrap().iter().enumerate() {
        let id = pair[0].as_u64().unwrap() as usize;
        let lp = pair[1].as_f64().unwrap();
        assert!(
            (got[id] - lp).abs() < 1e-4,
            "{name}: top-{k} id {id}: moelab {} transformers {lp}",
            got[id]
        );
    }
    // and the same ranking: nothing outside transformers' top 5 beats its 5th
    let fifth = want[4][1].as_f64().unwrap();
    let listed: Vec<usize> = (0..5)
        .map(|k| want[k][0].as_u64().unwrap() as usize)
        .collect();
    for (id, &v) in got.iter().enumerate() {
        if !listed.contains(&id) {
            assert!(
                v < fifth + 1e-4,
                "{name}: id {id} ({v}) outranks transformers' top 5"
            );
        }
    }
}

#[test]
fn every_family_imports_and_computes_what_transformers_computes() {
    for name in VARIANTS {
        let src = golden(name);
        let out = tmp(name);
        let imp = interop::hf::import_dir(&src, None).unwrap();
        interop::run::write_run(&out, &imp).unwrap();
        let exp = read_json(&src.join("expected.json"));

        let tok = Arc::new(Tokenizer::from_file(&out.join("tokenizer.json")).unwrap());
        let chat = ChatFormat::load(&out, tok.clone()).unwrap();
        let msgs = messages(&exp["chat"]["messages"]);
        let chat_ids = chat.render(&msgs).unwrap();
        assert_eq!(
            chat_ids,
            ids(&exp["chat"]["ids"]),
            "{name}: chat template ids"
        );
        let mut text_ids = chat.prefix().to_vec();
        text_ids.extend(tok.encode(exp["text"]["text"].as_str().unwrap()));
        assert_eq!(text_ids, ids(&exp["text"]["ids"]), "{name}: text ids");

        check_top5(name, &logprobs(&out, &chat_ids), &exp["chat"]["top5"]);
        check_top5(name, &logprobs(&out, &text_ids), &exp["text"]["top5"]);
        if name.contains("rope") {
            // the same weights as "llama" (same seed): a RoPE-scaling-blind import would
            // compute llama's numbers, which differ
            let plain = read_json(&golden("llama").join("expected.json"));
            let (a, b) = (&plain["text"]["top5"][0][1], &exp["text"]["top5"][0][1]);
            let gap = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
            assert!(
                gap > 1e-3,
                "{name}: scaling changes the top log-probability by {gap}"
            );
            let back = interop::hf::import_dir(&src, None).unwrap().config;
            assert!(back.rope_scaling.is_some(), "{name}");
        }
        if name.contains("window") {
            check_window(name, &out, &chat_ids, &exp["chat"]["top5"]);
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// A sliding-window model: the training forward (the tiled kernel with the window) gives
/// transformers' numbers as the ring-buffer KV cache does, and the window matters: without
/// it the prompt's top log-probability moves.
fn check_window(name: &str, run: &Path, prompt: &[u32], want: &Value) {
    let lr = train::load_run(run).unwrap();
    let cfg = &lr.cfg.model;
    assert!(
        cfg.sliding_window > 0 && cfg.sliding_window < prompt.len(),
        "{name}"
    );
    let t = prompt.len();
    let mut m = model::Model::with_params(cfg, model::Layout::new(cfg), lr.params.clone(), 1, t);
    m.forward(prompt, &vec![0; t]);
    let v = cfg.vocab_size;
    let last = &m.logits()[(t - 1) * v..t * v];
    let mx = last.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let z: f64 = last.iter().map(|&x| (x as f64 - mx).exp()).sum();
    let got: Vec<f64> = last.iter().map(|&x| x as f64 - mx - z.ln()).collect();
    check_top5(&format!("{name} (forward)"), &got, want);
    let mut blind = cfg.clone();
    blind.sliding_window = 0;
    blind.full_attention_layers.clear();
    let id = want[0][0].as_u64().unwrap() as usize;
    let gap = (common::logprobs(&blind, &lr.params, prompt)[id] - got[id]).abs();
    assert!(
        gap > 1e-3,
        "{name}: the window changes the top log-probability by {gap}"
    );
}

/// A copy of golden dir `name` in a temp dir, to break.
fn copy(name: &str) -> PathBuf {
    let d = tmp(&format!("src-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(golden(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    d
}

fn import_err(src: &Path) -> String {
    let out = tmp("bad-out");
    let e = interop::hf::import_dir(src, None)
        .and_then(|imp| interop::run::write_run(&out, &imp))
        .expect_err("import must fail")
        .to_string();
    assert!(!out.exists(), "a failed import left {}", out.display());
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

#[test]
fn bad_model_dirs_are_refused_by_name_and_nothing_is_written() {
    // a shard listed in the index but missing
    let d = copy("mixtral-sharded");
    std::fs::remove_file(d.join("model-00003-of-00005.safetensors")).unwrap();
    let e = import_err(&d);
    assert!(
        e.contains("model-00003-of-00005.safetensors") && e.contains("missing"),
        "{e}"
    );

    // a truncated shard
    let d = copy("llama");
    let f = d.join("model.safetensors");
    let b = std::fs::read(&f).unwrap();
    std::fs::write(&f, &b[..b.len() / 2]).unwrap();
    let e = import_err(&d);
    assert!(e.contains("truncated"), "{e}");

    // an architecture moelab does not compute
    let d = copy("llama");
    let p = d.join("config.json");
    let s = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, s.replace("\"llama\"", "\"gpt_neox\"")).unwrap();
    let e = import_err(&d);
    assert!(
        e.contains("gpt_neox") && e.contains("not a supported family"),
        "{e}"
    );

    // a tokenizer with more ids than the model has embeddings
    let d = copy("llama");
    let p = d.join("config.json");
    let s = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, s.replace("\"vocab_size\": 320", "\"vocab_size\": 300")).unwrap();
    let e = import_err(&d);
    assert!(e.contains("320 tokens") && e.contains("300"), "{e}");

    // a run dir that exists is never overwritten
    let out = tmp("exists");
    std::fs::create_dir_all(&out).unwrap();
    let imp = interop::hf::import_dir(&golden("llama"), None).unwrap();
    let e = interop::run::write_run(&out, &imp).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
}
