//! Finite-difference checks of the whole model's backward pass, per parameter tensor, for
//! the architecture knobs of issue 12 (explicit head_dim, q/k norms, q/k/v biases, a gated
//! shared expert of its own width, group-limited and scaled routing) and the baseline shape.
//!
//! For every trainable tensor W and a fixed random direction U over its elements, the
//! analytic directional derivative `grad_W . U` must match the central difference
//! `(L(W + eps U) - L(W - eps U)) / 2 eps` of the total loss (cross-entropy + aux + z),
//! computed by the float32 forward with eps = 1e-3 (smaller where a routing choice is near);
//! the loss is summed in float64 from the logits (the float32 total's own rounding would be
//! ~1e-4 of a directional derivative). Tolerance: |analytic - numeric| <= 1e-2 |numeric| +
//! 1e-3 (float32 rounding in the forward puts a few 1e-4 of noise on a numeric derivative;
//! a wrong backward is off by O(|numeric|): dropping RoPE's backward misses by 4e-2 to
//! 2.4e-1). Routing is discrete: a perturbation that flips a top-k choice would make the loss
//! jump, so the MoE configurations use wide router weights, and a direction that flips one
//! is replaced by another (printed).

use model::{Config, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const EPS: f32 = 1e-3;

/// The model's total loss with the cross-entropy computed in float64 from its logits.
fn loss64(m: &mut Model, tokens: &[u32], targets: &[u32]) -> f64 {
    let l = m.forward(tokens, targets);
    let v = m.cfg.vocab_size;
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (row, &y) in m.logits().chunks(v).zip(targets) {
        let mx = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        sum += lse - row[y as usize] as f64;
        count += 1;
    }
    let aux_coef = match m.cfg.balance {
        model::Balance::AuxLoss => m.cfg.aux_loss_coef as f64,
        _ => 0.0,
    };
    sum / count as f64 + aux_coef * l.aux as f64 + m.cfg.z_loss_coef as f64 * l.z as f64
}

fn check(name: &str, toml: &str) {
    let cfg = Config::from_toml(toml).unwrap();
    let (b, t, v) = (2, 12, cfg.model.vocab_size);
    let mut m = Model::new(&cfg.model, b, t, 7);
    // routers 8x wider than initialised, so no top-k choice is a near-tie that a
    // perturbation of EPS could flip
    for ts in m.layout.tensors.clone() {
        if ts.name.ends_with("router.weight") {
            m.params[ts.offset..ts.offset + ts.len]
                .iter_mut()
                .for_each(|p| *p *= 8.0);
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..v as u32)).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..v as u32)).collect();
    m.zero_grad();
    m.forward(&tokens, &targets);
    m.backward(1.0);
    let grads = m.grads.clone();
    // the set of experts each token chose (their order by score does not change the loss)
    let k = cfg.model.top_k;
    let choices = |m: &Model| -> Vec<Vec<u32>> {
        (0..cfg.model.n_layers)
            .filter_map(|l| m.router_choices(l))
            .map(|idx| {
                let mut v = idx.to_vec();
                v.chunks_mut(k).for_each(|c| c.sort_unstable());
                v
            })
            .collect()
    };
    let routed = choices(&m);
    let layout = m.layout.clone();
    let mut rows = vec![];
    for ts in layout.tensors.iter().filter(|ts| ts.trainable) {
        // a direction whose perturbation flips a top-k choice is not differentiable there:
        // draw another (up to 12, with smaller steps), and say how many were needed
        let mut found = None;
        for attempt in 0..12 {
            let u: Vec<f32> = (0..ts.len).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let analytic: f64 = grads[ts.offset..ts.offset + ts.len]
                .iter()
                .zip(&u)
                .map(|(g, u)| *g as f64 * *u as f64)
                .sum();
            // smaller steps after 4 flipped directions: a near-tie is then further away
            let eps = EPS / [1.0, 3.0, 10.0][attempt / 4];
            let mut loss_at = |sign: f32| {
                let saved = m.params[ts.offset..ts.offset + ts.len].to_vec();
                for (p, u) in m.params[ts.offset..ts.offset + ts.len].iter_mut().zip(&u) {
                    *p += sign * eps * u;
                }
                let l = loss64(&mut m, &tokens, &targets);
                let flipped = choices(&m) != routed;
                m.params[ts.offset..ts.offset + ts.len].copy_from_slice(&saved);
                (l, flipped)
            };
            let ((lp, fp), (lm, fm)) = (loss_at(1.0), loss_at(-1.0));
            if fp || fm {
                println!(
                    "[{name}] {}: direction {attempt} flips a routing choice",
                    ts.name
                );
                continue;
            }
            found = Some((analytic, (lp - lm) / (2.0 * eps as f64), eps));
            break;
        }
        let (a, n, eps) = found.unwrap_or_else(|| {
            panic!(
                "[{name}] every direction for {} flips a routing choice",
                ts.name
            )
        });
        rows.push((ts.name.clone(), a, n, eps));
    }
    let mut bad = vec![];
    for (tensor, a, n, eps) in &rows {
        let err = (a - n).abs();
        println!(
            "[{name}] {tensor:<36} analytic {a:>10.6} numeric {n:>10.6} err {err:.2e} (eps {eps:.0e})"
        );
        if err > 1e-2 * n.abs() + 1e-3 {
            bad.push(tensor.clone());
        }
    }
    assert!(bad.is_empty(), "[{name}] gradients off: {bad:?}");
}

/// A dense model and an MoE (softmax top-2, shared expert, aux and z losses) with a head dim
/// of 12 while d_model / n_heads is 8: the q projection is 48 wide against a width of 32.
const HEAD_DIM: &str = r#"
[model]
vocab_size = 40
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
head_dim = 12
max_seq_len = 16
ffn_hidden = 48
first_dense_layers = 1
n_experts = 4
top_k = 2
expert_hidden = 24
n_shared_experts = 1
aux_loss_coef = 0.01
z_loss_coef = 0.001
init_std = 0.1
[train]
seq_len = 16
"#;

#[test]
fn explicit_head_dim() {
    check("head_dim", HEAD_DIM);
    let dense = HEAD_DIM.replace("n_experts = 4", "n_experts = 0");
    check("head_dim dense", &dense);
}

/// q/k RMSNorm per head (Qwen3, with the explicit head dim) and over the whole projections
/// (OLMoE), in MoE models.
#[test]
fn qk_norms() {
    check(
        "qk_norm head",
        &HEAD_DIM.replace("head_dim = 12", "head_dim = 12\nqk_norm = \"head\""),
    );
    check(
        "qk_norm projection",
        &HEAD_DIM.replace("head_dim = 12", "qk_norm = \"projection\""),
    );
}

/// q/k/v biases and a shared expert of its own width behind a sigmoid gate, top-2 without
/// renormalisation (Qwen2-MoE).
#[test]
fn qkv_bias_and_gated_shared_expert() {
    let cfg = HEAD_DIM.replace(
        "n_shared_experts = 1",
        "n_shared_experts = 1\nshared_expert_hidden = 40\nshared_expert_gate = true\nqkv_bias = true\nrenormalize = false",
    );
    check("qwen2-like", &cfg);
}

/// DeepSeek-V3 routing: sigmoid scores with the selection bias, group-limited top-k (2
/// groups of 4, the best one eligible), renormalised and scaled by 2.5.
#[test]
fn group_limited_scaled_routing() {
    let cfg = HEAD_DIM
        .replace("n_experts = 4", "n_experts = 8\nn_group = 2\ntopk_group = 1\nrouted_scaling_factor = 2.5\nrouter_score = \"sigmoid\"\nbalance = \"bias\"");
    check("deepseek-like", &cfg);
}

/// The baseline (head dim from d_model / n_heads): the check itself is sound on the model
/// the PyTorch fixtures already cover.
#[test]
fn baseline_tiny_shape() {
    check("baseline", &HEAD_DIM.replace("head_dim = 12\n", ""));
}

#[test]
fn sliding_window_in_some_blocks() {
    // T = 12 with a window of 5: most queries lose keys; block 0 keeps full attention
    let cfg = HEAD_DIM.replace(
        "head_dim = 12\n",
        "head_dim = 12\nsliding_window = 5\nfull_attention_layers = [0]\n",
    );
    check("sliding window", &cfg);
}

/// RoPE scaling in training (issue 15): YaRN with its attention factor on cos and sin, linear
/// interpolation and Llama 3's blend, at T = 12 past an original length of 4.
#[test]
fn rope_scaling() {
    for (name, scaling) in [
        (
            "yarn",
            r#"{ type = "yarn", factor = 4.0, original_max_seq_len = 4 }"#,
        ),
        ("linear", r#"{ type = "linear", factor = 3.0 }"#),
        (
            "llama3",
            r#"{ type = "llama3", factor = 8.0, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_seq_len = 4 }"#,
        ),
    ] {
        let cfg = HEAD_DIM.replace(
            "head_dim = 12\n",
            &format!("head_dim = 12\nrope_scaling = {scaling}\n"),
        );
        assert!(Config::from_toml(&cfg)
            .unwrap()
            .model
            .rope_scaling
            .is_some());
        check(&format!("rope_scaling {name}"), &cfg);
    }
}
