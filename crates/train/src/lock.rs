//! The run-dir lock: one process at a time trains in a run dir. Two `moelab train` on one
//! `--out` (or a `--resume` while the run is still training) would interleave metrics.jsonl,
//! overwrite each other's checkpoints and leave a run that `moelab verify` cannot replay.
//!
//! An advisory `flock` on `RUN_DIR/train.lock`, which holds the PID of the process that owns
//! it. The kernel releases the lock when that process dies, however it dies (`kill -9`
//! included), so a stale lock file never blocks anyone: the next process takes it over.
//!
//! NOTE: the file is never deleted. Deleting a lock file races with a process that has just
//! opened it (it would lock a file nobody else can see); an idle `train.lock` costs nothing.
//! Only the process that writes (rank 0 of a data-parallel group) takes the lock.

use crate::{io_err, Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;

pub const LOCK_FILE: &str = "train.lock";

/// Held while this process trains in a run dir; dropping it (or dying) releases the lock.
pub struct RunLock {
    _file: File,
}

/// `flock(op | LOCK_NB)`: Ok(false) when another process holds a conflicting lock.
fn try_flock(f: &File, op: i32, path: &Path) -> Result<bool> {
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(Error::Io {
        path: path.into(),
        source: e,
    })
}

fn in_use(run: &Path, pid: &str) -> Error {
    let who = if pid.is_empty() {
        "another process".to_string()
    } else {
        format!("process {pid}")
    };
    let stop = if pid.is_empty() {
        String::new()
    } else {
        format!(" or stop it (`kill {pid}` checkpoints and exits)")
    };
    Error::Usage(format!(
        "{} is in use: {who} is training in it (lock {}); wait for it to finish{stop}, or choose another --out",
        run.display(),
        run.join(LOCK_FILE).display()
    ))
}

fn read_pid(f: &mut File) -> String {
    let mut s = String::new();
    let _ = f.rewind().and_then(|_| f.read_to_string(&mut s));
    s.trim().chars().take(20).collect()
}

impl RunLock {
    /// Takes the lock of the existing run dir `run`, or says which process holds it.
    pub fn acquire(run: &Path) -> Result<RunLock> {
        let p = run.join(LOCK_FILE);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(io_err(&p))?;
        if !try_flock(&f, libc::LOCK_EX, &p)? {
            return Err(in_use(run, &read_pid(&mut f)));
        }
        f.set_len(0).map_err(io_err(&p))?;
        f.rewind().map_err(io_err(&p))?;
        writeln!(f, "{}", std::process::id()).map_err(io_err(&p))?;
        Ok(RunLock { _file: f })
    }
}

/// Refuses when another process trains in `run`. Writes nothing: the check every process
/// makes before anything is written.
pub fn check_free(run: &Path) -> Result<()> {
    let p = run.join(LOCK_FILE);
    let Ok(mut f) = File::open(&p) else {
        return Ok(());
    };
    // NOTE: a shared lock tests for the holder's exclusive one; two checks never conflict
    if try_flock(&f, libc::LOCK_SH, &p)? {
        return Ok(()); // released when `f` closes
    }
    Err(in_use(run, &read_pid(&mut f)))
}
