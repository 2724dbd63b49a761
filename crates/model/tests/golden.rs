//! Golden tests: moelab's float32 forward, backward and 10 AdamW steps against fixtures
//! written by the PyTorch reference in float64 (`python reference/make_golden.py`, which
//! documents the fixture format). One test per fixture in `tests/golden/`:
//!
//! - `dense`: dense SwiGLU with grouped-query attention;
//! - `moe_softmax`: softmax top-2 MoE, a shared expert, aux loss and z-loss, tied embeddings;
//! - `moe_sigmoid_bias`: sigmoid top-2 MoE with DeepSeek-V3 bias balancing and a first dense
//!   layer, routing to every expert, two micro-batches per step (the bias moves on the loads
//!   summed over the step);
//! - `moe_top1_long`: the student's routing (softmax top-1, shared expert) with
//!   renormalize = false, residual dropout and two micro-batches per step, at T and B*T past
//!   every kernel block size (see [`long_enough`]).
//!
//! A step with `train.grad_accum` = A micro-batches runs as `train::trainer` runs it: each
//! micro-batch's gradient of total / A on its own (dropout keyed by the global micro-batch
//! index), folded left in micro-batch order, then clip + AdamW and bias balancing on the
//! step's summed loads. The step's loss is the mean of the micro-batch totals.
//!
//! Tolerances (errors are normalised by the tensor's largest reference magnitude, so tiny
//! entries do not dominate): logits 1e-5, every gradient 1e-4, loss 1e-5 relative, the 10
//! training losses 1e-5 relative. Router choices must match exactly, and every routed expert
//! of every MoE block must be chosen by at least one token of every micro-batch (issue 11:
//! a fixture whose routing ignores experts cannot see their bugs).

use model::{io, Config, Layout, Model, Optimizer};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden")
        .join(name)
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn f64s(&self, name: &str) -> Vec<f64> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture lacks {name}"));
        assert_eq!(t.dtype(), Dtype::F64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn i32s(&self, name: &str) -> Vec<i32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture lacks {name}"));
        assert_eq!(t.dtype(), Dtype::I32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

/// Max |got - want| / max |want|, and the index of the worst element.
fn norm_err(got: &[f32], want: &[f64]) -> (f64, usize) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    let mut worst = (0.0, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (*g as f64 - w).abs() / scale;
        if e > worst.0 {
            worst = (e, i);
        }
    }
    worst
}

/// The trainer's gradient fold: micro-batch j's gradient is added to the step's in order
/// (`train::dist::add_into`, element by element; the first is moved, not added to zeros).
fn fold(acc: &mut Vec<f32>, grads: &mut Vec<f32>, j: usize) {
    if j == 0 {
        std::mem::swap(acc, grads);
    } else {
        acc.iter_mut().zip(grads.iter()).for_each(|(a, g)| *a += g);
    }
}

/// gemm-common 0.19 (`cache::kernel_params`) splits a matmul's reduction dimension into
/// blocks of at least this many (`auto_kc.max(512)`, more on some caches): a weight
/// gradient `dout^T @ x` sums over N = B*T rows in more than one block only past it.
const GEMM_MIN_KC: usize = 512;

/// True when (T, B*T) are past every block size of the kernels on the training path, so a
/// bug at a block boundary shows: attention's causal row blocks (`attention::ROW_BLOCK`,
/// 32 query rows), the row tasks of the row-wise kernels, cross-entropy and the router
/// (`par::ROWS_PER_TASK`, 16), the row blocks of reductions over rows (`par::REDUCE_ROWS`, 64;
/// RMSNorm's weight gradient), gemm's reduction blocks (`GEMM_MIN_KC`) and dropout's mask
/// chunks (4096 elements of N*C, each drawn from its own ChaCha word position). Every count
/// must also leave a partial last block. Not covered: `linear_rows` (decode only) and the
/// per-expert gemm reductions, which sum over an expert's tokens only (N*K/E on average).
fn long_enough(b: usize, t: usize, c: usize) -> bool {
    use kernels::{attention::ROW_BLOCK, par::REDUCE_ROWS, par::ROWS_PER_TASK};
    let n = b * t;
    let past = |x: usize, blk: usize| x > blk && !x.is_multiple_of(blk);
    past(t, ROW_BLOCK)
        && past(n, ROWS_PER_TASK)
        && past(n, REDUCE_ROWS)
        && past(n, GEMM_MIN_KC)
        && past(n * c, 4096)
}

fn run(name: &str) {
    let d = dir(name);
    let cfg = Config::from_file(&d.join("config.toml")).unwrap();
    let layout = Layout::new(&cfg.model);
    let init = io::load(&layout, &d.join("init.safetensors"), false).unwrap();
    let exp = Expected {
        bytes: std::fs::read(d.join("expected.safetensors")).unwrap(),
    };
    let tokens: Vec<u32> = exp.i32s("tokens").iter().map(|&x| x as u32).collect();
    let targets: Vec<u32> = exp.i32s("targets").iter().map(|&x| x as u32).collect(); // -1 -> IGNORE_INDEX
    let (b, t, v) = (
        cfg.train.batch_size,
        cfg.train.seq_len,
        cfg.model.vocab_size,
    );
    let (n, micro) = (b * t, cfg.train.grad_accum as usize);
    assert_eq!(tokens.len(), micro * n, "[{name}] tokens are A*B*T");
    let batch = |j: usize| (&tokens[j * n..(j + 1) * n], &targets[j * n..(j + 1) * n]);
    let scale = 1.0 / micro as f32;

    // One step's micro-batches: forward checks on each, then the folded gradient.
    let mut m = Model::with_params(&cfg.model, layout.clone(), init.clone(), b, t);
    m.training = true; // residual dropout when model.dropout > 0, as the trainer runs
    let want_logits = exp.f64s("logits");
    let want_loss = exp.f64s("loss");
    let mut acc = vec![0.0f32; m.grads.len()];
    for j in 0..micro {
        let tag = format!("{name}, micro-batch {j}");
        let (x, y) = batch(j);
        m.dropout_key = j as u64;
        m.zero_grad();
        let losses = m.forward(x, y);
        let (le, li) = norm_err(m.logits(), &want_logits[j * n * v..(j + 1) * n * v]);
        println!("[{tag}] logits: max normalised error {le:.2e} at {li}");
        assert!(le <= 1e-5, "[{tag}] logits error {le:.2e} > 1e-5");
        let want = &want_loss[4 * j..4 * j + 4];
        let got = [losses.total, losses.ce, losses.aux, losses.z];
        for (i, label) in ["total", "ce", "aux", "z"].iter().enumerate() {
            let rel = (got[i] as f64 - want[i]).abs() / want[i].abs().max(1e-12);
            println!(
                "[{tag}] loss {label}: moelab {:.7} pytorch {:.7} rel err {rel:.2e}",
                got[i], want[i]
            );
            if want[i] != 0.0 || *label == "total" || *label == "ce" {
                assert!(rel <= 1e-5, "[{tag}] loss {label} rel err {rel:.2e} > 1e-5");
            }
        }
        let k = cfg.model.top_k;
        for l in 0..cfg.model.n_layers {
            if let Some(idx) = m.router_choices(l) {
                let want: Vec<u32> = exp.i32s(&format!("router_idx.{l}"))[j * n * k..][..n * k]
                    .iter()
                    .map(|&x| x as u32)
                    .collect();
                // PyTorch's topk orders by score, as moelab's router does.
                assert_eq!(idx, want.as_slice(), "[{tag}] router choices of layer {l}");
                let mut load = vec![0usize; cfg.model.n_experts];
                idx.iter().for_each(|&e| load[e as usize] += 1);
                println!("[{tag}] layer {l} tokens per expert: {load:?}");
                assert!(
                    load.iter().all(|&c| c > 0),
                    "[{tag}] layer {l}: an expert is never chosen ({load:?}); its gradients \
                     would be zero on both sides. Regenerate the fixture with routing that \
                     uses every expert (reference/make_golden.py)"
                );
            }
        }
        m.backward(scale);
        fold(&mut acc, &mut m.grads, j);
    }
    std::mem::swap(&mut m.grads, &mut acc);
    let mut worst_all = (0.0f64, "");
    for ts in layout.tensors.iter().filter(|t| t.trainable) {
        let want = exp.f64s(&format!("grad.{}", ts.name));
        let (e, i) = norm_err(&m.grads[ts.offset..ts.offset + ts.len], &want);
        if e >= worst_all.0 {
            worst_all = (e, ts.name.as_str());
        }
        assert!(
            e <= 1e-4,
            "[{name}] grad {} error {e:.2e} > 1e-4 at {i}: moelab {} pytorch {}",
            ts.name,
            m.grads[ts.offset + i],
            want[i]
        );
    }
    println!(
        "[{name}] gradients: worst normalised error over all tensors {:.2e} ({})",
        worst_all.0, worst_all.1
    );

    // 10 AdamW steps on the same micro-batches (as llm.c's test_gpt2).
    let mut m = Model::with_params(&cfg.model, layout, init, b, t);
    m.training = true;
    let mut opt = Optimizer::new(&m);
    let want = exp.f64s("train_losses");
    let mut worst = 0.0f64;
    for (step, w) in want.iter().enumerate() {
        let mut loss = 0.0f32;
        for j in 0..micro {
            let (x, y) = batch(j);
            m.dropout_key = (step * micro + j) as u64;
            m.zero_grad();
            loss += m.forward(x, y).total * scale;
            m.backward(scale);
            fold(&mut acc, &mut m.grads, j);
        }
        std::mem::swap(&mut m.grads, &mut acc);
        opt.step(&mut m, &cfg.train, cfg.train.lr);
        m.update_balance_bias(); // the loads of all the step's micro-batches
        let rel = (loss as f64 - w).abs() / w.abs();
        worst = worst.max(rel);
        println!("[{name}] step {step}: moelab {loss:.6} pytorch {w:.6} rel {rel:.1e}");
        assert!(
            rel <= 1e-5,
            "[{name}] training loss at step {step}: rel err {rel:.2e} > 1e-5"
        );
    }
    println!("[{name}] training losses: worst rel err {worst:.2e}");
}

#[test]
fn golden_dense() {
    run("dense");
}

#[test]
fn golden_moe_softmax_shared_aux_z() {
    run("moe_softmax");
}

#[test]
fn golden_moe_sigmoid_bias_first_dense_every_expert_accum() {
    run("moe_sigmoid_bias");
}

/// Issue 11: T and B*T past every kernel block, top-1 without renormalisation (the router
/// learns through the chosen expert's score), dropout, gradient accumulation.
#[test]
fn golden_moe_top1_long_dropout_accum() {
    let cfg = Config::from_file(&dir("moe_top1_long").join("config.toml")).unwrap();
    let (b, t, c) = (cfg.train.batch_size, cfg.train.seq_len, cfg.model.d_model);
    assert!(
        long_enough(b, t, c),
        "moe_top1_long must stay past every kernel block size (B {b}, T {t}, C {c})"
    );
    assert_eq!(cfg.model.top_k, 1);
    assert!(!cfg.model.renormalize && cfg.model.dropout > 0.0 && cfg.train.grad_accum == 2);
    run("moe_top1_long");
}
