//! moelab and the open-weight ecosystem: a Hugging Face model dir or a GGUF file becomes a
//! moelab run dir (weights as the fp32 master copy, the model's own tokenizer and chat
//! template), which `sample`, `chat`, `serve` and `train --init` then use like any run.
//!
//! - [`hf`]: a `save_pretrained` dir (config.json, safetensors, tokenizer files);
//! - [`run`]: the run dir an import writes, atomically.
//!
//! The tensor mapping of each family is `model::hf`'s (proved against transformers by the
//! golden tests); this crate reads files and writes runs.

pub mod export;
pub mod gguf;
pub mod hf;
pub mod run;
pub mod upcycle;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] model::Error),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::Error),
    #[error(transparent)]
    Train(#[from] train::Error),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn ferr(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.into(),
        msg: msg.into(),
    }
}
