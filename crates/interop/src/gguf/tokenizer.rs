//! The tokenizer of a GGUF file, rebuilt from `tokenizer.ggml.*` as a Hugging Face
//! tokenizer: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the vocabulary and merges
//! stored in the file, the pre-tokenizer that `tokenizer.ggml.pre` names (the same split
//! llama.cpp applies for it), control tokens (token type 3) as special added tokens and
//! user-defined ones (type 4) as added tokens, and the BOS prepended when
//! `tokenizer.ggml.add_bos_token` says so.

use super::file::{GgufFile, Value};
use crate::{ferr, Result};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// GPT-2's split, which `ByteLevel` applies itself (`use_regex`).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    f.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ferr(
                &f.path,
                format!("metadata {key} is missing or not an array"),
            )
        })?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ferr(&f.path, format!("metadata {key} holds a non-string")))
        })
        .collect()
}

fn pre_tokenizer(f: &GgufFile, pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |regex: bool| {
        PreTokenizerWrapper::ByteLevel(
            ByteLevel::default()
                .add_prefix_space(false)
                .use_regex(regex),
        )
    };
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| ferr(&f.path, format!("pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerWrapper::Split(s))
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" => byte_level(true),
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ]))
        }
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(LLAMA3)?, byte_level(false)]))
        }
        "qwen2" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(QWEN2)?, byte_level(false)]))
        }
        other => {
            return Err(ferr(
                &f.path,
                format!("tokenizer.ggml.pre \"{other}\" is not supported (moelab knows default, gpt2, smollm, starcoder, llama-bpe, qwen2)"),
            ))
        }
    })
}

/// The file's tokenizer.
pub fn build(f: &GgufFile) -> Result<tokenizer::Tokenizer> {
    let model = f
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(ferr(
            &f.path,
            format!("tokenizer.ggml.model \"{model}\" is not supported (moelab rebuilds byte-level BPE, \"gpt2\"; SentencePiece models: import the Hugging Face dir instead)"),
        ));
    }
    let tokens = strings(f, "tokenizer.ggml.tokens")?;
    let merges = strings(f, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match f.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(v) => v.iter().map(|x| x.as_u64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(ferr(
            &f.path,
            format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            ),
        ));
    }
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), i as u32);
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| ferr(&f.path, format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre_ignores_merges(f))
        .build()
        .map_err(|e| ferr(&f.path, format!("BPE: {e}")))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    let pre = f
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    t.with_pre_tokenizer(Some(pre_tokenizer(f, pre)?));
    t.with_decoder(Some(ByteLevel::default()));
    let added = |ty: u64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &x)| x == ty)
            .map(|(s, _)| AddedToken::from(s.to_string(), special))
            .collect()
    };
    t.add_special_tokens(&added(3, true));
    t.add_tokens(&added(4, false));
    let add_bos = f
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if add_bos {
        if let Some(id) = f.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64) {
            let bos = tokens
                .get(id as usize)
                .ok_or_else(|| {
                    ferr(
                        &f.path,
                        "tokenizer.ggml.bos_token_id is past the vocabulary",
                    )
                })?
                .to_string();
            let p = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
                .map_err(|e| ferr(&f.path, format!("BOS template: {e}")))?
                .special_tokens(vec![(bos.clone(), id as u32)])
                .build()
                .map_err(|e| ferr(&f.path, format!("BOS template: {e}")))?;
            t.with_post_processor(Some(p));
        }
    }
    Ok(tokenizer::Tokenizer::from_hf(t))
}

/// Llama 3's tokenizer takes a whole pre-token that is in the vocabulary as one token
/// before merging (`ignore_merges` in its tokenizer.json).
fn pre_ignores_merges(f: &GgufFile) -> bool {
    matches!(
        f.get("tokenizer.ggml.pre").and_then(Value::as_str),
        Some("llama-bpe" | "llama3" | "smaug-bpe")
    )
}
