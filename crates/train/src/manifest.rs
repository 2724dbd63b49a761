//! `RUN_DIR/manifest.json`: what a run was made from and what it produced, so that anyone
//! can replay it (`moelab verify`) and check that they get the same weights: the sha256 of
//! the config, the tokenizer and every data file read, the code version, the seed, the world
//! size of each segment of the run (it may be resumed with other settings), and the weights
//! hash of every checkpoint written.
//!
//! Rewritten atomically (temp file + rename) at the start of each segment and after each
//! checkpoint, by the process that writes checkpoints (rank 0).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;

/// The code that trained: the package version and, when built from a git checkout, the
/// commit (`build.rs`).
pub fn code_version() -> String {
    let v = env!("CARGO_PKG_VERSION");
    match option_env!("MOELAB_GIT_COMMIT") {
        Some(c) if !c.is_empty() => format!("{v}+git.{c}"),
        _ => v.to_string(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataRecord {
    /// "dir" (a data dir of `moelab prepare`) or "examples" (chat examples in memory, e.g.
    /// verified traces).
    pub kind: String,
    /// The data dir, absolute (for "dir").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// sha256 of each file read ("dir"), or of the examples' JSON ("examples": `train`, `val`).
    pub sha256: BTreeMap<String, String>,
}

/// Where a run's initial weights came from (`moelab train --init`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InitRecord {
    /// The run dir, checkpoint or imported file, absolute.
    pub path: String,
    /// Weights hash of the initial weights (what `verify` checks before replaying).
    pub weights_hash: String,
    /// sha256 of the source files an imported model came from (its import.json's).
    #[serde(default)]
    pub source_sha256: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Segment {
    /// The step this segment started from (0, or the checkpoint it resumed).
    pub from_step: u64,
    pub world_size: usize,
    pub threads: usize,
    pub code_version: String,
}

/// How a `--time-budget` run chose its steps (its config.toml holds the result, so a replay
/// needs none of this; it says why the run has the steps it has). A run killed inside a refit
/// (config.toml written, the manifest not yet) resumes with config.toml's steps; the times
/// here are then the fit before that one's, which the process did not live to record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TimeBudget {
    /// The budget, seconds from process start.
    pub seconds: f64,
    /// Seconds spent before the steps were fixed (start-up, the scratch measurement and the
    /// run's first steps).
    pub spent_seconds: f64,
    /// Measured seconds per optimizer step on the host that started the run: the run's own
    /// steps inside the warm-up ([`crate::trainer::refit_window`]) or, with a "wsd"
    /// schedule, the last window of steps timed before the decay; a scratch model's when no
    /// window can be timed (a "cosine" warm-up under 6 steps).
    pub step_seconds: f64,
    /// The steps chosen (the run's `train.steps`).
    pub steps: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub config_sha256: String,
    pub tokenizer_sha256: String,
    pub data: DataRecord,
    pub seed: u64,
    /// Optimizer steps the run is configured for (the LR schedule depends on it).
    pub steps: u64,
    /// Micro-batches per step across all processes.
    pub grad_accum: u64,
    /// Whether a teacher's logits were distilled (`moelab verify` cannot replay that).
    #[serde(default)]
    pub teacher: bool,
    /// The weights training started from (`train --init`), None for a random init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitRecord>,
    /// `train --time-budget`: how the steps were chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_budget: Option<TimeBudget>,
    pub segments: Vec<Segment>,
    /// Weights hash of every checkpoint written, by step.
    pub checkpoints: BTreeMap<u64, String>,
}

impl Manifest {
    pub fn path(run: &Path) -> PathBuf {
        run.join("manifest.json")
    }

    pub fn load(run: &Path) -> Result<Manifest> {
        let p = Manifest::path(run);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            Error::Usage(format!(
                "{}: cannot read ({e}); only runs trained by this moelab have a manifest",
                p.display()
            ))
        })?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::Usage(format!("{}: malformed manifest ({e})", p.display())))?;
        if m.format_version != FORMAT_VERSION {
            return Err(Error::Usage(format!(
                "{}: manifest format {}, this moelab reads {FORMAT_VERSION}",
                p.display(),
                m.format_version
            )));
        }
        Ok(m)
    }

    pub fn save(&self, run: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("manifest serialises");
        data::write_atomic(&Manifest::path(run), json.as_bytes()).map_err(Error::from)
    }
}
