//! The tiled attention kernel (online softmax, memory O(T)) against the stored-probability
//! kernel inside whole models: loss and every parameter gradient, dense and MoE, with
//! grouped heads, q/k norm, biases and dropout. (The Hugging Face golden tests run both
//! kernels against transformers too.)

use model::{Config, Model};

fn check(name: &str, text: &str, t: usize) {
    let cfg = Config::from_toml(text).unwrap();
    let b: usize = 2;
    let v = cfg.model.vocab_size as u32;
    let tokens: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7919 + 13) % v).collect();
    let targets: Vec<u32> = tokens.iter().map(|&x| (x * 31 + 5) % v).collect();
    let run = |flash: bool| {
        let mut m = Model::new(&cfg.model, b, t, 3);
        m.set_flash_attention(flash);
        m.training = true;
        m.dropout_key = 1;
        let l = m.forward(&tokens, &targets);
        m.zero_grad();
        m.backward(1.0);
        (l.total, m.grads.clone(), m.logits().to_vec())
    };
    let (l0, g0, z0) = run(false);
    let (l1, g1, z1) = run(true);
    let rel = ((l0 - l1) / l0).abs();
    assert!(rel < 1e-6, "[{name}] loss {l0} vs {l1}");
    let err = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    };
    let (ez, eg) = (err(&z1, &z0), err(&g1, &g0));
    println!("[{name}] loss rel {rel:.1e}, logits {ez:.1e}, gradients {eg:.1e}");
    assert!(ez < 1e-5, "[{name}] logits differ by {ez:.2e}");
    assert!(eg < 1e-4, "[{name}] gradients differ by {eg:.2e}");
}

#[test]
fn tiled_attention_equals_stored_probabilities() {
    let mid = include_str!("mid.toml");
    check("mid (MoE, GQA, dropout), T = 64", mid, 64);
    let long = mid
        .replace("max_seq_len = 64", "max_seq_len = 200")
        .replace("dropout = 0.1", "dropout = 0.0");
    check("mid, T = 200", &long, 200);
    let qwen = "[model]\nvocab_size = 300\nd_model = 48\nn_layers = 2\nn_heads = 6\nn_kv_heads = 2\nhead_dim = 12\nqk_norm = \"head\"\nqkv_bias = true\nmax_seq_len = 160\nffn_hidden = 64\n[train]\nseq_len = 160\n";
    check("q/k norm, biases, head_dim 12, T = 150", qwen, 150);
    // RoPE scaling past the original length: YaRN (its attention factor scales cos and sin,
    // so both backward passes carry it), linear and Llama 3
    for scaling in [
        r#"{ type = "yarn", factor = 4.0, original_max_seq_len = 50 }"#,
        r#"{ type = "linear", factor = 2.0 }"#,
        r#"{ type = "llama3", factor = 8.0, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_seq_len = 50 }"#,
    ] {
        let text = long.replace(
            "n_kv_heads = 2",
            &format!("n_kv_heads = 2\nrope_scaling = {scaling}"),
        );
        assert!(Config::from_toml(&text)
            .unwrap()
            .model
            .rope_scaling
            .is_some());
        check(&format!("mid, T = 200, rope_scaling {scaling}"), &text, 200);
    }
}

#[test]
fn tiled_attention_equals_stored_probabilities_at_passkey_width() {
    let text = "[model]\nvocab_size = 400\nd_model = 128\nn_layers = 4\nn_heads = 4\nn_kv_heads = 4\nmax_seq_len = 512\nffn_hidden = 512\n[train]\nseq_len = 512\n";
    check("dense d128, T = 512", text, 512);
}
