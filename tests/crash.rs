//! Crash safety through the real binary: `kill -9` at 20 random moments of a tiny training
//! run (including while checkpoints are being written), death at each point of a checkpoint
//! write, a full disk during a checkpoint, and damaged checkpoints. Every time, resuming
//! must end with the weights hash of an uninterrupted run, and nothing saved before the
//! failure may be lost.

mod common;

use common::{hash, prepared_corpus, s, tmpdir};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

const CONFIG: &str = common::CRASH_TINY;

fn moelab(args: &[&str], fault: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moelab"));
    c.args(args).env("RAYON_NUM_THREADS", "2");
    if let Some(f) = fault {
        c.env("MOELAB_FAULT", f);
    }
    c.output().unwrap()
}

fn train(data: &Path, run: &Path, resume: bool, fault: Option<&str>) -> Output {
    let mut args = vec![
        "train",
        "--config",
        CONFIG,
        "--data",
        s(data),
        "--out",
        s(run),
    ];
    if resume {
        args.push("--resume");
    }
    moelab(&args, fault)
}

/// Resumes (or, with no checkpoint yet, restarts) until the run finishes.
fn finish(data: &Path, run: &Path) -> Output {
    let has_ckpt = run.join("checkpoints").read_dir().is_ok_and(|mut d| {
        d.any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("step-")
        })
    });
    if !has_ckpt {
        let _ = std::fs::remove_dir_all(run);
    }
    let out = train(data, run, has_ckpt, None);
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn step_of_latest(run: &Path) -> String {
    std::fs::read_to_string(run.join("latest"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn kill_9_anywhere_then_resume_gives_the_uninterrupted_weights() {
    let d = tmpdir("crash", "kill");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    let t = Instant::now();
    let out = train(&data, &reference, false, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let span = t.elapsed();
    let want = hash(&reference);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
    let mut mid_checkpoint = 0;
    for i in 0..20 {
        let run = d.join(format!("run-{i}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_moelab"))
            .args([
                "train",
                "--config",
                CONFIG,
                "--data",
                s(&data),
                "--out",
                s(&run),
            ])
            .env("RAYON_NUM_THREADS", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let at = span.mul_f64(rng.gen_range(0.05..0.95));
        std::thread::sleep(at);
        // SAFETY: SIGKILL to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        let tmp_left = run.join("checkpoints").read_dir().is_ok_and(|mut d| {
            d.any(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-")
            })
        });
        mid_checkpoint += tmp_left as usize;
        finish(&data, &run);
        assert_eq!(
            hash(&run),
            want,
            "kill {i} at {at:?} ({status:?}): resumed weights differ"
        );
        assert!(
            !run.join("checkpoints").read_dir().unwrap().any(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-")
            }),
            "a temp dir of an interrupted checkpoint was left behind"
        );
    }
    eprintln!("{mid_checkpoint} of 20 kills landed inside a checkpoint write");
}

#[test]
fn death_at_every_point_of_a_checkpoint_write_loses_nothing() {
    let d = tmpdir("crash", "points");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    assert!(train(&data, &reference, false, None).status.success());
    let want = hash(&reference);
    for point in ["ckpt-model", "ckpt-state", "ckpt-renamed", "ckpt-latest"] {
        let run = d.join(point);
        let out = train(&data, &run, false, Some(&format!("{point}@12")));
        assert!(!out.status.success(), "{point}: the fault did not fire");
        // the previous checkpoint (or the new one, once `latest` names it) is intact
        let latest = step_of_latest(&run);
        let expect = if point == "ckpt-latest" {
            "step-0000012"
        } else {
            "step-0000010"
        };
        assert_eq!(latest, expect, "{point}");
        finish(&data, &run);
        assert_eq!(hash(&run), want, "{point}: resumed weights differ");
    }
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_what_was_saved() {
    let d = tmpdir("crash", "enospc");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    assert!(train(&data, &reference, false, None).status.success());
    let want = hash(&reference);
    for point in ["enospc-model", "enospc-state"] {
        let run = d.join(point);
        let out = train(&data, &run, false, Some(&format!("{point}@16")));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("No space left on device"), "{err}");
        assert_eq!(step_of_latest(&run), "step-0000014");
        let names: Vec<String> = run
            .join("checkpoints")
            .read_dir()
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".tmp-")),
            "partial checkpoint left: {names:?}"
        );
        assert!(
            names.contains(&"step-0000010".to_string()),
            "older checkpoints kept: {names:?}"
        );
        finish(&data, &run);
        assert_eq!(hash(&run), want);
    }
}

#[test]
fn a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one() {
    let d = tmpdir("crash", "damaged");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    assert!(train(&data, &reference, false, None).status.success());
    let want = hash(&reference);
    type Damage = fn(&Path);
    let damage: [(&str, Damage); 3] = [
        ("truncated model", |c| {
            let p = c.join("model.safetensors");
            let n = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(n / 2)
                .unwrap();
        }),
        ("flipped optimizer byte", |c| {
            let p = c.join("optim.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let i = b.len() - 5;
            b[i] ^= 0x10;
            std::fs::write(&p, b).unwrap();
        }),
        ("edited state", |c| {
            let p = c.join("state.json");
            let t = std::fs::read_to_string(&p)
                .unwrap()
                .replace("\"tokens_seen\": ", "\"tokens_seen\": 1");
            std::fs::write(&p, t).unwrap();
        }),
    ];
    for (what, f) in damage {
        let run = d.join(what.replace(' ', "-"));
        // dies right after checkpoint 20 is complete
        assert!(!train(&data, &run, false, Some("ckpt-latest@20"))
            .status
            .success());
        f(&run.join("checkpoints/step-0000020"));
        let out = finish(&data, &run);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("step-0000020") && err.contains("falling back"),
            "{what}: {err}"
        );
        assert_eq!(hash(&run), want, "{what}");
    }
}

/// Regression (this session's format bump): runs written before state.json carried its own
/// checksum (checkpoint format 1) must still load and resume.
#[test]
fn checkpoints_of_the_previous_format_still_load_and_resume() {
    let d = tmpdir("crash", "format1");
    let data = prepared_corpus(&d, 3);
    let reference = d.join("reference");
    assert!(train(&data, &reference, false, None).status.success());
    let want = hash(&reference);
    let run = d.join("old");
    assert!(!train(&data, &run, false, Some("ckpt-latest@20"))
        .status
        .success());
    // rewrite every checkpoint's state.json as format 1 wrote it
    for e in run.join("checkpoints").read_dir().unwrap() {
        let p = e.unwrap().path().join("state.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in ["checksum", "loss_ema", "skip_steps"] {
            o.remove(k);
        }
        o.insert("format_version".into(), 1.into());
        std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }
    let o = moelab(&["hash", s(&run)], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    finish(&data, &run);
    assert_eq!(hash(&run), want, "resumed from format 1");
    let newest = run.join("checkpoints/step-0000040/state.json");
    assert!(std::fs::read_to_string(newest)
        .unwrap()
        .contains("\"format_version\": 2"));
    // a format from the future is refused, naming the versions read
    let p = run.join("checkpoints/step-0000040/state.json");
    let t = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"format_version\": 2", "\"format_version\": 9");
    std::fs::write(&p, t).unwrap();
    let o = moelab(&["hash", s(&run.join("checkpoints/step-0000040"))], None);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("format version 9, this moelab reads 1 to 2")
    );
}
