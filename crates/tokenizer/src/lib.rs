//! moelab's tokenizer: byte-level BPE (GPT-2 style) trained and run with Hugging Face's
//! `tokenizers` crate, with the special tokens of moelab's chat format.
//!
//! What it is: train / encode / decode / save / load. What it is not: anything about tensors
//! or the chat template's rendering (that is `infer`'s job).
//!
//! Determinism: training the same corpus to the same vocab size must give a byte-identical
//! `tokenizer.json`. `tokenizers` counts words in hash maps with per-process random keys, the
//! source of the nondeterminism older versions had; in the pinned 0.22.2 the trainer sorts
//! the alphabet and breaks count ties by pair id. `tests/tokenizer.rs` checks byte identity
//! in-process and across processes (each with its own hash keys) with 1, 2 and 4 threads, so
//! a version bump that regresses is caught.
//!
//! Text is always text: [`Tokenizer::encode`] never produces a special-token id, whatever the
//! input contains; control tokens come only from [`Tokenizer::special`] in a template.
//!
//! The full 256-symbol byte alphabet is always in the vocabulary (not only the bytes the
//! corpus happens to contain), so any UTF-8 text encodes and round-trips.

use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

/// The chat format's special tokens, in id order (ids 0..6 of every moelab tokenizer).
pub const SPECIAL_TOKENS: [&str; 6] = [
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<think>",
    "</think>",
];

/// Smallest vocabulary: the special tokens plus the 256 byte symbols.
pub const MIN_VOCAB: usize = SPECIAL_TOKENS.len() + 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vocab size {0} is too small: it must be at least {MIN_VOCAB} (6 special tokens + 256 bytes)")]
    VocabTooSmall(usize),
    #[error("tokenizer {path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Hf(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// At most 200 characters of an error message from a parser: some quote the offending input,
/// which may be a whole file on one line.
fn short(e: &impl std::fmt::Display) -> String {
    let s = e.to_string().replace('\n', " ");
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

fn hf(e: impl std::fmt::Display) -> Error {
    Error::Hf(e.to_string())
}

/// A trained byte-level BPE tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    /// `inner` with the unmarked markup tokens special too, for [`Tokenizer::encode`] only
    /// (None: there are none).
    encoder: Option<HfTokenizer>,
    /// Ids of the special (control) added tokens, sorted: they carry no text in a reply.
    control: Vec<u32>,
    /// Ids of every added token (special or not), sorted.
    added: Vec<u32>,
    /// Ids of the added tokens no text encodes to, sorted: the special ones and the
    /// unmarked markup ones (see [`Tokenizer::wrap`]). Only a template emits them.
    templated: Vec<u32>,
    /// Whether the chat format's special tokens are ids 0..6 (a tokenizer moelab trained).
    moelab: bool,
    /// Whether the vocabulary spells tokens SentencePiece's way (`▁` for a space, `<0x0A>`
    /// for a byte; Llama 2, Mistral, Gemma) instead of GPT-2's byte-level characters.
    sentencepiece: bool,
}

/// Text every tokenizer moelab loads must encode: ASCII, control characters, accents, CJK,
/// an emoji, a private-use and the last code point.
const ENCODE_PROBE: &str =
    "The quick brown fox, 42!\t\n\u{0}\u{7f} é ß ǅ 日本語 🙂 \u{e000} \u{10ffff}";

/// Whether an added token's string is markup a chat format would use as a marker: `<...>` or
/// `[...]`, at least 3 characters, without whitespace (`<think>`, `</tool_call>`, `<|im_end|>`,
/// `[INST]`; not a run of spaces or a word).
fn is_markup(s: &str) -> bool {
    let enclosed =
        (s.starts_with('<') && s.ends_with('>')) || (s.starts_with('[') && s.ends_with(']'));
    enclosed && s.chars().count() >= 3 && !s.chars().any(char::is_whitespace)
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokenizer({} ids{})",
            self.vocab_size(),
            if self.moelab { ", moelab" } else { "" }
        )
    }
}

impl Tokenizer {
    /// Trains on `texts` to `vocab_size` entries (special tokens and byte symbols included).
    pub fn train<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        Tokenizer::train_with(texts, vocab_size, false)
    }

    /// As [`Tokenizer::train`]; with `split_digits` every digit is its own token (as in
    /// Llama and DeepSeek tokenizers), which arithmetic needs: a number's digits line up
    /// with positions instead of being merged into arbitrary chunks.
    pub fn train_with<I, S>(texts: I, vocab_size: usize, split_digits: bool) -> Result<Tokenizer>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < MIN_VOCAB {
            return Err(Error::VocabTooSmall(vocab_size));
        }
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials.clone())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        let mut tok = HfTokenizer::new(BPE::default());
        let byte_level = ByteLevel::default().add_prefix_space(false);
        if split_digits {
            tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ]))));
        } else {
            tok.with_pre_tokenizer(Some(byte_level));
        }
        tok.with_decoder(Some(ByteLevel::default()));
        tok.train(&mut trainer, texts).map_err(hf)?;
        tok.add_special_tokens(&specials);
        Ok(Tokenizer::wrap(tok))
    }

    /// NOTE: every tokenizer encodes special-token strings as ordinary text
    /// (`encode_special_tokens`; the flag is not part of `tokenizer.json`, so it is set on
    /// every construction). Only a chat template pushes control ids, by [`Tokenizer::special`];
    /// text from users, clients, corpora and traces can never forge a turn.
    ///
    /// Hugging Face's encoder also matches added tokens that are not marked special. Qwen3,
    /// QwQ and the DeepSeek-R1 distills ship `<think>`, `</think>` and `<tool_call>` that way
    /// (and a GGUF's user-defined tokens come in that way), so a client's `</think>` would
    /// become the model's reasoning marker. Such markup tokens (a `<...>` or `[...]` string
    /// without whitespace, see [`is_markup`]) are encoded as ordinary text too, and emitted
    /// only from a template's own text ([`Tokenizer::control_tokens`]). Other unmarked added
    /// tokens (runs of spaces, words) keep being matched, as the model was trained.
    ///
    /// NOTE: the markup tokens stay what the file says everywhere else: not control tokens
    /// (a reply's `<tool_call>` keeps its text), and `tokenizer.json` and the exports written
    /// unchanged. Only `encode` uses a copy in which they are special (adding them as special
    /// tokens changes the entries themselves).
    fn wrap(mut inner: HfTokenizer) -> Tokenizer {
        inner.set_encode_special_tokens(true);
        let decoder = inner.get_added_tokens_decoder();
        let markup: Vec<AddedToken> = decoder
            .values()
            .filter(|t| !t.special && is_markup(&t.content))
            .map(|t| AddedToken {
                special: true,
                ..t.clone()
            })
            .collect();
        let encoder = (!markup.is_empty()).then(|| {
            // (their ids stay: each content is already in the vocabulary; this only puts it
            // in the set of strings `encode_special_tokens` leaves as text)
            let mut e = inner.clone();
            e.add_special_tokens(&markup);
            e
        });
        let mut control: Vec<u32> = decoder
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        control.sort_unstable();
        let mut added: Vec<u32> = decoder.keys().copied().collect();
        added.sort_unstable();
        let mut templated: Vec<u32> = markup
            .iter()
            .filter_map(|t| inner.token_to_id(&t.content))
            .chain(control.iter().copied())
            .collect();
        templated.sort_unstable();
        templated.dedup();
        let moelab = SPECIAL_TOKENS
            .iter()
            .enumerate()
            .all(|(i, s)| inner.token_to_id(s) == Some(i as u32));
        let sentencepiece = spells_sentencepiece(inner.get_decoder());
        Tokenizer {
            inner,
            encoder,
            control,
            added,
            templated,
            moelab,
            sentencepiece,
        }
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let ferr = |msg: String| Error::File {
            path: path.into(),
            msg,
        };
        if !path.exists() {
            return Err(ferr("not found".into()));
        }
        let bytes = std::fs::read(path).map_err(|e| ferr(format!("cannot read ({e})")))?;
        Tokenizer::from_bytes(path, &bytes)
    }

    /// Parses the bytes of a `tokenizer.json` read from `path` (named in errors): for callers
    /// that also hash the bytes, so the file is read once. Any Hugging Face tokenizer loads
    /// (an imported model's); [`Tokenizer::is_moelab`] tells whether it has moelab's chat
    /// tokens.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Tokenizer> {
        let ferr = |msg: String| Error::File {
            path: path.into(),
            msg,
        };
        let inner = HfTokenizer::from_bytes(bytes).map_err(|e| {
            ferr(format!(
                "cannot read ({}); is it a tokenizer.json?",
                short(&e)
            ))
        })?;
        // NOTE: `encode` takes any text (a client's, a corpus's). A tokenizer that cannot
        // (an unknown token named but not in its vocabulary, a word-level model without
        // one) is refused here, not found out by the first unusual character of a chat.
        if let Err(e) = inner.encode_fast(ENCODE_PROBE, false) {
            return Err(ferr(format!(
                "cannot encode arbitrary text ({}); moelab needs a tokenizer that encodes any UTF-8",
                short(&e)
            )));
        }
        Ok(Tokenizer::wrap(inner))
    }

    /// Wraps a tokenizer built in code (e.g. from a GGUF file's vocabulary).
    pub fn from_hf(inner: HfTokenizer) -> Tokenizer {
        Tokenizer::wrap(inner)
    }

    /// Whether this tokenizer has moelab's chat tokens at ids 0..6 (one moelab trained, as
    /// opposed to an imported model's).
    pub fn is_moelab(&self) -> bool {
        self.moelab
    }

    /// Refuses a tokenizer without moelab's chat tokens, for the work that renders moelab's
    /// own chat format (task data, distillation, task evaluation). `path` is named.
    pub fn require_moelab(&self, path: &Path) -> Result<()> {
        if self.moelab {
            return Ok(());
        }
        let i = SPECIAL_TOKENS
            .iter()
            .enumerate()
            .position(|(i, s)| self.inner.token_to_id(s) != Some(i as u32))
            .unwrap_or(0);
        Err(Error::File {
            path: path.into(),
            msg: format!(
                "special token {} is not id {i}: not a moelab tokenizer (an imported model \
                 chats in its own template; task data and distillation need moelab's format)",
                SPECIAL_TOKENS[i]
            ),
        })
    }

    /// The canonical JSON (pretty-printed; the same bytes for the same tokenizer).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(hf)
    }

    /// Writes `tokenizer.json` atomically (temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self.to_json()?;
        let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
        let ferr = |e: std::io::Error| Error::File {
            path: path.into(),
            msg: e.to_string(),
        };
        // synced before the rename: the data dir's meta.json (synced) vouches for this file's
        // hash, so after a power loss it must not come back empty
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            use std::io::Write;
            f.write_all(json.as_bytes()).and_then(|()| f.sync_all())
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(ferr(e));
        }
        std::fs::rename(&tmp, path).map_err(ferr)
    }

    /// Token ids of `text`, always as text: a special-token string in it (`<|user|>`,
    /// `<think>`, ...) becomes ordinary byte-level tokens, never a control id.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encoder
            .as_ref()
            .unwrap_or(&self.inner)
            .encode_fast(text, false)
            .expect("byte-level BPE encodes any UTF-8")
            .get_ids()
            .to_vec()
    }

    /// Text of `ids`, special tokens included as their strings.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner
            .decode(ids, false)
            .expect("every id of this tokenizer decodes")
    }

    /// Bytes of the longest token's text (at least 1): a text of n bytes is at least
    /// n / max_token_bytes tokens, a bound known without encoding it.
    pub fn max_token_bytes(&self) -> usize {
        (0..self.vocab_size() as u32)
            .filter(|id| !self.is_control(*id))
            .map(|id| self.decode(&[id]).len())
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// Number of ids (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of an added token such as `"<|end|>"` or `"<|im_start|>"` (None when the string
    /// is not one token of this tokenizer's added vocabulary).
    pub fn special(&self, s: &str) -> Option<u32> {
        let id = self.inner.token_to_id(s)?;
        self.added.binary_search(&id).is_ok().then_some(id)
    }

    /// Whether `id` is a control token (a special added token: it carries no text in a
    /// reply).
    pub fn is_control(&self, id: u32) -> bool {
        self.control.binary_search(&id).is_ok()
    }

    /// The strings of the added tokens no text encodes to (the special ones and unmarked
    /// markup such as Qwen3's `<think>`) with their ids, longest string first: what a chat
    /// template may emit as control tokens.
    pub fn control_tokens(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .templated
            .iter()
            .filter_map(|&id| self.inner.id_to_token(id).map(|s| (s, id)))
            .collect();
        v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        v
    }

    /// Ids the tokenizer's post-processor puts before a text (a Llama's BOS; none for
    /// moelab's): what a raw completion prompt starts with.
    pub fn text_prefix(&self) -> Vec<u32> {
        let with = self
            .inner
            .encode_fast("a", true)
            .map(|e| e.get_ids().to_vec());
        let without = self.encode("a");
        match with {
            Ok(w) => {
                let at = (0..=w.len().saturating_sub(without.len()))
                    .find(|&i| w[i..].starts_with(&without))
                    .unwrap_or(0);
                w[..at].to_vec()
            }
            Err(_) => vec![],
        }
    }

    /// The bytes of token `id`'s text (a byte-level token can be part of a UTF-8 character,
    /// which [`Tokenizer::decode`] would show as U+FFFD); empty for control tokens.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if self.is_control(id) {
            return vec![];
        }
        let Some(s) = self.inner.id_to_token(id) else {
            return vec![];
        };
        if self.sentencepiece {
            // a byte-fallback token is its byte; otherwise the piece's UTF-8 with `▁` a space
            let hex = s
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .filter(|h| h.len() == 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            return match hex {
                Some(b) => vec![b],
                None => s.replace('\u{2581}', " ").into_bytes(),
            };
        }
        let map = byte_level_inverse();
        let bytes: Option<Vec<u8>> = s.chars().map(|c| map.get(&c).copied()).collect();
        bytes.unwrap_or_else(|| self.decode(&[id]).into_bytes())
    }

    /// The token string of `id` as the vocabulary spells it (byte-level symbols undecoded).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Whether a decoder undoes SentencePiece's spelling (a metaspace or byte-fallback step).
fn spells_sentencepiece(d: Option<&tokenizers::DecoderWrapper>) -> bool {
    use tokenizers::DecoderWrapper as D;
    match d {
        Some(D::Metaspace(_) | D::ByteFallback(_)) => true,
        Some(D::Sequence(s)) => s
            .get_decoders()
            .iter()
            .any(|d| spells_sentencepiece(Some(d))),
        _ => false,
    }
}

/// GPT-2's byte-to-character table inverted: byte-level BPE spells byte b as one printable
/// character (itself for printable ASCII and Latin-1, 256 + n for the others).
fn byte_level_inverse() -> &'static std::collections::HashMap<char, u8> {
    static MAP: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let mut m = std::collections::HashMap::new();
        let mut n = 0u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if printable {
                b as u32
            } else {
                n += 1;
                255 + n
            };
            m.insert(char::from_u32(c).expect("valid char"), b);
        }
        m
    })
}

/// Text of generated ids as they come, one id at a time, equal to decoding them all at once
/// (as text-generation-inference streams): each id's text is the decoding of a short window
/// of recent ids beyond the decoding of the window without it. Decoders that depend on
/// what precedes a token (SentencePiece's leading-space strip) see the ids before it, bytes
/// of a character split across ids wait for the rest, and the cost per id does not grow
/// with the text (decoding everything per token is quadratic in its length).
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the window: the ids before it are emitted and no longer decoded.
    prefix: usize,
    /// Ids before this one are emitted; those from it on wait.
    read: usize,
}

/// A UTF-8 character is at most 4 bytes and every token at least one: ids still incomplete
/// after this many are invalid text, emitted as they decode (with replacement characters).
const MAX_WAITING: usize = 4;

impl TextStream {
    pub fn new() -> TextStream {
        TextStream::default()
    }

    /// The new text after `id` (empty while it ends mid-character).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let waiting = self.ids.len() - self.read;
        let all = tok.decode(&self.ids[self.prefix..]);
        let split = all.ends_with('\u{FFFD}');
        if split && waiting < MAX_WAITING {
            return String::new();
        }
        match self.beyond_seen(tok, &all) {
            // invalid bytes, emitted as they decode; what follows decodes afresh (bytes that
            // complete a character later would not match what was emitted)
            Some(new) if split => {
                *self = TextStream::default();
                new
            }
            Some(new) if !new.is_empty() || waiting >= MAX_WAITING => {
                // the emitted ids stay as context for the next window, the ones before go
                self.ids.drain(..self.prefix);
                self.read -= self.prefix;
                self.prefix = self.read;
                self.read = self.ids.len();
                new
            }
            // nothing new yet (ids that decode to nothing alone, say)
            Some(_) => String::new(),
            // the decoder rewrote text already emitted: the waiting ids' own text, then afresh
            None => {
                let new = tok.decode(&self.ids[self.read..]);
                *self = TextStream::default();
                new
            }
        }
    }

    /// `all` (the window's text) beyond the text of the ids already emitted, if it extends it.
    fn beyond_seen(&self, tok: &Tokenizer, all: &str) -> Option<String> {
        let seen = tok.decode(&self.ids[self.prefix..self.read]);
        all.strip_prefix(seen.as_str()).map(str::to_string)
    }

    /// What is still waiting, decoded as it is (the text has ended).
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        let all = tok.decode(&self.ids[self.prefix..]);
        let rest = self
            .beyond_seen(tok, &all)
            .unwrap_or_else(|| tok.decode(&self.ids[self.read..]));
        *self = TextStream::default();
        rest
    }
}
