//! `moelab export --format gguf`, checked against llama.cpp: a dense model with tied
//! embeddings and a Mixtral-style MoE (8 routed experts, top-2), each with a moelab
//! tokenizer. The exported files are committed (tests/golden/export-gguf, MOELAB_BLESS=1
//! rewrites them) with llama.cpp's greedy continuation of a prompt (<name>.json, by
//! reference/make_gguf_export.py with llama-cpp-python 0.3.36 and an f32 KV cache; its
//! default f16 cache moves these tiny models' logits by ~2e-4 and flips a near tie in the
//! MoE's 8th token): the test re-exports and
//! requires the same bytes, so llama.cpp's tokens hold for today's exporter, then requires
//! moelab's greedy tokens to be llama.cpp's. Every export also imports back unchanged.

mod common;

use common::{config, greedy, ids, read_json, tokenizer};
use std::path::PathBuf;
use tokenizer::Tokenizer;

fn golden(name: &str) -> PathBuf {
    common::golden("export-gguf", name)
}

#[test]
fn moelab_models_export_to_gguf_that_llama_cpp_runs_the_same() {
    let tok = tokenizer();
    for name in ["dense", "moe-routed"] {
        let cfg = config(name != "dense", 0, tok.vocab_size());
        let params = model::Model::new(&cfg, 1, 1, 7).params;
        let file = golden(&format!("{name}.gguf"));
        let bytes = interop::gguf::write::export(
            &cfg,
            &params,
            &tok,
            None,
            interop::gguf::quant::F32,
            &file,
        )
        .unwrap();
        if std::env::var_os("MOELAB_BLESS").is_some() {
            std::fs::write(&file, &bytes).unwrap();
            continue; // then reference/make_gguf_export.py writes the expected tokens
        }
        assert!(
            bytes == std::fs::read(&file).unwrap(),
            "{name}: the export differs from {}: if intended, re-bless (MOELAB_BLESS=1) and re-run reference/make_gguf_export.py",
            file.display()
        );
        // the import reads back the same weights and tokenizer
        let back = interop::gguf::import_file(&file, None).unwrap();
        assert!(
            back.params == params,
            "{name}: weights changed in the round trip"
        );
        let t2 = Tokenizer::from_bytes(&file, &back.tokenizer_json).unwrap();
        for text in [
            "What is 12 + 34?",
            "  the lazy\tdog\n\nhéllo ✓",
            "<|user|>hi",
        ] {
            assert_eq!(t2.encode(text), tok.encode(text), "{name}: {text:?}");
        }
        // llama.cpp's greedy continuation is moelab's
        let exp = read_json(&golden(&format!("{name}.json")));
        let prompt = ids(&exp["prompt_ids"]);
        assert_eq!(
            tok.encode(exp["prompt"].as_str().unwrap()),
            prompt,
            "{name}: llama.cpp's ids"
        );
        let got = greedy(&cfg, &params, &prompt, ids(&exp["greedy"]).len());
        assert_eq!(
            got,
            ids(&exp["greedy"]),
            "{name}: greedy tokens differ from llama.cpp's"
        );
    }
}

#[test]
fn what_llama_cpp_cannot_express_is_refused() {
    let tok = tokenizer();
    let mut cfg = config(true, 0, tok.vocab_size());
    cfg.n_shared_experts = 1;
    let p = vec![0.0; model::Layout::new(&cfg).total];
    let e = interop::gguf::write::export(
        &cfg,
        &p,
        &tok,
        None,
        interop::gguf::quant::F32,
        "x.gguf".as_ref(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("shared experts"), "{e}");
}

#[test]
fn quantized_exports_import_back_as_their_dequantized_weights() {
    use interop::gguf::quant;
    let tok = tokenizer();
    let cfg = config(true, 0, tok.vocab_size());
    let params = model::Model::new(&cfg, 1, 1, 7).params;
    let layout = model::Layout::new(&cfg);
    for q in [quant::Q8_0, quant::Q4_0, quant::Q4_1] {
        let file = std::env::temp_dir().join(format!("moelab-q-{q}-{}.gguf", std::process::id()));
        let bytes = interop::gguf::write::export(&cfg, &params, &tok, None, q, &file).unwrap();
        std::fs::write(&file, &bytes).unwrap();
        let back = interop::gguf::import_file(&file, None).unwrap();
        std::fs::remove_file(&file).unwrap();
        for t in &layout.tensors {
            let (a, b) = (
                &params[t.offset..t.offset + t.len],
                &back.params[t.offset..t.offset + t.len],
            );
            if t.shape.len() == 1 {
                assert_eq!(a, b, "{}: norms stay f32", t.name);
            } else {
                // every row here is whole blocks: within half a quantization step of its
                // block (and the scale's f16 rounding)
                for (xs, ys) in a.chunks(32).zip(b.chunks(32)) {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // Q4_0's grid is [-8d, 7d] with d = amax/8: values of the other sign
                    // than the largest clamp at 7d, up to a whole step off
                    let tol = match q {
                        quant::Q8_0 => amax / 127.0 * 0.5,
                        quant::Q4_0 => amax / 8.0,
                        _ => 2.0 * amax / 15.0 * 0.5,
                    } + amax * 2e-3;
                    for (x, y) in xs.iter().zip(ys) {
                        let name = quant::type_name(q);
                        assert!((x - y).abs() <= tol, "{} ({name}): {x} -> {y}", t.name);
                    }
                }
            }
        }
    }
}
