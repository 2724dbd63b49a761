//! `moelab`: the command line. One subcommand per pipeline stage; logic lives in the library
//! crates, this file parses flags, draws progress and prints human errors.

mod bench;
mod demo;
mod presets;

use clap::{Parser, Subcommand};

/// Process-wide settings. Also restores the default SIGPIPE action.
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
        // `moelab ... | head` should end quietly, as other Unix tools do.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
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
    /// Run the built-in demo on defaults: a tiny MoE learns a synthetic language in seconds.
    #[command(after_help = "Example:\n  moelab demo\n  moelab demo --steps 300")]
    Demo(demo::DemoArgs),
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Bench(b) => bench::run(b),
        Cmd::Demo(d) => demo::run(d),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
