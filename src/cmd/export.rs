//! `moelab export`: a run as a Hugging Face model dir that transformers loads.

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:
  moelab export runs/shk --format hf --out exports/shk
  moelab export runs/smollm2-ft --format hf --dtype bf16 --out exports/smollm2-ft

  then, in Python: AutoModelForCausalLM.from_pretrained(\"exports/shk\")";

use anyhow::{bail, Result};
use clap::Args;
use interop::export::{write_hf, ExportDtype};
use std::path::PathBuf;

#[derive(Args)]
pub struct ExportArgs {
    /// Run dir (its latest checkpoint) or checkpoint dir.
    run: PathBuf,
    /// Output format: hf (a Hugging Face model dir). GGUF export is not implemented yet.
    #[arg(long, default_value = "hf")]
    format: String,
    /// Weight dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// The dir to create (must not exist).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let Some(dtype) = ExportDtype::parse(&a.dtype) else {
        bail!("--dtype {}: expected f32, f16 or bf16", a.dtype);
    };
    match a.format.as_str() {
        "hf" => {}
        "gguf" => bail!("--format gguf is not implemented yet (export --format hf, then llama.cpp's convert_hf_to_gguf.py)"),
        f => bail!("--format {f}: expected hf"),
    }
    let src = crate::runs::load_init(&a.run)?;
    let family = write_hf(
        &src.model,
        &src.init.params,
        &src.tok,
        src.chat.as_ref(),
        dtype,
        &a.out,
    )?;
    println!(
        "{}: a {family} model ({} parameters, {}) for transformers' AutoModelForCausalLM",
        a.out.display(),
        src.init.params.len(),
        a.dtype
    );
    Ok(())
}
