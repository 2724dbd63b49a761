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

use crate::template::JinjaTemplate;
use data::chat::ChatIds;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tokenizer::Tokenizer;

/// File in a run dir holding an imported model's chat format ([`ChatSpec`]); a run without
/// it chats in moelab's format.
pub const CHAT_FILE: &str = "chat.json";

/// An imported model's chat format, as `chat.json` stores it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChatSpec {
    /// The Jinja chat template (Hugging Face's `chat_template`).
    pub template: String,
    #[serde(default)]
    pub bos_token: String,
    #[serde(default)]
    pub eos_token: String,
    /// Token strings that end the assistant's reply (e.g. `<|im_end|>`, `<|endoftext|>`).
    pub stop: Vec<String>,
    /// The reasoning block's markers, when the model writes one (`["<think>", "</think>"]`);
    /// each must be one token of the vocabulary.
    #[serde(default)]
    pub think: Option<[String; 2]>,
    /// Token strings put before a raw completion prompt (e.g. the BOS token of a Llama).
    #[serde(default)]
    pub prefix: Vec<String>,
}

enum Template {
    Moelab,
    Jinja(Box<JinjaTemplate>),
}

/// How a model chats: its tokenizer, template, stop tokens and reasoning markers. Moelab's
/// own format for the models it trains; an imported model's Jinja template otherwise.
pub struct ChatFormat {
    pub tok: Arc<Tokenizer>,
    template: Template,
    stops: Vec<u32>,
    think: Option<(u32, u32)>,
    prefix: Vec<u32>,
}

impl ChatFormat {
    /// Moelab's format; the tokenizer must have its chat tokens.
    pub fn moelab(tok: Arc<Tokenizer>) -> Result<ChatFormat, String> {
        if !tok.is_moelab() {
            return Err("the tokenizer has no moelab chat tokens and the run has no chat.json (an imported model's chat template)".into());
        }
        let c = ChatIds::of(&tok);
        Ok(ChatFormat {
            stops: stop_tokens(&tok),
            think: Some((c.think, c.end_think)),
            // documents are separated by <|end|> in training data, so it also marks a start
            prefix: vec![c.end],
            template: Template::Moelab,
            tok,
        })
    }

    /// An imported model's format; every token string it names must be one token.
    pub fn from_spec(tok: Arc<Tokenizer>, spec: &ChatSpec) -> Result<ChatFormat, String> {
        let id = |s: &str| {
            tok.special(s)
                .or_else(|| match tok.encode(s)[..] {
                    [one] => Some(one),
                    _ => None,
                })
                .ok_or_else(|| format!("chat.json: {s:?} is not one token of the vocabulary"))
        };
        let stops = spec
            .stop
            .iter()
            .map(|s| id(s))
            .collect::<Result<Vec<_>, _>>()?;
        if stops.is_empty() {
            return Err("chat.json: `stop` names no token; a reply would never end".into());
        }
        let think = match &spec.think {
            Some([a, b]) => Some((id(a)?, id(b)?)),
            None => None,
        };
        let prefix = spec
            .prefix
            .iter()
            .map(|s| id(s))
            .collect::<Result<Vec<_>, _>>()?;
        let t = JinjaTemplate::new(&spec.template, &spec.bos_token, &spec.eos_token)?;
        let f = ChatFormat {
            tok,
            template: Template::Jinja(Box::new(t)),
            stops,
            think,
            prefix,
        };
        // message text reaches the template as a placeholder, so whether a lone user turn
        // renders does not depend on its text: checked once here (task prompts rely on it)
        f.render(&[Message::new(Role::User, "?")])
            .map_err(|e| format!("chat template cannot render a user message: {e}"))?;
        Ok(f)
    }

    /// The format of the run in `run_dir`: its `chat.json`, or moelab's.
    pub fn load(run_dir: &Path, tok: Arc<Tokenizer>) -> Result<ChatFormat, String> {
        let p = run_dir.join(CHAT_FILE);
        if !p.exists() {
            return ChatFormat::moelab(tok);
        }
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let spec: ChatSpec = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a chat spec ({e})", p.display()))?;
        ChatFormat::from_spec(tok, &spec).map_err(|e| format!("{}: {e}", p.display()))
    }

    /// Whether this is moelab's own format.
    pub fn is_moelab(&self) -> bool {
        matches!(self.template, Template::Moelab)
    }

    /// Token ids of a conversation, ending where the assistant's reply starts. Message text
    /// is always text (a control-token string in it is never a control token); an error is
    /// the template's own (`raise_exception`, e.g. roles out of order).
    pub fn render(&self, messages: &[Message]) -> Result<Vec<u32>, String> {
        match &self.template {
            Template::Moelab => Ok(render_prompt(&self.tok, messages)),
            Template::Jinja(t) => t.render(&self.tok, messages),
        }
    }

    /// Tokens that end a reply.
    pub fn stop_tokens(&self) -> Vec<u32> {
        self.stops.clone()
    }

    /// The reasoning block's opening and closing ids, when the format has one.
    pub fn think_ids(&self) -> Option<(u32, u32)> {
        self.think
    }

    /// Ids put before a raw completion prompt.
    pub fn prefix(&self) -> &[u32] {
        &self.prefix
    }

    /// A streaming parser for the reply to `prompt` (reasoning split off when the format has
    /// markers). A prompt that ends inside an open reasoning block (DeepSeek-R1's and QwQ's
    /// templates end the generation prompt with `<think>\n`) starts the reply in its
    /// reasoning: the model then writes only the closing marker.
    pub fn parser(&self, prompt: &[u32], stops: Vec<String>) -> ReplyParser {
        let mut p = ReplyParser::with_markers(self.tok.clone(), self.think, stops);
        if let Some((open, close)) = self.think {
            let last = prompt.iter().rev().find(|&&t| t == open || t == close);
            if last == Some(&open) {
                p.part = Part::Reasoning;
            }
        }
        p
    }

    /// A streaming parser for a raw completion (everything is the answer).
    pub fn plain_parser(&self, stops: Vec<String>) -> ReplyParser {
        ReplyParser {
            part: Part::Content,
            ..self.parser(&[], stops)
        }
    }
}

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
/// NOTE: each token's text comes from a [`tokenizer::TextStream`] (a short window of recent
/// ids decoded), never the whole reply again: decoding everything per token cost quadratic
/// time in the reply's length on the server's async workers (issue 11), and decoding each
/// id alone drops the spaces a SentencePiece decoder strips from a leading token.
#[derive(Default)]
struct Segment {
    /// Decoded text: complete UTF-8 up to the ids the stream holds back.
    text: String,
    stream: tokenizer::TextStream,
    /// Bytes of `text` already emitted.
    emitted: usize,
}

impl Segment {
    fn push(&mut self, tok: &Tokenizer, id: u32) {
        self.text += &self.stream.push(tok, id);
    }

    /// Decodes what is held back as it is (the segment has ended).
    fn flush(&mut self, tok: &Tokenizer) {
        self.text += &self.stream.finish(tok);
    }
}

/// Streams one assistant reply: feed generated ids with [`ReplyParser::push`], then call
/// [`ReplyParser::finish`] for the text held back.
pub struct ReplyParser {
    tok: Arc<Tokenizer>,
    /// `<think>` and `</think>` ids, when the format has a reasoning block.
    think: Option<(u32, u32)>,
    part: Part,
    reasoning: Segment,
    content: Segment,
    stops: Vec<String>,
    stopped: bool,
    reasoning_tokens: usize,
}

impl ReplyParser {
    /// `stops`: strings that end the answer (not included in it), as OpenAI's `stop`.
    /// The reasoning markers are the tokenizer's `<think>` and `</think>` (moelab's).
    pub fn new(tok: Arc<Tokenizer>, stops: Vec<String>) -> ReplyParser {
        let think = tok.special("<think>").zip(tok.special("</think>"));
        ReplyParser::with_markers(tok, think, stops)
    }

    /// A parser whose reasoning block opens and closes with the ids in `think`.
    pub fn with_markers(
        tok: Arc<Tokenizer>,
        think: Option<(u32, u32)>,
        stops: Vec<String>,
    ) -> ReplyParser {
        ReplyParser {
            tok,
            think,
            part: Part::Start,
            reasoning: Segment::default(),
            content: Segment::default(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            stopped: false,
            reasoning_tokens: 0,
        }
    }

    /// Whether token `id`, just pushed, was text of the answer (not a reasoning token, a
    /// reasoning marker or a control token): what a chat reply's log-probabilities cover.
    pub fn was_answer(&self, id: u32) -> bool {
        self.part == Part::Content
            && !self.tok.is_control(id)
            && self.think.is_none_or(|(a, b)| id != a && id != b)
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
        let (think, end_think) = match self.think {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        if self.part == Part::Reasoning || (self.part == Part::Start && Some(id) == think) {
            self.reasoning_tokens += 1;
        }
        match (self.part, id) {
            (Part::Start, t) if Some(t) == think => self.part = Part::Reasoning,
            (Part::Start | Part::Reasoning, t) if Some(t) == end_think => {
                d.reasoning = self.flush_reasoning();
                self.part = Part::Content;
            }
            // other control tokens (stop tokens, stray markers) carry no text
            (_, t) if self.tok.is_control(t) => {}
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
