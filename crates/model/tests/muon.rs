//! `train.optimizer = "muon"`: which tensors Muon updates and how. One step from fresh state
//! on the gradients of one batch: AdamW's tensors (embeddings, head, norms, router) get
//! exactly AdamW's update, and every hidden block (q, k and v of the fused projection, gate
//! and up of each expert, ...) moves by `lr * sqrt(max(1, rows/cols))` times the
//! Newton–Schulz orthogonalisation of its own gradient rows.

use model::config::OptimizerKind;
use model::{Config, Model, Optimizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MID: &str = include_str!("mid.toml");

#[test]
fn muon_updates_hidden_blocks_and_adamw_the_rest() {
    let mut cfg = Config::from_toml(MID).unwrap();
    cfg.model.dropout = 0.0;
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    let mut m = Model::new(&cfg.model, b, t, cfg.train.seed);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let v = cfg.model.vocab_size as u32;
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..v)).collect();
    let targets: Vec<u32> = tokens.iter().map(|&x| (x * 7 + 3) % v).collect();
    m.zero_grad();
    m.forward(&tokens, &targets);
    m.backward(1.0);
    let (before, grads) = (m.params.clone(), m.grads.clone());

    let mut tc = cfg.train.clone();
    tc.grad_clip = 0.0; // the gradient as it is (clipping scales both optimizers alike)
    let lr = 0.5 * tc.lr; // a point of the schedule: Muon's rate scales with it
    let mut adamw = Model::new(&cfg.model, b, t, cfg.train.seed);
    assert_eq!(adamw.params, before);
    adamw.grads.copy_from_slice(&grads);
    Optimizer::new(&adamw).step(&mut adamw, &tc, lr);
    tc.optimizer = OptimizerKind::Muon;
    Optimizer::new(&m).step(&mut m, &tc, lr);

    let mut hidden = 0;
    for ts in m.layout.tensors.iter().filter(|ts| ts.trainable) {
        let r = ts.offset..ts.offset + ts.len;
        if ts.blocks.is_empty() {
            // AdamW's tensors: exactly the update of an AdamW step at the same lr
            assert!(
                adamw.params[r.clone()]
                    .iter()
                    .zip(&m.params[r])
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{} is not AdamW's update",
                ts.name
            );
            continue;
        }
        hidden += 1;
        let cols = *ts.shape.last().unwrap();
        let muon_lr = tc.muon_lr * lr / tc.lr;
        let shrink = 1.0 - muon_lr * tc.weight_decay;
        let mut at = ts.offset;
        for &rows in &ts.blocks {
            let n = rows * cols;
            let mut want = grads[at..at + n].to_vec();
            kernels::muon::orthogonalize(
                &mut want,
                rows,
                cols,
                tc.muon_ns_steps,
                tc.precision.kernels(),
                &mut vec![],
            );
            let scale = muon_lr * (rows as f32 / cols as f32).max(1.0).sqrt();
            let mut worst = 0.0f32;
            for i in 0..n {
                let step = (before[at + i] * shrink - m.params[at + i]) / scale;
                worst = worst.max((step - want[i]).abs());
            }
            let big = want.iter().fold(0.0f32, |a, w| a.max(w.abs()));
            assert!(
                worst <= 1e-3 * big,
                "{} block at {at}: {worst} of {big}",
                ts.name
            );
            at += n;
        }
    }
    // per block: wqkv, wo, shared gate_up and down, the experts' gate_up and down per layer
    assert_eq!(hidden, 6 * cfg.model.n_layers);
    let wqkv = m.layout.get("layers.0.attn.wqkv.weight").unwrap();
    let d = cfg.model.head_dim();
    assert_eq!(
        wqkv.blocks,
        [4 * d, 2 * d, 2 * d],
        "q, k, v orthogonalised apart"
    );
    let experts = m.layout.get("layers.1.moe.experts.w_gate_up").unwrap();
    assert_eq!(experts.blocks, [96; 12], "gate and up of each of 6 experts");
}
