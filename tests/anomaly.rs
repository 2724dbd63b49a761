//! NaN/Inf and loss-spike handling through the binary: an anomalous step is skipped (or
//! rolled back to the last checkpoint and replayed without it), logged in metrics.jsonl, and
//! the run goes on with finite weights; a rolled-back run replays under `moelab verify`.

mod common;

use common::{hash, prepared_corpus, s, text, tiny_config, tmpdir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn moelab(args: &[&str], fault: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moelab"));
    c.args(args).env("RAYON_NUM_THREADS", "2");
    if let Some(f) = fault {
        c.env("MOELAB_FAULT", f);
    }
    c.output().unwrap()
}

fn setup(name: &str, extra_train: &str) -> (PathBuf, PathBuf, PathBuf) {
    let d = tmpdir("anomaly", name);
    let data = prepared_corpus(&d, 13);
    let cfg = tiny_config(&d, |c| {
        c.replace("[train]", &format!("[train]\n{extra_train}"))
            .replace("checkpoint_every = 2", "checkpoint_every = 5")
    });
    (d, data, cfg)
}

fn train(cfg: &Path, data: &Path, run: &Path, fault: Option<&str>) -> Output {
    moelab(
        &[
            "train",
            "--config",
            s(cfg),
            "--data",
            s(data),
            "--out",
            s(run),
        ],
        fault,
    )
}

fn events(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("anomaly").is_some())
        .collect()
}

#[test]
fn a_non_finite_step_is_skipped_and_logged() {
    let (d, data, cfg) = setup("nan", "");
    let run = d.join("run");
    let o = train(&cfg, &data, &run, Some("nan@7"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("step 7: non-finite loss or gradient"),
        "{}",
        text(&o)
    );
    let ev = events(&run);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["step"], 7);
    assert_eq!(ev[0]["action"], "skipped");
    // the weights stay finite: sampling and evaluation work
    let o = moelab(&["eval", "--run", s(&run), "--data", s(&data)], None);
    assert!(
        o.status.success() && !text(&o).contains("NaN"),
        "{}",
        text(&o)
    );
    let clean = d.join("clean");
    assert!(train(&cfg, &data, &clean, None).status.success());
    assert_ne!(
        hash(&run),
        hash(&clean),
        "the skipped step changed nothing?"
    );
}

#[test]
fn a_loss_spike_rolls_back_and_replays_deterministically() {
    let (d, data, cfg) = setup("spike", "spike_factor = 3.0\non_anomaly = \"rollback\"");
    let run = d.join("rollback");
    let o = train(&cfg, &data, &run, Some("spike@13"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("rolled back to step 10 and will skip step 13"),
        "{}",
        text(&o)
    );
    let ev = events(&run);
    let actions: Vec<(u64, &str)> = ev
        .iter()
        .map(|e| (e["step"].as_u64().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert_eq!(actions, [(13, "rollback"), (13, "skipped")], "{ev:?}");
    // rolling back then skipping equals skipping at once (training is deterministic)
    let (_, _, skip_cfg) = setup("spike-skip", "spike_factor = 3.0");
    let skipped = d.join("skipped");
    assert!(train(&skip_cfg, &data, &skipped, Some("spike@13"))
        .status
        .success());
    assert_eq!(hash(&run), hash(&skipped));
    // the skip is in the checkpoints: a replay under the same conditions reproduces the run
    let o = moelab(&["verify", s(&run)], Some("spike@13"));
    assert!(o.status.success(), "{}", text(&o));
    // a bad setting is refused up front
    let (_, _, bad) = setup("bad", "on_anomaly = \"ignore\"");
    let o = train(&bad, &data, &d.join("bad"), None);
    assert!(
        !o.status.success() && text(&o).contains("train.on_anomaly"),
        "{}",
        text(&o)
    );
}
