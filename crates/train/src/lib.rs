//! moelab training: the loop (reads top to bottom in [`trainer`]), the LR schedule,
//! training data ([`dataset`]), evaluation, checkpoints with exact resume.
//!
//! Not here: terminals. Progress goes to a [`trainer::Reporter`]; the CLI draws it.

pub mod budget;
pub mod checkpoint;
pub mod dataset;
pub mod dist;
pub mod eval;
mod fault;
pub mod lock;
pub mod manifest;
pub mod schedule;
pub mod trainer;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] model::Error),
    #[error(transparent)]
    Data(#[from] data::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{0}")]
    Usage(String),
    #[error("step {step}: the processes disagree: rank(s) {ranks:?} hold different weights than the others; stopping (the last checkpoint is intact)")]
    Diverged { step: u64, ranks: Vec<usize> },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// A trained run loaded for inference or evaluation.
pub struct LoadedRun {
    pub cfg: model::Config,
    pub params: Vec<f32>,
    pub checkpoint: PathBuf,
    pub state: checkpoint::State,
}

/// Loads the weights of `path`: a run dir (its latest checkpoint) or a checkpoint dir.
pub fn load_run(path: &std::path::Path) -> Result<LoadedRun> {
    let (run, ckpt) = if path.join("state.json").exists() {
        (
            path.parent().and_then(|p| p.parent()).map(PathBuf::from),
            path.to_path_buf(),
        )
    } else if !path.exists() {
        return Err(Error::Usage(format!(
            "{}: no such run; train one with `moelab train --out {}`",
            path.display(),
            path.display()
        )));
    } else {
        match checkpoint::latest_good(path)? {
            Some((c, _)) => (Some(path.to_path_buf()), c),
            None => {
                return Err(Error::Usage(format!(
                    "{}: has no checkpoint yet (is it a run dir?)",
                    path.display()
                )))
            }
        }
    };
    let state = checkpoint::read_state(&ckpt)?;
    let mut cfg = match run
        .as_ref()
        .map(|r| r.join("config.toml"))
        .filter(|p| p.exists())
    {
        Some(p) => model::Config::from_file(&p)?,
        None => model::Config {
            model: state.model.clone(),
            train: Default::default(),
        },
    };
    cfg.model = state.model.clone();
    // (a format-1 state.json has no checksum: its model is checked like a config's)
    cfg.model.validate().map_err(|e| Error::Checkpoint {
        path: ckpt.clone(),
        msg: format!("state.json: {e}"),
    })?;
    let layout = model::Layout::new(&cfg.model);
    let weights = ckpt.join("model.safetensors");
    if let Some(want) = state.files.get("model.safetensors") {
        let bytes = std::fs::read(&weights).map_err(io_err(&weights))?;
        if &data::sha256_hex(&bytes) != want {
            return Err(Error::Checkpoint {
                path: ckpt,
                msg: "model.safetensors is corrupted (sha256 mismatch)".into(),
            });
        }
    }
    let params = model::io::load(&layout, &weights, true)?;
    Ok(LoadedRun {
        cfg,
        params,
        checkpoint: ckpt,
        state,
    })
}
