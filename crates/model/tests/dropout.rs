//! Residual dropout: masks are a function of (dropout_key, block, site) only, the backward
//! pass matches a finite-difference directional derivative with the masks held fixed, and
//! evaluation (training = false) is unaffected by the dropout setting.

use model::{Config, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CFG: &str = r#"
[model]
vocab_size = 64
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 16
ffn_hidden = 48
dropout = 0.3
[train]
batch_size = 2
seq_len = 16
"#;

fn batch(v: u32) -> (Vec<u32>, Vec<u32>) {
    let x: Vec<u32> = (0..32).map(|i| (i * 7 + 3) % v).collect();
    let y: Vec<u32> = (0..32).map(|i| (i * 5 + 1) % v).collect();
    (x, y)
}

#[test]
fn masks_are_keyed_and_gradients_match_finite_differences() {
    let cfg = Config::from_toml(CFG).unwrap();
    let mut m = Model::new(&cfg.model, 2, 16, 1);
    let (x, y) = batch(64);
    let plain = m.forward(&x, &y).total;
    m.training = true;
    m.dropout_key = 5;
    let a = m.forward(&x, &y).total;
    let b = m.forward(&x, &y).total;
    m.dropout_key = 6;
    let c = m.forward(&x, &y).total;
    assert_eq!(a, b, "same key, same masks");
    assert_ne!(a, c, "another key, other masks");
    assert_ne!(a, plain, "dropout changes the training loss");
    m.training = false;
    assert_eq!(m.forward(&x, &y).total, plain, "evaluation ignores dropout");

    // directional derivative along a random direction, masks fixed by the key
    m.training = true;
    m.dropout_key = 5;
    m.zero_grad();
    m.forward(&x, &y);
    m.backward(1.0);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let u: Vec<f32> = (0..m.params.len())
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let analytic: f64 = m
        .grads
        .iter()
        .zip(&u)
        .map(|(g, u)| *g as f64 * *u as f64)
        .sum();
    let p0 = m.params.clone();
    let eps = 1e-3f32;
    let mut at = |s: f32| {
        m.params = p0.iter().zip(&u).map(|(p, u)| p + s * u).collect();
        m.forward(&x, &y).total as f64
    };
    let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
    let rel = (analytic - numeric).abs() / numeric.abs();
    println!("dropout gradient: analytic {analytic:.6} numeric {numeric:.6} rel {rel:.2e}");
    assert!(rel < 1e-2, "directional derivative mismatch: {rel:.2e}");
}
