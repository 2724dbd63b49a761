//! Golden tests against Hugging Face `transformers` itself (issue 12): tiny models of each
//! supported family (Llama, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), built by `reference/make_hf_golden.py` (transformers 5.24, float64),
//! loaded through the tensor mapping of `model::hf` (the one import uses), must give the
//! same logits, loss, router choices and parameter gradients.
//!
//! Tolerances as in `golden.rs` (errors normalised by the tensor's largest reference
//! magnitude): logits 1e-5, every gradient 1e-4, loss 1e-5 relative; router choices exact.

use model::hf::{config_from_hf, Family};
use model::{Layout, Model};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden")
        .join(name)
}

fn f64s(st: &SafeTensors, name: &str) -> Option<Vec<f64>> {
    let t = st.tensor(name).ok()?;
    assert_eq!(t.dtype(), Dtype::F64, "{name}");
    Some(
        t.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
    )
}

fn i32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<i32>) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture lacks {name}"));
    assert_eq!(t.dtype(), Dtype::I32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

/// Max |got - want| / max |want|.
fn norm_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs() / scale)
        .fold(0.0, f64::max)
}

fn run(name: &str, family: Family) {
    let d = dir(name);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    let hf = config_from_hf(&json).unwrap();
    assert_eq!(hf.family, family);
    let mut cfg = hf.config.clone();
    // transformers' logits and loss carry no auxiliary losses (output_router_logits off)
    cfg.aux_loss_coef = 0.0;
    cfg.z_loss_coef = 0.0;
    let layout = Layout::new(&cfg);
    let init_bytes = std::fs::read(d.join("init.safetensors")).unwrap();
    let init = SafeTensors::deserialize(&init_bytes).unwrap();
    let params = hf
        .assemble(&layout, |n| {
            let t = init.tensor(n).ok()?;
            assert_eq!(t.dtype(), Dtype::F32, "{n}");
            Some(
                t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            )
        })
        .unwrap();
    let exp_bytes = std::fs::read(d.join("expected.safetensors")).unwrap();
    let exp = SafeTensors::deserialize(&exp_bytes).unwrap();
    let (shape, tokens) = i32s(&exp, "tokens");
    let (b, t) = (shape[0], shape[1]);
    let tokens: Vec<u32> = tokens.iter().map(|&x| x as u32).collect();
    let targets: Vec<u32> = i32s(&exp, "targets").1.iter().map(|&x| x as u32).collect(); // -1 -> IGNORE_INDEX

    // both attention kernels: stored probabilities and tiles with an online softmax
    for flash in [false, true] {
        let name = format!(
            "{name}, {} attention",
            if flash { "tiled" } else { "stored" }
        );
        let mut m = Model::with_params(&cfg, layout.clone(), params.clone(), b, t);
        m.set_flash_attention(flash);
        let losses = m.forward(&tokens, &targets);
        let le = norm_err(m.logits(), &f64s(&exp, "logits").unwrap());
        println!("[{name}] logits: max normalised error {le:.2e}");
        assert!(le <= 1e-5, "[{name}] logits error {le:.2e} > 1e-5");
        let want = f64s(&exp, "loss").unwrap()[0];
        let rel = (losses.total as f64 - want).abs() / want;
        println!(
            "[{name}] loss: moelab {:.7} transformers {want:.7} rel err {rel:.2e}",
            losses.total
        );
        assert!(rel <= 1e-5, "[{name}] loss rel err {rel:.2e} > 1e-5");
        let mut moe_layers = 0;
        for l in 0..cfg.n_layers {
            if let Some(idx) = m.router_choices(l) {
                let want: Vec<u32> = i32s(&exp, &format!("router_idx.{l}"))
                    .1
                    .iter()
                    .map(|&x| x as u32)
                    .collect();
                assert_eq!(idx, want.as_slice(), "[{name}] router choices of layer {l}");
                moe_layers += 1;
            }
        }
        assert_eq!(
            moe_layers > 0,
            family != Family::Llama,
            "[{name}] MoE layers"
        );

        m.zero_grad();
        m.backward(1.0);
        let want = hf
            .assemble(&layout, |n| f64s(&exp, &format!("grad.{n}")))
            .unwrap();
        let mut worst = (0.0f64, String::new());
        for ts in layout.tensors.iter().filter(|t| t.trainable) {
            let r = ts.offset..ts.offset + ts.len;
            let e = norm_err(&m.grads[r.clone()], &want[r]);
            if e >= worst.0 {
                worst = (e, ts.name.clone());
            }
            assert!(e <= 1e-4, "[{name}] grad {} error {e:.2e} > 1e-4", ts.name);
        }
        println!(
            "[{name}] gradients: worst normalised error {:.2e} ({})",
            worst.0, worst.1
        );
    }
}

#[test]
fn transformers_llama_tied_gqa() {
    run("hf_llama", Family::Llama);
}

#[test]
fn transformers_mixtral_top2() {
    run("hf_mixtral", Family::Mixtral);
}

/// q/k/v biases, a shared expert of its own width (40) behind a sigmoid gate, top-2 without
/// renormalisation.
#[test]
fn transformers_qwen2_moe_bias_gated_shared_expert() {
    run("hf_qwen2_moe", Family::Qwen2Moe);
}

/// Per-head q/k RMSNorm (weights [D]), head_dim 12 with d_model 32 and 4 heads,
/// norm_topk_prob true.
#[test]
fn transformers_qwen3_moe_head_qk_norm() {
    run("hf_qwen3_moe", Family::Qwen3Moe);
}

/// q/k RMSNorm over the whole projections (weights [H*D] and [G*D]), top-2 without
/// renormalisation.
#[test]
fn transformers_olmoe_projection_qk_norm() {
    run("hf_olmoe", Family::Olmoe);
}

#[test]
fn unsupported_features_are_refused_by_name() {
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir("hf_llama").join("config.json")).unwrap())
            .unwrap();
    for (key, val, field) in [
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
        ("sliding_window", serde_json::json!(4096), "sliding_window"),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}),
            "rope_parameters.rope_type",
        ),
        ("model_type", serde_json::json!("gpt2"), "model_type"),
        ("mlp_only_layers", serde_json::json!([5]), "dense_layers"),
        ("clip_qkv", serde_json::json!(8.0), "clip_qkv"),
    ] {
        let mut v = base.clone();
        v[key] = val;
        let err = config_from_hf(&v).unwrap_err().to_string();
        println!("{err}");
        assert!(err.contains(field), "{err:?} does not name {field}");
    }
}
