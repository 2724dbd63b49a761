//! `moelab verify RUN_DIR`: replays a run from its manifest (same config, tokenizer, data and
//! seed; any thread count, any number of processes) and checks that it reproduces the run
//! bit for bit: the loss of every step against metrics.jsonl and the weights hash of every
//! checkpoint against manifest.json. On a mismatch it names the first differing step and,
//! when that checkpoint is still on disk, the first differing tensor.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use model::{io, Config, Layout, Model};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use train::manifest::Manifest;
use train::trainer::{
    run as train_run, EvalReport, Reporter, RunOptions, RunSpec, Source, StepReport,
};

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab verify runs/shk\n  moelab verify runs/shk --steps 500\n  RAYON_NUM_THREADS=1 moelab verify runs/shk --data /mnt/copy-of-data";

#[derive(Args)]
pub struct VerifyArgs {
    /// The run dir to verify (it must have manifest.json).
    run: PathBuf,
    /// Replay only the first N steps (N must be a checkpoint step of the run); default: up to
    /// its last checkpoint.
    #[arg(long)]
    steps: Option<u64>,
    /// The data dir, if it has moved since training (its files must hash the same).
    #[arg(long)]
    data: Option<PathBuf>,
}

/// Collects what the replay produced.
struct Replay {
    bar: ProgressBar,
    /// Steps whose weights hash is wanted, with the manifest's hash.
    want: BTreeMap<u64, String>,
    got: BTreeMap<u64, String>,
    losses: BTreeMap<u64, f32>,
    /// The replay's weights at the first checkpoint step whose hash differs.
    first_bad: Option<(u64, Vec<f32>)>,
}

impl Reporter for Replay {
    fn step(&mut self, r: &StepReport) {
        self.losses.insert(r.step, r.loss);
        self.bar.set_position(r.step);
    }
    fn eval(&mut self, _: &EvalReport) {}
    fn checkpoint(&mut self, _: u64, _: &Path) {}
    fn message(&mut self, msg: &str) {
        self.bar.println(msg);
    }
    fn weights(&mut self, step: u64, model: &Model) {
        if let Some(want) = self.want.get(&step) {
            let h = io::weights_hash(&model.layout, &model.params);
            if &h != want && self.first_bad.is_none() {
                self.first_bad = Some((step, model.params.clone()));
            }
            self.got.insert(step, h);
        }
    }
}

fn sha(p: &Path) -> Result<String> {
    Ok(data::sha256_hex(
        &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
    ))
}

/// Losses by step from metrics.jsonl (the last line of a step wins: resumed runs rewrite).
fn logged_losses(run: &Path) -> Result<BTreeMap<u64, f32>> {
    let p = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if v.get("anomaly").is_some() {
            continue;
        }
        if let (Some(s), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            out.insert(s, loss as f32);
        }
    }
    Ok(out)
}

pub fn run(a: VerifyArgs) -> Result<()> {
    let run = &a.run;
    let m = Manifest::load(run)?;
    if m.teacher {
        bail!(
            "{}: trained with a teacher's logits; verify does not replay logit distillation yet",
            run.display()
        );
    }
    if m.data.kind != "dir" {
        bail!("{}: trained on in-memory examples (`moelab distill train`); verify replays runs trained from a data dir (`moelab train --data`)", run.display());
    }
    // the inputs must be the ones the run recorded
    if sha(&run.join("config.toml"))? != m.config_sha256 {
        bail!(
            "{}: config.toml has changed since training (sha256 differs from the manifest)",
            run.display()
        );
    }
    if sha(&run.join("tokenizer.json"))? != m.tokenizer_sha256 {
        bail!(
            "{}: tokenizer.json has changed since training (sha256 differs from the manifest)",
            run.display()
        );
    }
    let data_dir = a
        .data
        .clone()
        .or_else(|| m.data.path.clone())
        .context("the manifest names no data dir; pass --data")?;
    // NOTE: the data is hashed once, by the replay, which checks every file against
    // meta.json as it reads it; meta.json is checked against the manifest here. Together:
    // the files are the ones the run was trained on.
    let meta = data::meta::Meta::load(&data_dir).with_context(|| {
        format!(
            "cannot read the run's data at {} (moved? pass --data)",
            data_dir.display()
        )
    })?;
    for (f, want) in &m.data.sha256 {
        if meta.outputs.get(f) != Some(want) {
            bail!("{}: {f} differs from the data the run was trained on (sha256 mismatch); point --data at the original", data_dir.display());
        }
    }
    if meta.outputs.get("tokenizer.json") != Some(&m.tokenizer_sha256) {
        bail!("{}: tokenizer.json is not the tokenizer the run was trained with; point --data at the original", data_dir.display());
    }
    let Some(&last) = m.checkpoints.keys().next_back() else {
        bail!(
            "{}: the manifest records no checkpoint to compare with",
            run.display()
        );
    };
    let n = a.steps.unwrap_or(last);
    if !m.checkpoints.contains_key(&n) {
        bail!(
            "--steps {n} is not a checkpoint step of this run; pick one of {:?}",
            m.checkpoints.keys().collect::<Vec<_>>()
        );
    }
    let mut cfg = Config::from_file(&run.join("config.toml"))?;
    cfg.train.steps = m.steps;
    cfg.train.seed = m.seed;
    let threads = rayon::current_num_threads();
    let segs: Vec<String> = m
        .segments
        .iter()
        .map(|s| {
            format!(
                "from step {} with {} process(es) x {} threads ({})",
                s.from_step, s.world_size, s.threads, s.code_version
            )
        })
        .collect();
    println!(
        "verifying {}: replaying {n} of {} steps in 1 process x {threads} threads ({})",
        run.display(),
        m.steps,
        train::manifest::code_version()
    );
    println!("the run was trained {}", segs.join("; "));

    let bar = ProgressBar::new(n);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]",
        )?
        .progress_chars("=> "),
    );
    let mut rep = Replay {
        bar,
        want: m
            .checkpoints
            .range(..=n)
            .map(|(k, v)| (*k, v.clone()))
            .collect(),
        got: BTreeMap::new(),
        losses: BTreeMap::new(),
        first_bad: None,
    };
    // a run started from other weights replays from the same weights, found where the
    // manifest says and checked by their hash
    let init = match &m.init {
        None => None,
        Some(rec) => {
            let init = crate::runs::load_init(std::path::Path::new(&rec.path))
                .with_context(|| format!("the run started from {} (train --init)", rec.path))?
                .init;
            if init.record.weights_hash != rec.weights_hash {
                bail!(
                    "the run started from {} with weights hash {}, but it now holds {}: the initial weights changed",
                    rec.path,
                    rec.weights_hash,
                    init.record.weights_hash
                );
            }
            println!(
                "starting from {} (weights hash {})",
                rec.path, rec.weights_hash
            );
            Some(init)
        }
    };
    let never = AtomicBool::new(false);
    let spec = RunSpec {
        cfg: cfg.clone(),
        source: Source::Dir(data_dir),
        teacher: None,
        run_dir: run.clone(),
        resume: false,
        init,
        stop: &never,
        opts: RunOptions {
            stop_at: Some(n),
            dry: true,
            comm: None,
            time_budget: None,
            refit: None,
        },
    };
    train_run(&spec, &mut rep)?;
    rep.bar.finish_and_clear();

    // the first step whose loss differs
    let logged = logged_losses(run)?;
    let first_loss = rep
        .losses
        .iter()
        .find(|(s, l)| logged.get(s).is_some_and(|x| x.to_bits() != l.to_bits()))
        .map(|(s, l)| (*s, *l, logged[s]));
    let mut ok = true;
    let mut matched = 0;
    for (step, want) in &rep.want {
        let got = rep.got.get(step).map_or("(not reached)", String::as_str);
        if got == want {
            matched += 1;
        } else {
            ok = false;
            println!("step {step}: weights hash MISMATCH: replay {got}, manifest {want}");
        }
    }
    println!(
        "{matched} of {} checkpoint weights hashes match the manifest",
        rep.want.len()
    );
    if let Some((s, got, want)) = first_loss {
        println!("first differing step: {s} (replayed loss {got}, logged {want})");
        ok = false;
    } else {
        println!(
            "{} of {} logged step losses match bit for bit",
            rep.losses.keys().filter(|s| logged.contains_key(s)).count(),
            rep.losses.len()
        );
    }
    // the weights on disk at step n are the ones the manifest vouches for
    let ckpt = run.join("checkpoints").join(format!("step-{n:07}"));
    if ckpt.is_dir() {
        let lr = train::load_run(&ckpt)?;
        let h = io::weights_hash(&Layout::new(&lr.cfg.model), &lr.params);
        if h != m.checkpoints[&n] {
            println!(
                "the weights in {} (hash {h}) are not the ones the manifest records",
                ckpt.display()
            );
            ok = false;
        } else {
            println!(
                "the weights in {} are the ones the manifest records",
                ckpt.display()
            );
        }
    }
    if ok {
        println!(
            "verified: {n} steps reproduce the run bit for bit (weights hash at step {n}: {})",
            rep.want[&n]
        );
        return Ok(());
    }
    if let Some((step, params)) = &rep.first_bad {
        let dir = run.join("checkpoints").join(format!("step-{step:07}"));
        let layout = Layout::new(&cfg.model);
        match io::load(&layout, &dir.join("model.safetensors"), true) {
            Ok(saved) => {
                for t in &layout.tensors {
                    let r = t.offset..t.offset + t.len;
                    let diff = saved[r.clone()]
                        .iter()
                        .zip(&params[r])
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    if saved[t.offset..t.offset + t.len] != params[t.offset..t.offset + t.len] {
                        println!(
                            "first differing tensor at step {step}: {} (max |diff| {diff:e})",
                            t.name
                        );
                        break;
                    }
                }
            }
            Err(_) => println!("(checkpoint step {step} is no longer on disk to compare tensors)"),
        }
    }
    bail!("{} does not reproduce: see above", run.display())
}
