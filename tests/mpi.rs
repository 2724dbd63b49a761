//! Data-parallel training over MPI through the binary (`--features mpi`, Open MPI's
//! `mpirun --oversubscribe`): 1, 2 and 4 processes with the same global batch give the same
//! weights hash and the same losses; a run resumes with another number of processes; a
//! process whose weights drift is caught by the hash agreement; a group that cannot split
//! the step is refused.
#![cfg(feature = "mpi")]

mod common;

use common::{hash, prepared_corpus, s, text, tiny_config, tmpdir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `moelab args` in one process (np = 0) or under mpirun with np processes.
fn moelab(np: usize, args: &[&str], fault: Option<&str>) -> Output {
    let bin = env!("CARGO_BIN_EXE_moelab");
    let mut c = if np == 0 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args([
            "--oversubscribe",
            "-np",
            &np.to_string(),
            "-x",
            "RAYON_NUM_THREADS",
        ]);
        if fault.is_some() {
            c.args(["-x", "MOELAB_FAULT"]);
        }
        c.arg(bin);
        c
    };
    c.args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    if let Some(f) = fault {
        c.env("MOELAB_FAULT", f);
    }
    c.output().unwrap()
}

fn setup(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let d = tmpdir("mpi", name);
    let data = prepared_corpus(&d, 11);
    let cfg = tiny_config(&d, |c| {
        c.replace("grad_accum = 2", "grad_accum = 4\nagree_every = 5")
            .replace("steps = 40", "steps = 24")
    });
    (d, data, cfg)
}

fn train(
    np: usize,
    cfg: &Path,
    data: &Path,
    run: &Path,
    extra: &[&str],
    fault: Option<&str>,
) -> Output {
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
    moelab(np, &a, fault)
}

fn losses(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(format!(
                "{} {} {}",
                v["step"],
                v.get("loss")?,
                v["grad_norm"]
            ))
        })
        .collect()
}

#[test]
fn one_two_and_four_processes_give_identical_weights() {
    let (d, data, cfg) = setup("same");
    let single = d.join("np1");
    let o = train(0, &cfg, &data, &single, &[], None);
    assert!(o.status.success(), "{}", text(&o));
    let want = hash(&single);
    for np in [1, 2, 4] {
        let run = d.join(format!("mpi{np}"));
        let o = train(np, &cfg, &data, &run, &[], None);
        assert!(o.status.success(), "np {np}: {}", text(&o));
        assert_eq!(hash(&run), want, "np {np}: weights differ from one process");
        assert_eq!(losses(&run), losses(&single), "np {np}: losses differ");
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["segments"][0]["world_size"], np);
    }
    // stopped after step 12's checkpoint under 2 processes, resumed under 4
    let run = d.join("resumed");
    assert!(!train(2, &cfg, &data, &run, &[], Some("ckpt-latest@12"))
        .status
        .success());
    assert_eq!(
        std::fs::read_to_string(run.join("latest")).unwrap().trim(),
        "step-0000012"
    );
    let o = train(4, &cfg, &data, &run, &["--resume"], None);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        hash(&run),
        want,
        "2 processes then 4 differ from one process"
    );
    // and one process replays it
    let o = moelab(0, &["verify", s(&run)], None);
    assert!(
        o.status.success() && text(&o).contains("verified: 24 steps"),
        "{}",
        text(&o)
    );
}

/// Muon under data parallelism: every process orthogonalises the same all-reduced momentum,
/// so two processes give one process's weights, and one process verifies the run.
#[test]
fn muon_under_two_processes_gives_one_process_weights() {
    two_processes_give_one_process_weights("muon", "optimizer = \"muon\"", "optimizer: Muon for ");
}

/// bf16 matmuls under data parallelism, as Muon above.
#[test]
fn bf16_under_two_processes_gives_one_process_weights() {
    two_processes_give_one_process_weights("bf16", "precision = \"bf16\"", "");
}

fn two_processes_give_one_process_weights(name: &str, setting: &str, says: &str) {
    let d = tmpdir("mpi", name);
    let data = prepared_corpus(&d, 11);
    let cfg = tiny_config(&d, |c| {
        c.replace("grad_accum = 2", "grad_accum = 4")
            .replace("steps = 40", "steps = 12")
            .replace("[train]", &format!("[train]\n{setting}"))
    });
    assert!(std::fs::read_to_string(&cfg).unwrap().contains(setting));
    let single = d.join("np1");
    let o = train(0, &cfg, &data, &single, &[], None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(says), "{}", text(&o));
    let run = d.join("mpi2");
    let o = train(2, &cfg, &data, &run, &[], None);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(hash(&run), hash(&single), "2 processes differ from one");
    assert_eq!(losses(&run), losses(&single));
    let o = moelab(0, &["verify", s(&run)], None);
    assert!(
        o.status.success() && text(&o).contains("verified: 12 steps"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_drifting_process_is_caught_and_a_bad_split_refused() {
    let (d, data, cfg) = setup("drift");
    let o = train(
        2,
        &cfg,
        &data,
        &d.join("drift"),
        &[],
        Some("corrupt-rank1@7"),
    );
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("step 10: the processes disagree: rank(s) [1]"),
        "{out}"
    );
    // the checkpoints written before are intact and the run resumes
    let o = train(2, &cfg, &data, &d.join("drift"), &["--resume"], None);
    assert!(o.status.success(), "{}", text(&o));
    let o = train(3, &cfg, &data, &d.join("three"), &[], None);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("not a multiple of the 3 processes"), "{out}");
    assert!(!d.join("three").join("latest").exists());
}
