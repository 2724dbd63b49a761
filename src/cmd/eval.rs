//! `moelab eval`: a run's validation loss on a data dir, or its accuracy on held-out
//! reasoning problems (`--task`).

use crate::runs::{load_reasoner, run_tokenizer_path, task_bar};
use anyhow::{bail, Context, Result};
use clap::Args;
use data::tasks::{self, Split};
use model::{Layout, Model};
use std::path::{Path, PathBuf};
use train::dataset::Dataset;
use train::eval::evaluate;
use train::load_run;

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab eval --run runs/shk --data data/shk\n  moelab eval --run runs/student --task all --n 400";

#[derive(Args)]
pub struct EvalArgs {
    /// Run dir or checkpoint dir.
    #[arg(long)]
    run: PathBuf,
    /// Data dir (its validation split is evaluated).
    #[arg(long, required_unless_present = "task", conflicts_with = "task")]
    data: Option<PathBuf>,
    /// Reasoning tasks (add, mul, expr, sort, comma-separated or all): exact-match accuracy
    /// of greedy answers on held-out problems.
    #[arg(long)]
    task: Option<String>,
    /// --data: at most N batches (default: the whole split). --task: N problems (default 400).
    #[arg(long)]
    n: Option<u64>,
    /// --task: which held-out split: `test` (report) or `dev` (tune). Every problem belongs
    /// to one split by a hash of its prompt; training data comes from `train`.
    #[arg(long, default_value = "test", value_parser = crate::runs::parse_split)]
    split: data::tasks::Split,
    /// --task: seed of the problems drawn from the split.
    #[arg(long, default_value_t = infer::tasks::EVAL_SEED)]
    seed: u64,
    /// --task: sequences decoded together.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// --task: one difficulty for every problem (add: digits, mul: 1-4, expr: depth, sort:
    /// length); default: each task's range.
    #[arg(long)]
    difficulty: Option<u32>,
    /// --task: print the first N answers with their reasoning.
    #[arg(long, default_value_t = 0)]
    show: usize,
}

pub fn run(a: EvalArgs) -> Result<()> {
    if let Some(t) = &a.task {
        let n = a.n.unwrap_or(400) as usize;
        return eval_task(&a.run, t, n, a.seed, a.difficulty, a.split, a.batch, a.show);
    }
    let data = a.data.expect("clap requires --data without --task");
    let lr = load_run(&a.run)?;
    let (b, t) = (lr.cfg.train.batch_size, lr.cfg.train.seq_len);
    let ds = Dataset::open(&data, lr.cfg.model.vocab_size, t)?;
    // another dataset's tokenizer maps the same ids to other text: its loss and bits per
    // byte would be meaningless numbers (issue 11)
    let run_tok = run_tokenizer_path(&a.run, &lr.checkpoint)?;
    let run_json =
        std::fs::read(&run_tok).with_context(|| format!("cannot read {}", run_tok.display()))?;
    if data::sha256_hex(&run_json) != ds.tokenizer_sha256 {
        bail!(
            "{}: its tokenizer.json is not the one {} was trained with ({}); evaluate on data prepared with the run's tokenizer",
            data.display(),
            a.run.display(),
            run_tok.display()
        );
    }
    let mut m = Model::with_params(&lr.cfg.model, Layout::new(&lr.cfg.model), lr.params, b, t);
    let e = evaluate(&mut m, &ds.val, a.n.unwrap_or(0));
    let meta = ds.meta.as_ref().expect("a data dir has meta.json");
    println!(
        "checkpoint     {} (step {})",
        lr.checkpoint.display(),
        lr.state.step
    );
    println!(
        "val loss       {:.4} nats/token over {} tokens",
        e.loss, e.tokens
    );
    println!("perplexity     {:.2}", e.loss.exp());
    if meta.kind == "corpus" {
        let bytes_per_token = meta.val_bytes as f64 / meta.val_tokens as f64;
        let bpb = e.loss / std::f64::consts::LN_2 / bytes_per_token;
        println!("bits per byte  {bpb:.4}  ({bytes_per_token:.3} bytes/token)");
    }
    Ok(())
}

/// `moelab eval --run RUN --task NAMES [--split dev|test]`.
#[allow(clippy::too_many_arguments)]
fn eval_task(
    run: &Path,
    task_spec: &str,
    n: usize,
    seed: u64,
    difficulty: Option<u32>,
    split: Split,
    slots: usize,
    show: usize,
) -> Result<()> {
    let task_list = tasks::parse_list(task_spec).map_err(anyhow::Error::msg)?;
    if split == Split::Train {
        bail!("--split train is training data; evaluate on dev (tuning) or test (reporting)");
    }
    if n == 0 {
        bail!("--n must be at least 1");
    }
    let r = load_reasoner(run)?;
    let (bar, mut tick) = task_bar("eval", n);
    let e =
        infer::tasks::evaluate_tasks(&r, &task_list, n, seed, difficulty, split, slots, &mut tick);
    bar.finish_and_clear();
    println!(
        "{} (step {}), {n} problems of the {} split (seed {seed}), greedy",
        r.checkpoint.display(),
        r.step,
        split.name()
    );
    println!("active matmul params per token: {}\n", r.active_params());
    for a in e.attempts.iter().take(show) {
        let mark = if a.verified { "correct" } else { "wrong" };
        // a format without reasoning markers (an imported model's) has no think block
        if r.chat.think_ids().is_some() {
            println!(
                "[{mark}] {}\n<think>\n{}\n</think>\n{}\n",
                a.prompt, a.reasoning, a.answer
            );
        } else {
            println!("[{mark}] {}\n{}\n", a.prompt, a.answer);
        }
    }
    print!("{}", e.score.table());
    println!(
        "\ndecode: {:.0} tokens/s ({slots} sequences per batch)",
        e.tokens_per_s
    );
    Ok(())
}
