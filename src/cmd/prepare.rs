//! `moelab prepare --corpus PATH... --out DATA_DIR` (pretraining text) and
//! `moelab prepare --task NAME[,NAME...] --out DATA_DIR` (generated reasoning problems) and
//! `moelab prepare --passkey --context N --out DATA_DIR` (long-context retrieval documents).

use anyhow::{Context, Result};
use clap::Args;
use data::prepare::{
    prepare_corpus, prepare_passkey, prepare_tasks, PasskeyOpts, PrepareOpts, TaskOpts,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Duration;
use tokenizer::Tokenizer;

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab prepare --corpus plays/ --out data/shk\n  moelab prepare --corpus a.txt b.jsonl --out data/mix --vocab-size 8192\n  moelab prepare --task all --n 20000 --out data/tasks\n  moelab prepare --task add,mul --no-reasoning --out data/tasks-answers\n  moelab prepare --passkey --context 512 --n 20000 --out data/passkey-512\n  moelab prepare --passkey --context 4096 --tokenizer runs/pk512 --out data/passkey-4k";

#[derive(Args)]
pub struct PrepareArgs {
    /// Text to train on: .txt files, folders of them (recursive), or .jsonl with a "text" field.
    #[arg(long, num_args = 1.., required_unless_present_any = ["task", "passkey"], conflicts_with_all = ["task", "passkey"])]
    corpus: Vec<PathBuf>,
    /// Reasoning tasks to generate chat data for: add, mul, expr, sort (comma-separated, or all).
    #[arg(long, conflicts_with = "passkey")]
    task: Option<String>,
    /// Passkey-retrieval documents (a number hidden in filler text, asked for at the end) of
    /// every length up to --context tokens, every token a training target; the long-context
    /// check `moelab eval --task passkey` uses held-out keys.
    #[arg(long)]
    passkey: bool,
    /// --passkey: longest document in tokens (the train.seq_len it is for).
    #[arg(long, default_value_t = 512, requires = "passkey")]
    context: usize,
    /// Data dir to write (tokenizer.json, then train.bin/val.bin or train.jsonl/val.jsonl, meta.json).
    #[arg(long)]
    out: PathBuf,
    /// Tokenizer vocabulary size (at most the model's vocab_size; task data needs far fewer
    /// and stops early).
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Fraction of the corpus (its last bytes) kept for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// --task, --passkey: number of training problems (validation gets n/20, at least 64).
    #[arg(long, default_value_t = 20000)]
    n: usize,
    /// --task, --passkey: generator seed (held-out evaluation uses other seeds).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// --task: answers only, with an empty think block (the no-reasoning baseline).
    #[arg(long)]
    no_reasoning: bool,
    /// --task: one difficulty for every problem (add: digits, mul: 1-4, expr: depth, sort:
    /// length); default: each task's range.
    #[arg(long)]
    difficulty: Option<u32>,
    /// Reuse this tokenizer instead of training one: a tokenizer.json or a run dir (e.g. a
    /// teacher's for --task; an imported model's for --corpus, to fine-tune it with
    /// `train --init`: documents then end with the model's own end-of-text token).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Replace an existing data dir.
    #[arg(long)]
    force: bool,
}

/// The tokenizer at `p` (a tokenizer.json or a run dir) and the id that ends a document:
/// `<|end|>` for moelab's tokenizers, the EOS of the run's chat.json for an imported model.
fn corpus_tokenizer(p: &std::path::Path) -> Result<(Tokenizer, u32)> {
    let path = crate::runs::tokenizer_path(p);
    let tok = Tokenizer::from_file(&path)?;
    if tok.is_moelab() {
        let end = tok.special("<|end|>").expect("moelab tokenizer");
        return Ok((tok, end));
    }
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let spec = dir.join(infer::chat::CHAT_FILE);
    let eos = std::fs::read(&spec)
        .ok()
        .and_then(|b| serde_json::from_slice::<infer::chat::ChatSpec>(&b).ok())
        .map(|s| s.eos_token)
        .filter(|s| !s.is_empty())
        .with_context(|| {
            format!(
                "{}: not a moelab tokenizer and no {} beside it names its end-of-text token; pass an imported run dir",
                path.display(),
                spec.display()
            )
        })?;
    let end = tok
        .special(&eos)
        .with_context(|| format!("{}: eos_token {eos:?} is not one token", spec.display()))?;
    Ok((tok, end))
}

pub fn run(a: PrepareArgs) -> Result<()> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    let progress = |m: &str| bar.set_message(m.to_string());
    if a.passkey {
        let opts = PasskeyOpts {
            n: a.n,
            context: a.context,
            seed: a.seed,
            vocab_size: a.vocab_size,
            tokenizer: a.tokenizer.map(|p| crate::runs::tokenizer_path(&p)),
            force: a.force,
        };
        let meta = prepare_passkey(&a.out, &opts, &progress);
        bar.finish_and_clear();
        let meta = meta?;
        let pk = meta.passkey.as_ref().expect("passkey data");
        println!(
            "{}: {} train / {} val passkey documents of up to {} tokens, {} train tokens, vocab {}",
            a.out.display(),
            pk.train_docs,
            pk.val_docs,
            pk.context,
            meta.train_tokens,
            meta.vocab_size
        );
        return Ok(());
    }
    if let Some(spec) = &a.task {
        let tasks = data::tasks::parse_list(spec).map_err(anyhow::Error::msg)?;
        let opts = TaskOpts {
            n: a.n,
            seed: a.seed,
            vocab_size: a.vocab_size,
            reasoning: !a.no_reasoning,
            tokenizer: a.tokenizer.map(|p| crate::runs::tokenizer_path(&p)),
            difficulty: a.difficulty,
            force: a.force,
        };
        let meta = prepare_tasks(&tasks, &a.out, &opts, &progress);
        bar.finish_and_clear();
        let meta = meta?;
        let td = meta.tasks.as_ref().expect("task data");
        println!(
            "{}: {} train / {} val problems ({}), {} train tokens, vocab {}",
            a.out.display(),
            td.train_examples,
            td.val_examples,
            if td.reasoning {
                "with reasoning"
            } else {
                "answers only"
            },
            meta.train_tokens,
            meta.vocab_size
        );
        return Ok(());
    }
    let opts = PrepareOpts {
        vocab_size: a.vocab_size,
        val_fraction: a.val_fraction,
        force: a.force,
        tokenizer: a.tokenizer.as_deref().map(corpus_tokenizer).transpose()?,
    };
    let meta = prepare_corpus(&a.corpus, &a.out, &opts, &progress);
    bar.finish_and_clear();
    let meta = meta?;
    println!(
        "{}: {} input files, {} train tokens ({:.2} MB), {} val tokens ({:.2} MB), vocab {}",
        a.out.display(),
        meta.inputs.len(),
        meta.train_tokens,
        meta.train_bytes as f64 / 1e6,
        meta.val_tokens,
        meta.val_bytes as f64 / 1e6,
        meta.vocab_size
    );
    Ok(())
}
