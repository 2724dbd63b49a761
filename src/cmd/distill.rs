//! `moelab distill generate` (teacher traces, verified) and `moelab distill train` (student
//! SFT on verified traces, optionally with logit distillation from the teacher).

use crate::presets::resolve_config;
use crate::progress::train_with_progress;
use crate::runs::{load_reasoner, task_bar};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use data::chat::{self, Example};
use data::tasks::{self, Split};
use infer::tasks::{attempt_some, render_example, Score};
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
    /// traces.jsonl to write (whole, at the end; attempts are kept in OUT.partial as they
    /// finish, and the same command continues from there after a crash or Ctrl-C).
    #[arg(long)]
    out: PathBuf,
    /// Overwrite --out if it exists (and drop an earlier run's OUT.partial).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Student config file or preset (e.g. student).
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
            a.force,
        ),
        DistillCmd::Train(a) => train(a).map(|_| ()),
    }
}

/// Verified traces of a traces file, split into train and validation (1 problem in 20), with a
/// warning that counts malformed lines.
pub fn read_traces(path: &Path) -> Result<(Vec<Example>, Vec<Example>, Option<String>)> {
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
    let teachers: std::collections::BTreeSet<&str> =
        all.iter().map(|e| e.teacher.as_str()).collect();
    // the traces' teacher is the default tokenizer; several (merged files) must be chosen
    let teacher = match teachers.len() {
        0 | 1 => all.first().map(|e| e.teacher.clone()),
        _ => None,
    };
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
    // NOTE: validation is about 1 problem in 20, chosen by a hash of the problem (not of
    // the line), so the k candidates of one prompt, or a commuted twin, never sit on both
    // sides
    let (mut train, mut val) = (vec![], vec![]);
    for e in verified {
        if total >= 40 && is_validation(&e.prompt) {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    if train.is_empty() {
        // a few problems, all of them drawn for validation: train on them
        (train, val) = (val, vec![]);
    }
    Ok((train, val, teacher))
}

/// Whether a trace of `prompt` is in distillation's validation set (sha256 of the
/// problem's key, salted so it is not the split's hash, mod 20 = 0).
fn is_validation(prompt: &str) -> bool {
    let key = format!("distill-val:{}", tasks::problem_key(prompt));
    let h = data::sha256_hex(key.as_bytes());
    u64::from_str_radix(&h[..8], 16)
        .expect("hex")
        .is_multiple_of(20)
}

pub fn train(a: TrainArgs) -> Result<train::trainer::Outcome> {
    let cfg = resolve_config(&a.config, a.steps, a.seed)?;
    let (train, val, trace_teacher) = read_traces(&a.traces)?;
    let tokenizer = match (&a.tokenizer, &a.teacher) {
        (Some(t), _) => crate::runs::tokenizer_path(t),
        (None, Some(t)) => t.join("tokenizer.json"),
        (None, None) => match trace_teacher {
            Some(t) => Path::new(&t).join("tokenizer.json"),
            None => bail!(
                "{}: its traces come from several teachers; pass --tokenizer (or --teacher) to choose the vocabulary",
                a.traces.display()
            ),
        },
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
    force: bool,
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
    if out.exists() && !force {
        bail!(
            "{} exists; pass --force to overwrite it (or choose another --out)",
            out.display()
        );
    }
    let r = load_reasoner(teacher, "auto")?;
    // NOTE: traces are training data, so they come from the train split only.
    let prompts: Vec<String> = tasks::generate_mix(&task_list, n, seed, difficulty, Split::Train)
        .into_iter()
        .map(|p| p.prompt)
        .collect();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Every finished attempt is appended to OUT.partial as it ends, so a crash or Ctrl-C
    // loses nothing: the same command continues from it (each attempt is what a full run
    // makes, so the file is too), and OUT itself is written whole at the end.
    let header = serde_json::json!({
        "moelab_partial_traces": 1,
        "teacher": teacher.display().to_string(),
        "checkpoint": r.checkpoint.display().to_string(),
        "step": r.step,
        "tasks": task_list.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "n": n, "k": k, "temperature": temperature, "seed": seed, "difficulty": difficulty,
    });
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    if force {
        // a fresh start: whatever an earlier generate left goes
        std::fs::remove_file(&partial).ok();
    }
    let mut done = read_partial(&partial, &header, &prompts, k)?;
    if !done.is_empty() {
        println!(
            "{}: continuing, {} of {} attempts already made",
            partial.display(),
            done.len(),
            n * k
        );
    }
    // rewritten whole first: a line cut short by a crash must not end up mid-file
    let mut text = serde_json::to_string(&header)? + "\n";
    for (i, (e, rt)) in &done {
        text += &partial_line(*i, e, *rt);
    }
    data::write_atomic(&partial, text.as_bytes())?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    let todo: Vec<usize> = (0..n * k).filter(|i| !done.contains_key(i)).collect();
    let (bar, mut tick) = task_bar("generate", n * k);
    bar.set_position(done.len() as u64);
    let (before, mut finished, mut tokens) = (done.len(), 0, 0);
    let mut failed = None;
    let tps = attempt_some(
        &r,
        &prompts,
        k,
        temperature,
        seed,
        slots,
        &todo,
        &mut |i, a, g| {
            let e = a.to_example(teacher);
            if failed.is_none() {
                use std::io::Write;
                let line = partial_line(i, &e, a.reasoning_tokens);
                failed = file.write_all(line.as_bytes()).err();
            }
            done.insert(i, (e, a.reasoning_tokens));
            (finished, tokens) = (finished + 1, tokens + g);
            crash_test_fault(&mut file, finished);
            tick(before + finished, tokens);
        },
    );
    bar.finish_and_clear();
    if let Some(e) = failed {
        eprintln!(
            "warning: {}: {e}; the attempts are kept in memory and written to {}",
            partial.display(),
            out.display()
        );
    }
    let mut score = Score::default();
    let examples: Vec<Example> = done
        .into_values()
        .map(|(e, rt)| {
            score.add(&e.prompt, e.verified, rt);
            e
        })
        .collect();
    chat::write_jsonl(out, &examples)?;
    std::fs::remove_file(&partial).ok();
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

/// One line of a partial traces file: attempt index, reasoning tokens, the trace.
fn partial_line(i: usize, e: &Example, reasoning_tokens: usize) -> String {
    let v = serde_json::json!({"i": i, "reasoning_tokens": reasoning_tokens, "trace": e});
    v.to_string() + "\n"
}

/// The attempts an interrupted `distill generate` left in `path` (none when it does not
/// exist). A file begun with other arguments is refused; a last line cut short is dropped.
fn read_partial(
    path: &Path,
    header: &serde_json::Value,
    prompts: &[String],
    k: usize,
) -> Result<std::collections::BTreeMap<usize, (Example, usize)>> {
    let mut done = std::collections::BTreeMap::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut lines = text.lines();
    // compared as text: a float read back need not equal the one written
    if lines.next() != Some(serde_json::to_string(header)?.as_str()) {
        bail!(
            "{} holds the attempts of a `distill generate` with other arguments (or another teacher checkpoint); rerun that command to finish it, or pass --force to start afresh",
            path.display()
        );
    }
    let parse = |l: &str| -> Option<(usize, usize, Example)> {
        let mut v: serde_json::Value = serde_json::from_str(l).ok()?;
        let i = usize::try_from(v["i"].as_u64()?).ok()?;
        let rt = usize::try_from(v["reasoning_tokens"].as_u64()?).ok()?;
        Some((i, rt, serde_json::from_value(v["trace"].take()).ok()?))
    };
    // made again: a line that does not parse (the last line of a killed run) and one of
    // another problem (a file of another version's problem mix)
    for (i, rt, e) in lines.filter_map(parse) {
        if prompts.get(i / k) == Some(&e.prompt) {
            done.insert(i, (e, rt));
        }
    }
    Ok(done)
}

/// For the crash tests: `MOELAB_FAULT=generate@N` dies (abort, like `kill -9`) after the Nth
/// attempt of this process, leaving half a line behind.
fn crash_test_fault(file: &mut std::fs::File, finished: usize) {
    if std::env::var("MOELAB_FAULT").is_ok_and(|w| w == format!("generate@{finished}")) {
        use std::io::Write;
        let _ = file.write_all(b"{\"i\": 1, \"reasoning_tok");
        eprintln!("MOELAB_FAULT: dying at generate@{finished}");
        std::process::abort();
    }
}
