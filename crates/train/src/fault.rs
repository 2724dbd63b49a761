//! Fault injection for the crash-safety tests: `MOELAB_FAULT=point@step` makes this process
//! die at a named point of step `step`'s work (with `abort`, as abruptly as `kill -9`: no
//! destructors, no flushing), or, for points named `enospc-*`, fail there with "No space
//! left on device", for points named `eio-*` with "Input/output error" (what a failing
//! fsync reports), or (see [`active`]) poisons a value. Unset (always, outside tests) it
//! costs one env lookup per call.
//!
//! NOTE: these errors are synthetic. A real full file system (short writes) is exercised by
//! tests/crash.rs on a tmpfs it mounts; a real failing fsync needs a failing block device,
//! so `eio-fsync` stands in for it.

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
    let errno = if point.starts_with("enospc") {
        Some(28) // ENOSPC
    } else if point.starts_with("eio") {
        Some(5) // EIO
    } else {
        None
    };
    if let Some(errno) = errno {
        return Err(Error::Io {
            path: path.into(),
            source: std::io::Error::from_raw_os_error(errno),
        });
    }
    eprintln!("MOELAB_FAULT: dying at {point}@{step}");
    std::process::abort();
}

/// Whether MOELAB_FAULT asks for `point` at `step` (faults that change values, not the
/// process: `nan@S` (the logged loss), `nan-grad@S` (one gradient element), `spike@S`,
/// `corrupt-rankR@S`).
pub(crate) fn active(point: &str, step: u64) -> bool {
    std::env::var("MOELAB_FAULT").is_ok_and(|w| w == format!("{point}@{step}"))
}
