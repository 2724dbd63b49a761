//! Training with a progress bar (a helper the commands share, not a command): the bar and
//! its metrics line, Ctrl-C / SIGTERM handling (checkpoint, then stop), and the data-parallel
//! variant where only rank 0 draws.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use model::Config;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use train::trainer::{
    run as train_run, EvalReport, Init, Outcome, Reporter, RunSpec, Source, StepReport, TeacherSpec,
};

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

/// Trains with a progress bar; Ctrl-C or SIGTERM checkpoints and stops.
pub fn train_with_progress(
    cfg: Config,
    source: Source,
    teacher: Option<TeacherSpec>,
    out: &Path,
    resume: bool,
    init: Option<Init>,
) -> Result<Outcome> {
    train_with(cfg, source, teacher, out, resume, init, None, None)
}

/// A new run whose steps `train --time-budget` chose: the choice goes into its manifest, and
/// `refit` fits them again from the run's own first steps (see `RunOptions::refit`).
pub fn train_budgeted(
    cfg: Config,
    source: Source,
    out: &Path,
    init: Option<Init>,
    budget: train::manifest::TimeBudget,
    refit: &train::trainer::Refit,
) -> Result<Outcome> {
    let budget = Some((budget, refit));
    train_with(cfg, source, None, out, false, init, None, budget)
}

/// One process of a data-parallel group (only rank 0 draws progress).
pub fn train_in_group(
    cfg: Config,
    source: Source,
    out: &Path,
    resume: bool,
    init: Option<Init>,
    comm: &dyn train::dist::Comm,
) -> Result<Outcome> {
    train_with(cfg, source, None, out, resume, init, Some(comm), None)
}

/// Set by Ctrl-C or SIGTERM during a training (it then checkpoints and stops).
static STOP: AtomicBool = AtomicBool::new(false);

/// Whether the last training was asked to stop, even if the signal came too late to
/// stop it (during its last step or checkpoint): the demo ends then.
pub fn interrupted() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Whether `sig` is set to be ignored (as `nohup` sets SIGHUP).
fn signal_ignored(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current disposition.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

#[allow(clippy::too_many_arguments)]
fn train_with(
    cfg: Config,
    source: Source,
    teacher: Option<TeacherSpec>,
    out: &Path,
    resume: bool,
    init: Option<Init>,
    comm: Option<&dyn train::dist::Comm>,
    budget: Option<(train::manifest::TimeBudget, &train::trainer::Refit)>,
) -> Result<Outcome> {
    let quiet = comm.is_some_and(|c| c.rank() > 0);
    // whether a training is running: between trainings (the demo's generation and
    // evaluation stages) a signal ends the process at once, as it would without the handler
    static TRAINING: AtomicBool = AtomicBool::new(false);
    struct Training;
    impl Drop for Training {
        fn drop(&mut self) {
            TRAINING.store(false, Ordering::SeqCst);
        }
    }
    TRAINING.store(true, Ordering::SeqCst);
    STOP.store(false, Ordering::SeqCst);
    let _training = Training;
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        // NOTE: with ctrlc's `termination` feature this catches SIGINT, SIGTERM and SIGHUP:
        // kill, systemd, Docker and Slurm stop a run with SIGTERM, and it must checkpoint
        // then as it does on Ctrl-C (issue 11). A SIGHUP that was ignored when we started
        // (`nohup moelab train ...`) stays ignored: logging out must not stop the run.
        let hup_ignored = signal_ignored(libc::SIGHUP);
        let _ = ctrlc::set_handler(|| {
            if !TRAINING.load(Ordering::SeqCst) || STOP.swap(true, Ordering::SeqCst) {
                // no training to checkpoint, or a second signal: the user insists
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
        peak_gflops: crate::machine::nominal_peak_gflops(threads),
        last_eval: None,
        quiet,
    };
    let spec = RunSpec {
        cfg,
        source,
        teacher,
        run_dir: out.to_path_buf(),
        resume,
        init,
        stop: &STOP,
        opts: train::trainer::RunOptions {
            comm,
            time_budget: budget.as_ref().map(|b| b.0.clone()),
            refit: budget.map(|b| b.1),
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
