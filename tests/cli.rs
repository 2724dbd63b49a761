//! End-to-end tests of the `moelab` binary in a temp dir.

mod common;

use common::bin as moelab;
use std::path::PathBuf;

fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("cli", name)
}

fn bench_json(threads: usize, config: &str) -> serde_json::Value {
    bench_json_with(threads, config, &[])
}

fn bench_json_with(threads: usize, config: &str, extra: &[&str]) -> serde_json::Value {
    let out = moelab()
        .args([
            "bench", "train", "--config", config, "--steps", "20", "--warmup", "0", "--json",
        ])
        .args(extra)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Determinism through the real binary: 20 training steps, RAYON_NUM_THREADS = 1, 2, 4 and a
/// repeated run give the same weights hash.
#[test]
fn weights_hash_independent_of_rayon_num_threads() {
    let one = bench_json(1, "tiny");
    let hash = one["weights_hash"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 64);
    for threads in [2, 4, 1] {
        let other = bench_json(threads, "tiny");
        assert_eq!(other["threads"], threads);
        assert_eq!(
            other["weights_hash"].as_str().unwrap(),
            hash,
            "hash differs with {threads} threads"
        );
    }
}

/// The same with bf16 matmuls (their tiles split across threads by the kernel itself), and
/// not the f32 weights: the bf16 path is the one taken.
#[test]
fn bf16_weights_hash_independent_of_rayon_num_threads() {
    let bf16 = ["--precision", "bf16"];
    let one = bench_json_with(1, "tiny", &bf16);
    assert_eq!(one["precision"], "bf16");
    let hash = one["weights_hash"].as_str().unwrap().to_string();
    for threads in [2, 4] {
        let other = bench_json_with(threads, "tiny", &bf16);
        assert_eq!(
            other["weights_hash"].as_str().unwrap(),
            hash,
            "bf16 hash differs with {threads} threads"
        );
    }
    let f32_run = bench_json(2, "tiny");
    assert_ne!(f32_run["weights_hash"].as_str().unwrap(), hash);
    let (lb, lf) = (
        one["loss"].as_f64().unwrap(),
        f32_run["loss"].as_f64().unwrap(),
    );
    assert!((lb - lf).abs() < 0.02 * lf, "bf16 loss {lb} vs f32 {lf}");
}

#[test]
fn bench_reports_throughput_and_mfu() {
    let v = bench_json(2, "tiny");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["gflops"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_mib"].as_f64().unwrap() > 0.0);
    assert!(v["loss"].as_f64().unwrap().is_finite());
}

/// A run directory named like a preset (`--out teacher`) does not hide the preset; a directory
/// that names no preset is refused, pointing at the config file of a run; a pipe still works.
#[test]
fn a_directory_is_not_a_config() {
    let d = tmpdir("dircfg");
    for dir in ["tiny", "myrun", "empty"] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
    }
    std::fs::write(d.join("myrun/config.toml"), "").unwrap();
    let run = |config: &str| {
        moelab()
            .args([
                "bench", "train", "--config", config, "--steps", "2", "--warmup", "0",
            ])
            .current_dir(&d)
            .output()
            .unwrap()
    };
    let out = run("tiny");
    assert!(out.status.success(), "{}", common::text(&out));
    for (dir, says) in [
        (
            "myrun",
            "\"myrun\" is a directory, not a config file (this run keeps its config in myrun/config.toml)\n",
        ),
        ("empty", "\"empty\" is a directory, not a config file\n"),
    ] {
        let out = run(dir);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    // a config read from a pipe (`--config <(...)`) is a file that exists and is no directory
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} bench train --config <(cat {}) --steps 2 --warmup 0",
            env!("CARGO_BIN_EXE_moelab"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.toml")
        ))
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
}

#[test]
fn bad_config_is_one_line_error_naming_field() {
    let d = tmpdir("badcfg");
    let tiny = include_str!("../configs/tiny.toml");
    let cases = [
        (
            "heads.toml",
            tiny.replace("n_heads = 4 ", "n_heads = 3 "),
            "n_heads",
        ),
        (
            "topk.toml",
            tiny.replace("top_k = 2 ", "top_k = 9 "),
            "top_k",
        ),
        (
            "unknown.toml",
            tiny.replace("[train]", "dropuot = 0.1\n[train]"),
            "dropuot",
        ),
        (
            "zero.toml",
            tiny.replace("d_model = 64 ", "d_model = 0 "),
            "d_model",
        ),
    ];
    for (name, text, field) in cases {
        assert_ne!(text, tiny, "test edit for {name} did not apply");
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        let out = moelab()
            .args([
                "bench",
                "train",
                "--config",
                p.to_str().unwrap(),
                "--steps",
                "1",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{name}: error is not one line: {err}"
        );
        assert!(
            err.contains(field),
            "{name}: error does not name {field}: {err}"
        );
    }
    let out = moelab()
        .args(["bench", "train", "--config", "no-such-preset"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("presets: tiny, small-dense, small-moe"));
    let out = moelab().args(["bench", "train"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit with 2");
    // a zero context length (divided by once) is refused before the run is read
    let out = moelab()
        .args([
            "eval",
            "--run",
            "no-run",
            "--task",
            "passkey",
            "--context",
            "0,128",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--context"));
    // counts of zero (NaN in the demo's table) or past what memory holds
    for (args, flag) in [
        (
            &["demo", "--prompts", "0", "--out", "no-demo"][..],
            "--prompts",
        ),
        (
            &["demo", "--eval-n", "0", "--out", "no-demo"][..],
            "--eval-n",
        ),
        (
            &[
                "distill",
                "generate",
                "--teacher",
                "no-run",
                "--n",
                "100000",
                "--k",
                "1000",
                "--out",
                "x.jsonl",
            ][..],
            "--k 1000",
        ),
        (
            &["eval", "--run", "no-run", "--task", "add", "--n", "0"][..],
            "--n 0",
        ),
    ] {
        let out = moelab().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new("no-demo").exists());
}
