//! `moelab distill generate` (teacher traces, verified) and `moelab distill train` (student
//! SFT on verified traces, optionally with logit distillation from the teacher).

use crate::presets::resolve_config;
use crate::progress::train_with_progress;
use crate::runs::{load_reasoner, task_bar};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use data::chat::{self, Example};
use data::tasks::{self, Split};
use infer::tasks::{attempt, render_example, Score};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use train::trainer::{Source, TeacherSpec};

#[derive(Subcommand)]
pub enum DistillCmd {
    /// The teacher writes k candidate solutions per prompt; the verifier marks the correct ones.
    #[command(
        after_help = "Examples:\n  moelab distill generate --teacher runs/teacher --task all --n 2000 --out traces.jsonl\n  moelab distill generate --teacher runs/teacher --task add,mul --n 500 --k 4 --temperature 0.7 --out traces.jsonl"
    )]
    Generate(GenerateArgs),
    /// Train a student on the verified traces (SFT), optionally on the teacher's logits too.
    #[command(
        after_help = "Examples:\n  moelab distill train --config student --traces traces.jsonl --out runs/student\n  moelab distill train --config student --traces traces.jsonl --out runs/student-kd \\\n      --teacher runs/teacher --kd-weight 0.5 --kd-temperature 2\n\nCtrl-C or SIGTERM saves a checkpoint and exits; the same command with --resume continues."
    )]
    Train(TrainArgs),
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Teacher run dir (or checkpoint dir).
    #[arg(long)]
    teacher: PathBuf,
    /// Tasks to pose: add, mul, expr, sort (comma-separated, or all).
    #[arg(long, default_value = "all")]
    task: String,
    /// Prompts to generate (fresh problems from --seed).
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Candidates per prompt.
    #[arg(long, default_value_t = 2)]
    k: usize,
    /// Sampling temperature (0: greedy, then every candidate is the same).
    #[arg(long, default_value_t = 0.6)]
    temperature: f32,
    /// Seed of the prompts and the samplers.
    #[arg(long, default_value_t = 2)]
    seed: u64,
    /// One difficulty for every prompt (add: digits, mul: 1-4, expr: depth, sort: length).
    #[arg(long)]
    difficulty: Option<u32>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// traces.jsonl to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Student config file or preset (student, tiny-student, ...).
    #[arg(long)]
    config: String,
    /// traces.jsonl from `moelab distill generate`; only verified traces are used.
    #[arg(long)]
    traces: PathBuf,
    /// Run dir of the student.
    #[arg(long)]
    out: PathBuf,
    /// Teacher run for logit distillation (and the tokenizer).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Weight W of the distillation loss: (1 - W) CE + W T^2 KL(teacher || student).
    #[arg(long, default_value_t = 0.5, requires = "teacher")]
    kd_weight: f32,
    /// Softmax temperature T of the distillation loss.
    #[arg(long, default_value_t = 2.0, requires = "teacher")]
    kd_temperature: f32,
    /// tokenizer.json (or a dir holding one) when there is no --teacher; default: the
    /// tokenizer of the run that wrote the traces.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Total optimizer steps (overrides train.steps; at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Continue the student run in --out (same config and traces; a change is refused).
    #[arg(long)]
    resume: bool,
    /// Start the student from these weights (a run or checkpoint dir of the same shape and
    /// tokenizer, e.g. an earlier student) instead of a random init; the manifest records
    /// their hash.
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
}

pub fn run(cmd: DistillCmd) -> Result<()> {
    match cmd {
        DistillCmd::Generate(a) => generate_cmd(
            &a.teacher,
            &a.task,
            a.n,
            a.k,
            a.temperature,
            a.seed,
            a.difficulty,
            &a.out,
            a.batch,
        ),
        DistillCmd::Train(a) => train(a).map(|_| ()),
    }
}

/// Verified traces of a traces file, split into train and validation (every 20th), with a
/// warning that counts malformed lines.
pub fn read_traces(path: &Path) -> Result<(Vec<Example>, Vec<Example>, String)> {
    if !path.exists() {
        bail!(
            "{}: no such traces file; write one with `moelab distill generate`",
            path.display()
        );
    }
    let (all, bad) = chat::read_jsonl(path)?;
    if let Some((line, msg)) = bad.first() {
        eprintln!(
            "warning: {}: skipped {} malformed line(s) (first: line {line}: {msg})",
            path.display(),
            bad.len()
        );
    }
    let total = all.len();
    let teacher = all.first().map(|e| e.teacher.clone()).unwrap_or_default();
    // NOTE: a trace of a dev or test problem would leak the held-out sets into training, so
    // traces of suite problems outside the train split are dropped (with a warning);
    // prompts outside the suite (a user's own data) are kept.
    let held_out = |e: &Example| {
        tasks::solve(&e.prompt).is_some() && tasks::Split::of(&e.prompt) != tasks::Split::Train
    };
    let n_held_out = all.iter().filter(|e| held_out(e)).count();
    if n_held_out > 0 {
        eprintln!(
            "warning: {}: skipped {n_held_out} trace(s) of held-out problems (dev/test split); `moelab distill generate` draws from the train split",
            path.display()
        );
    }
    // NOTE: a suite problem's answer is checked again here: the `verified` flag is the
    // file's word (it defaults to true when missing), and a merged or hand-edited traces file
    // could otherwise teach a wrong answer
    let wrong =
        |e: &Example| tasks::solve(&e.prompt).is_some() && !tasks::verify(&e.prompt, &e.answer);
    let n_wrong = all
        .iter()
        .filter(|e| e.verified && !held_out(e) && wrong(e))
        .count();
    if n_wrong > 0 {
        eprintln!(
            "warning: {}: skipped {n_wrong} trace(s) marked verified whose answer is wrong",
            path.display()
        );
    }
    let verified: Vec<Example> = all
        .into_iter()
        .filter(|e| e.verified && !held_out(e) && !wrong(e))
        .collect();
    if verified.is_empty() {
        bail!(
            "{}: none of its {total} traces is verified; generate more (--n, --k) or train the teacher longer",
            path.display()
        );
    }
    println!(
        "{}: {} verified of {total} traces{}",
        path.display(),
        verified.len(),
        if bad.is_empty() {
            String::new()
        } else {
            format!(", {} malformed lines skipped", bad.len())
        }
    );
    let (mut train, mut val) = (vec![], vec![]);
    for (i, e) in verified.into_iter().enumerate() {
        if total >= 40 && i % 20 == 19 {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    Ok((train, val, teacher))
}

pub fn train(a: TrainArgs) -> Result<train::trainer::Outcome> {
    let cfg = resolve_config(&a.config, a.steps, a.seed)?;
    let (train, val, trace_teacher) = read_traces(&a.traces)?;
    let tokenizer = match (&a.tokenizer, &a.teacher) {
        (Some(t), _) => crate::runs::tokenizer_path(t),
        (None, Some(t)) => t.join("tokenizer.json"),
        (None, None) => Path::new(&trace_teacher).join("tokenizer.json"),
    };
    if !tokenizer.exists() {
        bail!(
            "no tokenizer at {}: pass --tokenizer (the teacher's run dir or its tokenizer.json)",
            tokenizer.display()
        );
    }
    let mut rendered = None;
    let init = match &a.init {
        None => None,
        Some(p) => {
            let src = crate::runs::load_init(p)?;
            // an imported student learns in its own chat template
            if let Some(spec) = &src.chat {
                let fmt = infer::chat::ChatFormat::from_spec(Arc::new(src.tok.clone()), spec)
                    .map_err(anyhow::Error::msg)?;
                let render = |ex: &[Example]| -> Result<Vec<(Vec<u32>, usize)>> {
                    ex.iter()
                        .map(|e| {
                            render_example(&fmt, e)
                                .map_err(|m| anyhow::anyhow!("--init {}: {m}", p.display()))
                        })
                        .collect()
                };
                rendered = Some(train::dataset::Rendered {
                    train: render(&train)?,
                    val: render(&val)?,
                    pad: fmt.stop_tokens()[0],
                });
            }
            crate::runs::check_init_fits(&src.init, &src.model, &cfg.model)?;
            if tokenizer::Tokenizer::from_file(&tokenizer)?.to_json()? != src.tok.to_json()? {
                bail!(
                    "--init {}: its tokenizer is not the traces' ({}); the student must keep its vocabulary",
                    p.display(),
                    tokenizer.display()
                );
            }
            Some(src.init)
        }
    };
    let teacher = match &a.teacher {
        None => None,
        Some(t) => {
            let r = load_reasoner(t, "auto")?;
            if tokenizer::Tokenizer::from_file(&tokenizer)?.to_json()? != r.tok.to_json()? {
                bail!(
                    "the teacher {} and the student (tokenizer {}) use different tokenizers; distillation needs one vocabulary: drop --tokenizer or pass the teacher's",
                    t.display(),
                    tokenizer.display()
                );
            }
            if r.cfg.max_seq_len < cfg.train.seq_len {
                bail!(
                    "the teacher's context ({}) is shorter than the student's seq_len ({})",
                    r.cfg.max_seq_len,
                    cfg.train.seq_len
                );
            }
            if !(0.0..=1.0).contains(&a.kd_weight) || a.kd_temperature <= 0.0 {
                bail!("--kd-weight must be in [0, 1] and --kd-temperature positive");
            }
            Some(TeacherSpec {
                cfg: r.cfg.clone(),
                params: r.params,
                weight: a.kd_weight,
                temperature: a.kd_temperature,
            })
        }
    };
    let provenance = serde_json::json!({
        "traces": a.traces.display().to_string(),
        "traces_sha256": data::sha256_hex(&std::fs::read(&a.traces)?),
        "train_examples": train.len(),
        "val_examples": val.len(),
        "teacher": a.teacher.as_ref().map(|t| t.display().to_string()),
        "kd_weight": teacher.as_ref().map(|t| t.weight),
        "kd_temperature": teacher.as_ref().map(|t| t.temperature),
    });
    let outcome = train_with_progress(
        cfg,
        Source::Examples {
            train,
            val,
            rendered,
            tokenizer,
        },
        teacher,
        &a.out,
        a.resume,
        init,
    )?;
    // what the student learned from, next to its config
    data::write_atomic(
        &a.out.join("distill.json"),
        serde_json::to_string_pretty(&provenance)?.as_bytes(),
    )?;
    Ok(outcome)
}

/// Attempts (`--n` times `--k`) one `distill generate` makes at most.
const MAX_ATTEMPTS: usize = 10_000_000;

/// `moelab distill generate`.
#[allow(clippy::too_many_arguments)]
fn generate_cmd(
    teacher: &Path,
    task_spec: &str,
    n: usize,
    k: usize,
    temperature: f32,
    seed: u64,
    difficulty: Option<u32>,
    out: &Path,
    slots: usize,
) -> Result<()> {
    let task_list = tasks::parse_list(task_spec).map_err(anyhow::Error::msg)?;
    if k == 0 || n == 0 {
        bail!("--n and --k must be at least 1");
    }
    // (every attempt is held in memory until the file is written)
    if n.checked_mul(k).is_none_or(|nk| nk > MAX_ATTEMPTS) {
        bail!(
            "--n {n} times --k {k} is more than {MAX_ATTEMPTS} attempts; generate in several files"
        );
    }
    let r = load_reasoner(teacher, "auto")?;
    // NOTE: traces are training data, so they come from the train split only.
    let prompts: Vec<String> = tasks::generate_mix(&task_list, n, seed, difficulty, Split::Train)
        .into_iter()
        .map(|p| p.prompt)
        .collect();
    let (bar, mut tick) = task_bar("generate", prompts.len() * k);
    let (attempts, tps) = attempt(&r, &prompts, k, temperature, seed, slots, &mut tick);
    bar.finish_and_clear();
    let mut score = Score::default();
    let examples: Vec<Example> = attempts
        .iter()
        .map(|a| {
            score.add(&a.prompt, a.verified, a.reasoning_tokens);
            a.to_example(teacher)
        })
        .collect();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    chat::write_jsonl(out, &examples)?;
    let kept = examples.iter().filter(|e| e.verified).count();
    println!(
        "{}: {} traces ({n} prompts x {k}), {kept} verified ({:.1}%), {:.0} tokens/s\n",
        out.display(),
        examples.len(),
        100.0 * kept as f64 / examples.len() as f64,
        tps
    );
    println!("acceptance by task and difficulty:");
    print!("{}", score.table().replacen("accuracy", "accepted", 1));
    Ok(())
}
