//! `moelab`: the command line. One subcommand per pipeline stage; logic lives in the library
//! crates, this file parses flags, draws progress and prints human errors.

mod cmd;
mod comm;
mod machine;
mod presets;
mod progress;
mod runs;

use clap::{Parser, Subcommand};

/// Process-wide allocator settings.
///
/// NOTE: gemm allocates its packing buffers (up to a few MiB) on every call. With glibc's
/// defaults those come from fresh mmaps or trimmed arenas, so every matmul page-faults its
/// buffers back in (6% of training time in the kernel's `clear_page` under perf). Keeping
/// freed memory in the process removes that.
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// SIGPIPE: the default action (end quietly) for commands that write to a pipe, so that
/// `moelab ... | head` stops as other Unix tools do; ignored by `moelab serve`.
///
/// NOTE: a server must never take SIGPIPE's default action. hyper writes responses with
/// `writev`, which (unlike `send` with MSG_NOSIGNAL) raises SIGPIPE when the client has
/// already closed its socket: every client that hung up mid-stream (curl Ctrl-C, a closed
/// tab, `break` in an openai stream loop) was a chance to kill the whole server (issue 11).
/// Ignored, the write fails with EPIPE and only that connection ends.
fn sigpipe(cmd: &Cmd) {
    let action = if matches!(cmd, Cmd::Serve(_)) {
        libc::SIG_IGN
    } else {
        libc::SIG_DFL
    };
    // SAFETY: sets a signal disposition; called before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, action);
    }
}

#[derive(Parser)]
#[command(
    name = "moelab",
    version,
    about = "A frontier AI lab in one Rust binary: MoE pretraining, reasoning distillation and serving on CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure training speed (tokens/s, GFLOP/s, MFU, peak memory).
    #[command(subcommand)]
    Bench(cmd::bench::BenchCmd),
    /// Turn a text corpus into a tokenizer and token shards, or generate reasoning problems.
    #[command(after_help = cmd::prepare::EXAMPLES)]
    Prepare(cmd::prepare::PrepareArgs),
    /// Pretrain a model on a prepared data dir (Ctrl-C or SIGTERM saves a checkpoint and exits).
    #[command(after_help = cmd::train::EXAMPLES)]
    Train(cmd::train::TrainArgs),
    /// Generate text from a trained run (KV-cache decoding, streamed).
    #[command(after_help = cmd::sample::EXAMPLES)]
    Sample(cmd::sample::SampleArgs),
    /// Validation loss of a run on a data dir, or its accuracy on held-out reasoning problems.
    #[command(after_help = cmd::eval::EXAMPLES)]
    Eval(cmd::eval::EvalArgs),
    /// Chat with a run in the terminal; its reasoning streams dimmed before the answer.
    #[command(after_help = cmd::chat::EXAMPLES)]
    Chat(cmd::chat::ChatArgs),
    /// Serve a run over an OpenAI-compatible HTTP API (reasoning in `reasoning_content`) and a web chat page.
    #[command(after_help = cmd::serve::EXAMPLES)]
    Serve(cmd::serve::ServeArgs),
    /// Manage API keys and read the usage ledger of `moelab serve`.
    #[command(subcommand)]
    Keys(cmd::keys::KeysCmd),
    /// Distill reasoning: teacher traces with a verifier, then student training.
    #[command(subcommand)]
    Distill(cmd::distill::DistillCmd),
    /// Replay a run from its manifest and check that it reproduces the weights bit for bit.
    #[command(after_help = cmd::verify::EXAMPLES)]
    Verify(cmd::verify::VerifyArgs),
    /// Import a Hugging Face model dir or a GGUF file as a run (its weights, tokenizer and chat template).
    #[command(after_help = cmd::import::EXAMPLES)]
    Import(cmd::import::ImportArgs),
    /// Export a run as a Hugging Face model dir (config.json, safetensors, tokenizer, chat template).
    #[command(after_help = cmd::export::EXAMPLES)]
    Export(cmd::export::ExportArgs),
    /// Turn a dense run into a Mixture-of-Experts run whose experts start as copies of its FFN.
    #[command(after_help = cmd::upcycle::EXAMPLES)]
    Upcycle(cmd::upcycle::UpcycleArgs),
    /// Weights hash (sha256 of the tensors in name order) of a run's latest checkpoint.
    #[command(after_help = cmd::hash::EXAMPLES)]
    Hash(cmd::hash::HashArgs),
    /// Plot training and validation loss of runs (SVG, or HTML with a summary table).
    #[command(after_help = cmd::report::EXAMPLES)]
    Report(cmd::report::ReportArgs),
    /// The whole pipeline on built-in defaults: teacher -> verified traces -> student -> eval -> chat.
    #[command(after_help = cmd::demo::EXAMPLES)]
    Demo(cmd::demo::DemoArgs),
}

/// When this process started (as close to exec as Rust gets): `train --time-budget`
/// counts from here.
pub static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn main() {
    STARTED.get_or_init(std::time::Instant::now);
    keep_freed_memory();
    let cli = Cli::parse();
    sigpipe(&cli.cmd);
    if !matches!(cli.cmd, Cmd::Train(_) | Cmd::Bench(_))
        && comm::launched_size().is_some_and(|n| n > 1)
    {
        eprintln!("error: only `moelab train` and `moelab bench reduce` run as several MPI processes; run this command once, without mpirun");
        std::process::exit(2);
    }
    let res = match cli.cmd {
        Cmd::Bench(b) => pooled(|| cmd::bench::run(b)),
        Cmd::Demo(d) => pooled(|| cmd::demo::run(d)),
        Cmd::Prepare(a) => cmd::prepare::run(a),
        Cmd::Train(a) => pooled(|| cmd::train::run(a)),
        Cmd::Sample(a) => pooled(|| cmd::sample::run(a)),
        Cmd::Eval(a) => cmd::eval::run(a),
        Cmd::Chat(a) => cmd::chat::run(a),
        Cmd::Serve(a) => cmd::serve::run(a),
        Cmd::Keys(c) => cmd::keys::run(c),
        Cmd::Distill(c) => pooled(|| cmd::distill::run(c)),
        Cmd::Hash(a) => cmd::hash::run(a),
        Cmd::Import(a) => cmd::import::run(a),
        Cmd::Upcycle(a) => cmd::upcycle::run(a),
        Cmd::Export(a) => cmd::export::run(a),
        Cmd::Verify(a) => pooled(|| cmd::verify::run(a)),
        Cmd::Report(a) => cmd::report::run(a),
    };
    if let Err(e) = res {
        eprintln!("error: {}", clip_error(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// Runs a training-bound command as the root of a rayon pool of the usual size
/// ([`kernels::par::on_pool`]: up to ~5% faster training, the same bits). MPI processes stay on
/// the main thread, the one that initialised MPI.
fn pooled(f: impl FnOnce() -> anyhow::Result<()> + Send) -> anyhow::Result<()> {
    if comm::launched_size().is_some_and(|n| n > 1) {
        return f();
    }
    kernels::par::on_pool(rayon::current_num_threads(), f)?
}

/// The error as one line of at most ~1,000 characters. Errors quote short excerpts of what
/// they reject; this is the last guard, so that no input (a 50 MB one-line config, a JSON
/// line) is ever echoed whole to a terminal or a log (issue 11). The end, which says what
/// to do, is kept.
fn clip_error(msg: &str) -> String {
    let msg = msg.replace(['\n', '\r'], " ");
    let chars: Vec<char> = msg.chars().collect();
    if chars.len() <= 1000 {
        return msg;
    }
    let head: String = chars[..600].iter().collect();
    let tail: String = chars[chars.len() - 300..].iter().collect();
    format!("{head} [...] {tail}")
}

#[cfg(test)]
mod tests {
    /// Commands never import each other (issue 12): what two commands share lives in a
    /// helper module (runs, progress, presets, machine, comm) or a library crate.
    #[test]
    fn commands_do_not_import_commands() {
        let commands: [(&str, &str); 13] = [
            ("bench", include_str!("cmd/bench.rs")),
            ("chat", include_str!("cmd/chat.rs")),
            ("demo", include_str!("cmd/demo.rs")),
            ("distill", include_str!("cmd/distill.rs")),
            ("eval", include_str!("cmd/eval.rs")),
            ("hash", include_str!("cmd/hash.rs")),
            ("keys", include_str!("cmd/keys.rs")),
            ("prepare", include_str!("cmd/prepare.rs")),
            ("report", include_str!("cmd/report.rs")),
            ("sample", include_str!("cmd/sample.rs")),
            ("serve", include_str!("cmd/serve.rs")),
            ("train", include_str!("cmd/train.rs")),
            ("verify", include_str!("cmd/verify.rs")),
        ];
        for (name, text) in commands {
            for (other, _) in commands.iter().filter(|(o, _)| *o != name) {
                assert!(
                    !text.contains(&format!("cmd::{other}")) && !text.contains("super::"),
                    "src/cmd/{name}.rs imports the command {other}: move what they share to a helper"
                );
            }
        }
    }
}
