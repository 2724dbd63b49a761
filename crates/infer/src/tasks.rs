//! Reasoning tasks with a model: attempts at problems (batched generation, greedy or
//! sampled, each answer verified), accuracy by task and difficulty with 95% Wilson
//! intervals, and held-out evaluation. Used by `moelab eval --task`, `distill generate` and
//! the demo; progress is reported through a callback (the CLI draws it).

use crate::chat::{ChatFormat, Message, Role};
use crate::{generate, Request, SamplingParams};
use data::chat::{self, Example};
use data::tasks::{self, Split, Task};
use model::ModelConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokenizer::Tokenizer;

/// Default seed of evaluation problems. Held-out does not depend on it: evaluation draws
/// from the dev or test split, training data from the train split ([`Split`]).
pub const EVAL_SEED: u64 = 1000;

/// A model with its tokenizer, ready to generate (loaded by the CLI from a run dir).
pub struct Reasoner {
    pub cfg: ModelConfig,
    pub params: Vec<f32>,
    /// Quantized copies of the matrices inference multiplies by (None: f32).
    pub quant: Option<Arc<model::quant::QuantWeights>>,
    pub tok: Tokenizer,
    /// How the model chats: moelab's format, or an imported model's template (`chat.json`).
    pub chat: Arc<ChatFormat>,
    /// The checkpoint the weights came from, and its step (for reports).
    pub checkpoint: PathBuf,
    pub step: u64,
}

impl Reasoner {
    /// Active matmul parameters per token.
    pub fn active_params(&self) -> usize {
        self.cfg.active_matmul_params()
    }
}

/// One generated answer to a prompt.
pub struct Attempt {
    pub prompt: String,
    pub reasoning: String,
    pub answer: String,
    pub verified: bool,
    /// Tokens between <think> and </think>.
    pub reasoning_tokens: usize,
}

impl Attempt {
    /// The traces.jsonl record of this attempt, written by `teacher`.
    pub fn to_example(&self, teacher: &Path) -> Example {
        let (task, difficulty) = tasks::solve(&self.prompt)
            .map_or((String::new(), 0), |s| (s.0.name().to_string(), s.1));
        Example {
            prompt: self.prompt.clone(),
            reasoning: self.reasoning.clone(),
            answer: self.answer.clone(),
            verified: self.verified,
            teacher: teacher.display().to_string(),
            task,
            difficulty,
        }
    }
}

/// Generates `k` attempts per prompt (sampled when `temperature > 0`, with seed
/// `seed + candidate index`, else greedy) and verifies each. Returns the attempts in
/// (prompt, candidate) order and the decode throughput (generated tokens per second).
/// `progress(finished sequences, generated tokens)` is called as sequences finish.
pub fn attempt(
    r: &Reasoner,
    prompts: &[String],
    k: usize,
    temperature: f32,
    seed: u64,
    slots: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> (Vec<Attempt>, f64) {
    let todo: Vec<usize> = (0..prompts.len() * k).collect();
    let mut out: Vec<Option<Attempt>> = (0..todo.len()).map(|_| None).collect();
    let (mut produced, mut done) = (0usize, 0usize);
    let tps = attempt_some(
        r,
        prompts,
        k,
        temperature,
        seed,
        slots,
        &todo,
        &mut |i, a, g| {
            out[i] = Some(a);
            produced += g;
            done += 1;
            progress(done, produced);
        },
    );
    (
        out.into_iter().map(|a| a.expect("every attempt")).collect(),
        tps,
    )
}

/// The attempts `todo` of [`attempt`]'s list (index = prompt * k + candidate; each the same
/// as in a full run, since a request's tokens do not depend on its batch), handed to
/// `on_attempt(index, attempt, generated tokens)` as they finish. Returns the decode
/// throughput.
#[allow(clippy::too_many_arguments)]
pub fn attempt_some(
    r: &Reasoner,
    prompts: &[String],
    k: usize,
    temperature: f32,
    seed: u64,
    slots: usize,
    todo: &[usize],
    on_attempt: &mut dyn FnMut(usize, Attempt, usize),
) -> f64 {
    let max_seq = r.cfg.max_seq_len;
    let fmt = &r.chat;
    let reqs: Vec<Request> = todo
        .iter()
        .map(|&i| {
            let ids = task_prompt(fmt, &prompts[i / k]);
            Request {
                max_tokens: max_seq.saturating_sub(ids.len()),
                prompt: ids,
                params: SamplingParams {
                    temperature,
                    top_k: 0,
                    top_p: 1.0,
                    seed: seed.wrapping_add((i % k) as u64),
                },
            }
        })
        .collect();
    // moelab's format ends a reply at <|end|> only (what its published numbers used); an
    // imported template at any of its stop tokens
    let stops = if fmt.is_moelab() {
        vec![chat::ChatIds::of(&r.tok).end]
    } else {
        fmt.stop_tokens()
    };
    let start = Instant::now();
    let mut produced = 0usize;
    generate(
        &r.cfg,
        &r.params,
        r.quant.as_ref(),
        &reqs,
        slots,
        &stops,
        &mut |j, g| {
            produced += g.tokens.len();
            let i = todo[j];
            let prompt = prompts[i / k].clone();
            let reply = split_reply(&r.tok, fmt.think_ids(), &stops, &g.tokens);
            let a = Attempt {
                verified: reply.finished && tasks::verify(&prompt, &reply.answer),
                prompt,
                reasoning: reply.reasoning.trim().to_string(),
                answer: reply.answer.trim().to_string(),
                reasoning_tokens: reply.reasoning_tokens,
            };
            on_attempt(i, a, g.tokens.len());
        },
    );
    produced as f64 / start.elapsed().as_secs_f64().max(1e-9)
}

/// The tokens of a task prompt as a user turn in `fmt`, up to where the reply starts.
pub fn task_prompt(fmt: &ChatFormat, prompt: &str) -> Vec<u32> {
    if fmt.is_moelab() {
        return chat::prompt_ids(&fmt.tok, prompt);
    }
    fmt.render(&[Message::new(Role::User, prompt)])
        .expect("ChatFormat::from_spec checked that a user message renders")
}

/// A training example as tokens in `fmt` and the index of its first assistant token: the
/// user turn as the template renders it, then the reasoning block between the format's
/// markers, the answer and the end-of-turn token (what [`split_reply`] reads back). A format
/// without reasoning markers takes answer-only examples; one with reasoning is refused.
pub fn render_example(fmt: &ChatFormat, ex: &Example) -> Result<(Vec<u32>, usize), String> {
    if fmt.is_moelab() {
        return Ok(chat::render(&fmt.tok, ex));
    }
    let tok = &fmt.tok;
    let mut v = fmt.render(&[Message::new(Role::User, ex.prompt.as_str())])?;
    let start = v.len();
    match fmt.think_ids() {
        Some((open, close)) => {
            v.push(open);
            v.extend(tok.encode(&ex.reasoning));
            v.push(close);
        }
        None if !ex.reasoning.is_empty() => {
            return Err("the student's chat format has no reasoning markers (chat.json `think`), so it cannot learn reasoning traces; train on answers only (`moelab prepare --task ... --no-reasoning`) or set `think` to two tokens of its vocabulary".into());
        }
        None => {}
    }
    v.extend(tok.encode(&ex.answer));
    v.push(fmt.stop_tokens()[0]);
    Ok((v, start))
}

/// A generated reply split into its parts.
pub struct Reply {
    pub reasoning: String,
    pub answer: String,
    /// A stop token ended it (not the length limit).
    pub finished: bool,
    /// Tokens between the reasoning markers (all of them when the block never closed).
    pub reasoning_tokens: usize,
}

/// Splits generated `ids` at the first stop token and the reasoning markers `think`
/// (None: the whole reply is the answer).
pub fn split_reply(
    tok: &Tokenizer,
    think: Option<(u32, u32)>,
    stops: &[u32],
    ids: &[u32],
) -> Reply {
    let end = ids.iter().position(|t| stops.contains(t));
    let body = &ids[..end.unwrap_or(ids.len())];
    let (r, a, rt): (&[u32], &[u32], usize) = match think {
        None => (&[], body, 0),
        Some((open, close)) => {
            let b = body.strip_prefix(&[open]).unwrap_or(body);
            let rt = ids
                .iter()
                .position(|&t| t == close)
                .map_or(ids.len(), |e| e.saturating_sub(1));
            match b.iter().position(|&t| t == close) {
                Some(i) => (&b[..i], &b[i + 1..], rt),
                // a reasoning block that never closed holds no answer
                None => (b, &[], rt),
            }
        }
    };
    Reply {
        reasoning: tok.decode(r),
        answer: tok.decode(a),
        finished: end.is_some(),
        reasoning_tokens: rt,
    }
}

/// Accuracy by (task, difficulty). Problems are drawn independently from a split's
/// distribution, so a small space repeats problems (the test split holds 16 depth-1
/// expressions): `n` counts attempts (the Wilson interval is over them), `distinct` the
/// problems among them ([`tasks::problem_key`]).
#[derive(Default, Clone)]
pub struct Score {
    pub cells: BTreeMap<(Task, u32), (usize, usize, usize)>, // correct, total, reasoning tokens
    problems: BTreeMap<(Task, u32), BTreeSet<String>>,
}

impl Score {
    pub fn add(&mut self, prompt: &str, correct: bool, reasoning_tokens: usize) {
        if let Some((t, d, _, _)) = tasks::solve(prompt) {
            let c = self.cells.entry((t, d)).or_default();
            c.0 += correct as usize;
            c.1 += 1;
            c.2 += reasoning_tokens;
            self.problems
                .entry((t, d))
                .or_default()
                .insert(tasks::problem_key(prompt));
        }
    }

    /// Distinct problems over tasks matching `f`.
    pub fn distinct<F: Fn(Task) -> bool>(&self, f: F) -> usize {
        // a union: one problem can be at two difficulties (`34 * 5` is 1, `5 * 34` is 3)
        let all: BTreeSet<&String> = self
            .problems
            .iter()
            .filter(|((t, _), _)| f(*t))
            .flat_map(|(_, p)| p)
            .collect();
        all.len()
    }

    fn sum<F: Fn(Task) -> bool>(&self, f: F) -> (usize, usize, usize) {
        self.cells
            .iter()
            .filter(|((t, _), _)| f(*t))
            .fold((0, 0, 0), |a, (_, c)| (a.0 + c.0, a.1 + c.1, a.2 + c.2))
    }

    /// Accuracy over tasks matching `f` (percent; NaN when empty).
    pub fn accuracy<F: Fn(Task) -> bool>(&self, f: F) -> f64 {
        let (c, n, _) = self.sum(f);
        100.0 * c as f64 / n as f64
    }

    pub fn task_accuracy(&self, t: Task) -> f64 {
        self.accuracy(|x| x == t)
    }

    pub fn tasks(&self) -> Vec<Task> {
        let mut v: Vec<Task> = self.cells.keys().map(|k| k.0).collect();
        v.dedup();
        v
    }

    /// Correct and total over tasks matching `f`.
    pub fn counts<F: Fn(Task) -> bool>(&self, f: F) -> (usize, usize) {
        let (c, n, _) = self.sum(f);
        (c, n)
    }

    /// The breakdown table (task, difficulty, accuracy with its 95% Wilson interval, n,
    /// distinct problems, mean reasoning tokens).
    pub fn table(&self) -> String {
        let row = |task: &str, d: &str, (c, n, rt): (usize, usize, usize), distinct: usize| {
            let (lo, hi) = wilson(c, n);
            format!(
                "{:<6} {:>10} {:>8.1}% {:>15} {:>6} {:>8} {:>16.1}\n",
                task,
                d,
                100.0 * c as f64 / n as f64,
                format!("{:.1}-{:.1}%", 100.0 * lo, 100.0 * hi),
                n,
                distinct,
                rt as f64 / n as f64
            )
        };
        let mut s = format!(
            "{:<6} {:>10} {:>9} {:>15} {:>6} {:>8} {:>16}\n",
            "task", "difficulty", "accuracy", "95% interval", "n", "distinct", "reasoning tokens"
        );
        for t in self.tasks() {
            for ((_, d), c) in self.cells.iter().filter(|(k, _)| k.0 == t) {
                s += &row(t.name(), &d.to_string(), *c, self.problems[&(t, *d)].len());
            }
            s += &row(
                t.name(),
                "all",
                self.sum(|x| x == t),
                self.distinct(|x| x == t),
            );
        }
        s += &row("all", "", self.sum(|_| true), self.distinct(|_| true));
        s
    }
}

/// The 95% Wilson score interval of `correct` successes in `n` trials, as fractions
/// (Wilson 1927; unlike the normal approximation it stays inside [0, 1] and is sensible at
/// 0% and 100%). (0, 1) when n is 0.
pub fn wilson(correct: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n_f) = (1.959_963_984_540_054_f64, n as f64);
    let p = correct as f64 / n_f;
    let denom = 1.0 + z * z / n_f;
    let center = (p + z * z / (2.0 * n_f)) / denom;
    let half = z / denom * (p * (1.0 - p) / n_f + z * z / (4.0 * n_f * n_f)).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// Held-out evaluation: `n` problems of `task_list` from `seed` in `split`, greedy.
pub struct TaskEval {
    pub score: Score,
    pub tokens_per_s: f64,
    pub attempts: Vec<Attempt>,
}

#[allow(clippy::too_many_arguments)]
pub fn evaluate_tasks(
    r: &Reasoner,
    task_list: &[Task],
    n: usize,
    seed: u64,
    difficulty: Option<u32>,
    split: Split,
    slots: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> TaskEval {
    let prompts: Vec<String> = tasks::generate_mix(task_list, n, seed, difficulty, split)
        .into_iter()
        .map(|p| p.prompt)
        .collect();
    let (attempts, tps) = attempt(r, &prompts, 1, 0.0, 0, slots, progress);
    let mut score = Score::default();
    for a in &attempts {
        score.add(&a.prompt, a.verified, a.reasoning_tokens);
    }
    TaskEval {
        score,
        tokens_per_s: tps,
        attempts,
    }
}

#[cfg(test)]
mod tests {
    use super::{render_example, split_reply, task_prompt, wilson};
    use crate::chat::{ChatFormat, ChatSpec};
    use std::sync::Arc;
    use tokenizer::Tokenizer;

    fn chatml() -> ChatFormat {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/golden/import/llama");
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        let spec = ChatSpec {
            template: std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
            stop: vec!["<|im_end|>".into()],
            think: None,
            prefix: vec![],
        };
        ChatFormat::from_spec(Arc::new(tok), &spec).unwrap()
    }

    #[test]
    fn task_prompts_are_a_user_turn_in_the_models_template() {
        let f = chatml();
        let t = &f.tok;
        let ids = task_prompt(&f, "What is 2 + 3?");
        let mut want = vec![t.special("<|im_start|>").unwrap()];
        want.extend(t.encode("user\nWhat is 2 + 3?"));
        want.push(t.special("<|im_end|>").unwrap());
        want.extend(t.encode("\n"));
        want.push(t.special("<|im_start|>").unwrap());
        want.extend(t.encode("assistant\n"));
        assert_eq!(ids, want, "{:?}", t.decode(&ids));
        // text that spells a control token stays text
        let ids = task_prompt(&f, "<|im_end|>");
        let end = t.special("<|im_end|>").unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == end).count(), 1);
    }

    #[test]
    fn examples_render_in_the_students_template() {
        let f = chatml();
        let t = &f.tok;
        let mut ex = data::chat::Example {
            prompt: "Name a color.".into(),
            reasoning: String::new(),
            answer: "red".into(),
            verified: true,
            teacher: String::new(),
            task: String::new(),
            difficulty: 0,
        };
        let (ids, start) = render_example(&f, &ex).unwrap();
        let prompt = task_prompt(&f, "Name a color.");
        assert_eq!(start, prompt.len());
        let mut want = prompt;
        want.extend(t.encode("red"));
        want.push(t.special("<|im_end|>").unwrap());
        assert_eq!(ids, want);
        ex.reasoning = "a warm one".into();
        let e = render_example(&f, &ex).unwrap_err();
        assert!(e.contains("no reasoning markers"), "{e}");
    }

    #[test]
    fn replies_split_at_the_stop_token_and_reasoning_markers() {
        let f = chatml();
        let t = &f.tok;
        let end = t.special("<|im_end|>").unwrap();
        let mut ids = t.encode("The answer is 5.");
        ids.push(end);
        ids.extend(t.encode("ignored"));
        let r = split_reply(t, None, &[end], &ids);
        assert_eq!(r.answer, "The answer is 5.");
        assert_eq!(
            (r.reasoning.as_str(), r.finished, r.reasoning_tokens),
            ("", true, 0)
        );
        // markers (any two ids): reasoning between them, the answer after
        let (open, close) = (t.special("<|im_start|>").unwrap(), end);
        let stop = t.special("<|endoftext|>").unwrap_or(0);
        let mut ids = vec![open];
        ids.extend(t.encode("2 plus 3"));
        let n = ids.len() - 1;
        ids.push(close);
        ids.extend(t.encode("5"));
        let r = split_reply(t, Some((open, close)), &[stop], &ids);
        assert_eq!((r.reasoning.as_str(), r.answer.as_str()), ("2 plus 3", "5"));
        assert_eq!((r.finished, r.reasoning_tokens), (false, n));
    }

    /// `n` counts attempts; `distinct` counts problems, a commuted twin being the same one.
    #[test]
    fn score_counts_attempts_and_distinct_problems() {
        let mut s = super::Score::default();
        for (p, ok) in [
            ("What is 34 + 5?", true),
            ("What is 5 + 34?", false),
            ("What is 34 + 5?", true),
            ("What is 43 + 5?", true),
            ("Evaluate 2*(3+4).", true),
            ("Evaluate (4+3)*2.", true),
            // one problem at two difficulties (1 and 3): counted once
            ("What is 34 * 5?", true),
            ("What is 5 * 34?", true),
            ("not a problem", true),
        ] {
            s.add(p, ok, 10);
        }
        assert_eq!(s.counts(|_| true), (7, 8));
        assert_eq!(s.distinct(|_| true), 4);
        assert_eq!(s.distinct(|t| t == data::tasks::Task::Add), 2);
        assert_eq!(s.distinct(|t| t == data::tasks::Task::Mul), 1);
        let t = s.table();
        let all = t.lines().last().unwrap();
        let cols: Vec<&str> = all.split_whitespace().collect();
        assert_eq!(cols[..5], ["all", "87.5%", "52.9-97.8%", "8", "4"], "{t}");
        assert!(t.lines().next().unwrap().contains(" n distinct "), "{t}");
    }

    #[test]
    fn wilson_interval_matches_published_values() {
        // Newcombe (1998), table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775; 10/10 -> 0.7225-1.
        let close = |a: f64, b: f64| (a - b).abs() < 5e-4;
        let (lo, hi) = wilson(81, 263);
        assert!(close(lo, 0.2553) && close(hi, 0.3662), "{lo} {hi}");
        let (lo, hi) = wilson(0, 10);
        assert!(close(lo, 0.0) && close(hi, 0.2775), "{lo} {hi}");
        let (lo, hi) = wilson(10, 10);
        assert!(close(lo, 0.7225) && close(hi, 1.0), "{lo} {hi}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }
}
