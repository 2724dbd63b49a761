//! Commands that use a trained run: `sample`, `eval`, `hash`.

use anyhow::{bail, Context, Result};
use clap::Args;
use infer::{Sampler, SamplingParams};
use model::decode::Decoder;
use model::{io, Layout, Model};
use std::io::Write;
use std::path::{Path, PathBuf};
use tokenizer::Tokenizer;
use train::dataset::Dataset;
use train::eval::evaluate;
use train::load_run;

#[derive(Args)]
pub struct SampleArgs {
    /// Run dir (its latest checkpoint) or a checkpoint dir.
    #[arg(long)]
    run: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate (stops early at <|end|> or the context length).
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run_tokenizer(run: &std::path::Path, ckpt: &std::path::Path) -> Result<Tokenizer> {
    Ok(Tokenizer::from_file(&run_tokenizer_path(run, ckpt)?)?)
}

/// The tokenizer.json of a run dir, or of the run a checkpoint dir belongs to.
pub fn run_tokenizer_path(run: &Path, ckpt: &Path) -> Result<PathBuf> {
    let candidates = [
        run.join("tokenizer.json"),
        ckpt.join("../../tokenizer.json"),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "{}: no tokenizer.json next to the checkpoint",
                run.display()
            )
        })
}

pub fn sample(a: SampleArgs) -> Result<()> {
    let lr = load_run(&a.run)?;
    let tok = run_tokenizer(&a.run, &lr.checkpoint)?;
    let end = tok.special("<|end|>").expect("moelab tokenizer");
    // Documents are separated by <|end|> in training data, so it also marks a document start.
    let mut prompt = vec![end];
    prompt.extend(tok.encode(&a.prompt));
    let mut dec = Decoder::new(&lr.cfg.model);
    if prompt.len() >= dec.remaining() {
        bail!(
            "the prompt is {} tokens; this model's context is {} tokens",
            prompt.len(),
            lr.cfg.model.max_seq_len
        );
    }
    let mut sampler = Sampler::new(SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    });
    let mut logits = vec![];
    for &t in &prompt {
        logits = dec.step(&lr.params, t).to_vec();
    }
    let mut out = std::io::stdout().lock();
    write!(out, "{}", a.prompt)?;
    let mut generated: Vec<u32> = vec![];
    let mut printed = 0;
    for _ in 0..a.max_tokens {
        let next = sampler.sample(&logits);
        if next == end || dec.remaining() == 0 {
            break;
        }
        generated.push(next);
        // print whatever decodes to complete characters so far
        let text = tok.decode(&generated);
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            write!(out, "{}", &text[printed..])?;
            out.flush()?;
            printed = text.len();
        }
        logits = dec.step(&lr.params, next).to_vec();
    }
    writeln!(out)?;
    Ok(())
}

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
    #[arg(long, default_value = "test", value_parser = parse_split)]
    split: data::tasks::Split,
    /// --task: seed of the problems drawn from the split.
    #[arg(long, default_value_t = crate::reasoning::EVAL_SEED)]
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

pub fn parse_split(s: &str) -> std::result::Result<data::tasks::Split, String> {
    match data::tasks::Split::from_name(s) {
        Some(x) if x != data::tasks::Split::Train => Ok(x),
        _ => Err("expected dev or test".into()),
    }
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if let Some(t) = &a.task {
        let n = a.n.unwrap_or(400) as usize;
        return crate::reasoning::eval_cmd(
            &a.run,
            t,
            n,
            a.seed,
            a.difficulty,
            a.split,
            a.batch,
            a.show,
        );
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

#[derive(Args)]
pub struct HashArgs {
    /// Run dir (its latest checkpoint) or a checkpoint dir.
    path: PathBuf,
}

pub fn hash(a: HashArgs) -> Result<()> {
    let lr = load_run(&a.path)?;
    println!(
        "{}  {} (step {})",
        io::weights_hash(&Layout::new(&lr.cfg.model), &lr.params),
        lr.checkpoint.display(),
        lr.state.step
    );
    Ok(())
}

/// A tokenizer.json path from a file, or a run or data dir holding one.
pub fn tokenizer_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("tokenizer.json")
    } else {
        p.to_path_buf()
    }
}
