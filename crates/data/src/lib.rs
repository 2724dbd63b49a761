//! moelab's data layer: corpus ingestion (`.txt` files, folders, `.jsonl` with a `text`
//! field), token shards with a versioned header, `meta.json`, and a seeded batch loader whose
//! position is one integer saved in checkpoints.
//!
//! Not here: models, tensors, training.
//!
//! DATA_DIR layout: `tokenizer.json`, `train.bin`, `val.bin`, `meta.json`.

pub mod chat;
pub mod corpus;
pub mod loader;
pub mod meta;
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

/// sha256 of bytes, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}
