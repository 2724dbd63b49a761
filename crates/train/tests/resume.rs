//! Exact resume: 40 steps straight and 20 steps + stop + resume 20 give the same weights hash
//! (and the same metrics). Also: resuming with another model shape is refused and nothing is
//! overwritten.

use data::prepare::{prepare_corpus, PrepareOpts};
use model::Config;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use train::trainer::{run, EvalReport, Outcome, Reporter, RunSpec, Source, StepReport};

struct StopAt<'a> {
    at: u64,
    stop: &'a AtomicBool,
}

impl Reporter for StopAt<'_> {
    fn step(&mut self, r: &StepReport) {
        if r.step == self.at {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
    fn eval(&mut self, _: &EvalReport) {}
    fn checkpoint(&mut self, _: u64, _: &Path) {}
    fn message(&mut self, _: &str) {}
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moelab-resume-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn corpus(dir: &Path) -> PathBuf {
    let words = [
        "thou", "art", "the", "king", "of", "night", "and", "day", "my", "lord", "speak", "hence",
    ];
    let mut x: u64 = 1;
    let mut text = String::new();
    for i in 0..6000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(words[(x >> 40) as usize % words.len()]);
        text.push(if i % 9 == 8 { '\n' } else { ' ' });
    }
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn cfg(steps: u64) -> Config {
    let mut c = Config::from_toml(include_str!("../../../configs/tiny.toml")).unwrap();
    c.train.steps = steps;
    c.train.warmup_steps = 5;
    c.train.eval_every = 10;
    c.train.eval_batches = 2;
    c.train.checkpoint_every = 15;
    c.train.grad_accum = 2;
    c
}

fn files_snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
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
fn stop_and_resume_equals_uninterrupted() {
    stop_and_resume(false, false);
}

/// Muon's momentum (in the optimizer's `m`) round-trips through the checkpoint.
#[test]
fn stop_and_resume_equals_uninterrupted_muon() {
    stop_and_resume(true, false);
}

/// bf16 matmuls, with each optimizer: a resumed run takes the same precision from its config.
#[test]
fn stop_and_resume_equals_uninterrupted_bf16() {
    stop_and_resume(false, true);
    stop_and_resume(true, true);
}

fn stop_and_resume(muon: bool, bf16: bool) {
    let cfg = |steps: u64| {
        let mut c = cfg(steps);
        if muon {
            c.train.optimizer = model::config::OptimizerKind::Muon;
        }
        if bf16 {
            c.train.precision = model::config::TrainPrecision::Bf16;
        }
        c
    };
    let root = tmp(&format!("exact-{muon}-{bf16}"));
    let data = root.join("data");
    let opts = PrepareOpts {
        tokenizer: None,
        vocab_size: 400,
        val_fraction: 0.1,
        force: false,
    };
    prepare_corpus(&[corpus(&root)], &data, &opts, &|_| {}).unwrap();

    let never = AtomicBool::new(false);
    let straight = RunSpec {
        cfg: cfg(40),
        source: Source::Dir(data.clone()),
        teacher: None,
        run_dir: root.join("a"),
        resume: false,
        init: None,
        stop: &never,
        opts: Default::default(),
    };
    assert_eq!(
        run(
            &straight,
            &mut StopAt {
                at: 0,
                stop: &never
            }
        )
        .unwrap(),
        Outcome::Finished
    );

    let stop = AtomicBool::new(false);
    let first = RunSpec {
        cfg: cfg(40),
        source: Source::Dir(data.clone()),
        teacher: None,
        run_dir: root.join("b"),
        resume: false,
        init: None,
        stop: &stop,
        opts: Default::default(),
    };
    assert_eq!(
        run(
            &first,
            &mut StopAt {
                at: 20,
                stop: &stop
            }
        )
        .unwrap(),
        Outcome::Stopped
    );
    let stop2 = AtomicBool::new(false);
    let second = RunSpec {
        cfg: cfg(40),
        source: Source::Dir(data.clone()),
        teacher: None,
        run_dir: root.join("b"),
        resume: true,
        init: None,
        stop: &stop2,
        opts: Default::default(),
    };
    assert_eq!(
        run(
            &second,
            &mut StopAt {
                at: 0,
                stop: &stop2
            }
        )
        .unwrap(),
        Outcome::Finished
    );

    let a = train::load_run(&root.join("a")).unwrap();
    let b = train::load_run(&root.join("b")).unwrap();
    assert_eq!(a.state.step, 40);
    assert_eq!(b.state.step, 40);
    println!(
        "straight {}  resumed {}",
        a.state.weights_hash, b.state.weights_hash
    );
    assert_eq!(
        a.state.weights_hash, b.state.weights_hash,
        "resumed run differs from the uninterrupted one"
    );
    let ma = std::fs::read_to_string(root.join("a/metrics.jsonl")).unwrap();
    let mb = std::fs::read_to_string(root.join("b/metrics.jsonl")).unwrap();
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("tokens_per_s");
                v.to_string()
            })
            .collect()
    };
    assert_eq!(strip(&ma), strip(&mb), "metrics differ after resume");

    // resuming with another model shape is refused and touches nothing
    let before = files_snapshot(&root.join("b"));
    let mut other = cfg(60);
    other.model.d_model = 32;
    let st = AtomicBool::new(false);
    let bad = RunSpec {
        cfg: other,
        source: Source::Dir(data.clone()),
        teacher: None,
        run_dir: root.join("b"),
        resume: true,
        init: None,
        stop: &st,
        opts: Default::default(),
    };
    let err = run(&bad, &mut StopAt { at: 0, stop: &st })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.d_model"), "{err}");
    assert_eq!(
        before,
        files_snapshot(&root.join("b")),
        "a refused resume changed the run dir"
    );
    // and starting a new run over an existing one is refused too
    let fresh = RunSpec {
        cfg: cfg(40),
        source: Source::Dir(data),
        teacher: None,
        run_dir: root.join("b"),
        resume: false,
        init: None,
        stop: &st,
        opts: Default::default(),
    };
    let err = run(&fresh, &mut StopAt { at: 0, stop: &st })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(before, files_snapshot(&root.join("b")));
    let _ = std::fs::remove_dir_all(&root);
}
