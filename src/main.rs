//! `moelab`: the command line. One subcommand per pipeline stage; logic lives in the library
//! crates, this file parses flags, draws progress and prints human errors.

mod bench;
mod chat_cmd;
mod comm;
mod demo;
mod distill_cmd;
mod machine;
mod prepare_cmd;
mod presets;
mod progress;
mod report;
mod run_cmds;
mod runs;
mod serve_cmd;
mod train_cmd;
mod verify_cmd;

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
    Bench(bench::BenchCmd),
    /// Turn a text corpus into a tokenizer and token shards, or generate reasoning problems.
    #[command(
        after_help = "Examples:\n  moelab prepare --corpus plays/ --out data/shk\n  moelab prepare --corpus a.txt b.jsonl --out data/mix --vocab-size 8192\n  moelab prepare --task all --n 20000 --out data/tasks\n  moelab prepare --task add,mul --no-reasoning --out data/tasks-answers"
    )]
    Prepare(prepare_cmd::PrepareArgs),
    /// Pretrain a model on a prepared data dir (Ctrl-C or SIGTERM saves a checkpoint and exits).
    #[command(
        after_help = "Examples:\n  moelab train --config small-moe --data data/shk --out runs/shk\n  moelab train --config small-moe --data data/shk --out runs/shk --resume\n  mpirun -np 2 moelab train --config small-moe --grad-accum 2 --data data/shk --out runs/dp   (--features mpi)\n\nOne process trains in a run dir at a time (RUN_DIR/train.lock). --resume continues the same run: a changed config ([train] included) or other data is refused."
    )]
    Train(train_cmd::TrainArgs),
    /// Generate text from a trained run (KV-cache decoding, streamed).
    #[command(
        after_help = "Examples:\n  moelab sample --run runs/shk --prompt 'ROMEO:'\n  moelab sample --run runs/shk --prompt 'ROMEO:' --temperature 0 --max-tokens 50"
    )]
    Sample(run_cmds::SampleArgs),
    /// Validation loss of a run on a data dir, or its accuracy on held-out reasoning problems.
    #[command(
        after_help = "Examples:\n  moelab eval --run runs/shk --data data/shk\n  moelab eval --run runs/student --task all --n 400"
    )]
    Eval(run_cmds::EvalArgs),
    /// Chat with a run in the terminal; its reasoning streams dimmed before the answer.
    #[command(
        after_help = "Examples:\n  moelab chat --run runs/student\n  moelab chat --run runs/student --hide-reasoning --temperature 0.7\n  echo 'What is 12 * 34?' | moelab chat --run runs/student\n\nIn the chat: /reset forgets the conversation, /exit quits."
    )]
    Chat(chat_cmd::ChatArgs),
    /// Serve a run over an OpenAI-compatible HTTP API (reasoning in `reasoning_content`) and a web chat page.
    #[command(
        after_help = "Examples:\n  moelab serve --run runs/student\n  moelab serve --run runs/student --addr 0.0.0.0:8080 --keys-db keys.db --rate-limit 60\n\nThen: open http://127.0.0.1:8080/ or point an OpenAI client at http://127.0.0.1:8080/v1.\nSIGINT/SIGTERM stop it gracefully (in-flight requests finish within --shutdown-deadline).\nLimits: --max-body, --max-connections, --header-timeout and --body-timeout bound what one\nclient can hold; a stop sequence is at most 128 bytes."
    )]
    Serve(serve_cmd::ServeArgs),
    /// Manage API keys and read the usage ledger of `moelab serve`.
    #[command(subcommand)]
    Keys(serve_cmd::KeysCmd),
    /// Distill reasoning: teacher traces with a verifier, then student training.
    #[command(subcommand)]
    Distill(distill_cmd::DistillCmd),
    /// Replay a run from its manifest and check that it reproduces the weights bit for bit.
    #[command(
        after_help = "Examples:\n  moelab verify runs/shk\n  moelab verify runs/shk --steps 500\n  RAYON_NUM_THREADS=1 moelab verify runs/shk --data /mnt/copy-of-data"
    )]
    Verify(verify_cmd::VerifyArgs),
    /// Weights hash (sha256 of the tensors in name order) of a run's latest checkpoint.
    #[command(
        after_help = "Examples:\n  moelab hash runs/shk\n  moelab hash runs/shk/checkpoints/step-0000500"
    )]
    Hash(run_cmds::HashArgs),
    /// Plot training and validation loss of runs (SVG, or HTML with a summary table).
    #[command(
        after_help = "Examples:\n  moelab report --run runs/shk --out docs/loss.svg\n  moelab report --run runs/moe runs/dense --out report.html"
    )]
    Report(report::ReportArgs),
    /// The whole pipeline on built-in defaults: teacher -> verified traces -> student -> eval -> chat.
    #[command(
        after_help = "Examples:\n  moelab demo\n  moelab demo --out /tmp/demo --teacher-steps 300 --student-steps 300"
    )]
    Demo(demo::DemoArgs),
}

fn main() {
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
        Cmd::Bench(b) => bench::run(b),
        Cmd::Demo(d) => demo::run(d),
        Cmd::Prepare(a) => prepare_cmd::run(a),
        Cmd::Train(a) => train_cmd::run(a),
        Cmd::Sample(a) => run_cmds::sample(a),
        Cmd::Eval(a) => run_cmds::eval(a),
        Cmd::Chat(a) => chat_cmd::run(a),
        Cmd::Serve(a) => serve_cmd::serve(a),
        Cmd::Keys(c) => serve_cmd::keys(c),
        Cmd::Distill(c) => distill_cmd::run(c),
        Cmd::Hash(a) => run_cmds::hash(a),
        Cmd::Verify(a) => verify_cmd::run(a),
        Cmd::Report(a) => report::run(a),
    };
    if let Err(e) = res {
        eprintln!("error: {}", clip_error(&format!("{e:#}")));
        std::process::exit(1);
    }
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
        let commands: [(&str, &str); 10] = [
            ("bench", include_str!("bench.rs")),
            ("chat_cmd", include_str!("chat_cmd.rs")),
            ("demo", include_str!("demo.rs")),
            ("distill_cmd", include_str!("distill_cmd.rs")),
            ("prepare_cmd", include_str!("prepare_cmd.rs")),
            ("report", include_str!("report.rs")),
            ("run_cmds", include_str!("run_cmds.rs")),
            ("serve_cmd", include_str!("serve_cmd.rs")),
            ("train_cmd", include_str!("train_cmd.rs")),
            ("verify_cmd", include_str!("verify_cmd.rs")),
        ];
        for (name, text) in commands {
            for (other, _) in commands.iter().filter(|(o, _)| *o != name) {
                assert!(
                    !text.contains(&format!("crate::{other}")) && !text.contains("super::"),
                    "src/{name}.rs imports the command {other}: move what they share to a helper"
                );
            }
        }
    }
}
