//! `moelab demo`: what the compute core can do today, on built-in defaults, offline, in
//! seconds. A tiny MoE (the `tiny` preset) learns two-digit addition written as bytes
//! ("37+45=82\n"), with a live progress bar, then answers held-out problems greedily and
//! prints a summary: loss, accuracy, throughput, expert balance and the weights hash.
//!
//! NOTE: later stages (tokenizer, data shards, distillation, serving) replace this with the
//! full teacher -> traces -> student pipeline; the synthetic task lives here until the `data`
//! crate owns task generators.

use crate::presets::load_config;
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kernels::IGNORE_INDEX;
use model::optim::train_step;
use model::{io, Model, Optimizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

#[derive(Args)]
pub struct DemoArgs {
    /// Training steps.
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    /// Seed for initialisation and data.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Held-out problems to answer after training.
    #[arg(long, default_value_t = 100)]
    eval: usize,
}

fn problem(rng: &mut ChaCha8Rng) -> (String, String) {
    let (a, b) = (rng.gen_range(0..100u32), rng.gen_range(0..100u32));
    (format!("{a}+{b}="), format!("{}\n", a + b))
}

/// A stream of problems as bytes, long enough for `n` tokens.
fn stream(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n + 1 {
        let (q, a) = problem(rng);
        out.extend(q.bytes().chain(a.bytes()).map(u32::from));
    }
    out
}

/// Greedy completion by full recompute (the KV cache arrives with `moelab sample`).
fn complete(m: &mut Model, prompt: &str, max_new: usize) -> String {
    let (_, t) = m.batch_shape();
    let v = m.cfg.vocab_size;
    let mut toks: Vec<u32> = prompt.bytes().map(u32::from).collect();
    let mut out = String::new();
    for _ in 0..max_new {
        if toks.len() >= t {
            break;
        }
        let mut input = toks.clone();
        input.resize(t, 0); // right padding: causal attention never looks at it
        m.forward(&input, &vec![IGNORE_INDEX; t]);
        let row = &m.logits()[(toks.len() - 1) * v..toks.len() * v];
        let next = (0..v)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap_or(0) as u32;
        if next == u32::from(b'\n') {
            break;
        }
        toks.push(next);
        out.push(char::from(next as u8));
    }
    out
}

pub fn run(a: DemoArgs) -> Result<()> {
    let mut cfg = load_config("tiny")?;
    cfg.train.seed = a.seed;
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    println!("moelab demo: a {}-layer MoE ({} experts, top-{}, {} shared) learns two-digit addition from bytes", cfg.model.n_layers, cfg.model.n_experts, cfg.model.top_k, cfg.model.n_shared_experts);
    let mut m = Model::new(&cfg.model, b, t, a.seed);
    let mut opt = Optimizer::new(&m);
    println!(
        "{} parameters, {} active per token, {} threads\n",
        m.layout.n_params(),
        cfg.model.active_matmul_params(),
        rayon::current_num_threads()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )?
        .progress_chars("=> "),
    );
    let start = Instant::now();
    let (mut first, mut last) = (None, 0.0);
    let mut loads: Vec<Vec<u64>> = vec![];
    for step in 0..a.steps {
        let mut tokens = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for _ in 0..b {
            let s = stream(&mut rng, t);
            tokens.extend_from_slice(&s[..t]);
            targets.extend_from_slice(&s[1..=t]);
        }
        // cosine decay to 10% after a short warm-up
        let lr = cfg.train.lr * lr_factor(step, a.steps);
        let (l, _) = train_step(&mut m, &mut opt, &tokens, &targets, &cfg.train, lr);
        if loads.is_empty() {
            loads = m.last_load.iter().map(|x| vec![0; x.len()]).collect();
        }
        for (acc, l_) in loads.iter_mut().zip(&m.last_load) {
            for (x, y) in acc.iter_mut().zip(l_) {
                *x += y;
            }
        }
        first.get_or_insert(l.ce);
        last = l.ce;
        let tok_s = ((step + 1) * b * t) as f64 / start.elapsed().as_secs_f64();
        bar.set_message(format!(
            "loss {:.3}  {:.0} tok/s  imbalance {:.2}",
            l.ce,
            tok_s,
            m.load_imbalance()
        ));
        bar.inc(1);
    }
    bar.finish();
    let secs = start.elapsed().as_secs_f64();
    let mut eval_rng = ChaCha8Rng::seed_from_u64(a.seed ^ 0x5EED_E7A1);
    let mut gen = Model::with_params(&cfg.model, m.layout.clone(), m.params.clone(), 1, t);
    let mut correct = 0;
    let mut shown = vec![];
    for i in 0..a.eval {
        let (q, ans) = problem(&mut eval_rng);
        let got = complete(&mut gen, &q, 5);
        if got == ans.trim_end() {
            correct += 1;
        }
        if i < 4 {
            shown.push(format!("{q}{got}  (expected {})", ans.trim_end()));
        }
    }
    println!(
        "\n  loss            {:.3} -> {last:.3} nats/token",
        first.unwrap_or(0.0)
    );
    println!(
        "  accuracy        {correct}/{} held-out problems answered exactly",
        a.eval
    );
    println!(
        "  throughput      {:.0} tokens/s over {} steps ({secs:.1} s)",
        (a.steps * b * t) as f64 / secs,
        a.steps
    );
    for (l, load) in loads.iter().enumerate().filter(|(_, x)| !x.is_empty()) {
        let total: u64 = load.iter().sum();
        let shares: Vec<String> = load
            .iter()
            .map(|&x| format!("{:.0}%", 100.0 * x as f64 / total.max(1) as f64))
            .collect();
        println!("  expert load L{l}  {}", shares.join(" "));
    }
    println!(
        "  weights hash    {}",
        io::weights_hash(&m.layout, &m.params)
    );
    println!("\n  {}", shown.join("\n  "));
    Ok(())
}

fn lr_factor(step: usize, total: usize) -> f32 {
    let warm = (total / 20).max(1);
    if step < warm {
        return (step + 1) as f32 / warm as f32;
    }
    let p = (step - warm) as f32 / (total - warm).max(1) as f32;
    0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * p).cos())
}
