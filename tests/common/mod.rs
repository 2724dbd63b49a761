//! Helpers shared by the end-to-end tests that train tiny runs through the binary
//! (crash.rs, verify.rs, anomaly.rs, mpi.rs).
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const CRASH_TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/configs/crash-tiny.toml");

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
    let o = Command::new(env!("CARGO_BIN_EXE_moelab"))
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
    let o = Command::new(env!("CARGO_BIN_EXE_moelab"))
        .args(["hash", s(run)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
