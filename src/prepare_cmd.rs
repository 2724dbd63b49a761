//! `moelab prepare --corpus PATH... --out DATA_DIR`.

use anyhow::Result;
use clap::Args;
use data::prepare::{prepare_corpus, PrepareOpts};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct PrepareArgs {
    /// Text to train on: .txt files, folders of them (recursive), or .jsonl with a "text" field.
    #[arg(long, num_args = 1.., required = true)]
    corpus: Vec<PathBuf>,
    /// Data dir to write (tokenizer.json, train.bin, val.bin, meta.json).
    #[arg(long)]
    out: PathBuf,
    /// Tokenizer vocabulary size (must equal the model's vocab_size).
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Fraction of the corpus (its last bytes) kept for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Replace an existing data dir.
    #[arg(long)]
    force: bool,
}

pub fn run(a: PrepareArgs) -> Result<()> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    let opts = PrepareOpts {
        vocab_size: a.vocab_size,
        val_fraction: a.val_fraction,
        force: a.force,
    };
    let meta = prepare_corpus(&a.corpus, &a.out, &opts, &|m| {
        bar.set_message(m.to_string())
    });
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
