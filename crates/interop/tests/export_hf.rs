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

mod common;

use common::{config, ids, logprobs, messages, read_json, tmp, tokenizer};
use infer::chat::ChatFormat;
use interop::export::{write_hf, ExportDtype};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizer::Tokenizer;

fn golden(name: &str) -> PathBuf {
    common::golden("export", name)
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
        let cfg = config(moe, 2, tok.vocab_size());
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
        let exp = read_json(&g.join("expected.json"));
        // moelab's chat format, written as Jinja, renders in transformers what moelab renders
        let chat = ChatFormat::moelab(Arc::new(tok.clone())).unwrap();
        let msgs = messages(&exp["chat"]["messages"]);
        let ids = ids(&exp["chat"]["ids"]);
        assert_eq!(chat.render(&msgs).unwrap(), ids, "{name}: chat template");
        // the next token's log-probabilities over the whole vocabulary: transformers' within
        // 1e-4
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
    let root = common::root().join("tests/golden/import");
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
    let mut cfg = config(true, 2, tok.vocab_size());
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
