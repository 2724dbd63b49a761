//! `meta.json` of a data dir: what went in (sha256 of every input), what came out (sha256 of
//! every output), and the numbers eval needs (bytes per split, for bits per byte).

use crate::corpus::InputRecord;
use crate::{io_err, write_atomic, Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub format_version: u32,
    pub vocab_size: usize,
    pub inputs: Vec<InputRecord>,
    /// File name -> sha256 of `tokenizer.json`, `train.bin`, `val.bin`.
    pub outputs: BTreeMap<String, String>,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// UTF-8 bytes of the text behind each split (bits per byte = nats / ln 2 / bytes).
    pub train_bytes: usize,
    pub val_bytes: usize,
    pub val_fraction: f64,
    /// "corpus" (token shards `train.bin`/`val.bin`), "chat" (`train.jsonl`/`val.jsonl`
    /// from `moelab prepare --task`) or "documents" (token shards of whole documents, each
    /// ending with `<|end|>`, packed into rows so none is cut: `moelab prepare --passkey`).
    #[serde(default = "corpus_kind")]
    pub kind: String,
    /// Chat data: the tasks, generator seed and whether reasoning is included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<TaskData>,
    /// Passkey data: how it was generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passkey: Option<PasskeyData>,
}

/// How a passkey data dir was generated (`moelab prepare --passkey`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PasskeyData {
    /// Longest document, in row positions (a training `seq_len` it fits).
    pub context: usize,
    pub seed: u64,
    pub train_docs: usize,
    pub val_docs: usize,
}

fn corpus_kind() -> String {
    "corpus".into()
}

/// How a task data dir was generated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskData {
    pub tasks: Vec<String>,
    pub seed: u64,
    pub reasoning: bool,
    /// One difficulty for every problem, if the data was generated with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<u32>,
    pub train_examples: usize,
    pub val_examples: usize,
}

impl Meta {
    /// Reads `name` from the data dir `dir` and checks it against the sha256 meta.json records
    /// for it; returns the bytes and their sha256 (hashed once: the caller reuses it, e.g. for
    /// the run's manifest). A data dir edited after `moelab prepare` (a changed token, a
    /// swapped tokenizer, a prepare killed half-way by an older moelab) is refused here.
    pub fn read_checked(&self, dir: &Path, name: &str) -> Result<(Vec<u8>, String)> {
        let path = dir.join(name);
        let Some(want) = self.outputs.get(name) else {
            return Err(Error::Input {
                path: dir.join("meta.json"),
                msg: format!("records no sha256 for {name}; re-run `moelab prepare --force`"),
            });
        };
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let got = crate::sha256_hex(&bytes);
        if &got != want {
            return Err(Error::Input {
                path: dir.into(),
                msg: format!("{name} differs from the sha256 meta.json records for it (changed after `moelab prepare`?); re-run `moelab prepare --force` with the original `--corpus` or `--task` inputs"),
            });
        }
        Ok((bytes, got))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("meta serialises");
        write_atomic(&dir.join("meta.json"), json.as_bytes())
    }

    pub fn load(dir: &Path) -> Result<Meta> {
        let path = dir.join("meta.json");
        if !dir.exists() {
            return Err(Error::Input {
                path: dir.into(),
                msg: "data dir does not exist; run `moelab prepare --corpus PATH --out DIR` first"
                    .into(),
            });
        }
        if !path.exists() {
            return Err(Error::Input {
                path: dir.into(),
                msg: "is not a prepared data dir (no meta.json); run `moelab prepare` first".into(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let meta: Meta = serde_json::from_str(&text).map_err(|e| Error::Input {
            path: path.clone(),
            msg: format!("malformed ({e}); re-run `moelab prepare`"),
        })?;
        if meta.format_version != FORMAT_VERSION {
            return Err(Error::Input { path, msg: format!("format version {}, this moelab reads {FORMAT_VERSION}; re-run `moelab prepare`", meta.format_version) });
        }
        Ok(meta)
    }
}
