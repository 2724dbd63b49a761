//! Fault injection for the crash-safety tests: `MOELAB_FAULT=point@step` makes this process
//! die at a named point of step `step`'s work (with `abort`, as abruptly as `kill -9`: no
//! destructors, no flushing), or, for points named `enospc-*`, fail there with "No space
//! left on device", or (see [`active`]) poisons a value. Unset (always, outside tests) it
//! costs one env lookup per call.

use crate::{Error, Result};
use std::path::Path;

/// Dies or fails at `point` of `step` when MOELAB_FAULT asks for it.
pub(crate) fn point(point: &str, step: u64, path: &Path) -> Result<()> {
    let Ok(want) = std::env::var("MOELAB_FAULT") else {
        return Ok(());
    };
    if want != format!("{point}@{step}") {
        return Ok(());
    }
    if point.starts_with("enospc") {
        return Err(Error::Io {
            path: path.into(),
            source: std::io::Error::from_raw_os_error(28), // ENOSPC
        });
    }
    eprintln!("MOELAB_FAULT: dying at {point}@{step}");
    std::process::abort();
}

/// Whether MOELAB_FAULT asks for `point` at `step` (faults that change values, not the
/// process: `nan@S`, `spike@S`, `corrupt-rankR@S`).
pub(crate) fn active(point: &str, step: u64) -> bool {
    std::env::var("MOELAB_FAULT").is_ok_and(|w| w == format!("{point}@{step}"))
}
