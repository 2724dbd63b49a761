//! `moelab demo`: the whole distillation story on built-in defaults, offline.
//!
//! 1. generate reasoning problems (add/sub, mul, nested expressions, sorting) with
//!    step-by-step solutions, and the same problems with answers only;
//! 2. train a teacher MoE on the solutions;
//! 3. the teacher writes solutions to fresh problems; the verifier keeps the correct ones;
//! 4. train a student with under a quarter of the teacher's active parameters on the
//!    verified traces, and the same student on answers only with the same compute;
//! 5. evaluate all three on held-out problems (greedy) and print a table;
//! 6. one chat turn of the student, reasoning shown dimmed.
//!
//! Everything lands in `--out` (runs, data, traces) so the models can be chatted with or
//! served afterwards.

use crate::presets::resolve_config;
use crate::progress::train_with_progress;
use crate::runs::{load_reasoner, task_bar};
use anyhow::{bail, Result};
use clap::Args;
use data::chat::{self, Example};
use data::prepare::{prepare_tasks, TaskOpts};
use data::tasks::{self, Split, Task};
use infer::tasks::{self as reasoning, evaluate_tasks, Reasoner, TaskEval, EVAL_SEED};
use model::config::{OptimizerKind, TrainPrecision};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;
use train::trainer::{Outcome, Source};

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab demo\n  moelab demo --out /tmp/demo --teacher-steps 300 --student-steps 300";

#[derive(Args)]
pub struct DemoArgs {
    /// Directory for the demo's data, traces and runs (replaced if it holds an earlier demo).
    #[arg(long, default_value = "moelab-demo")]
    out: PathBuf,
    /// Tasks (add, mul, expr, sort; comma-separated or all). The default keeps to the two
    /// multi-step arithmetic tasks, which a teacher learns within the demo's minutes.
    #[arg(long, default_value = "add,mul")]
    task: String,
    /// Teacher config file or preset.
    #[arg(long, default_value = "teacher")]
    teacher_config: String,
    /// Student config file or preset.
    #[arg(long, default_value = "student")]
    student_config: String,
    /// Teacher training steps.
    #[arg(long, default_value_t = 450)]
    teacher_steps: u64,
    /// Student training steps (both students).
    #[arg(long, default_value_t = 550)]
    student_steps: u64,
    /// Training problems for the teacher.
    #[arg(long, default_value_t = 20000)]
    n: usize,
    /// Fresh prompts the teacher answers for distillation.
    #[arg(long, default_value_t = 3000)]
    prompts: usize,
    /// Held-out problems per model in the final table.
    #[arg(long, default_value_t = 1000)]
    eval_n: usize,
    /// Which held-out split the table reports: `test` (the default), or `dev` when you tune
    /// the demo's settings (choose settings on dev, report test once).
    #[arg(long, default_value = "test", value_parser = crate::runs::parse_split)]
    eval_split: Split,
    /// Seed of everything.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Matmul precision of the three training stages: auto (bf16 where the CPU's
    /// AVX512-BF16 dot products outrun its fp32 FMAs, as on AMD Zen 4; else fp32), fp32 or
    /// bf16 (`train.precision`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "fp32", "bf16"])]
    precision: String,
    /// Optimizer of the three training stages: muon (Muon for the hidden matrices, AdamW
    /// for the rest) or adamw (`train.optimizer`, set whatever the config files say). Muon's students reach a higher accuracy
    /// in the demo's steps (README: "The demo").
    #[arg(long, default_value = "muon", value_parser = ["muon", "adamw"])]
    optimizer: String,
}

fn stage(i: usize, msg: &str, start: Instant) {
    println!(
        "\n[{i}/6] {msg} ({:.1} min in)",
        start.elapsed().as_secs_f64() / 60.0
    );
}

fn train(
    config: &str,
    steps: u64,
    seed: u64,
    (precision, optimizer): (TrainPrecision, OptimizerKind),
    source: Source,
    out: &Path,
) -> Result<()> {
    let mut cfg = resolve_config(config, Some(steps), Some(seed))?;
    cfg.train.precision = precision;
    cfg.train.optimizer = optimizer;
    let outcome = train_with_progress(cfg, source, None, out, false, None)?;
    if outcome == Outcome::Stopped || crate::progress::interrupted() {
        bail!("demo interrupted");
    }
    Ok(())
}

pub fn run(a: DemoArgs) -> Result<()> {
    let start = Instant::now();
    let precision = match a.precision.as_str() {
        "bf16" => TrainPrecision::Bf16,
        "fp32" => TrainPrecision::Fp32,
        // bf16 where it is faster (AVX512-BF16 at twice the fp32 FMA rate, as on AMD Zen 4)
        _ if kernels::peak::bf16_pays() => TrainPrecision::Bf16,
        _ => TrainPrecision::Fp32,
    };
    let optimizer = match a.optimizer.as_str() {
        "adamw" => OptimizerKind::Adamw,
        _ => OptimizerKind::Muon,
    };
    let how = (precision, optimizer);
    let task_list = tasks::parse_list(&a.task).map_err(anyhow::Error::msg)?;
    // (zero made the table's percentages NaN and said the teacher "solved nothing")
    for (flag, v, max) in [
        ("--n", a.n, 10_000_000),
        ("--prompts", a.prompts, 1_000_000),
        ("--eval-n", a.eval_n, 1_000_000),
    ] {
        if !(1..=max).contains(&v) {
            bail!("{flag} {v} must be between 1 and {max}");
        }
    }
    let out = &a.out;
    if out.exists() {
        if !out.join("demo.txt").exists() {
            bail!(
                "{} exists and is not an earlier demo; choose another --out",
                out.display()
            );
        }
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("demo.txt"), "written by `moelab demo`\n")?;
    println!(
        "moelab demo: distil step-by-step reasoning from a teacher MoE into a small student ({} threads, {} matmuls, {})",
        rayon::current_num_threads(),
        match precision {
            TrainPrecision::Bf16 => "bf16",
            TrainPrecision::Fp32 => "fp32",
        },
        optimizer.name()
    );

    let names: Vec<&str> = task_list.iter().map(|t| t.name()).collect();
    stage(
        1,
        &format!("generating reasoning problems ({})", names.join(", ")),
        start,
    );
    let quiet = |_: &str| {};
    let mut opts = TaskOpts {
        n: a.n,
        seed: a.seed,
        vocab_size: 4096,
        reasoning: true,
        tokenizer: None,
        difficulty: None,
        force: true,
    };
    let (data, answers) = (out.join("data-reasoning"), out.join("data-answers"));
    let meta = prepare_tasks(&task_list, &data, &opts, &quiet)?;
    opts.reasoning = false;
    opts.tokenizer = Some(data.join("tokenizer.json"));
    prepare_tasks(&task_list, &answers, &opts, &quiet)?;
    let p = &tasks::generate_mix(&task_list, 3, a.seed, None, Split::Train)[2 % task_list.len()];
    println!(
        "  {} problems, {} tokens, vocab {}; e.g.\n  {}\n  <think>{}</think> {}",
        a.n,
        meta.train_tokens,
        meta.vocab_size,
        p.prompt,
        p.reasoning.replace('\n', "\n  "),
        p.answer
    );

    stage(2, "training the teacher on step-by-step solutions", start);
    let teacher = out.join("teacher");
    train(
        &a.teacher_config,
        a.teacher_steps,
        a.seed,
        how,
        Source::Dir(data.clone()),
        &teacher,
    )?;

    stage(
        3,
        "the teacher solves fresh problems; the verifier keeps the correct solutions",
        start,
    );
    let t = load_reasoner(&teacher, "auto")?;
    let prompts: Vec<String> =
        tasks::generate_mix(&task_list, a.prompts, a.seed + 1, None, Split::Train)
            .into_iter()
            .map(|p| p.prompt)
            .collect();
    let (bar, mut tick) = task_bar("generate", prompts.len());
    let (attempts, tps) = reasoning::attempt(&t, &prompts, 1, 0.0, a.seed, 64, &mut tick);
    bar.finish_and_clear();
    let traces: Vec<Example> = attempts.iter().map(|x| x.to_example(&teacher)).collect();
    let traces_path = out.join("traces.jsonl");
    chat::write_jsonl(&traces_path, &traces)?;
    let verified: Vec<Example> = traces.iter().filter(|e| e.verified).cloned().collect();
    println!(
        "  {} of {} traces verified ({:.0}%), {tps:.0} tokens/s -> {}",
        verified.len(),
        traces.len(),
        100.0 * verified.len() as f64 / traces.len() as f64,
        traces_path.display()
    );
    if verified.is_empty() {
        bail!("the teacher solved nothing; train it longer (--teacher-steps)");
    }

    stage(4, "training the student on the verified traces", start);
    let student = out.join("student");
    train(
        &a.student_config,
        a.student_steps,
        a.seed,
        how,
        Source::Examples {
            rendered: None,
            train: verified,
            val: vec![],
            tokenizer: data.join("tokenizer.json"),
        },
        &student,
    )?;

    stage(
        5,
        "training the same student on answers only (same steps, same tokens)",
        start,
    );
    let baseline = out.join("student-answers");
    train(
        &a.student_config,
        a.student_steps,
        a.seed,
        how,
        Source::Dir(answers),
        &baseline,
    )?;

    stage(
        6,
        &format!(
            "{}-split problems (greedy), never seen in training",
            a.eval_split.name()
        ),
        start,
    );
    let mut rows: Vec<(String, Reasoner, TaskEval)> = vec![];
    for (name, dir) in [
        ("teacher", &teacher),
        ("student (distilled)", &student),
        ("student (answers only)", &baseline),
    ] {
        let r = load_reasoner(dir, "auto")?;
        let (bar, mut tick) = task_bar("eval", a.eval_n);
        let e = evaluate_tasks(
            &r,
            &task_list,
            a.eval_n,
            EVAL_SEED,
            None,
            a.eval_split,
            64,
            &mut tick,
        );
        bar.finish_and_clear();
        rows.push((name.to_string(), r, e));
    }
    print!("{}", comparison_table(&rows, &task_list));
    println!(
        "({} problems per model, drawn from the {} split's distribution: {} distinct)\n",
        a.eval_n,
        a.eval_split.name(),
        rows[0].2.score.distinct(|_| true)
    );
    let (_, s, _) = &rows[1];
    let shown = if task_list.contains(&Task::Mul) {
        Task::Mul
    } else {
        task_list[0]
    };
    // A fresh held-out problem of the same split, not one of the table's.
    let evaluated: std::collections::HashSet<&str> = rows[1]
        .2
        .attempts
        .iter()
        .map(|x| x.prompt.as_str())
        .collect();
    let fresh = tasks::generate_mix(&[shown], 64, EVAL_SEED + 7, None, a.eval_split)
        .into_iter()
        .map(|p| p.prompt)
        .find(|p| !evaluated.contains(p.as_str()))
        .expect("64 test problems are not all in the table");
    chat_turn(s, &fresh);
    println!(
        "\ndone in {:.1} min. Runs are in {}: try `moelab eval --run {} --task {} --show 3`",
        start.elapsed().as_secs_f64() / 60.0,
        out.display(),
        student.display(),
        names.join(",")
    );
    Ok(())
}

/// Model | active params | accuracy per task | all | decode tokens/s.
pub fn comparison_table(rows: &[(String, Reasoner, TaskEval)], task_list: &[Task]) -> String {
    let mut s = format!("{:<24} {:>8}", "model", "active");
    for t in task_list {
        s += &format!(" {:>6}", t.name());
    }
    s += &format!(" {:>6} {:>13} {:>8}\n", "all", "95% interval", "tok/s");
    for (name, r, e) in rows {
        s += &format!("{:<24} {:>7.2}M", name, r.active_params() as f64 / 1e6);
        for &t in task_list {
            s += &format!(" {:>5.1}%", e.score.task_accuracy(t));
        }
        let (c, n) = e.score.counts(|_| true);
        let (lo, hi) = reasoning::wilson(c, n);
        s += &format!(
            " {:>5.1}% {:>13} {:>8.0}\n",
            e.score.accuracy(|_| true),
            format!("{:.1}-{:.1}%", 100.0 * lo, 100.0 * hi),
            e.tokens_per_s
        );
    }
    s
}

/// One chat turn: the prompt, the reasoning (dimmed on a terminal) and the answer.
pub fn chat_turn(r: &Reasoner, prompt: &str) {
    let (a, _) = reasoning::attempt(r, &[prompt.to_string()], 1, 0.0, 0, 1, &mut |_, _| {});
    let a = &a[0];
    let (dim, reset) = if std::io::stdout().is_terminal() {
        ("\x1b[2m", "\x1b[0m")
    } else {
        ("", "")
    };
    println!("\nyou> {prompt}");
    println!("{dim}<think>\n{}\n</think>{reset}", a.reasoning);
    println!(
        "student> {}   ({})",
        a.answer,
        if a.verified { "correct" } else { "wrong" }
    );
}
