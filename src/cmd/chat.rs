//! `moelab chat`: a terminal chat with a trained run. The reply streams as it is generated,
//! reasoning first (dimmed on a terminal, between `<think>` tags otherwise, or hidden), then
//! the answer. History is kept (earlier answers, not their reasoning) and the oldest turns
//! are dropped when the conversation outgrows the model's context.

use crate::runs::load_reasoner;
use anyhow::{bail, Result};
use clap::Args;
use infer::chat::{ChatFormat, Delta, Message, Role};
use infer::{Engine, EngineConfig, Event, Finish, SamplingParams, Seq};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab chat --run runs/student\n  moelab chat --run runs/student --hide-reasoning --temperature 0.7\n  echo 'What is 12 * 34?' | moelab chat --run runs/student\n\nIn the chat: /reset forgets the conversation, /exit quits.";

#[derive(Args)]
pub struct ChatArgs {
    /// Run dir (its latest checkpoint) or a checkpoint dir.
    #[arg(long)]
    run: PathBuf,
    /// Matrices to multiply by: auto (an imported GGUF model's own quantized types, Q4_K/Q6_K included; else
    /// f32), f32, or q8_0 / q5_0 / q4_1 / q4_0 for every matrix (quantized in memory at load).
    #[arg(long, default_value = "auto")]
    quant: String,
    /// Element type of the KV cache: f32, or f16 / bf16 (half the memory; keys and values
    /// rounded when cached, attention computed in f32).
    #[arg(long = "kv-cache", default_value = "f32", value_parser = crate::runs::parse_kv)]
    kv_cache: model::decode::KvType,
    /// Do not print the reasoning, only the answer.
    #[arg(long)]
    hide_reasoning: bool,
    /// A system message put before the conversation.
    #[arg(long)]
    system: Option<String>,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens per reply at most (default: whatever the context leaves).
    #[arg(long)]
    max_tokens: Option<usize>,
}

const HELP: &str =
    "Type a message and press Enter. /reset forgets the conversation, /exit (or Ctrl-D) quits.";

pub fn run(a: ChatArgs) -> Result<()> {
    let r = load_reasoner(&a.run, &a.quant)?;
    let chat = r.chat.clone();
    let cfg = r.cfg.clone();
    let engine = Engine::start_quant(
        &cfg,
        r.params,
        r.quant,
        EngineConfig {
            slots: 1,
            max_queue: 1,
            kv: a.kv_cache,
        },
    );
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if tty {
        println!("moelab chat with {} ({HELP})", a.run.display());
    }
    let mut history: Vec<Message> = vec![];
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    let mut turn = 0u64;
    loop {
        if tty {
            print!("\n> ");
            std::io::stdout().flush()?;
        }
        line.clear();
        if stdin.read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                println!("(conversation reset)");
                continue;
            }
            "/help" => {
                println!("{HELP}");
                continue;
            }
            _ => {}
        }
        history.push(Message::new(Role::User, text));
        let prompt = fit_history(&chat, a.system.as_deref(), &mut history, cfg.max_seq_len);
        let prompt = match prompt {
            Ok(p) => p,
            Err(e) => {
                history.pop();
                eprintln!("error: {e}");
                continue;
            }
        };
        let Some(prompt) = prompt else {
            history.pop();
            eprintln!(
                "error: this message does not fit in the model's context of {} tokens; shorten it",
                cfg.max_seq_len
            );
            continue;
        };
        let left = cfg.max_seq_len - prompt.len();
        let seq = Seq {
            prompt,
            params: SamplingParams {
                temperature: a.temperature,
                top_k: 0,
                top_p: a.top_p,
                seed: a.seed.wrapping_add(turn),
            },
            max_tokens: a.max_tokens.unwrap_or(left).min(left),
            stop: chat.stop_tokens(),
            logprobs: None,
        };
        turn += 1;
        let answer = stream_reply(&engine, &chat, seq, !a.hide_reasoning, tty)?;
        history.push(Message::new(Role::Assistant, answer));
    }
    Ok(())
}

/// The prompt of the conversation, dropping the oldest turns until it leaves room for a reply
/// (a quarter of the context, at least). `None` when the last message alone does not fit.
/// An error is the template's (e.g. a model whose template refuses a system message).
fn fit_history(
    chat: &ChatFormat,
    system: Option<&str>,
    history: &mut Vec<Message>,
    context: usize,
) -> std::result::Result<Option<Vec<u32>>, String> {
    let budget = context - context / 4;
    loop {
        let mut msgs: Vec<Message> = system
            .map(|s| Message::new(Role::System, s))
            .into_iter()
            .collect();
        msgs.extend(history.iter().cloned());
        let p = chat.render(&msgs)?;
        if p.len() <= budget || (history.len() == 1 && p.len() < context) {
            return Ok(Some(p));
        }
        if history.len() <= 1 {
            return Ok(None);
        }
        // drop the oldest user turn and its answer
        history.drain(..2.min(history.len() - 1));
    }
}

/// Streams one reply to stdout; returns the answer.
fn stream_reply(
    engine: &Engine,
    chat: &ChatFormat,
    seq: Seq,
    show_reasoning: bool,
    tty: bool,
) -> Result<String> {
    let mut parser = chat.parser(&seq.prompt, vec![]);
    let (tx, rx) = std::sync::mpsc::channel();
    if let Err(e) = engine.submit(seq, Box::new(move |ev| tx.send(ev).is_ok())) {
        bail!("{e}");
    }
    let mut p = Printer {
        show_reasoning,
        style: if tty {
            ("\x1b[2m", "\x1b[0m")
        } else {
            ("", "")
        },
        in_reasoning: false,
        answer: String::new(),
        out: std::io::stdout().lock(),
    };
    let mut finish = Finish::Stop;
    for ev in rx {
        match ev {
            Event::Logprobs(_) => {}
            Event::Token(t) => p.print(parser.push(t))?,
            Event::Done(f) => {
                finish = f;
                break;
            }
        }
    }
    p.print(parser.finish())?;
    if p.in_reasoning {
        write!(p.out, "</think>{}", p.style.1)?;
    }
    if finish == Finish::Length {
        write!(p.out, " [cut: length limit]")?;
    }
    writeln!(p.out)?;
    Ok(p.answer)
}

struct Printer<'a> {
    show_reasoning: bool,
    /// (start, end) of the reasoning's style.
    style: (&'static str, &'static str),
    in_reasoning: bool,
    answer: String,
    out: std::io::StdoutLock<'a>,
}

impl Printer<'_> {
    fn print(&mut self, d: Delta) -> Result<()> {
        if self.show_reasoning && !d.reasoning.is_empty() {
            if !self.in_reasoning {
                write!(self.out, "{}<think>", self.style.0)?;
                self.in_reasoning = true;
            }
            write!(self.out, "{}", d.reasoning)?;
        }
        if !d.content.is_empty() {
            if self.in_reasoning {
                writeln!(self.out, "</think>{}", self.style.1)?;
                self.in_reasoning = false;
            }
            write!(self.out, "{}", d.content)?;
            self.answer += &d.content;
        }
        self.out.flush()?;
        Ok(())
    }
}
