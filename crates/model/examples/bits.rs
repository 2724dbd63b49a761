//! Bit-for-bit fingerprints of the model's numerics, for refactors that must change no bit
//! (issue 12's restructure): run it before and after on the same machine and compare.
//!
//!     cargo run --release -p model --example bits
//!
//! Per configuration (the four golden fixtures, `configs/tiny.toml`, and a sigmoid/bias MoE
//! with a shared expert and dropout): sha256 over the bits of 3 training steps of 2
//! micro-batches each (every micro-batch's losses, logits and gradient; the weights after
//! each step), of one backward with logit distillation, of 16 KV-cache decode steps, and of
//! a 3-slot batched decode. The hashes are not pinned in a test: the gemm crate picks its
//! blocking from the host's caches, so the bits legitimately differ between CPUs; the tests
//! (golden fixtures, gradcheck, decode equivalence) bound the numerics with tolerances.

use model::decode::{BatchDecoder, Decoder};
use model::{io, Config, Distill, Layout, Model, Optimizer};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

const MID: &str = include_str!("../tests/mid.toml");

fn bits(h: &mut Sha256, xs: &[f32]) {
    for x in xs {
        h.update(x.to_bits().to_le_bytes());
    }
}

fn fingerprint(name: &str, cfg: &Config, params: Vec<f32>) {
    let (b, t, v) = (
        cfg.train.batch_size,
        cfg.train.seq_len,
        cfg.model.vocab_size,
    );
    let n = b * t;
    let tok = |j: usize, i: usize| ((i * 31 + j * 977 + 7) % v) as u32;
    let batch = |j: usize| -> (Vec<u32>, Vec<u32>) {
        let x: Vec<u32> = (0..n).map(|i| tok(j, i)).collect();
        let y: Vec<u32> = (0..n)
            .map(|i| {
                if i % 11 == 5 {
                    kernels::IGNORE_INDEX
                } else {
                    tok(j, i + 1)
                }
            })
            .collect();
        (x, y)
    };

    let mut train = Sha256::new();
    let mut m = Model::with_params(&cfg.model, Layout::new(&cfg.model), params.clone(), b, t);
    m.training = true;
    let mut opt = Optimizer::new(&m);
    let mut acc = vec![0.0f32; m.grads.len()];
    for step in 0..3 {
        for j in 0..2 {
            let (x, y) = batch(step * 2 + j);
            m.dropout_key = (step * 2 + j) as u64;
            m.zero_grad();
            let l = m.forward(&x, &y);
            bits(&mut train, &[l.total, l.ce, l.aux, l.z]);
            bits(&mut train, m.logits());
            m.backward(0.5);
            bits(&mut train, &m.grads);
            if j == 0 {
                std::mem::swap(&mut acc, &mut m.grads);
            } else {
                acc.iter_mut().zip(&m.grads).for_each(|(a, g)| *a += g);
            }
        }
        std::mem::swap(&mut m.grads, &mut acc);
        opt.step(&mut m, &cfg.train, cfg.train.lr);
        m.update_balance_bias();
        bits(&mut train, &m.params);
    }
    let trained = m.params.clone();

    let mut kd = Sha256::new();
    let (x, y) = batch(9);
    let teacher: Vec<f32> = (0..n * v)
        .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    m.zero_grad();
    m.forward(&x, &y);
    let d = Distill {
        teacher_logits: &teacher,
        weight: 0.5,
        temperature: 2.0,
    };
    bits(&mut kd, &[m.distill_loss(&d)]);
    m.backward_distill(1.0, Some(&d));
    bits(&mut kd, &m.grads);

    let mut dec = Sha256::new();
    let mut one = Decoder::new(&cfg.model);
    let steps = 16.min(cfg.model.max_seq_len);
    for i in 0..steps {
        bits(&mut dec, one.step(&trained, tok(3, i)));
    }
    let mut batched = BatchDecoder::new(&cfg.model, 3);
    for i in 0..steps {
        let inputs: Vec<(usize, u32)> = (0..3)
            .filter(|&s| i >= s && (i + s) % 4 != 3)
            .map(|s| (s, tok(s + 5, i)))
            .collect();
        bits(&mut dec, batched.step(&trained, &inputs));
    }

    let hex = |h: Sha256| hex::encode(&h.finalize()[..8]);
    println!(
        "{name:<18} weights {}  train {}  kd {}  decode {}",
        &io::weights_hash(&m.layout, &trained)[..16],
        hex(train),
        hex(kd),
        hex(dec)
    );
}

fn main() {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden");
    for name in ["dense", "moe_softmax", "moe_sigmoid_bias", "moe_top1_long"] {
        let cfg = Config::from_file(&golden.join(name).join("config.toml")).unwrap();
        let p = io::load(
            &Layout::new(&cfg.model),
            &golden.join(name).join("init.safetensors"),
            false,
        )
        .unwrap();
        fingerprint(name, &cfg, p);
    }
    let tiny = Config::from_toml(include_str!("../../../configs/tiny.toml")).unwrap();
    fingerprint("tiny", &tiny, Model::new(&tiny.model, 1, 1, 3).params);
    let mid = Config::from_toml(MID).unwrap();
    fingerprint(
        "mid-sigmoid-bias",
        &mid,
        Model::new(&mid.model, 1, 1, 5).params,
    );
}
