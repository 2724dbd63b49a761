//! `moelab train --config FILE --data DATA_DIR --out RUN_DIR [--steps N] [--seed S] [--resume]`.

use crate::presets::resolve_config;
use crate::progress::{train_budgeted, train_in_group, train_with_progress};
use anyhow::Result;
use clap::Args;
use model::Config;
use std::path::{Path, PathBuf};
use train::trainer::{Init, Outcome, Source};

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab train --config small-moe --data data/shk --out runs/shk\n  moelab train --init runs/smollm2 --data data/mine --out runs/smollm2-mine --steps 200\n  moelab train --config small-moe --data data/shk --out runs/shk --resume\n  moelab train --config small-moe --data data/shk --out runs/shk10 --time-budget 10m\n  mpirun -np 2 moelab train --config small-moe --grad-accum 2 --data data/shk --out runs/dp   (--features mpi)\n\nOne process trains in a run dir at a time (RUN_DIR/train.lock). --resume continues the same run: a changed config ([train] included) or other data is refused.";

#[derive(Args)]
pub struct TrainArgs {
    /// Config file or preset name (tiny, small-dense, small-moe, teacher, student,
    /// passkey-128, passkey-512, passkey-4096-yarn, shakespeare). With
    /// --init it may be left out: the initial model's shape and default [train] settings.
    #[arg(long, required_unless_present = "init")]
    config: Option<String>,
    /// Data dir written by `moelab prepare`.
    #[arg(long)]
    data: PathBuf,
    /// Run dir (config, tokenizer, metrics.jsonl, checkpoints).
    #[arg(long)]
    out: PathBuf,
    /// Total optimizer steps (overrides train.steps; at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Seed (overrides train.seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Micro-batches per optimizer step (overrides train.grad_accum); under `mpirun -np N`
    /// the N processes share them (N must divide it).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    grad_accum: Option<u64>,
    /// Train as N replicas inside this process, each with its own model and 1/N of the
    /// threads, sharing each step's micro-batches as `mpirun -np N` would (N must divide
    /// grad_accum). Same weights as one replica; on few cores often faster.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    replicas: Option<u64>,
    /// Continue the run in --out from its latest checkpoint. The config must be the run's
    /// own, [train] included (same --steps, --seed, --grad-accum): a changed setting is
    /// refused, since the run could no longer be replayed by `moelab verify`.
    #[arg(long)]
    resume: bool,
    /// Start from these weights instead of a random init: a run dir or checkpoint dir (e.g.
    /// `moelab import`'s), a Hugging Face model dir or a GGUF file. The config's [model]
    /// must lay out the same tensors (dropout and context length may differ); the data must
    /// use its tokenizer (`moelab prepare --corpus ... --tokenizer RUN`). The manifest
    /// records the initial weights' hash, so `moelab verify` can replay the run from them.
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    /// Train for this much wall clock from process start (e.g. 10m, 90s, 1h30m) instead of a
    /// fixed step count: a few steps are timed first and the steps that fit (evaluations and
    /// checkpoints included) become train.steps, written to the run's config and manifest,
    /// so `moelab verify` replays the run exactly on any host.
    #[arg(long, conflicts_with_all = ["steps", "resume", "replicas"])]
    time_budget: Option<String>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let init = a.init.as_deref().map(crate::runs::load_init).transpose()?;
    let mut cfg = match (&a.config, &init) {
        (Some(c), _) => resolve_config(c, a.steps, a.seed)?,
        (None, Some(src)) => {
            let mut cfg = model::Config {
                model: src.model.clone(),
                train: Default::default(),
            };
            cfg.train.seq_len = cfg.train.seq_len.min(cfg.model.max_seq_len);
            if let Some(s) = a.steps {
                cfg.train.steps = s;
            }
            if let Some(s) = a.seed {
                cfg.train.seed = s;
            }
            cfg.validate()?;
            cfg
        }
        (None, None) => unreachable!("clap requires --config without --init"),
    };
    if let Some(g) = a.grad_accum {
        cfg.train.grad_accum = g;
        cfg.validate()?;
    }
    // (an imported model's chat.json goes with its weights: Init::files)
    let init = match init {
        Some(src) => {
            crate::runs::check_init_fits(&src.init, &src.model, &cfg.model)?;
            crate::runs::check_data_tokenizer(&a.data, &src.tok)?;
            Some(src.init)
        }
        None => None,
    };
    if cfg.train.precision == model::config::TrainPrecision::Bf16 && !kernels::bf16::has_hardware()
    {
        eprintln!(
            "warning: precision = \"bf16\" on a CPU without AVX512-BF16 computes every bf16 product with the exact scalar definition, many times slower than fp32; set precision = \"fp32\" in [train] for speed (the weights will differ)"
        );
    } else if cfg.train.precision == model::config::TrainPrecision::Bf16
        && !kernels::peak::bf16_pays()
    {
        eprintln!(
            "warning: precision = \"bf16\": this CPU's AVX512-BF16 dot products run no faster than its fp32 FMAs ({:.0} vs {:.0} GFLOP/s on one core), so bf16 trains slower than fp32 here (packing operands costs extra); set precision = \"fp32\" in [train] for speed (the weights will differ)",
            kernels::peak::bf16_gflops().unwrap_or(0.0),
            kernels::peak::fma_gflops().unwrap_or(0.0),
        );
    }
    let group = crate::comm::world()?;
    if let Some(text) = &a.time_budget {
        if group.is_some() {
            anyhow::bail!("--time-budget times one process; with mpirun give --steps");
        }
        let seconds = train::budget::parse_duration(text)
            .map_err(|e| anyhow::anyhow!("--time-budget: {e}"))?;
        let (budget, costs) = fit_budget(&mut cfg, &a.data, seconds)?;
        let tc = cfg.train.clone();
        let refit = move |done: u64, step: f64, checkpoint: Option<f64>| {
            use train::budget::{fit_steps, record};
            let mut costs = costs.with_step(step);
            if let Some(c) = checkpoint {
                costs.checkpoint = c;
            }
            let spent = started();
            let steps = done + fit_steps(&tc, &costs, seconds - spent, seconds);
            record(seconds, spent, &costs, steps)
        };
        train_budgeted(cfg, Source::Dir(a.data), &a.out, init, budget, &refit)?;
        return Ok(());
    }
    if let Some(n) = a.replicas.map(|n| n as usize).filter(|&n| n > 1) {
        if group.is_some() {
            anyhow::bail!("--replicas splits one process; under mpirun use -np instead");
        }
        train_replicas(cfg, &a.data, &a.out, a.resume, init, n)?;
        return Ok(());
    }
    let Some(comm) = group.as_deref() else {
        train_with_progress(cfg, Source::Dir(a.data), None, &a.out, a.resume, init)?;
        return Ok(());
    };
    // data-parallel: every process trains; rank 0 reports and writes
    let (rank, size) = (comm.rank(), comm.size());
    if rank == 0 {
        eprintln!(
            "data-parallel over {size} processes: {} micro-batches per step each",
            cfg.train.grad_accum / size as u64
        );
    }
    match train_in_group(cfg, Source::Dir(a.data), &a.out, a.resume, init, comm) {
        Ok(_) => Ok(()),
        Err(e) => {
            // the others would wait for this process forever
            eprintln!("error (rank {rank} of {size}): {e:#}");
            comm.abort(1)
        }
    }
}

/// Seconds since the process started.
fn started() -> f64 {
    crate::STARTED
        .get()
        .map_or(0.0, |t| t.elapsed().as_secs_f64())
}

/// The first fit of `--time-budget`, from a scratch model's steps; the run fits again from
/// its own first steps (`RunOptions::refit`), with the costs returned here.
fn fit_budget(
    cfg: &mut Config,
    data: &Path,
    seconds: f64,
) -> Result<(train::manifest::TimeBudget, train::budget::Costs)> {
    use train::budget::{fit_steps, measure_step, record, Costs};
    let tc = &cfg.train;
    // the final evaluation covers the whole validation split
    let ds = train::dataset::Dataset::open(data, cfg.model.vocab_size, tc.seq_len)?;
    let val_batches = match &ds.val {
        train::dataset::Split::Tokens(t) => {
            data::loader::eval_batches(t, tc.batch_size, tc.seq_len) as u64
        }
        train::dataset::Split::Chat(p) => {
            data::chat::ChatLoader::new(p, tc.batch_size, 0).map_or(0, |l| l.eval_batches() as u64)
        }
    };
    drop(ds);
    eprintln!(
        "time budget {}: timing a few steps of this config...",
        human(seconds)
    );
    let step = measure_step(cfg, 2, 7);
    let params = model::Layout::new(&cfg.model).n_params();
    let costs = Costs::estimate(tc, step, val_batches, params);
    let spent = started();
    let steps = fit_steps(tc, &costs, seconds - spent, seconds);
    if steps <= tc.warmup_steps {
        anyhow::bail!(
            "--time-budget {}: at {step:.3} s per step only {steps} steps fit, not more than train.warmup_steps = {}; give a longer budget",
            human(seconds),
            tc.warmup_steps
        );
    }
    cfg.train.steps = steps;
    cfg.validate()?;
    eprintln!(
        "time budget {}: {step:.3} s per step measured, {spent:.1} s spent: {steps} steps (the LR schedule spans them)",
        human(seconds)
    );
    Ok((record(seconds, spent, &costs, steps), costs))
}

fn human(seconds: f64) -> String {
    if seconds < 10.0 {
        return format!("{seconds}s");
    }
    let s = seconds.round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// `--replicas N`: N threads, each a rank of an in-process group with its own thread pool.
fn train_replicas(
    cfg: Config,
    data: &Path,
    out: &Path,
    resume: bool,
    init: Option<Init>,
    n: usize,
) -> Result<Outcome> {
    let threads = (rayon::current_num_threads() / n).max(1);
    eprintln!(
        "{n} replicas x {threads} threads: {} micro-batches per step each",
        cfg.train.grad_accum / n as u64
    );
    let results: Vec<Result<Outcome>> = std::thread::scope(|s| {
        let handles: Vec<_> = train::dist::Local::group(n)
            .into_iter()
            .map(|comm| {
                let (cfg, init) = (cfg.clone(), init.clone());
                s.spawn(move || -> Result<Outcome> {
                    let rank = train::dist::Comm::rank(&comm);
                    let r = kernels::par::on_pool(threads, || {
                        train_in_group(
                            cfg,
                            Source::Dir(data.to_path_buf()),
                            out,
                            resume,
                            init,
                            &comm,
                        )
                    })
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
                    if let Err(e) = &r {
                        // the other replicas would wait for this one forever
                        eprintln!("error (replica {rank} of {n}): {e:#}");
                        std::process::exit(1);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a replica panicked"))
            .collect()
    });
    results.into_iter().next().expect("replica 0")
}
