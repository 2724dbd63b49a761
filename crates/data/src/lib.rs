//! moelab's data layer: corpus ingestion (`.txt` files, folders, `.jsonl` with a `text`
//! field), token shards with a versioned header, `meta.json`, and a seeded batch loader whose
//! position is one integer saved in checkpoints.
//!
//! Not here: models, tensors, training.
//!
//! DATA_DIR layout: `tokenizer.json`, `train.bin`, `val.bin`, `meta.json`. meta.json records
//! the sha256 of every other file; readers check it ([`meta::Meta::read_checked`]).

pub mod chat;
pub mod corpus;
pub mod loader;
pub mod meta;
pub mod passkey;
pub mod prepare;
pub mod shard;
pub mod tasks;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {msg}")]
    Input { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Shard { path: PathBuf, msg: String },
    #[error("{0}")]
    Tokenizer(#[from] tokenizer::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Syncs a directory's entries (after a rename into it or a file created in it).
pub fn sync_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Writes `data` to `path` atomically: a temp file in the same directory, fsync, rename. On
/// failure (a short write on a full disk, a failed fsync) `path` is untouched and the temp
/// file is removed, so a full disk is not left fuller.
pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
        .map_err(io_err(&tmp));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// At most `max` characters of `s` on one line, with "..." when cut: errors quote an excerpt
/// of what they reject, never a whole (possibly one-line, 50 MB) file.
pub fn excerpt(s: &str, max: usize) -> String {
    let s = s.replace(['\n', '\r'], " ");
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Fault injection for the crash tests (the convention of `train`'s fault.rs):
/// `MOELAB_FAULT=point@0` aborts this process at `point`, as abruptly as `kill -9`.
pub(crate) fn fault(point: &str) {
    if std::env::var("MOELAB_FAULT").is_ok_and(|w| w == format!("{point}@0")) {
        eprintln!("MOELAB_FAULT: dying at {point}@0");
        std::process::abort();
    }
}

/// sha256 of bytes, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}
