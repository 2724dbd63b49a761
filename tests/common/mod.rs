//! The toolkit every end-to-end suite uses (issue 12): one builder for the `moelab` command
//! (2 rayon threads unless told otherwise, an optional injected fault), temp dirs, output
//! text, prepared tiny corpora and configs, weights hashes and file snapshots.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const CRASH_TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/configs/crash-tiny.toml");

/// The moelab binary as a command, with RAYON_NUM_THREADS=2 (a later `.env` overrides it).
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moelab"));
    c.env("RAYON_NUM_THREADS", "2");
    c
}

/// `moelab ARGS` with 2 threads, run to completion.
pub fn moelab(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// `moelab ARGS` with `threads` rayon threads and, when given, a fault injected at a named
/// point (MOELAB_FAULT; see crates/train/src/fault.rs).
pub fn moelab_with(args: &[&str], threads: &str, fault: Option<&str>) -> Output {
    let mut c = bin();
    c.args(args).env("RAYON_NUM_THREADS", threads);
    if let Some(f) = fault {
        c.env("MOELAB_FAULT", f);
    }
    c.output().unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// stdout and stderr of a finished command.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh temp dir for one test.
pub fn tmpdir(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moelab-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a generated corpus into `d` and prepares it (vocab 300) into `d/data`.
pub fn prepared_corpus(d: &Path, seed: u64) -> PathBuf {
    let words = [
        "thou", "art", "the", "king", "of", "night", "and", "day", "my", "lord",
    ];
    let mut x = seed;
    let mut t = String::new();
    for i in 0..6000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        t.push_str(words[(x >> 40) as usize % words.len()]);
        t.push(if i % 11 == 10 { '\n' } else { ' ' });
    }
    std::fs::write(d.join("corpus.txt"), t).unwrap();
    let data = d.join("data");
    let o = bin()
        .args([
            "prepare",
            "--corpus",
            s(&d.join("corpus.txt")),
            "--out",
            s(&data),
        ])
        .args(["--vocab-size", "300"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    data
}

/// tests/configs/crash-tiny.toml with `edit` applied, written to `d/cfg.toml`.
pub fn tiny_config(d: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let p = d.join("cfg.toml");
    std::fs::write(&p, edit(std::fs::read_to_string(CRASH_TINY).unwrap())).unwrap();
    p
}

/// The weights hash of a run's latest checkpoint (`moelab hash`).
pub fn hash(run: &Path) -> String {
    let o = bin().args(["hash", s(run)]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Says, past the test harness's capture, that a test did not run and proved nothing. (The
/// harness swallows `eprintln!` of passing tests; a skip must be seen in every run.)
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: {why}.\n*** It passed vacuously and proved NOTHING in this run. ***\n"
    );
}

/// A tmpfs of a fixed size mounted for as long as the value lives: a real small file system
/// that fills up (short writes, ENOSPC), unlike an injected error. Unmounted on drop, also
/// when the test panics.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `kib` KiB at `dir`. Err(why) when this process is not root (mounting
    /// needs it); a root that cannot mount is a broken test machine and panics.
    pub fn mount(dir: &Path, kib: u64) -> Result<Tmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root, and mounting a tmpfs needs root (CI runs as root)".into());
        }
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k"),
                "tmpfs",
                s(dir),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "root, yet mount failed: {}", text(&o));
        Ok(Tmpfs { dir: dir.into() })
    }

    /// Bytes an unprivileged writer can still write (statvfs f_bavail).
    pub fn free(&self) -> u64 {
        let c = std::ffi::CString::new(s(&self.dir)).unwrap();
        // SAFETY: statvfs fills the zeroed struct; c is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|st| st.success());
        if !ok {
            // still busy: detach it now, the kernel frees it when the last user goes
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Every file under `dir` (recursively) with its bytes, sorted by path.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Copies the tree at `from` to `to` (files and dirs only).
pub fn copy_tree(from: &Path, to: &Path) {
    for (p, bytes) in files_under(from) {
        let dst = to.join(p.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::write(dst, bytes).unwrap();
    }
}

/// The floats of a checkpoint's model.safetensors (every tensor moelab writes is F32) and how
/// many of them are not finite.
pub fn non_finite_weights(ckpt: &Path) -> (usize, usize) {
    let b = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&b[8..8 + n]).unwrap();
    assert_eq!(
        header.matches("\"dtype\":").count(),
        header.matches("\"dtype\":\"F32\"").count(),
        "not all F32: {header}"
    );
    let floats: Vec<f32> = b[8 + n..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (
        floats.len(),
        floats.iter().filter(|v| !v.is_finite()).count(),
    )
}

/// The checkpoint dir `latest` names.
pub fn latest_checkpoint(run: &Path) -> PathBuf {
    let name = std::fs::read_to_string(run.join("latest")).unwrap();
    run.join("checkpoints").join(name.trim())
}
