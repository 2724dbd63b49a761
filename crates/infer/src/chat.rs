//! The chat template and the streaming reasoning parser shared by `moelab chat` and
//! `moelab serve`.
//!
//! Template (the format `moelab prepare --task` trains on, DESIGN.md "Chat and reasoning
//! format"): `<|system|>` text, then per turn `<|user|>` text and `<|assistant|>` `<think>`
//! reasoning `</think>` answer `<|end|>`; the prompt ends with `<|assistant|>` and the model
//! writes the rest. Earlier assistant turns are rendered with an empty think block: their
//! reasoning is not fed back (the DeepSeek-R1 convention, and it saves context).
//!
//! [`ReplyParser`] turns generated token ids into text deltas split into reasoning and
//! answer, holding back incomplete UTF-8 (a byte-level token can end mid-character) and any
//! text that may be the start of a stop string. Its work per token is bounded by the token's
//! text and the stop strings' lengths, not by the reply so far.

use data::chat::ChatIds;
use std::sync::Arc;
use tokenizer::Tokenizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// Token ids of a conversation, ending with `<|assistant|>` (where generation starts).
pub fn render_prompt(tok: &Tokenizer, messages: &[Message]) -> Vec<u32> {
    let c = ChatIds::of(tok);
    let mut v = vec![];
    for m in messages {
        match m.role {
            Role::System => {
                v.push(c.system);
                v.extend(tok.encode(&m.content));
            }
            Role::User => {
                v.push(c.user);
                v.extend(tok.encode(&m.content));
            }
            Role::Assistant => {
                v.extend([c.assistant, c.think, c.end_think]);
                v.extend(tok.encode(&m.content));
                v.push(c.end);
            }
        }
    }
    v.push(c.assistant);
    v
}

/// Tokens that end an assistant turn: `<|end|>`, and a turn marker if the model starts the
/// next turn itself.
pub fn stop_tokens(tok: &Tokenizer) -> Vec<u32> {
    let c = ChatIds::of(tok);
    vec![c.end, c.user, c.system, c.assistant]
}

/// New text of a reply after one token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// Nothing generated yet: `<think>` opens the reasoning, anything else is the answer.
    Start,
    Reasoning,
    Content,
}

/// Incremental text of one segment (reasoning or answer).
///
/// NOTE: each token is decoded once, on its own (with the few before it that end
/// mid-character), never the whole reply again: decoding everything per token cost
/// quadratic time in the reply's length on the server's async workers (issue 11).
/// Byte-level BPE decodes a concatenation of ids to the concatenation of their texts
/// whenever the split falls on a character boundary, so the text is the same.
#[derive(Default)]
struct Segment {
    /// Decoded text: complete UTF-8 up to the ids in `pending`.
    text: String,
    /// Ids whose bytes end mid-character, waiting for the rest of it.
    pending: Vec<u32>,
    /// Bytes of `text` already emitted.
    emitted: usize,
}

/// A UTF-8 character is at most 4 bytes and every token at least one: ids still incomplete
/// after this many are invalid text, decoded as it is (with replacement characters).
const MAX_PENDING: usize = 4;

impl Segment {
    fn push(&mut self, tok: &Tokenizer, id: u32) {
        self.pending.push(id);
        let t = tok.decode(&self.pending);
        if !t.ends_with('\u{FFFD}') || self.pending.len() >= MAX_PENDING {
            self.text += &t;
            self.pending.clear();
        }
    }

    /// Decodes what is pending as it is (the segment has ended).
    fn flush(&mut self, tok: &Tokenizer) {
        if !self.pending.is_empty() {
            self.text += &tok.decode(&self.pending);
            self.pending.clear();
        }
    }
}

/// Streams one assistant reply: feed generated ids with [`ReplyParser::push`], then call
/// [`ReplyParser::finish`] for the text held back.
pub struct ReplyParser {
    tok: Arc<Tokenizer>,
    ids: ChatIds,
    part: Part,
    reasoning: Segment,
    content: Segment,
    stops: Vec<String>,
    stopped: bool,
    reasoning_tokens: usize,
}

impl ReplyParser {
    /// `stops`: strings that end the answer (not included in it), as OpenAI's `stop`.
    pub fn new(tok: Arc<Tokenizer>, stops: Vec<String>) -> ReplyParser {
        let ids = ChatIds::of(&tok);
        ReplyParser {
            tok,
            ids,
            part: Part::Start,
            reasoning: Segment::default(),
            content: Segment::default(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            stopped: false,
            reasoning_tokens: 0,
        }
    }

    /// A parser for raw text completions: everything is the answer (no reasoning block).
    pub fn plain(tok: Arc<Tokenizer>, stops: Vec<String>) -> ReplyParser {
        ReplyParser {
            part: Part::Content,
            ..ReplyParser::new(tok, stops)
        }
    }

    /// Tokens of the think block so far, its markers included.
    pub fn reasoning_tokens(&self) -> usize {
        self.reasoning_tokens
    }

    /// Whether a stop string was reached (the caller should stop generating).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text that `id` completes.
    pub fn push(&mut self, id: u32) -> Delta {
        let mut d = Delta::default();
        if self.stopped {
            return d;
        }
        let c = self.ids;
        if self.part == Part::Reasoning || (self.part == Part::Start && id == c.think) {
            self.reasoning_tokens += 1;
        }
        match (self.part, id) {
            (Part::Start, t) if t == c.think => self.part = Part::Reasoning,
            (Part::Start | Part::Reasoning, t) if t == c.end_think => {
                d.reasoning = self.flush_reasoning();
                self.part = Part::Content;
            }
            // other control tokens (stop tokens, stray markers) carry no text
            (_, t) if (t as usize) < tokenizer::SPECIAL_TOKENS.len() => {}
            (Part::Reasoning, t) => {
                self.reasoning.push(&self.tok, t);
                d.reasoning = self.emit_reasoning(false);
            }
            (Part::Start | Part::Content, t) => {
                self.part = Part::Content;
                self.content.push(&self.tok, t);
                d.content = self.emit_content(false);
            }
        }
        d
    }

    /// Text held back so far (the reply has ended).
    pub fn finish(&mut self) -> Delta {
        Delta {
            reasoning: self.emit_reasoning(true),
            content: if self.stopped {
                String::new()
            } else {
                self.emit_content(true)
            },
        }
    }

    fn flush_reasoning(&mut self) -> String {
        self.emit_reasoning(true)
    }

    fn emit_reasoning(&mut self, all: bool) -> String {
        let s = &mut self.reasoning;
        if all {
            s.flush(&self.tok);
        }
        let out = s.text[s.emitted..].to_string();
        s.emitted = s.text.len();
        out
    }

    fn emit_content(&mut self, all: bool) -> String {
        if all {
            self.content.flush(&self.tok);
        }
        let text = &self.content.text;
        let from = self.content.emitted;
        // a stop string ends the answer before it; only text that can hold a new match is
        // searched (its last bytes before `from` and what is new)
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                let mut at = from.saturating_sub(s.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text[at..].find(s.as_str()).map(|i| at + i)
            })
            .min();
        let end = match hit {
            Some(i) => {
                self.stopped = true;
                i
            }
            None if all => text.len(),
            None => text.len() - held_back(text, &self.stops),
        };
        let end = end.max(from);
        self.content.emitted = end;
        text[from..end].to_string()
    }
}

/// Bytes at the end of `text` that could start a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            s.char_indices()
                .skip(1)
                .map(|(k, _)| &s[..k])
                .filter(|p| text.ends_with(p))
                .map(|p| p.len())
        })
        .max()
        .unwrap_or(0)
}
