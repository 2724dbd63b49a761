//! `moelab train --config FILE --data DATA_DIR --out RUN_DIR [--steps N] [--seed S] [--resume]`.

use crate::presets::load_config;
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use model::Config;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use train::trainer::{
    run as train_run, EvalReport, Outcome, Reporter, RunSpec, Source, StepReport, TeacherSpec,
};

#[derive(Args)]
pub struct TrainArgs {
    /// Config file or preset name (tiny, small-dense, small-moe, teacher, student).
    #[arg(long)]
    config: String,
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
}

struct Bar {
    bar: ProgressBar,
    flops_per_token: f64,
    peak_gflops: Option<f64>,
    last_eval: Option<f64>,
    /// A data-parallel rank other than 0: says nothing.
    quiet: bool,
}

impl Bar {
    /// A line above the bar, or on stderr when there is no terminal to draw the bar on.
    fn line(&self, msg: String) {
        if self.quiet {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }
}

impl Reporter for Bar {
    fn step(&mut self, r: &StepReport) {
        self.bar.set_length(r.steps);
        self.bar.set_position(r.step);
        let mfu = self.peak_gflops.map_or(String::new(), |p| {
            format!(
                "  MFU {:.0}%",
                100.0 * r.tokens_per_s * self.flops_per_token / 1e9 / p
            )
        });
        let bal = if r.imbalance > 0.0 {
            format!("  balance {:.2}", r.imbalance)
        } else {
            String::new()
        };
        let val = self
            .last_eval
            .map_or(String::new(), |v| format!("  val {v:.3}"));
        let kd = r.kd_loss.map_or(String::new(), |k| format!("  kd {k:.3}"));
        self.bar.set_message(format!(
            "loss {:.3}{kd}{val}  {:.0} tok/s{mfu}{bal}",
            r.loss, r.tokens_per_s
        ));
    }
    fn eval(&mut self, r: &EvalReport) {
        self.last_eval = Some(r.val_loss);
        self.line(format!(
            "step {:>6}  val loss {:.4}  ({} tokens)",
            r.step, r.val_loss, r.val_tokens
        ));
    }
    fn checkpoint(&mut self, step: u64, dir: &Path) {
        self.line(format!("step {step:>6}  checkpoint {}", dir.display()));
    }
    fn message(&mut self, msg: &str) {
        self.line(msg.to_string());
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let mut cfg = resolve_config(&a.config, a.steps, a.seed)?;
    if let Some(g) = a.grad_accum {
        cfg.train.grad_accum = g;
        cfg.validate()?;
    }
    let group = crate::comm::world()?;
    if let Some(n) = a.replicas.map(|n| n as usize).filter(|&n| n > 1) {
        if group.is_some() {
            anyhow::bail!("--replicas splits one process; under mpirun use -np instead");
        }
        train_replicas(cfg, &a.data, &a.out, a.resume, n)?;
        return Ok(());
    }
    let Some(comm) = group.as_deref() else {
        train_with_progress(cfg, Source::Dir(a.data), None, &a.out, a.resume)?;
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
    match train_in_group(cfg, Source::Dir(a.data), &a.out, a.resume, comm) {
        Ok(_) => Ok(()),
        Err(e) => {
            // the others would wait for this process forever
            eprintln!("error (rank {rank} of {size}): {e:#}");
            comm.abort(1)
        }
    }
}

/// A config file or preset with the command line's overrides, validated.
pub fn resolve_config(spec: &str, steps: Option<u64>, seed: Option<u64>) -> Result<Config> {
    let mut cfg = load_config(spec)?;
    if let Some(s) = steps {
        cfg.train.steps = s;
    }
    if let Some(s) = seed {
        cfg.train.seed = s;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Trains with a progress bar; Ctrl-C or SIGTERM checkpoints and stops.
pub fn train_with_progress(
    cfg: Config,
    source: Source,
    teacher: Option<TeacherSpec>,
    out: &Path,
    resume: bool,
) -> Result<Outcome> {
    train_with(cfg, source, teacher, out, resume, None)
}

/// `--replicas N`: N threads, each a rank of an in-process group with its own thread pool.
fn train_replicas(cfg: Config, data: &Path, out: &Path, resume: bool, n: usize) -> Result<Outcome> {
    let threads = (rayon::current_num_threads() / n).max(1);
    eprintln!(
        "{n} replicas x {threads} threads: {} micro-batches per step each",
        cfg.train.grad_accum / n as u64
    );
    let results: Vec<Result<Outcome>> = std::thread::scope(|s| {
        let handles: Vec<_> = train::dist::Local::group(n)
            .into_iter()
            .map(|comm| {
                let cfg = cfg.clone();
                s.spawn(move || -> Result<Outcome> {
                    let rank = train::dist::Comm::rank(&comm);
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()?;
                    let r = pool.install(|| {
                        train_in_group(cfg, Source::Dir(data.to_path_buf()), out, resume, &comm)
                    });
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

/// One process of a data-parallel group (only rank 0 draws progress).
fn train_in_group(
    cfg: Config,
    source: Source,
    out: &Path,
    resume: bool,
    comm: &dyn train::dist::Comm,
) -> Result<Outcome> {
    train_with(cfg, source, None, out, resume, Some(comm))
}

/// Whether `sig` is set to be ignored (as `nohup` sets SIGHUP).
fn signal_ignored(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current disposition.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

fn train_with(
    cfg: Config,
    source: Source,
    teacher: Option<TeacherSpec>,
    out: &Path,
    resume: bool,
    comm: Option<&dyn train::dist::Comm>,
) -> Result<Outcome> {
    let quiet = comm.is_some_and(|c| c.rank() > 0);
    static STOP: AtomicBool = AtomicBool::new(false);
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        // NOTE: with ctrlc's `termination` feature this catches SIGINT, SIGTERM and SIGHUP:
        // kill, systemd, Docker and Slurm stop a run with SIGTERM, and it must checkpoint
        // then as it does on Ctrl-C (issue 11). A SIGHUP that was ignored when we started
        // (`nohup moelab train ...`) stays ignored: logging out must not stop the run.
        let hup_ignored = signal_ignored(libc::SIGHUP);
        let _ = ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                // a second signal: the user insists
                std::process::exit(130);
            }
        });
        if hup_ignored {
            // SAFETY: installing SIG_IGN for SIGHUP has no preconditions.
            unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
        }
    });
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(cfg.train.steps)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )?
        .progress_chars("=> "),
    );
    let threads = rayon::current_num_threads();
    let mut rep = Bar {
        bar,
        flops_per_token: cfg.model.train_flops_per_token(cfg.train.seq_len),
        peak_gflops: crate::bench::nominal_peak_gflops(threads),
        last_eval: None,
        quiet,
    };
    let spec = RunSpec {
        cfg,
        source,
        teacher,
        run_dir: out.to_path_buf(),
        resume,
        stop: &STOP,
        opts: train::trainer::RunOptions {
            comm,
            ..Default::default()
        },
    };
    let outcome = train_run(&spec, &mut rep)?;
    rep.bar.finish();
    if quiet {
        return Ok(outcome);
    }
    match outcome {
        Outcome::Finished => println!("done: {}", out.display()),
        Outcome::Stopped => println!(
            "stopped: checkpoint written; continue with the same command and --resume (--out {})",
            out.display()
        ),
    }
    Ok(outcome)
}
