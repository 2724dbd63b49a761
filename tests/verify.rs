//! `moelab verify` through the binary: a run replays bit for bit with another thread count and
//! after a resume; changed inputs (data, config, tokenizer) are refused; a run whose weights
//! were disturbed mid-training is caught at the first differing step and tensor; published
//! weights that are not the replayed ones are caught.

mod common;

use common::{hash, prepared_corpus, s, text, tiny_config, tmpdir};
use std::path::{Path, PathBuf};
use std::process::Output;

fn moelab(args: &[&str], threads: &str, fault: Option<&str>) -> Output {
    common::moelab_with(args, threads, fault)
}

/// Data, and a config that keeps every checkpoint.
fn setup(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let d = tmpdir("verify", name);
    let data = prepared_corpus(&d, 5);
    let cfg = tiny_config(&d, |c| {
        c.replace("checkpoint_every = 2", "checkpoint_every = 4")
            .replace("keep_checkpoints = 3", "keep_checkpoints = 20")
    });
    (d, data, cfg)
}

fn train(cfg: &Path, data: &Path, run: &Path, extra: &[&str], fault: Option<&str>) -> Output {
    let mut a = vec![
        "train",
        "--config",
        s(cfg),
        "--data",
        s(data),
        "--out",
        s(run),
    ];
    a.extend(extra);
    moelab(&a, "2", fault)
}

/// `--time-budget`: the steps come from a measured step time, are written to the run's
/// config and manifest before the first step, fitted again from the run's own steps inside
/// the warm-up (and with a "wsd" schedule, again every few steps until the decay starts, its
/// first window after the warm-up when that is too short to time), and
/// the run replays bit for bit (the replay needs no timing). Bad budgets are refused before
/// anything is written.
#[test]
fn a_time_budget_run_records_its_steps_and_replays() {
    let (d, data, cfg) = setup("budget");
    let base = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("checkpoint_every = 4", "checkpoint_every = 100")
        .replace("warmup_steps = 4", "warmup_steps = 12");
    // (a "wsd" warm-up too short to time: the same window, in the stable phase)
    for (schedule, warmup) in [("cosine", 12), ("wsd", 12), ("wsd", 2)] {
        let cfg = d.join(format!("{schedule}-{warmup}.toml"));
        let cfg_text = base.replace(
            "warmup_steps = 12",
            &format!("warmup_steps = {warmup}\nschedule = \"{schedule}\""),
        );
        std::fs::write(&cfg, cfg_text).unwrap();
        let run = d.join(format!("run-{schedule}-{warmup}"));
        let o = train(&cfg, &data, &run, &["--time-budget", "4s"], None);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(out.contains("s per step measured"), "{out}");
        // the refit: steps 6-11 of the run itself timed (train::trainer::refit_window)
        assert!(
            out.contains("s per step over steps 6-11 of this run"),
            "{out}"
        );
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap())
                .unwrap();
        let b = &m["time_budget"];
        assert_eq!(b["seconds"], 4.0, "{m}");
        let steps = b["steps"].as_u64().unwrap();
        assert_eq!(m["steps"].as_u64(), Some(steps));
        assert!(steps > 12, "{m}");
        if schedule == "cosine" {
            // (a "wsd" run's last fit comes late in the run: a loaded host may be past 4 s)
            assert!(b["spent_seconds"].as_f64().unwrap() < 4.0, "{m}");
        } else {
            // later windows of 6 steps each, the last one ending before the decay starts
            let last = out
                .lines()
                .find(|l| l.ends_with(&format!(": {steps} steps (final fit)")))
                .unwrap_or_else(|| panic!("no final fit to {steps} steps: {out}"));
            let at: u64 = last.split(&['-', ' '][..]).nth(9).unwrap().parse().unwrap();
            assert!(
                at >= 11 && (at - 11).is_multiple_of(6) && at < steps,
                "{last}"
            );
        }
        let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(saved.contains(&format!("steps = {steps}\n")), "{saved}");
        let o = moelab(&["verify", s(&run)], "1", None);
        assert!(
            o.status.success() && text(&o).contains(&format!("verified: {steps} steps")),
            "{}",
            text(&o)
        );
    }
    for (args, says) in [
        (&["--time-budget", "10x"][..], "is not a duration"),
        (&["--time-budget", "0.001s"], "steps fit"),
        (
            &["--time-budget", "4s", "--steps", "9"],
            "cannot be used with",
        ),
    ] {
        let other = d.join("refused");
        let o = train(&cfg, &data, &other, args, None);
        assert!(
            !o.status.success() && text(&o).contains(says),
            "{args:?}: {}",
            text(&o)
        );
        assert!(!other.exists(), "{args:?} wrote {}", other.display());
    }
}

/// A budgeted run killed between a refit's two writes (config.toml has the new steps, the
/// manifest does not yet) resumes with config.toml's steps and replays bit for bit.
#[test]
fn a_time_budget_run_killed_inside_a_refit_resumes() {
    let (d, data, cfg) = setup("budget-kill");
    let cfg_text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("warmup_steps = 4", "warmup_steps = 12\nschedule = \"wsd\"");
    std::fs::write(&cfg, cfg_text).unwrap();
    let run = d.join("run");
    // killed at a refit after the first (steps 12-17, 18-23, ... timed; checkpoints every 4
    // steps) that chose other steps than the manifest holds
    let saved = [17, 23, 29, 35]
        .into_iter()
        .find_map(|at| {
            let _ = std::fs::remove_dir_all(&run);
            let fault = format!("refit-manifest@{at}");
            let o = train(&cfg, &data, &run, &["--time-budget", "4s"], Some(&fault));
            if o.status.success() {
                return None; // the run was fitted too few steps to refit at `at`
            }
            assert!(text(&o).contains("MOELAB_FAULT: dying"), "{}", text(&o));
            let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
            let m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap())
                    .unwrap();
            let recorded = m["steps"].as_u64().unwrap();
            (!saved.contains(&format!("steps = {recorded}\n"))).then_some(saved)
        })
        .expect("no refit at steps 17-35 chose other steps than the one before it");
    // a step count that moves a rate already used is not an interrupted refit: refused
    let other = d.join("edited");
    copy_dir(&run, &other);
    std::fs::write(
        other.join("config.toml"),
        saved.replace(&format!("steps = {}\n", steps_in(&saved)), "steps = 14\n"),
    )
    .unwrap();
    let o = train(
        &other.join("config.toml"),
        &data,
        &other,
        &["--resume"],
        None,
    );
    assert!(
        !o.status.success() && text(&o).contains("config.toml was changed"),
        "{}",
        text(&o)
    );
    let o = train(&run.join("config.toml"), &data, &run, &["--resume"], None);
    assert!(o.status.success(), "{}", text(&o));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    let steps = m["steps"].as_u64().unwrap();
    assert!(
        saved.contains(&format!("steps = {steps}\n")),
        "{saved} vs {m}"
    );
    assert_eq!(m["time_budget"]["steps"].as_u64(), Some(steps), "{m}");
    let o = moelab(&["verify", s(&run)], "1", None);
    assert!(
        o.status.success() && text(&o).contains(&format!("verified: {steps} steps")),
        "{}",
        text(&o)
    );
}

/// `steps = N` of a saved config.toml.
fn steps_in(config: &str) -> u64 {
    config
        .lines()
        .find_map(|l| l.strip_prefix("steps = ")?.trim().parse().ok())
        .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn a_run_replays_bit_for_bit_with_other_threads_and_after_resume() {
    let (d, data, cfg) = setup("ok");
    let run = d.join("run");
    // interrupted after step 20's checkpoint, resumed: two segments
    assert!(!train(&cfg, &data, &run, &[], Some("ckpt-latest@20"))
        .status
        .success());
    let o = train(&cfg, &data, &run, &["--resume"], None);
    assert!(o.status.success(), "{}", text(&o));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["segments"].as_array().unwrap().len(), 2, "{m}");
    assert_eq!(m["segments"][1]["from_step"], 20);
    assert_eq!(m["checkpoints"].as_object().unwrap().len(), 10);
    for threads in ["1", "3"] {
        let o = moelab(&["verify", s(&run)], threads, None);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        assert!(
            out.contains("10 of 10 checkpoint weights hashes match"),
            "{out}"
        );
        assert!(out.contains("40 of 40 logged step losses match"), "{out}");
        assert!(out.contains("verified: 40 steps"), "{out}");
    }
    let o = moelab(&["verify", s(&run), "--steps", "12"], "2", None);
    assert!(
        o.status.success() && text(&o).contains("verified: 12 steps"),
        "{}",
        text(&o)
    );
    let o = moelab(&["verify", s(&run), "--steps", "13"], "2", None);
    assert!(
        !o.status.success() && text(&o).contains("not a checkpoint step"),
        "{}",
        text(&o)
    );
    // changed inputs are refused before replaying
    let val = data.join("val.bin");
    let saved = std::fs::read(&val).unwrap();
    let mut bad = saved.clone();
    let i = bad.len() - 3;
    bad[i] ^= 1;
    std::fs::write(&val, &bad).unwrap();
    let o = moelab(&["verify", s(&run)], "2", None);
    assert!(
        !o.status.success() && text(&o).contains("val.bin differs"),
        "{}",
        text(&o)
    );
    std::fs::write(&val, &saved).unwrap();
    // issue 11: so are a changed config and a changed tokenizer (each a real change: another
    // learning rate; two tokens with their ids swapped), named, before any replay
    type Edit = fn(&str) -> String;
    let edits: [(&str, Edit); 2] = [
        ("config.toml", |t| t.replace("lr = 0.003", "lr = 0.004")),
        ("tokenizer.json", |t| {
            let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
            let vocab = v["model"]["vocab"].as_object_mut().unwrap();
            let (a, b) = ("a".to_string(), "b".to_string()); // byte-level: always there
            let (ia, ib) = (vocab[&a].clone(), vocab[&b].clone());
            vocab.insert(a, ib);
            vocab.insert(b, ia);
            serde_json::to_string(&v).unwrap()
        }),
    ];
    for (file, edit) in edits {
        let p = run.join(file);
        let saved = std::fs::read_to_string(&p).unwrap();
        let changed = edit(&saved);
        assert_ne!(changed, saved, "the test's edit of {file} did not apply");
        std::fs::write(&p, changed).unwrap();
        let o = moelab(&["verify", s(&run)], "2", None);
        let out = text(&o);
        assert!(!o.status.success(), "{file}: {out}");
        assert!(
            out.contains(&format!("{file} has changed since training")),
            "{file}: {out}"
        );
        assert!(
            !out.contains("replaying"),
            "{file}: refused only after replaying: {out}"
        );
        std::fs::write(&p, saved).unwrap();
    }
    // moved data: --data points at it
    std::fs::rename(&data, d.join("moved")).unwrap();
    let o = moelab(&["verify", s(&run), "--steps", "8"], "2", None);
    assert!(
        !o.status.success() && text(&o).contains("pass --data"),
        "{}",
        text(&o)
    );
    let o = moelab(
        &[
            "verify",
            s(&run),
            "--steps",
            "8",
            "--data",
            s(&d.join("moved")),
        ],
        "2",
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn disturbed_training_and_swapped_weights_are_caught() {
    let (d, data, cfg) = setup("bad");
    // the weights are nudged after step 14 (as a faulty machine might): the run's own
    // records (metrics, manifest) follow the disturbed weights
    let run = d.join("disturbed");
    let o = train(&cfg, &data, &run, &[], Some("corrupt-rank0@14"));
    assert!(o.status.success(), "{}", text(&o));
    let o = moelab(&["verify", s(&run)], "2", None);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("3 of 10 checkpoint weights hashes match"),
        "{out}"
    );
    assert!(out.contains("first differing step: 15"), "{out}");
    assert!(out.contains("first differing tensor at step 16: "), "{out}");
    // an honest run whose final checkpoint was swapped for other weights
    let run = d.join("swapped");
    assert!(train(&cfg, &data, &run, &[], None).status.success());
    let other = d.join("other");
    assert!(train(&cfg, &data, &other, &["--seed", "8"], None)
        .status
        .success());
    let ck = "checkpoints/step-0000040";
    std::fs::remove_dir_all(run.join(ck)).unwrap();
    std::fs::rename(other.join(ck), run.join(ck)).unwrap();
    let o = moelab(&["verify", s(&run)], "2", None);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("10 of 10 checkpoint weights hashes match"),
        "{out}"
    );
    assert!(
        out.contains("are not the ones the manifest records"),
        "{out}"
    );
}

#[test]
fn replicas_in_one_process_train_the_same_weights() {
    let (d, data, cfg) = setup("replicas");
    let one = d.join("one");
    assert!(train(&cfg, &data, &one, &[], None).status.success());
    let two = d.join("two");
    let o = train(&cfg, &data, &two, &["--replicas", "2"], None);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(hash(&one), hash(&two));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(two.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["segments"][0]["world_size"], 2);
    let o = train(&cfg, &data, &d.join("three"), &["--replicas", "3"], None);
    assert!(
        !o.status.success() && text(&o).contains("not a multiple of the 3 processes"),
        "{}",
        text(&o)
    );
}
