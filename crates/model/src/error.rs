//! The model crate's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config: {field}: {msg}")]
    Config { field: String, msg: String },
    #[error("could not parse config {path}: {msg}")]
    ConfigParse { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("weights file {path}: {msg}")]
    Weights { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn cfg_err(field: &str, msg: impl Into<String>) -> Error {
    Error::Config {
        field: field.to_string(),
        msg: msg.into(),
    }
}
