//! The training loop. Reads top to bottom: open data and run dir, build or resume the model,
//! then per step: micro-batches (gradient accumulation) -> clip + AdamW -> bias balancing ->
//! metrics -> periodic eval -> periodic checkpoint -> stop check.
//!
//! Exact resume: everything a step depends on is either in the checkpoint (weights, AdamW
//! moments and step count, selection biases) or a pure function of (config, seed, step):
//! the learning rate and the training batches (batch k is drawn from RNG stream k).

use crate::checkpoint::{self, describe_diff, State, FORMAT_VERSION};
use crate::dataset::{Batcher, Dataset, Split};
use crate::dist::{self, Comm, Single};
use crate::eval::evaluate;
use crate::fault;
use crate::manifest::{self, DataRecord, Manifest, Segment};
use crate::schedule::{self, lr_at};
use crate::{io_err, Error, Result};
use data::chat::{ChatLoader, Example};
use data::loader::Loader;
use model::{io, Config, Distill, Model, Optimizer};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// One optimizer step, for progress bars and metrics.jsonl.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: u64,
    pub steps: u64,
    /// Mean cross-entropy over the step's micro-batches (nats/token).
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens_seen: u64,
    /// Training tokens per second over this run's steps so far.
    pub tokens_per_s: f64,
    /// max/mean expert load over MoE blocks (1.0 = perfectly balanced; 0 for dense models).
    pub imbalance: f64,
    /// Distillation loss T^2 KL(teacher || student) when distilling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kd_loss: Option<f32>,
}

/// A validation pass.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub step: u64,
    pub val_loss: f64,
    pub val_tokens: usize,
}

/// Where progress goes. The CLI draws it; tests collect it.
pub trait Reporter {
    fn step(&mut self, r: &StepReport);
    fn eval(&mut self, r: &EvalReport);
    fn checkpoint(&mut self, step: u64, dir: &Path);
    fn message(&mut self, msg: &str);
    /// The weights after each step (for replays that compare them).
    fn weights(&mut self, _step: u64, _model: &Model) {}
}

/// Where training data comes from.
pub enum Source {
    /// A data dir written by `moelab prepare`.
    Dir(PathBuf),
    /// Chat examples held in memory (verified traces), with the tokenizer to encode them.
    Examples {
        train: Vec<Example>,
        val: Vec<Example>,
        /// The examples in the student's own chat template (None: moelab's format).
        rendered: Option<crate::dataset::Rendered>,
        tokenizer: PathBuf,
    },
}

/// What to train.
pub struct RunSpec<'a> {
    pub cfg: Config,
    pub source: Source,
    /// Logit distillation (None: plain cross-entropy).
    pub teacher: Option<TeacherSpec>,
    pub run_dir: PathBuf,
    pub resume: bool,
    /// Start from these weights instead of a random init (`train --init`).
    pub init: Option<Init>,
    /// Set (e.g. by Ctrl-C) to checkpoint after the current step and return.
    pub stop: &'a AtomicBool,
    pub opts: RunOptions<'a>,
}

/// Initial weights for a new run, laid out by the run's model config.
#[derive(Clone)]
pub struct Init {
    pub params: Vec<f32>,
    pub record: crate::manifest::InitRecord,
    /// Files the new run dir keeps from where the weights came from (an imported model's
    /// `chat.json`), written with config.toml before the first step.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Less common ways to run.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Stop after this many steps (the schedule still spans `train.steps`): `moelab verify
    /// --steps`.
    pub stop_at: Option<u64>,
    /// A replay: write nothing (no run dir, metrics, checkpoints or manifest), skip evals.
    pub dry: bool,
    /// The data-parallel group (None: this process alone).
    pub comm: Option<&'a dyn Comm>,
    /// How `train --time-budget` chose `train.steps` (recorded in the manifest).
    pub time_budget: Option<crate::manifest::TimeBudget>,
    /// `train --time-budget`: fits `train.steps` again from this run's own speed, given
    /// the steps done and the seconds each took. Called at the end of the warm-up and, with
    /// a "wsd" schedule, after every as many steps again until the decay starts: no learning
    /// rate before that point depends on `train.steps`, so a replay with the final steps is
    /// bit for bit the same run. config.toml and the manifest are rewritten each time.
    pub refit: Option<&'a Refit>,
}

/// See [`RunOptions::refit`]: (steps done, seconds per step, seconds per checkpoint as
/// measured so far, if any was written) -> the new choice.
pub type Refit = dyn Fn(u64, f64, Option<f64>) -> crate::manifest::TimeBudget;

/// The steps [`RunOptions::refit`] first times (`from`..`at`: the second half of the
/// warm-up) and the step after which it first refits; None when no such window exists.
/// Not earlier: an MoE's experts are loaded unevenly at first (max/mean load 2.5-3.7
/// at step 10, 2.0 at step 50, 1.3-1.6 from step 300 on small-moe), and steps 11-50
/// measured 7-20% slower than the run's average on Shakespeare. A "wsd" schedule's rates
/// do not depend on `train.steps` until its decay, so a warm-up too short to time (under 6
/// steps) still refits, after step 11, when the decay starts later than that.
pub fn refit_window(tc: &model::TrainConfig) -> Option<(u64, u64)> {
    let wsd = tc.schedule == model::Schedule::Wsd;
    let mut at = tc.warmup_steps.saturating_sub(1);
    if wsd && at < 11 {
        at = 11;
    }
    let from = (at / 2).max(1);
    (at >= from + 4 && at <= schedule::steps_fixed_from(tc)).then_some((from, at))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Stopped,
}

/// Logit distillation from a teacher computed on the fly (forward KL at a temperature).
pub struct TeacherSpec {
    pub cfg: model::ModelConfig,
    pub params: Vec<f32>,
    /// Weight W of the distillation loss: loss = (1 - W) CE + W T^2 KL.
    pub weight: f32,
    pub temperature: f32,
}

fn append_metrics(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    writeln!(
        f,
        "{}",
        serde_json::to_string(value).expect("metrics serialise")
    )
    .map_err(io_err(path))
}

/// Keeps only metrics lines of steps <= `step` (after resuming from a checkpoint, lines of
/// steps that were not checkpointed are replayed and would otherwise appear twice).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| {
                    v["step"]
                        .as_u64()
                        .map(|s| s <= step || v.get("anomaly").is_some())
                })
                .unwrap_or(false)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    data::write_atomic(path, kept.as_bytes()).map_err(Error::from)
}

/// What [`check_run_dir`] found: a new run, a restart of a run dir that never reached a
/// checkpoint, or a resume.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RunDirPlan {
    New,
    Restart,
    Resume,
}

/// Checks the run dir for a new run or a resume, writing nothing (every process of a group
/// checks before rank 0 writes). `probe_lock`: refuse when another process trains in it
/// (false for the process that holds the lock itself).
///
/// NOTE: a resume must continue the same run: the same config (`[train]` included), the
/// same tokenizer and the same data, and the run's own files as the manifest recorded them.
/// The LR schedule (it spans `train.steps`), the batch order (`train.seed`) and every
/// optimizer setting shape the weights; a run whose settings changed mid-way could not be
/// replayed by `moelab verify` from its one config.toml, so such a resume is refused (it
/// changes nothing) rather than recorded. One exception: a `--time-budget` run killed
/// between a refit's two writes (see `refit_interrupted`).
fn check_run_dir(
    spec: &RunSpec,
    ds: &Dataset,
    rec: &DataRecord,
    probe_lock: bool,
) -> Result<RunDirPlan> {
    let run = &spec.run_dir;
    if probe_lock {
        crate::lock::check_free(run)?;
    }
    let cfg_path = run.join("config.toml");
    let read = |name: &str| -> Result<Vec<u8>> {
        let p = run.join(name);
        std::fs::read(&p).map_err(io_err(&p))
    };
    if spec.resume {
        let Some((latest, _)) = checkpoint::latest_good(run)? else {
            return Err(Error::Usage(format!(
                "nothing to resume in {}: it has no checkpoint; drop --resume to start a new run",
                run.display()
            )));
        };
        let resumed_step = latest
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        let cfg_bytes = read("config.toml")?;
        let tok_bytes = read("tokenizer.json")?;
        let old_manifest = if Manifest::path(run).exists() {
            Some(Manifest::load(run)?)
        } else {
            None
        };
        if let Some(m) = &old_manifest {
            // the run's own inputs, as its manifest vouches for them (an edited config.toml
            // would otherwise be recorded as if the whole run had used it)
            for (name, bytes, want) in [
                ("config.toml", &cfg_bytes, &m.config_sha256),
                ("tokenizer.json", &tok_bytes, &m.tokenizer_sha256),
            ] {
                if &data::sha256_hex(bytes) != want
                    && !(name == "config.toml" && refit_interrupted(&cfg_bytes, m, resumed_step))
                {
                    return Err(Error::Usage(format!(
                        "cannot resume {}: {name} was changed since training (its sha256 differs from manifest.json); restore the original or train into another --out",
                        run.display()
                    )));
                }
            }
        }
        let text = String::from_utf8_lossy(&cfg_bytes);
        let old = Config::from_toml(&text)?;
        if old.model != spec.cfg.model {
            return Err(Error::Usage(format!(
                "cannot resume {}: {}; resume with --config {} or choose another --out",
                run.display(),
                describe_diff(&old.model, &spec.cfg.model),
                cfg_path.display()
            )));
        }
        if old.train != spec.cfg.train {
            return Err(Error::Usage(format!(
                "cannot resume {}: {}; a run keeps its [train] section (the LR schedule, batch order and optimizer shape its weights, and `moelab verify` replays one config): resume with --config {} and no --steps/--seed/--grad-accum, or train into another --out (issue 11)",
                run.display(),
                checkpoint::describe_section_diff("train", &old.train, &spec.cfg.train, "the run"),
                cfg_path.display()
            )));
        }
        if data::sha256_hex(&tok_bytes) != ds.tokenizer_sha256 {
            return Err(Error::Usage(format!(
                "cannot resume {}: the data's tokenizer is not the run's tokenizer.json; resume with the data the run was trained on",
                run.display()
            )));
        }
        if let Some(m) = &old_manifest {
            if let Some((f, _)) = m
                .data
                .sha256
                .iter()
                .find(|(f, h)| rec.sha256.get(*f) != Some(h))
            {
                let what = m
                    .data
                    .path
                    .as_ref()
                    .map_or(String::new(), |p| format!(" ({})", p.display()));
                return Err(Error::Usage(format!(
                    "cannot resume {}: {f} differs from the data the run was trained on; resume with the original data{what}",
                    run.display()
                )));
            }
        }
        return Ok(RunDirPlan::Resume);
    }
    if cfg_path.exists() || run.join("latest").exists() {
        let any_ckpt = std::fs::read_dir(run.join("checkpoints")).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("step-")))
        });
        if any_ckpt || run.join("latest").exists() {
            return Err(Error::Usage(format!(
                "{} already holds a run; pass --resume to continue it or choose another --out",
                run.display()
            )));
        }
        // NOTE: a run that died before its first checkpoint holds nothing to resume (and
        // its weights are a pure function of the config), so a new run may replace it; but
        // only a dir that is recognisably a moelab run (its config parses and a run file
        // exists): any other dir that happens to hold a config.toml is left alone.
        let is_run = std::fs::read_to_string(&cfg_path)
            .ok()
            .is_some_and(|t| model::Config::from_toml(&t).is_ok())
            && ["manifest.json", "metrics.jsonl", "train.lock"]
                .iter()
                .any(|f| run.join(f).exists());
        if !is_run {
            return Err(Error::Usage(format!(
                "{} holds a config.toml but is not a moelab run dir; choose another --out",
                run.display()
            )));
        }
        return Ok(RunDirPlan::Restart);
    }
    Ok(RunDirPlan::New)
}

/// Writes the run dir of a new run (or a restart): config.toml and tokenizer.json. Called by
/// the writer, holding the lock, after [`check_run_dir`].
fn write_run_dir(spec: &RunSpec, tokenizer_json: &[u8], plan: RunDirPlan) -> Result<()> {
    let run = &spec.run_dir;
    if plan == RunDirPlan::Resume {
        return Ok(());
    }
    if plan == RunDirPlan::Restart {
        for f in ["metrics.jsonl", "manifest.json"] {
            let p = run.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
    }
    data::write_atomic(&run.join("config.toml"), spec.cfg.to_toml().as_bytes())?;
    data::write_atomic(&run.join("tokenizer.json"), tokenizer_json)?;
    for (name, bytes) in spec.init.iter().flat_map(|i| &i.files) {
        data::write_atomic(&run.join(name), bytes)?;
    }
    Ok(())
}

/// Runs (or resumes) training to `cfg.train.steps`.
pub fn run(spec: &RunSpec, rep: &mut dyn Reporter) -> Result<Outcome> {
    let cfg = &spec.cfg;
    // mutable for `refit` only, which changes `steps` before any rate depends on it
    let mut tc = cfg.train.clone();
    let ds = match &spec.source {
        Source::Dir(d) => Dataset::open(d, cfg.model.vocab_size, tc.seq_len)?,
        Source::Examples {
            train,
            val,
            rendered,
            tokenizer,
        } => Dataset::from_examples(
            train,
            val,
            rendered.as_ref(),
            tokenizer,
            cfg.model.vocab_size,
            tc.seq_len,
        )?,
    };
    let (b, t) = (tc.batch_size, tc.seq_len);
    let loader = match &ds.train {
        Split::Tokens(tokens) => {
            Batcher::Tokens(Loader::new(tokens, b, t, tc.seed).ok_or_else(|| {
                Error::Usage(format!(
                    "training split has {} tokens, fewer than seq_len + 1 = {}",
                    tokens.len(),
                    t + 1
                ))
            })?)
        }
        Split::Chat(p) => {
            if p.too_long > 0 {
                rep.message(&format!(
                    "{} training examples are longer than seq_len = {t} and were left out",
                    p.too_long
                ));
            }
            Batcher::Chat(ChatLoader::new(p, b, tc.seed)?)
        }
    };
    let mut teacher = match &spec.teacher {
        Some(ts) => {
            if ts.cfg.vocab_size != cfg.model.vocab_size {
                return Err(Error::Usage(format!(
                    "the teacher has vocab_size {} and the student {}: distillation needs one tokenizer",
                    ts.cfg.vocab_size, cfg.model.vocab_size
                )));
            }
            let layout = model::Layout::new(&ts.cfg);
            let mut m = Model::with_params(&ts.cfg, layout, ts.params.clone(), b, t);
            m.training = false;
            Some(m)
        }
        None => None,
    };
    let comm: &dyn Comm = spec.opts.comm.unwrap_or(&Single);
    let (rank, world) = (comm.rank(), comm.size());
    if !tc.grad_accum.is_multiple_of(world as u64) {
        return Err(Error::Usage(format!(
            "train.grad_accum = {} is not a multiple of the {world} processes; each process computes grad_accum / processes micro-batches",
            tc.grad_accum
        )));
    }
    // rank 0 writes (config, metrics, checkpoints, manifest); a replay writes nothing
    let writer = rank == 0 && !spec.opts.dry;
    let rec = data_record(&spec.source, &ds)?;
    let mut _lock = None;
    if !spec.opts.dry {
        // every process checks before any writes (else the others would find rank 0's new
        // run dir and take it for an existing run)
        check_run_dir(spec, &ds, &rec, true)?;
        comm.all_gather(&[0]);
        if writer {
            std::fs::create_dir_all(&spec.run_dir).map_err(io_err(&spec.run_dir))?;
            _lock = Some(crate::lock::RunLock::acquire(&spec.run_dir)?);
            checkpoint::remove_stale_temp(&spec.run_dir);
            // again under the lock: another process may have started since the first check
            let plan = check_run_dir(spec, &ds, &rec, false)?;
            write_run_dir(spec, &ds.tokenizer_json, plan)?;
        }
    }
    let run = &spec.run_dir;
    let metrics = run.join("metrics.jsonl");

    let mut model = Model::new(&cfg.model, b, t, tc.seed);
    model.set_precision(tc.precision.kernels());
    let mut opt = Optimizer::new(&model);
    let mut state = State {
        format_version: FORMAT_VERSION,
        step: 0,
        next_batch: 0,
        tokens_seen: 0,
        seed: tc.seed,
        weights_hash: String::new(),
        files: Default::default(),
        model: cfg.model.clone(),
        loss_ema: None,
        skip_steps: vec![],
        opt_step: None,
        checksum: String::new(),
    };
    if let (Some(init), false) = (&spec.init, spec.resume) {
        if init.params.len() != model.params.len() {
            return Err(Error::Usage(format!(
                "the initial weights ({}) hold {} values but the config's model has {}",
                init.record.path,
                init.params.len(),
                model.params.len()
            )));
        }
        model.params.copy_from_slice(&init.params);
    }
    if spec.resume {
        let (dir, notes) = checkpoint::latest_good(run)?.expect("checked by check_run_dir");
        for n in notes {
            rep.message(&n);
        }
        state = checkpoint::load(&dir, &mut model, &mut opt)?;
        if writer {
            truncate_metrics(&metrics, state.step)?;
        }
        rep.message(&format!(
            "resumed from {} (step {})",
            dir.display(),
            state.step
        ));
    }
    if spec.cfg.train.optimizer == model::config::OptimizerKind::Muon {
        let trainable = || model.layout.tensors.iter().filter(|t| t.trainable);
        let hidden = || trainable().filter(|t| !t.blocks.is_empty());
        let matrices: usize = hidden().map(|t| t.blocks.len()).sum();
        let muon_params: usize = hidden().map(|t| t.len).sum();
        let all: usize = trainable().map(|t| t.len).sum();
        rep.message(&format!(
            "optimizer: Muon for {matrices} matrices ({muon_params} parameters), AdamW for the other {} parameters",
            all - muon_params
        ));
    }
    let mut manifest = if writer {
        Some(start_manifest(
            spec,
            rec,
            state.step,
            spec.resume.then_some(state.weights_hash.as_str()),
            world,
        )?)
    } else {
        None
    };
    // the state a rollback returns to: the last checkpoint (or the start)
    let rollbacks = tc.on_anomaly == model::config::OnAnomaly::Rollback;
    let snap = |m: &Model, o: &Optimizer, s: &State| {
        rollbacks.then(|| (m.params.clone(), o.clone(), s.clone()))
    };
    let mut snapshot = snap(&model, &opt, &state);

    let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
    let mine = dist::block(rank, world, tc.grad_accum);
    let mut acc = vec![0.0f32; model.grads.len()];
    let mut held: Vec<Vec<f32>> = if rank == 0 {
        vec![]
    } else {
        vec![vec![0.0; model.grads.len()]; mine.clone().count()]
    };
    let start = Instant::now();
    let start_tokens = state.tokens_seen;
    let mut outcome = Outcome::Finished;
    // refits from the steps' own time (evaluations and checkpoints left out: `Costs` counts
    // them), each over all steps timed since the first window began: a window of 50 steps
    // alone (~9 s) missed the rest of a run's speed by 7% either way on a drifting host, a
    // budget overrun or a waste of the same size; a rollback ends them (the fit standing
    // then is final)
    let mut refit = match (spec.opts.refit, spec.resume) {
        (Some(f), false) => refit_window(&tc).map(|w| (f, w)),
        _ => None,
    };
    let mut refits = 0u32;
    let (mut timed, mut timed_steps) = (0.0f64, 0u64);
    // what the budget's estimates stand for, measured: checkpoints (their count, seconds)
    // and the evaluations' seconds
    let (mut ckpts, mut ckpt_secs, mut eval_secs) = (0u32, 0.0f64, 0.0f64);
    while state.step < tc.steps {
        let step_start = Instant::now();
        if spec.opts.stop_at.is_some_and(|n| state.step >= n) {
            outcome = Outcome::Stopped;
            break;
        }
        let lr = lr_at(state.step, &tc);
        let this_step = state.step + 1;
        model.training = true;
        // this process's micro-batches, each gradient on its own (see dist.rs)
        let (mut ce, mut kd) = (vec![], vec![]);
        for (j, k) in mine.clone().enumerate() {
            let bi = state.next_batch + k;
            loader.batch(bi, &mut x, &mut y);
            model.dropout_key = bi;
            model.zero_grad();
            ce.push(model.forward(&x, &y).ce);
            match (&mut teacher, &spec.teacher) {
                (Some(tm), Some(ts)) => {
                    tm.forward(&x, &y);
                    let d = Distill {
                        teacher_logits: tm.logits(),
                        weight: ts.weight,
                        temperature: ts.temperature,
                    };
                    kd.push(model.distill_loss(&d));
                    model.backward_distill(1.0 / tc.grad_accum as f32, Some(&d));
                }
                _ => {
                    kd.push(0.0);
                    model.backward(1.0 / tc.grad_accum as f32);
                }
            }
            if j == 0 && fault::active("nan-grad", this_step) {
                // one element of a trainable tensor, as an overflow in a backward kernel
                // would leave it; it must reach the anomaly check through the fold
                let t = model.layout.tensors.iter().find(|t| t.trainable);
                let t = t.expect("a model has trainable tensors");
                model.grads[t.offset + t.len / 2] = f32::NAN;
            }
            // swaps, not copies: with one micro-batch per step nothing is copied at all
            if rank > 0 {
                std::mem::swap(&mut held[j], &mut model.grads);
            } else if j == 0 {
                std::mem::swap(&mut acc, &mut model.grads);
            } else {
                dist::add_into(&mut acc, &model.grads);
            }
        }
        state.next_batch += tc.grad_accum;
        // losses, stop flags and expert loads of every process, then the gradient fold
        let load = model.take_load();
        let mut words: Vec<u64> = ce.iter().chain(&kd).map(|v| v.to_bits() as u64).collect();
        words.push(spec.stop.load(Ordering::SeqCst) as u64);
        words.extend(load.iter().flatten());
        let all = dist::gather_u64(comm, &words);
        let per = words.len();
        let n = ce.len();
        let (mut loss, mut kd_loss, mut stop) = (0.0f32, 0.0f32, false);
        let mut total_load = load.clone();
        total_load.iter_mut().for_each(|l| l.fill(0));
        for r in 0..world {
            let w = &all[r * per..(r + 1) * per];
            for v in &w[..n] {
                loss += f32::from_bits(*v as u32) / tc.grad_accum as f32;
            }
            for v in &w[n..2 * n] {
                kd_loss += f32::from_bits(*v as u32) / tc.grad_accum as f32;
            }
            stop |= w[2 * n] != 0;
            let mut counts = w[2 * n + 1..].iter();
            for c in total_load.iter_mut().flatten() {
                *c += counts.next().expect("same load shape on every rank");
            }
        }
        dist::fold_across(comm, &mut acc, &held);
        std::mem::swap(&mut model.grads, &mut acc);
        if fault::active("nan", this_step) {
            loss = f32::NAN;
        }
        if fault::active("spike", this_step) {
            loss *= 100.0;
        }

        let norm = Optimizer::grad_norm(&model);
        let anomaly = if state.skip_steps.contains(&this_step) {
            Some("rolled back before")
        } else if !loss.is_finite() || !norm.is_finite() {
            Some("non-finite loss or gradient")
        } else if tc.spike_factor > 0.0
            && state.loss_ema.is_some_and(|e| loss > tc.spike_factor * e)
        {
            Some("loss spike")
        } else {
            None
        };
        if let Some(kind) = anomaly {
            let rollback = rollbacks && !state.skip_steps.contains(&this_step);
            let event = serde_json::json!({
                "step": this_step, "anomaly": kind, "loss": loss, "grad_norm": norm,
                "action": if rollback { "rollback" } else { "skipped" },
                "ema": state.loss_ema,
            });
            if writer {
                append_metrics(&metrics, &event)?;
            }
            if let Some((params, o, st)) = snapshot.as_ref().filter(|_| rollback) {
                let mut skips = state.skip_steps.clone();
                skips.push(this_step);
                model.params.clone_from(params);
                opt = o.clone();
                state = st.clone();
                state.skip_steps = skips;
                let _ = model.take_load();
                if writer {
                    truncate_metrics(&metrics, state.step)?;
                }
                refit = None;
                rep.message(&format!(
                    "step {this_step}: {kind} (loss {loss}); rolled back to step {} and will skip step {this_step}",
                    state.step
                ));
                continue;
            }
            rep.message(&format!(
                "step {this_step}: {kind} (loss {loss}, grad norm {norm}); update skipped"
            ));
        } else {
            opt.step_with_norm(&mut model, &tc, lr, norm);
            model.apply_load(total_load);
            state.loss_ema = Some(match state.loss_ema {
                None => loss,
                Some(e) => 0.9 * e + 0.1 * loss,
            });
        }
        state.step += 1;
        state.tokens_seen += (tc.grad_accum as usize * b * t) as u64;
        if let Some((fit, (from, at))) = refit {
            if state.step > from {
                timed += step_start.elapsed().as_secs_f64();
                timed_steps += 1;
            }
            if state.step == at {
                let per = timed / timed_steps as f64;
                let mut tb = fit(
                    state.step,
                    per,
                    (ckpts > 0).then(|| ckpt_secs / ckpts as f64),
                );
                tc.steps = tb.steps.max(tc.warmup_steps + 1);
                // the steps run so far used rates that must not change
                while schedule::steps_fixed_from(&tc) < state.step {
                    tc.steps += 1;
                }
                tb.steps = tc.steps;
                let next = at + (at - from);
                let last = next >= schedule::steps_fixed_from(&tc);
                refit = (!last).then_some((fit, (at, next)));
                refits += 1;
                if writer {
                    let mut c = cfg.clone();
                    c.train.steps = tc.steps;
                    let toml = c.to_toml();
                    data::write_atomic(&run.join("config.toml"), toml.as_bytes())?;
                    fault::point("refit-manifest", state.step, run)?;
                    if let Some(m) = manifest.as_mut() {
                        m.steps = tc.steps;
                        m.config_sha256 = data::sha256_hex(toml.as_bytes());
                        m.time_budget = Some(tb.clone());
                        m.save(run)?;
                    }
                }
                let wsd = tc.schedule == model::Schedule::Wsd;
                if refits == 1 || last {
                    let what = if last && wsd { " (final fit)" } else { "" };
                    rep.message(&format!(
                        "time budget: {per:.3} s per step over steps {}-{at} of this run, {:.1} s spent: {} steps{what}",
                        at - timed_steps + 1,
                        tb.spent_seconds,
                        tc.steps
                    ));
                }
            }
        }

        if fault::active(&format!("corrupt-rank{rank}"), state.step) {
            // a faulty machine: every weight off by a relative 1e-4
            model.params.iter_mut().for_each(|p| *p *= 1.0 + 1e-4);
        }
        if world > 1 && tc.agree_every > 0 && state.step.is_multiple_of(tc.agree_every) {
            let digest = io::weights_hash(&model.layout, &model.params);
            let all = comm.all_gather(digest.as_bytes());
            let digests: Vec<Vec<u8>> = all.chunks(digest.len()).map(|c| c.to_vec()).collect();
            let odd = dist::disagreeing(&digests);
            if !odd.is_empty() {
                return Err(Error::Diverged {
                    step: state.step,
                    ranks: odd,
                });
            }
        }

        let report = StepReport {
            step: state.step,
            steps: tc.steps,
            loss,
            lr,
            grad_norm: norm,
            tokens_seen: state.tokens_seen,
            tokens_per_s: (state.tokens_seen - start_tokens) as f64 / start.elapsed().as_secs_f64(),
            imbalance: model.load_imbalance(),
            kd_loss: spec.teacher.as_ref().map(|_| kd_loss),
        };
        if writer {
            append_metrics(&metrics, &report)?;
        }
        rep.step(&report);
        rep.weights(state.step, &model);

        let last = state.step == tc.steps;
        let periodic = tc.eval_every > 0 && state.step.is_multiple_of(tc.eval_every);
        if (periodic || last) && ds.val.targets() > 0 && writer {
            let t0 = Instant::now();
            let e = evaluate(&mut model, &ds.val, if last { 0 } else { tc.eval_batches });
            let r = EvalReport {
                step: state.step,
                val_loss: e.loss,
                val_tokens: e.tokens,
            };
            eval_secs += t0.elapsed().as_secs_f64();
            append_metrics(&metrics, &r)?;
            rep.eval(&r);
        }
        if (tc.checkpoint_every > 0 && state.step.is_multiple_of(tc.checkpoint_every))
            || last
            || stop
        {
            let t0 = Instant::now();
            state.weights_hash = io::weights_hash(&model.layout, &model.params);
            if writer {
                let dir = checkpoint::save(run, &model, Some(&opt), &state, tc.keep_checkpoints)?;
                if let Some(m) = manifest.as_mut() {
                    m.checkpoints.insert(state.step, state.weights_hash.clone());
                    m.save(run)?;
                }
                rep.checkpoint(state.step, &dir);
            }
            ckpts += 1;
            ckpt_secs += t0.elapsed().as_secs_f64();
            snapshot = snap(&model, &opt, &state);
        }
        if stop && !last {
            outcome = Outcome::Stopped;
            break;
        }
    }
    if refits > 0 && outcome == Outcome::Finished {
        // what the last fit estimated, as it went
        rep.message(&format!(
            "time budget: evaluations took {eval_secs:.1} s, {ckpts} checkpoints {:.2} s each",
            ckpt_secs / ckpts.max(1) as f64
        ));
    }
    Ok(outcome)
}

/// What this run's data is: the hashes [`Dataset`] computed as it read the data dir (or the
/// in-memory examples).
pub fn data_record(source: &Source, ds: &Dataset) -> Result<DataRecord> {
    Ok(match source {
        Source::Dir(d) => DataRecord {
            kind: "dir".into(),
            path: Some(d.canonicalize().map_err(io_err(d))?),
            sha256: ds.sha256.clone(),
        },
        Source::Examples { .. } => DataRecord {
            kind: "examples".into(),
            path: None,
            sha256: ds.sha256.clone(),
        },
    })
}

/// Whether `config.toml` differs from what the manifest vouches for only by a
/// `--time-budget` refit the process did not live to record: a refit writes config.toml, then
/// the manifest, and the one differs from the other in `train.steps` alone, at a step count
/// under which every step up to the checkpoint resumed from (`resumed_step`) had the same
/// rate. Resuming with config.toml's steps is then the same run (`start_manifest` records
/// them); any other change, a changed step count that moves a rate already used included,
/// is still refused.
fn refit_interrupted(cfg_bytes: &[u8], m: &Manifest, resumed_step: u64) -> bool {
    let Some(new) = m.time_budget.as_ref().and_then(|_| {
        let text = std::str::from_utf8(cfg_bytes).ok()?;
        Config::from_toml(text).ok()
    }) else {
        return false;
    };
    let mut old = new.clone();
    old.train.steps = m.steps;
    data::sha256_hex(old.to_toml().as_bytes()) == m.config_sha256
        && schedule::steps_fixed_from(&old.train) >= resumed_step
        && schedule::steps_fixed_from(&new.train) >= resumed_step
}

/// The run's manifest with a new segment (a fresh run's, or the existing one's on resume).
fn start_manifest(
    spec: &RunSpec,
    data: DataRecord,
    from_step: u64,
    resumed_hash: Option<&str>,
    world: usize,
) -> Result<Manifest> {
    let run = &spec.run_dir;
    let sha = |name: &str| -> Result<String> {
        let p = run.join(name);
        Ok(data::sha256_hex(&std::fs::read(&p).map_err(io_err(&p))?))
    };
    let old = if spec.resume && Manifest::path(run).exists() {
        Some(Manifest::load(run)?)
    } else {
        None
    };
    let mut m = Manifest {
        format_version: manifest::FORMAT_VERSION,
        config_sha256: sha("config.toml")?,
        tokenizer_sha256: sha("tokenizer.json")?,
        data,
        seed: spec.cfg.train.seed,
        steps: spec.cfg.train.steps,
        grad_accum: spec.cfg.train.grad_accum,
        teacher: spec.teacher.is_some(),
        // a resume keeps what the run started from
        init: match &old {
            Some(o) => o.init.clone(),
            None => spec.init.as_ref().map(|i| i.record.clone()),
        },
        time_budget: match &old {
            // the steps config.toml holds (see `refit_interrupted`), the rest as recorded
            Some(o) => o.time_budget.clone().map(|tb| manifest::TimeBudget {
                steps: spec.cfg.train.steps,
                ..tb
            }),
            None => spec.opts.time_budget.clone(),
        },
        segments: old.as_ref().map(|o| o.segments.clone()).unwrap_or_default(),
        checkpoints: old.map(|o| o.checkpoints).unwrap_or_default(),
    };
    // checkpoints past the one resumed from are about to be rewritten; the one resumed from
    // may have been written by a process that died before recording it
    m.checkpoints.retain(|&s, _| s <= from_step);
    if let Some(h) = resumed_hash {
        m.checkpoints.insert(from_step, h.to_string());
    }
    m.segments.push(Segment {
        from_step,
        world_size: world,
        threads: rayon::current_num_threads(),
        code_version: manifest::code_version(),
    });
    m.save(run)?;
    Ok(m)
}
