//! `moelab prepare --corpus`: corpus -> tokenizer + token shards + meta.json.
//!
//! The split is deterministic: documents in input order (folders sorted), the last
//! `val_fraction` of the bytes (cut at a line break) is validation, as nanoGPT does. The
//! tokenizer is trained on the training split only. Every document ends with `<|end|>`.
//!
//! A data dir appears whole or not at all: it is built in a temp dir beside `--out` and
//! renamed into place at the end (with `--force`, atomically exchanged with the old one), so
//! a prepare that dies half-way leaves the old data dir as it was.

use crate::corpus::{self, InputRecord};
use crate::meta::{Meta, FORMAT_VERSION};
use crate::tasks::{generate_mix, Split};
use crate::{io_err, sha256_hex, shard, Error, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct PrepareOpts {
    pub vocab_size: usize,
    pub val_fraction: f64,
    /// Replace an existing data dir.
    pub force: bool,
    /// Encode with this tokenizer (e.g. an imported model's) instead of training one, and
    /// end each document with this id (its end-of-text token).
    pub tokenizer: Option<(Tokenizer, u32)>,
}

/// Splits documents so the last `frac` of the bytes are validation, cutting at a line break.
fn split(docs: Vec<String>, frac: f64) -> (Vec<String>, Vec<String>) {
    let total: usize = docs.iter().map(|d| d.len()).sum();
    let mut budget = ((1.0 - frac) * total as f64) as usize;
    let (mut train, mut val) = (vec![], vec![]);
    for d in docs {
        if budget == 0 {
            val.push(d);
        } else if d.len() <= budget {
            budget -= d.len();
            train.push(d);
        } else {
            // cut after the last line break within the budget (else the first one after it)
            let mut b = budget;
            while !d.is_char_boundary(b) {
                b -= 1;
            }
            let cut = match d[..b].rfind('\n') {
                Some(i) => i + 1,
                None => d[b..].find('\n').map_or(d.len(), |i| b + i + 1),
            };
            let (a, b) = d.split_at(cut);
            train.push(a.to_string());
            if !b.trim().is_empty() {
                val.push(b.to_string());
            }
            budget = 0;
        }
    }
    (train, val)
}

/// File name -> sha256 of each of `files` in `out` (meta.json's `outputs`).
fn output_hashes(out: &Path, files: &[&str]) -> Result<BTreeMap<String, String>> {
    let mut outputs = BTreeMap::new();
    for f in files {
        let p = out.join(f);
        outputs.insert(
            f.to_string(),
            sha256_hex(&std::fs::read(&p).map_err(io_err(&p))?),
        );
    }
    Ok(outputs)
}

/// The files a data dir may hold (a dir holding anything else is not one of ours to replace).
const DATA_FILES: [&str; 6] = [
    "tokenizer.json",
    "train.bin",
    "val.bin",
    "train.jsonl",
    "val.jsonl",
    "meta.json",
];

/// Refuses an `--out` that must not be replaced: prepared data without `--force`, a file, or
/// a dir holding files of its own (a typo of `--out` must never delete someone's corpus).
fn check_out(out: &Path, force: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let refuse = |msg: &str| {
        Err(Error::Input {
            path: out.into(),
            msg: msg.into(),
        })
    };
    if !out.is_dir() {
        return refuse("is not a directory; choose another --out");
    }
    if out.join("meta.json").exists() && !force {
        return refuse(
            "already holds prepared data; pass --force to replace it or choose another --out",
        );
    }
    for e in std::fs::read_dir(out).map_err(io_err(out))? {
        let e = e.map_err(io_err(out))?;
        let name = e.file_name().to_string_lossy().into_owned();
        // temp files of an interrupted atomic write (`name.tmp.PID`) are ours too
        let ours = DATA_FILES.contains(&name.as_str()) || name.contains(".tmp.");
        if !ours {
            return refuse(&format!(
                "is not empty and is not a data dir ({name} is not one of its files); choose another --out"
            ));
        }
    }
    Ok(())
}

/// A data dir under construction: a temp dir beside the target, renamed into place by
/// [`Staging::commit`]; dropped uncommitted (an error), it is removed.
struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    done: bool,
}

impl Staging {
    fn new(out: &Path) -> Result<Staging> {
        let name = out
            .file_name()
            .ok_or_else(|| Error::Input {
                path: out.into(),
                msg: "is not a directory name; choose another --out".into(),
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        remove_dead_stagings(&parent, &name);
        let tmp = parent.join(format!(".{name}.prepare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        Ok(Staging {
            tmp,
            out: out.to_path_buf(),
            done: false,
        })
    }

    /// Puts the finished dir in place: a plain rename when `out` does not exist, else an
    /// atomic exchange with the old dir (renameat2 RENAME_EXCHANGE), which is then removed.
    /// At no moment is there a half-written or missing data dir at `out`.
    fn commit(mut self) -> Result<()> {
        crate::fault("prepare-commit");
        let (tmp, out) = (&self.tmp, &self.out);
        if out.exists() {
            if let Err(e) = exchange(tmp, out) {
                // NOTE: filesystems without RENAME_EXCHANGE: move the old dir aside first;
                // a death between the two renames leaves it beside `out` as `.NAME.old-PID`.
                if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
                    return Err(Error::Io {
                        path: out.clone(),
                        source: e,
                    });
                }
                // (outside the `.NAME.prepare-` prefix, so no later prepare deletes the only
                // copy of the old data as a dead staging dir)
                let old = tmp.with_file_name(format!(
                    ".{}.old-{}",
                    out.file_name().unwrap_or_default().to_string_lossy(),
                    std::process::id()
                ));
                std::fs::rename(out, &old).map_err(io_err(out))?;
                std::fs::rename(tmp, out).map_err(io_err(out))?;
                let _ = std::fs::remove_dir_all(&old);
            }
            // `tmp` now holds the old data dir
            let _ = std::fs::remove_dir_all(tmp);
        } else {
            std::fs::rename(tmp, out).map_err(io_err(out))?;
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            // the renames are durable once the parent dir is
            let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes temp dirs left beside `parent/name` by prepares that died (their PID is gone).
fn remove_dead_stagings(parent: &Path, name: &str) {
    let prefix = format!(".{name}.prepare-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Prepares `out` from the corpus at `paths`. `progress` receives one-line status updates.
pub fn prepare_corpus(
    paths: &[PathBuf],
    out: &Path,
    opts: &PrepareOpts,
    progress: &dyn Fn(&str),
) -> Result<Meta> {
    if !(opts.val_fraction > 0.0 && opts.val_fraction < 1.0) {
        return Err(Error::Other(format!(
            "--val-fraction {} must be between 0 and 1",
            opts.val_fraction
        )));
    }
    check_out(out, opts.force)?;
    progress("reading corpus");
    let sources = corpus::read(paths)?;
    let inputs: Vec<InputRecord> = sources
        .iter()
        .map(|s| InputRecord {
            path: s.path.display().to_string(),
            sha256: s.sha256.clone(),
            bytes: s.bytes,
        })
        .collect();
    let docs: Vec<String> = sources.into_iter().flat_map(|s| s.docs).collect();
    let (train_docs, val_docs) = split(docs, opts.val_fraction);
    if val_docs.is_empty() || train_docs.is_empty() {
        return Err(Error::Other(
            "corpus too small to split into train and validation".into(),
        ));
    }
    let (tok, end) = match &opts.tokenizer {
        Some((t, end)) => (t.clone(), *end),
        None => {
            progress(&format!(
                "training a {}-token BPE tokenizer",
                opts.vocab_size
            ));
            let tok = Tokenizer::train(train_docs.iter(), opts.vocab_size)?;
            let end = tok
                .special("<|end|>")
                .expect("moelab tokenizers have <|end|>");
            (tok, end)
        }
    };
    progress("encoding");
    let encode = |docs: &[String]| -> Vec<u32> {
        let parts: Vec<Vec<u32>> = docs.par_iter().map(|d| tok.encode(d)).collect();
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for p in parts {
            out.extend_from_slice(&p);
            out.push(end);
        }
        out
    };
    let train = encode(&train_docs);
    let val = encode(&val_docs);
    progress("writing");
    write_shard_dir(out, &tok, &train, &val, |outputs| Meta {
        format_version: FORMAT_VERSION,
        vocab_size: tok.vocab_size(),
        inputs,
        outputs,
        train_tokens: train.len(),
        val_tokens: val.len(),
        train_bytes: train_docs.iter().map(|d| d.len()).sum(),
        val_bytes: val_docs.iter().map(|d| d.len()).sum(),
        val_fraction: opts.val_fraction,
        kind: "corpus".into(),
        tasks: None,
        passkey: None,
    })
}

/// Writes a token-shard data dir at `out` as one atomic step: tokenizer.json, train.bin,
/// val.bin, and the meta.json that `meta` makes from their sha256s.
fn write_shard_dir(
    out: &Path,
    tok: &Tokenizer,
    train: &[u32],
    val: &[u32],
    meta: impl FnOnce(BTreeMap<String, String>) -> Meta,
) -> Result<Meta> {
    let stage = Staging::new(out)?;
    let tmp = &stage.tmp;
    tok.save(&tmp.join("tokenizer.json"))?;
    shard::write(&tmp.join("train.bin"), train, tok.vocab_size())?;
    shard::write(&tmp.join("val.bin"), val, tok.vocab_size())?;
    let meta = meta(output_hashes(
        tmp,
        &["tokenizer.json", "train.bin", "val.bin"],
    )?);
    meta.save(tmp)?;
    stage.commit()?;
    Ok(meta)
}

/// Options of `moelab prepare --task`.
#[derive(Debug, Clone)]
pub struct TaskOpts {
    /// Training examples (validation gets a twentieth of this, at least 64).
    pub n: usize,
    pub seed: u64,
    pub vocab_size: usize,
    /// Include the step-by-step reasoning (false: answer-only, with an empty think block).
    pub reasoning: bool,
    /// Reuse this tokenizer.json instead of training one (to share a teacher's).
    pub tokenizer: Option<PathBuf>,
    /// One difficulty for every problem (None: each task's default range).
    pub difficulty: Option<u32>,
    pub force: bool,
}

/// The validation problems' seed, derived from the training seed (its own generator streams).
pub fn val_seed(seed: u64) -> u64 {
    seed ^ 0x7661_6c5f_7365_6564
}

/// Prepares a chat data dir of generated reasoning problems: `tokenizer.json`,
/// `train.jsonl`, `val.jsonl`, `meta.json`. The tokenizer is trained (digits split) on the
/// full solutions with reasoning, whether or not the data keeps them, so reasoning and
/// answer-only data of the same seed share one tokenizer.
pub fn prepare_tasks(
    tasks: &[crate::tasks::Task],
    out: &Path,
    opts: &TaskOpts,
    progress: &dyn Fn(&str),
) -> Result<Meta> {
    use crate::chat::{self, Example};
    if opts.n == 0 {
        return Err(Error::Other("--n must be at least 1".into()));
    }
    check_out(out, opts.force)?;
    progress("generating problems");
    let to_examples = |ps: Vec<crate::tasks::Problem>| -> Vec<Example> {
        ps.into_iter()
            .map(|p| Example {
                task: p.task.name().into(),
                difficulty: p.difficulty,
                prompt: p.prompt,
                reasoning: if opts.reasoning {
                    p.reasoning
                } else {
                    String::new()
                },
                answer: p.answer,
                verified: true,
                teacher: "ground-truth".into(),
            })
            .collect()
    };
    // Training problems come from the train split; the validation loss (a tuning signal)
    // from dev. The test split is never written to a data dir.
    let train_p = generate_mix(tasks, opts.n, opts.seed, opts.difficulty, Split::Train);
    let n_val = (opts.n / 20).max(64);
    let val_p = generate_mix(
        tasks,
        n_val,
        val_seed(opts.seed),
        opts.difficulty,
        Split::Dev,
    );
    let texts = train_p
        .iter()
        .map(|p| format!("{}\n{}\n{}", p.prompt, p.reasoning, p.answer));
    let tok = given_or_trained(opts.tokenizer.as_deref(), texts, opts.vocab_size, progress)?;
    let (train, val) = (to_examples(train_p), to_examples(val_p));
    let count =
        |ex: &[Example]| -> usize { ex.par_iter().map(|e| chat::render(&tok, e).0.len()).sum() };
    progress("writing");
    let stage = Staging::new(out)?;
    let tmp = &stage.tmp;
    tok.save(&tmp.join("tokenizer.json"))?;
    chat::write_jsonl(&tmp.join("train.jsonl"), &train)?;
    chat::write_jsonl(&tmp.join("val.jsonl"), &val)?;
    let outputs = output_hashes(tmp, &["tokenizer.json", "train.jsonl", "val.jsonl"])?;
    let meta = Meta {
        format_version: FORMAT_VERSION,
        vocab_size: tok.vocab_size(),
        inputs: vec![],
        outputs,
        train_tokens: count(&train),
        val_tokens: count(&val),
        train_bytes: 0,
        val_bytes: 0,
        val_fraction: n_val as f64 / (opts.n + n_val) as f64,
        kind: "chat".into(),
        tasks: Some(crate::meta::TaskData {
            tasks: tasks.iter().map(|t| t.name().to_string()).collect(),
            seed: opts.seed,
            reasoning: opts.reasoning,
            difficulty: opts.difficulty,
            train_examples: train.len(),
            val_examples: val.len(),
        }),
        passkey: None,
    };
    meta.save(tmp)?;
    stage.commit()?;
    Ok(meta)
}

/// The moelab tokenizer at `given`, or one trained (digits split) on `texts`.
fn given_or_trained<S: AsRef<str> + Send>(
    given: Option<&Path>,
    texts: impl Iterator<Item = S> + Send,
    vocab_size: usize,
    progress: &dyn Fn(&str),
) -> Result<Tokenizer> {
    if let Some(p) = given {
        let t = Tokenizer::from_file(p)?;
        t.require_moelab(p)?;
        return Ok(t);
    }
    progress("training the tokenizer");
    Ok(Tokenizer::train_with(texts, vocab_size, true)?)
}

/// Options of `moelab prepare --passkey`.
#[derive(Debug, Clone)]
pub struct PasskeyOpts {
    /// Training documents (validation gets a twentieth, at least 64).
    pub n: usize,
    /// Longest document in row positions: the `seq_len` the data is for.
    pub context: usize,
    pub seed: u64,
    pub vocab_size: usize,
    /// Reuse this tokenizer.json (e.g. the run to extend) instead of training one.
    pub tokenizer: Option<PathBuf>,
    pub force: bool,
}

/// Prepares a "documents" data dir of passkey documents ([`crate::passkey`]): training keys
/// from the train split, validation keys from dev; the test split is only evaluated.
pub fn prepare_passkey(out: &Path, opts: &PasskeyOpts, progress: &dyn Fn(&str)) -> Result<Meta> {
    use crate::passkey::{self, Pieces};
    use rand::SeedableRng;
    if opts.n == 0 {
        return Err(Error::Other("--n must be at least 1".into()));
    }
    check_out(out, opts.force)?;
    let texts = (0..64u32).map(|i| passkey::sample_text(10_000 + i * 1_409));
    let tok = given_or_trained(opts.tokenizer.as_deref(), texts, opts.vocab_size, progress)?;
    let end = tok
        .special("<|end|>")
        .expect("moelab tokenizers have <|end|>");
    let pieces = Pieces::new(&tok, end);
    // a document of min_context prompt-and-answer tokens and its tail fits a row of
    // `context` positions
    let least = pieces.min_context() + pieces.tail_len() - 1;
    if opts.context < least {
        return Err(Error::Other(format!(
            "--context {} is too short for a passkey document (at least {least} tokens with this tokenizer)",
            opts.context
        )));
    }
    progress("generating documents");
    let n_val = (opts.n / 20).max(64);
    let docs = |n: usize, seed: u64, split: Split| -> Vec<u32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        passkey::generate(&pieces, n, opts.context, split, &mut rng)
            .iter()
            .flat_map(|d| d.tokens())
            .collect()
    };
    let train = docs(opts.n, opts.seed, Split::Train);
    let val = docs(n_val, val_seed(opts.seed), Split::Dev);
    progress("writing");
    write_shard_dir(out, &tok, &train, &val, |outputs| Meta {
        format_version: FORMAT_VERSION,
        vocab_size: tok.vocab_size(),
        inputs: vec![],
        outputs,
        train_tokens: train.len(),
        val_tokens: val.len(),
        train_bytes: 0,
        val_bytes: 0,
        val_fraction: n_val as f64 / (opts.n + n_val) as f64,
        kind: "documents".into(),
        tasks: None,
        passkey: Some(crate::meta::PasskeyData {
            context: opts.context,
            seed: opts.seed,
            train_docs: opts.n,
            val_docs: n_val,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_cuts_at_a_line_break_near_the_fraction() {
        let docs = vec!["aaaa\nbbbb\n".to_string(), "cccc\ndddd\n".to_string()];
        let (t, v) = split(docs, 0.25);
        assert_eq!(t, vec!["aaaa\nbbbb\n".to_string(), "cccc\n".to_string()]);
        assert_eq!(v, vec!["dddd\n".to_string()]);
    }
}
