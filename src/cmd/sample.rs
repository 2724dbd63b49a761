//! `moelab sample`: text from a trained run, streamed (KV-cache decoding).

use crate::runs::{run_chat_format, run_tokenizer};
use anyhow::{bail, Result};
use clap::Args;
use infer::{Sampler, SamplingParams};
use model::decode::Decoder;
use std::io::Write;
use std::path::PathBuf;
use train::load_run;

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab sample --run runs/shk --prompt 'ROMEO:'\n  moelab sample --run runs/shk --prompt 'ROMEO:' --temperature 0 --max-tokens 50";

#[derive(Args)]
pub struct SampleArgs {
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
    /// Text to continue.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate (stops early at <|end|> or the context length).
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: SampleArgs) -> Result<()> {
    let lr = load_run(&a.run)?;
    let tok = run_tokenizer(&a.run, &lr.checkpoint, lr.cfg.model.vocab_size)?;
    // the format's document start and ends: moelab's <|end|> (documents are separated by
    // it in training data, so it also marks a start), an imported model's BOS and EOS
    let chat = run_chat_format(&a.run, &lr.checkpoint, tok.clone())?;
    let stops = chat.stop_tokens();
    let mut prompt = chat.prefix().to_vec();
    prompt.extend(tok.encode(&a.prompt));
    let source = crate::runs::source_quant(&a.run, &lr.checkpoint)?;
    let quant = crate::runs::quant_weights(&lr.cfg.model, &lr.params, &source, &a.quant)?;
    let mut dec = Decoder::new(&lr.cfg.model);
    dec.set_quant(quant);
    dec.set_kv_type(a.kv_cache);
    if prompt.len() >= dec.remaining() {
        bail!(
            "the prompt is {} tokens; this model's context is {} tokens",
            prompt.len(),
            lr.cfg.model.max_seq_len
        );
    }
    let mut sampler = Sampler::new(SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    });
    if prompt.is_empty() {
        bail!("nothing to continue: this model has no start token; give --prompt");
    }
    // the prompt in batched forwards (prefill), not one token per step
    let mut logits = dec.feed(&lr.params, &prompt).to_vec();
    let mut out = std::io::stdout().lock();
    write!(out, "{}", a.prompt)?;
    // each token's text as soon as it completes a character
    let mut text = tokenizer::TextStream::new();
    for _ in 0..a.max_tokens {
        let next = sampler.sample(&logits);
        if stops.contains(&next) || dec.remaining() == 0 {
            break;
        }
        let piece = text.push(&tok, next);
        if !piece.is_empty() {
            write!(out, "{piece}")?;
            out.flush()?;
        }
        logits = dec.step(&lr.params, next).to_vec();
    }
    writeln!(out, "{}", text.finish(&tok))?;
    Ok(())
}
