//! Helpers the commands share (not a command): loading a run as a [`Reasoner`], finding a
//! run's or a data dir's tokenizer, the `--split` parser, and the progress bar of task
//! generation. Commands import this module, never each other.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use infer::chat::ChatFormat;
use infer::tasks::Reasoner;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokenizer::Tokenizer;
use train::load_run;

/// A run dir (its latest checkpoint) or a checkpoint dir, with its tokenizer, ready to
/// generate.
pub fn load_reasoner(path: &Path) -> Result<Reasoner> {
    let run = load_run(path)?;
    let tok = run_tokenizer(path, &run.checkpoint)?;
    Ok(Reasoner {
        cfg: run.cfg.model,
        params: run.params,
        tok,
        checkpoint: run.checkpoint,
        step: run.state.step,
    })
}

/// As [`load_reasoner`], for the work that speaks moelab's chat format (task evaluation,
/// distillation): a run whose tokenizer lacks moelab's chat tokens (an imported model) is
/// refused with the reason.
pub fn load_task_reasoner(path: &Path) -> Result<Reasoner> {
    let r = load_reasoner(path)?;
    r.tok.require_moelab(path)?;
    Ok(r)
}

/// The chat format of the run `path` was loaded from (`r`): its `chat.json` (an imported
/// model's template) or moelab's.
pub fn chat_format(path: &Path, r: &Reasoner) -> Result<ChatFormat> {
    let tok_path = run_tokenizer_path(path, &r.checkpoint)?;
    let run_dir = tok_path.parent().unwrap_or(Path::new("."));
    ChatFormat::load(run_dir, Arc::new(r.tok.clone())).map_err(anyhow::Error::msg)
}

pub fn run_tokenizer(run: &Path, ckpt: &Path) -> Result<Tokenizer> {
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

/// A tokenizer.json path from a file, or a run or data dir holding one.
pub fn tokenizer_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("tokenizer.json")
    } else {
        p.to_path_buf()
    }
}

/// `--split dev|test` (train is training data, never evaluated on).
pub fn parse_split(s: &str) -> std::result::Result<data::tasks::Split, String> {
    match data::tasks::Split::from_name(s) {
        Some(x) if x != data::tasks::Split::Train => Ok(x),
        _ => Err("expected dev or test".into()),
    }
}

/// A progress bar over `n` generated sequences, labelled `label`, and the callback that
/// advances it (finished sequences, generated tokens) for `infer::tasks`.
pub fn task_bar(label: &str, n: usize) -> (ProgressBar, impl FnMut(usize, usize)) {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label:>10} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .expect("template")
        .progress_chars("=> "),
    );
    let (b, start) = (bar.clone(), Instant::now());
    let tick = move |done: usize, tokens: usize| {
        b.set_position(done as u64);
        b.set_message(format!(
            "{:.0} tok/s",
            tokens as f64 / start.elapsed().as_secs_f64()
        ));
    };
    (bar, tick)
}

/// Where keys and usage live unless `--keys-db` / `--db` says otherwise (serve and keys).
pub const KEYS_DB: &str = "moelab-keys.db";
