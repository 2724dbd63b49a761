//! `moelab export`: a run as a Hugging Face model dir that transformers loads, or a GGUF
//! file that llama.cpp loads.

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:
  moelab export runs/shk --format hf --out exports/shk
  moelab export runs/smollm2-ft --format hf --dtype bf16 --out exports/smollm2-ft
  moelab export runs/smollm2-ft --format gguf --dtype f16 --out exports/smollm2-ft.gguf
  moelab export runs/smollm2-ft --format gguf --quant q4_1 --out exports/smollm2-ft.q4_1.gguf

  then, in Python: AutoModelForCausalLM.from_pretrained(\"exports/shk\")";

use anyhow::{bail, Result};
use clap::Args;
use interop::export::{write_hf, ExportDtype};
use std::path::PathBuf;

#[derive(Args)]
pub struct ExportArgs {
    /// Run dir (its latest checkpoint) or checkpoint dir.
    run: PathBuf,
    /// Output format: hf (a Hugging Face model dir) or gguf (one file for llama.cpp, as its
    /// llama, bailingmoe, qwen2moe or qwen3moe architecture).
    #[arg(long, default_value = "hf")]
    format: String,
    /// Weight dtype: f32, f16 or bf16 (gguf: f32 or f16).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// gguf: quantize the matrices to q8_0, q5_0, q4_1 or q4_0 (norms stay f32; matrices whose
    /// rows are not whole 32-value blocks are f16).
    #[arg(long)]
    quant: Option<String>,
    /// The dir to create (must not exist).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let Some(dtype) = ExportDtype::parse(&a.dtype) else {
        bail!("--dtype {}: expected f32, f16 or bf16", a.dtype);
    };
    let src = crate::runs::load_init(&a.run)?;
    if a.quant.is_some() && a.format != "gguf" {
        bail!("--quant applies to --format gguf");
    }
    match a.format.as_str() {
        "hf" => {}
        "gguf" => {
            if dtype == ExportDtype::Bf16 {
                bail!("--dtype bf16: GGUF export writes f32 or f16");
            }
            use interop::gguf::quant;
            let mat_type = match a.quant.as_deref() {
                None if dtype == ExportDtype::F16 => quant::F16,
                None => quant::F32,
                Some("q8_0") => quant::Q8_0,
                Some("q4_0") => quant::Q4_0,
                Some("q4_1") => quant::Q4_1,
                Some("q5_0") => quant::Q5_0,
                Some(q) => bail!("--quant {q}: expected q8_0, q5_0, q4_1 or q4_0"),
            };
            if a.out.exists() {
                bail!("{}: already exists; choose a new --out", a.out.display());
            }
            let bytes = interop::gguf::write::export(
                &src.model,
                &src.init.params,
                &src.tok,
                src.chat.as_ref(),
                mat_type,
                &a.out,
            )?;
            data::write_atomic(&a.out, &bytes)?;
            println!(
                "{}: a {}-architecture GGUF ({} parameters, {}, {} bytes) for llama.cpp",
                a.out.display(),
                interop::gguf::write::Arch::of(&src.model)
                    .map(|x| x.name())
                    .unwrap_or("?"),
                src.init.params.len(),
                a.quant.as_deref().unwrap_or(&a.dtype),
                bytes.len()
            );
            return Ok(());
        }
        f => bail!("--format {f}: expected hf or gguf"),
    }
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
