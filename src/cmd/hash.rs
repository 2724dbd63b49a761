//! `moelab hash`: the weights hash of a run's latest checkpoint (or of a checkpoint dir).

/// `--help` examples.
pub const EXAMPLES: &str =
    "Examples:\n  moelab hash runs/shk\n  moelab hash runs/shk/checkpoints/step-0000500";

use anyhow::Result;
use clap::Args;
use model::{io, Layout};
use std::path::PathBuf;
use train::load_run;

#[derive(Args)]
pub struct HashArgs {
    /// Run dir (its latest checkpoint) or a checkpoint dir.
    path: PathBuf,
}

pub fn run(a: HashArgs) -> Result<()> {
    let lr = load_run(&a.path)?;
    println!(
        "{}  {} (step {})",
        io::weights_hash(&Layout::new(&lr.cfg.model), &lr.params),
        lr.checkpoint.display(),
        lr.state.step
    );
    Ok(())
}
