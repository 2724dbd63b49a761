//! `moelab import`: a Hugging Face model dir (or a GGUF file) becomes a run dir.

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:
  moelab import SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
  moelab import ~/models/SmolLM2-135M-Instruct --out runs/smollm2-hf
  moelab import ~/models/Qwen3-30B-A3B --out runs/qwen3 --context 4096
  moelab chat runs/smollm2";

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ImportArgs {
    /// A Hugging Face model dir (config.json, *.safetensors, tokenizer.json) or a GGUF file.
    src: PathBuf,
    /// The run dir to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Context length of the run (default: the model's, at most 8192; the KV cache of each
    /// serving slot is allocated for all of it).
    #[arg(long)]
    context: Option<usize>,
}

pub fn run(a: ImportArgs) -> Result<()> {
    if a.context == Some(0) {
        bail!("--context must be at least 1");
    }
    if !a.src.exists() {
        bail!("{}: no such file or dir", a.src.display());
    }
    eprintln!("reading {}", a.src.display());
    let imp = if a.src.is_dir() {
        interop::hf::import_dir(&a.src, a.context)?
    } else if crate::runs::is_gguf(&a.src) {
        interop::gguf::import_file(&a.src, a.context)?
    } else {
        bail!(
            "{}: expected a Hugging Face model dir (config.json, *.safetensors, tokenizer.json) or a GGUF file",
            a.src.display()
        );
    };
    let c = &imp.config;
    eprintln!(
        "{}: {} layers, d_model {}, {} heads ({} kv), {}, vocab {}, context {}",
        imp.source.family,
        c.n_layers,
        c.d_model,
        c.n_heads,
        c.n_kv_heads,
        if c.n_experts > 1 {
            format!("{} experts (top {})", c.n_experts, c.top_k)
        } else {
            "dense".to_string()
        },
        c.vocab_size,
        c.max_seq_len
    );
    interop::run::write_run(&a.out, &imp)?;
    println!(
        "imported {} parameters into {}; try `moelab chat --run {}`",
        imp.params.len(),
        a.out.display(),
        a.out.display()
    );
    Ok(())
}
