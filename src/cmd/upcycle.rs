//! `moelab upcycle`: a dense run becomes a Mixture-of-Experts run whose experts start as
//! copies of its FFN (sparse upcycling), computing what the dense model computed; then
//! `moelab train --init` trains it like any run.

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:
  moelab upcycle runs/smollm2 --experts 8 --top-k 2 --out runs/smollm2-moe
  moelab upcycle runs/dense --experts 4 --top-k 1 --shared 1 --out runs/moe
  moelab train --init runs/smollm2-moe --data data/mine --out runs/smollm2-moe-ft --steps 500";

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct UpcycleArgs {
    /// A dense run dir (or checkpoint dir), e.g. one `moelab import` wrote.
    run: PathBuf,
    /// Routed experts per block (each a copy of the block's FFN).
    #[arg(long)]
    experts: usize,
    /// Experts each token is routed to.
    #[arg(long)]
    top_k: usize,
    /// Always-on shared experts per block (copies too).
    #[arg(long, default_value_t = 0)]
    shared: usize,
    /// Seed of the router's random init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The run dir to create (must not exist).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: UpcycleArgs) -> Result<()> {
    let src = crate::runs::load_init(&a.run)?;
    let (cfg, params) = interop::upcycle::upcycle(
        &src.model,
        &src.init.params,
        interop::upcycle::Upcycle {
            experts: a.experts,
            top_k: a.top_k,
            shared: a.shared,
            seed: a.seed,
        },
        &a.run,
    )?;
    let imp = interop::run::Imported {
        config: cfg,
        params,
        tokenizer_json: src.tok.to_json()?.into_bytes(),
        chat: src.chat,
        source: interop::run::Source {
            format: "upcycle".into(),
            family: "moelab".into(),
            path: src.init.record.path.clone(),
            sha256: [(
                "weights_hash".to_string(),
                src.init.record.weights_hash.clone(),
            )]
            .into(),
            code_version: train::manifest::code_version(),
            quant: Default::default(),
        },
        quant_bytes: Default::default(),
    };
    interop::run::write_run(&a.out, &imp)?;
    println!(
        "{}: {} experts (top {}{}) per block, each a copy of the FFN of {}; {} parameters. Train it with `moelab train --init {}`",
        a.out.display(),
        a.experts,
        a.top_k,
        if a.shared > 0 { format!(", {} shared", a.shared) } else { String::new() },
        a.run.display(),
        imp.params.len(),
        a.out.display()
    );
    Ok(())
}
