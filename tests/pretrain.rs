//! End-to-end pretraining through the real binary in a temp dir, on the tiny config:
//! prepare -> train -> sample / eval / hash, Ctrl-C and resume, and bad input that must give
//! a one-line error and leave everything on disk as it was.

mod common;

use common::{bin as moelab, moelab as run};
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("e2e", name)
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "moelab {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail with exit code 1 and a one-line error containing `want`.
fn fails(args: &[&str], want: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "moelab {args:?} should fail: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "moelab {args:?}: error is not one line: {err}"
    );
    assert!(
        err.contains(want),
        "moelab {args:?}: error {err:?} does not mention {want:?}"
    );
}

fn write_corpus(dir: &Path) {
    let words = [
        "thou", "art", "the", "king", "of", "night", "and", "day", "my", "lord", "speak", "hence",
        "ROMEO:", "JULIET:",
    ];
    let mut x: u64 = 9;
    let mut text = String::new();
    for i in 0..8000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(words[(x >> 40) as usize % words.len()]);
        text.push(if i % 9 == 8 { '\n' } else { ' ' });
    }
    std::fs::create_dir_all(dir.join("plays/more")).unwrap();
    let (a, b) = text.split_at(text.len() / 2);
    std::fs::write(dir.join("plays/a.txt"), a).unwrap();
    std::fs::write(dir.join("plays/more/b.txt"), b).unwrap();
    std::fs::write(
        dir.join("plays/notes.jsonl"),
        "{\"text\": \"thou art the king\"}\n{\"text\": \"my lord, speak\"}\n",
    )
    .unwrap();
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
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

#[test]
fn prepare_train_sample_eval_hash() {
    let d = tmpdir("flow");
    write_corpus(&d);
    let (corpus, data, runp) = (d.join("plays"), d.join("data"), d.join("run"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = ok(&[
        "prepare",
        "--corpus",
        &s(&corpus),
        "--out",
        &s(&data),
        "--vocab-size",
        "400",
    ]);
    assert!(out.contains("3 input files"), "{out}");
    for f in ["tokenizer.json", "train.bin", "val.bin", "meta.json"] {
        assert!(data.join(f).exists(), "{f}");
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["inputs"].as_array().unwrap().len(), 3);
    assert_eq!(meta["outputs"]["train.bin"].as_str().unwrap().len(), 64);
    // preparing again is deterministic (byte-identical outputs) and needs --force
    fails(
        &["prepare", "--corpus", &s(&corpus), "--out", &s(&data)],
        "--force",
    );
    let data2 = d.join("data2");
    ok(&[
        "prepare",
        "--corpus",
        &s(&corpus),
        "--out",
        &s(&data2),
        "--vocab-size",
        "400",
    ]);
    for f in ["tokenizer.json", "train.bin", "val.bin"] {
        assert_eq!(
            std::fs::read(data.join(f)).unwrap(),
            std::fs::read(data2.join(f)).unwrap(),
            "{f} differs between runs"
        );
    }

    ok(&[
        "train",
        "--config",
        "tiny",
        "--data",
        &s(&data),
        "--out",
        &s(&runp),
        "--steps",
        "12",
    ]);
    for f in ["config.toml", "tokenizer.json", "metrics.jsonl", "latest"] {
        assert!(runp.join(f).exists(), "{f}");
    }
    let metrics = std::fs::read_to_string(runp.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().filter(|l| l.contains("\"loss\"")).count() == 12);
    assert!(metrics.contains("val_loss"));

    let text = ok(&[
        "sample",
        "--run",
        &s(&runp),
        "--prompt",
        "thou art",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ]);
    assert!(text.starts_with("thou art"), "{text}");
    let again = ok(&[
        "sample",
        "--run",
        &s(&runp),
        "--prompt",
        "thou art",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ]);
    assert_eq!(text, again, "greedy sampling must be reproducible");
    let e = ok(&["eval", "--run", &s(&runp), "--data", &s(&data)]);
    assert!(
        e.contains("bits per byte") && e.contains("perplexity"),
        "{e}"
    );
    let h = ok(&["hash", &s(&runp)]);
    assert_eq!(h.split_whitespace().next().unwrap().len(), 64, "{h}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn ctrl_c_checkpoints_and_resume_continues() {
    let d = tmpdir("sigint");
    write_corpus(&d);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (data, runp) = (d.join("data"), d.join("run"));
    ok(&[
        "prepare",
        "--corpus",
        &s(&d.join("plays")),
        "--out",
        &s(&data),
        "--vocab-size",
        "400",
    ]);
    let child = moelab()
        .args([
            "train",
            "--config",
            "tiny",
            "--data",
            &s(&data),
            "--out",
            &s(&runp),
            "--steps",
            "100000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait for a few steps
    let metrics = runp.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(t0.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "Ctrl-C must exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("--resume"));
    let h = ok(&["hash", &s(&runp)]);
    let step: u64 = h
        .trim()
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(step >= 3, "{h}");
    // the same command with --resume continues from there (a changed --steps would be
    // refused: issue 11), and stops again on Ctrl-C
    let child = moelab()
        .args([
            "train",
            "--config",
            "tiny",
            "--data",
            &s(&data),
            "--out",
            &s(&runp),
            "--steps",
            "100000",
            "--resume",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logged_past = |n: u64| {
        std::fs::read_to_string(&metrics).is_ok_and(|m| {
            m.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .is_ok_and(|v| v["step"].as_u64().is_some_and(|s| s > n))
            })
        })
    };
    let t0 = std::time::Instant::now();
    while !logged_past(step + 2) {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the resumed run did not continue"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let h = ok(&["hash", &s(&runp)]);
    let resumed: u64 = h
        .trim()
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(resumed > step + 2, "{h}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_input_gives_one_line_errors_and_damages_nothing() {
    let d = tmpdir("bad");
    write_corpus(&d);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = d.join("out");
    fails(
        &[
            "prepare",
            "--corpus",
            &s(&d.join("nope")),
            "--out",
            &s(&out),
        ],
        "does not exist",
    );
    std::fs::create_dir_all(d.join("empty")).unwrap();
    fails(
        &[
            "prepare",
            "--corpus",
            &s(&d.join("empty")),
            "--out",
            &s(&out),
        ],
        "has no .txt or .jsonl files",
    );
    std::fs::write(d.join("bin.txt"), b"abc\x00\x01\x02def").unwrap();
    fails(
        &[
            "prepare",
            "--corpus",
            &s(&d.join("bin.txt")),
            "--out",
            &s(&out),
        ],
        "looks binary",
    );
    // the same text twice (one file given twice, or a copy) would be in train and val
    std::fs::create_dir_all(d.join("twice")).unwrap();
    std::fs::write(d.join("twice/a.txt"), "to be or not to be\n".repeat(50)).unwrap();
    std::fs::write(d.join("twice/b.txt"), "to be or not to be\n".repeat(50)).unwrap();
    for extra in [d.join("twice"), d.join("twice/a.txt")] {
        fails(
            &[
                "prepare",
                "--corpus",
                &s(&d.join("twice/a.txt")),
                "--corpus",
                &s(&extra),
                "--out",
                &s(&out),
            ],
            "has the same contents as",
        );
    }
    std::fs::write(d.join("latin1.txt"), b"caf\xe9 au lait\n").unwrap();
    fails(
        &[
            "prepare",
            "--corpus",
            &s(&d.join("latin1.txt")),
            "--out",
            &s(&out),
        ],
        "not valid UTF-8",
    );
    std::fs::write(d.join("bad.jsonl"), "{\"text\": \"ok\"}\n{oops\n").unwrap();
    fails(
        &[
            "prepare",
            "--corpus",
            &s(&d.join("bad.jsonl")),
            "--out",
            &s(&out),
        ],
        "line 2",
    );
    assert!(
        !out.exists(),
        "failed prepares must not create the output dir"
    );

    fails(
        &[
            "train",
            "--config",
            "tiny",
            "--data",
            &s(&d.join("missing")),
            "--out",
            &s(&d.join("r0")),
        ],
        "moelab prepare",
    );
    assert!(!d.join("r0").exists());

    let data = d.join("data");
    ok(&[
        "prepare",
        "--corpus",
        &s(&d.join("plays")),
        "--out",
        &s(&data),
        "--vocab-size",
        "400",
    ]);
    let runp = d.join("run");
    ok(&[
        "train",
        "--config",
        "tiny",
        "--data",
        &s(&data),
        "--out",
        &s(&runp),
        "--steps",
        "3",
    ]);
    let before = snapshot(&runp);
    // a checkpoint from another config
    let other = d.join("other.toml");
    std::fs::write(
        &other,
        include_str!("../configs/tiny.toml").replace("d_model = 64 ", "d_model = 32 "),
    )
    .unwrap();
    fails(
        &[
            "train",
            "--config",
            &s(&other),
            "--data",
            &s(&data),
            "--out",
            &s(&runp),
            "--steps",
            "6",
            "--resume",
        ],
        "model.d_model",
    );
    fails(
        &[
            "train",
            "--config",
            "tiny",
            "--data",
            &s(&data),
            "--out",
            &s(&runp),
            "--steps",
            "6",
        ],
        "--resume",
    );
    assert_eq!(
        before,
        snapshot(&runp),
        "refused commands changed the run dir"
    );
    // corrupted shard header, truncated shard
    let shard = data.join("train.bin");
    let good = std::fs::read(&shard).unwrap();
    let mut bad = good.clone();
    bad[0] = b'X';
    std::fs::write(&shard, &bad).unwrap();
    fails(
        &[
            "train",
            "--config",
            "tiny",
            "--data",
            &s(&data),
            "--out",
            &s(&d.join("r1")),
        ],
        // checked against meta.json's sha256 before it is parsed (issue 11)
        "train.bin differs",
    );
    std::fs::write(&shard, &good[..good.len() - 6]).unwrap();
    fails(
        &[
            "train",
            "--config",
            "tiny",
            "--data",
            &s(&data),
            "--out",
            &s(&d.join("r2")),
        ],
        "train.bin differs",
    );
    assert!(!d.join("r1").exists() && !d.join("r2").exists());
    // runs that do not exist
    fails(
        &["sample", "--run", &s(&d.join("nope")), "--prompt", "x"],
        "no such run",
    );
    fails(
        &["eval", "--run", &s(&runp), "--data", &s(&d.join("nope"))],
        "moelab prepare",
    );
    // a corrupted checkpoint is detected
    let ckpt = std::fs::read_to_string(runp.join("latest")).unwrap();
    let weights = runp
        .join("checkpoints")
        .join(ckpt.trim())
        .join("model.safetensors");
    let mut w = std::fs::read(&weights).unwrap();
    let n = w.len();
    w[n - 1] ^= 0xff;
    std::fs::write(&weights, w).unwrap();
    fails(&["hash", &s(&runp)], "corrupted");
    let _ = std::fs::remove_dir_all(&d);
}
