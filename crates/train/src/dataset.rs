//! Training data as the trainer and evaluation read it: a data dir written by `moelab
//! prepare` (token shards or chat rows) or chat examples (verified traces), checked against
//! the model config and meta.json's hashes, split into train and validation.

use crate::{io_err, Error, Result};
use data::chat::{self, ChatLoader, Example, Packed};
use data::loader::Loader;
use data::meta::Meta;
use data::shard;
use std::collections::BTreeMap;
use std::path::Path;
use tokenizer::Tokenizer;

/// One split of a dataset: a token stream (pretraining) or packed, loss-masked chat rows.
pub enum Split {
    Tokens(Vec<u32>),
    Chat(Packed),
}

impl Split {
    /// Tokens that count toward the loss.
    pub fn targets(&self) -> usize {
        match self {
            Split::Tokens(t) => t.len().saturating_sub(1),
            Split::Chat(p) => p.targets,
        }
    }
}

/// Training data, checked against the model config.
pub struct Dataset {
    /// meta.json of a data dir (None for traces).
    pub meta: Option<Meta>,
    pub train: Split,
    pub val: Split,
    /// The tokenizer.json the data is encoded with (copied into the run dir).
    pub tokenizer_json: Vec<u8>,
    /// sha256 of `tokenizer_json`.
    pub tokenizer_sha256: String,
    /// sha256 of each data file read (a data dir's `train.bin`/`val.bin` or
    /// `train.jsonl`/`val.jsonl`, checked against meta.json), or of the examples' JSON
    /// (`train`, `val`): what the manifest records, hashed once.
    pub sha256: BTreeMap<String, String>,
}

fn check_vocab(what: &str, tok_vocab: usize, vocab_size: usize, fix: &str) -> Result<()> {
    // NOTE: a tokenizer may come out smaller than asked (a small corpus runs out of
    // merges); a model with room for every id is fine.
    if tok_vocab > vocab_size {
        return Err(Error::Usage(format!(
            "the config has model.vocab_size = {vocab_size} but {what} uses a {tok_vocab}-token tokenizer; set model.vocab_size = {tok_vocab}{fix}"
        )));
    }
    Ok(())
}

impl Dataset {
    /// Opens a data dir written by `moelab prepare` (`--corpus` or `--task`); chat rows are
    /// packed to `seq_len`.
    ///
    /// Every file is checked against the sha256 meta.json records for it, as it is read (one
    /// read and one hash per file; the hashes are kept for the manifest).
    pub fn open(dir: &Path, vocab_size: usize, seq_len: usize) -> Result<Dataset> {
        let meta = Meta::load(dir)?;
        check_vocab(
            &dir.display().to_string(),
            meta.vocab_size,
            vocab_size,
            &format!(" or re-run `moelab prepare --vocab-size {vocab_size}`"),
        )?;
        let tok_path = dir.join("tokenizer.json");
        let (tokenizer_json, tokenizer_sha256) = meta.read_checked(dir, "tokenizer.json")?;
        // a tokenizer that hashes right but does not parse (or has another vocabulary than
        // meta.json says) is refused here, not by `sample` after hours of training
        let tok = Tokenizer::from_bytes(&tok_path, &tokenizer_json).map_err(data::Error::from)?;
        if tok.vocab_size() != meta.vocab_size {
            return Err(Error::Usage(format!(
                "{}: has {} tokens but meta.json says {}; re-run `moelab prepare --force`",
                tok_path.display(),
                tok.vocab_size(),
                meta.vocab_size
            )));
        }
        let mut sha256 = BTreeMap::new();
        if meta.kind == "chat" {
            let mut read = |name: &str| -> Result<Packed> {
                let path = dir.join(name);
                let (bytes, sha) = meta.read_checked(dir, name)?;
                sha256.insert(name.to_string(), sha);
                let (ex, bad) = chat::parse_jsonl(&bytes);
                if let Some((line, msg)) = bad.first() {
                    return Err(Error::Usage(format!(
                        "{}:{line}: malformed example ({msg}); re-run `moelab prepare --task`",
                        path.display()
                    )));
                }
                Ok(pack_examples(&tok, &ex, seq_len))
            };
            let (train, val) = (read("train.jsonl")?, read("val.jsonl")?);
            return Ok(Dataset {
                meta: Some(meta),
                train: Split::Chat(train),
                val: Split::Chat(val),
                tokenizer_json,
                tokenizer_sha256,
                sha256,
            });
        }
        let mut read = |name: &str| -> Result<Vec<u32>> {
            let (bytes, sha) = meta.read_checked(dir, name)?;
            sha256.insert(name.to_string(), sha);
            Ok(shard::parse(&dir.join(name), &bytes)?.tokens)
        };
        let (train, val) = (read("train.bin")?, read("val.bin")?);
        let (train, val) = if meta.kind == "documents" {
            let end = tok.special("<|end|>").ok_or_else(|| {
                Error::Usage(format!(
                    "{}: a documents data dir needs a moelab tokenizer (with <|end|>)",
                    tok_path.display()
                ))
            })?;
            (
                Split::Chat(pack_documents(&train, end, seq_len)),
                Split::Chat(pack_documents(&val, end, seq_len)),
            )
        } else {
            (Split::Tokens(train), Split::Tokens(val))
        };
        Ok(Dataset {
            meta: Some(meta),
            train,
            val,
            tokenizer_json,
            tokenizer_sha256,
            sha256,
        })
    }

    /// Chat examples (e.g. verified traces) encoded with the tokenizer at `tokenizer`, in
    /// moelab's chat format, or as `rendered` (another model's template) when given.
    pub fn from_examples(
        train: &[Example],
        val: &[Example],
        rendered: Option<&Rendered>,
        tokenizer: &Path,
        vocab_size: usize,
        seq_len: usize,
    ) -> Result<Dataset> {
        let tok = Tokenizer::from_file(tokenizer).map_err(data::Error::from)?;
        if rendered.is_none() {
            tok.require_moelab(tokenizer).map_err(data::Error::from)?;
        }
        check_vocab(
            &tokenizer.display().to_string(),
            tok.vocab_size(),
            vocab_size,
            "",
        )?;
        let tokenizer_json = std::fs::read(tokenizer).map_err(io_err(tokenizer))?;
        let h = |e: &[Example]| {
            data::sha256_hex(
                serde_json::to_string(e)
                    .expect("examples serialise")
                    .as_bytes(),
            )
        };
        Ok(Dataset {
            meta: None,
            train: Split::Chat(match rendered {
                Some(r) => Packed::new(&r.train, seq_len, r.pad),
                None => pack_examples(&tok, train, seq_len),
            }),
            val: Split::Chat(match rendered {
                Some(r) => Packed::new(&r.val, seq_len, r.pad),
                None => pack_examples(&tok, val, seq_len),
            }),
            tokenizer_sha256: data::sha256_hex(&tokenizer_json),
            tokenizer_json,
            sha256: [("train".to_string(), h(train)), ("val".to_string(), h(val))].into(),
        })
    }
}

/// Chat examples already rendered as token ids in a model's own template: (ids, index of
/// the first assistant token) per example, and the id that pads a row (its end of turn).
pub struct Rendered {
    pub train: Vec<(Vec<u32>, usize)>,
    pub val: Vec<(Vec<u32>, usize)>,
    pub pad: u32,
}

/// Renders and packs chat examples into rows of `seq_len`.
pub fn pack_examples(tok: &Tokenizer, ex: &[Example], seq_len: usize) -> Packed {
    use rayon::prelude::*;
    let rendered: Vec<(Vec<u32>, usize)> = ex.par_iter().map(|e| chat::render(tok, e)).collect();
    Packed::new(&rendered, seq_len, chat::ChatIds::of(tok).end)
}

/// Packs a stream of whole documents, each ending with `end`, into rows of `seq_len` with
/// every token a target: a document never straddles two rows (one longer than a row is left
/// out, counted in `too_long`).
pub fn pack_documents(stream: &[u32], end: u32, seq_len: usize) -> Packed {
    let docs: Vec<(Vec<u32>, usize)> = stream
        .split_inclusive(|&t| t == end)
        .filter(|d| d.len() >= 2)
        .map(|d| (d.to_vec(), 0))
        .collect();
    Packed::new(&docs, seq_len, end)
}

/// Training batches of either kind of split.
pub(crate) enum Batcher<'a> {
    Tokens(Loader<'a>),
    Chat(ChatLoader<'a>),
}

impl Batcher<'_> {
    pub(crate) fn batch(&self, k: u64, x: &mut [u32], y: &mut [u32]) {
        match self {
            Batcher::Tokens(l) => l.batch(k, x, y),
            Batcher::Chat(l) => l.batch(k, x, y),
        }
    }
}
