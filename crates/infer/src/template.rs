//! A model's own chat template (the Jinja `chat_template` of a Hugging Face or GGUF model),
//! rendered with `minijinja` (and its Python-compatible string methods), and tokenized so
//! that message text can never become a control token.
//!
//! Transformers renders the template with the messages and then tokenizes the whole string,
//! special tokens included, so a user who types `<|im_start|>system` forges a turn. Here the
//! template is rendered with each message's content replaced by a sentinel; control tokens
//! are recognised only in the template's own text, and the string between two control
//! tokens (template text and message text together, so byte-pair merges across their
//! boundary are the ones transformers makes) is encoded as text. For a message without
//! control-token strings the ids equal transformers' `apply_chat_template(tokenize=True)`.
//!
//! NOTE: a template that transforms the content (`content | trim`, `.strip()`) sees the
//! sentinel, so the message is inserted untransformed: ids can differ from transformers' for
//! content with leading or trailing whitespace. Accepted: the alternative, rendering the raw
//! content, loses track of what is message text.

use crate::chat::{Message, Role};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;
use tokenizer::Tokenizer;

/// Private-use code points around a message index: they cannot come from a message (every
/// message is replaced by its sentinel before rendering), and templates do not emit them.
const OPEN: char = '\u{F8F0}';
const CLOSE: char = '\u{F8F1}';

/// A compiled chat template with the token strings it refers to.
pub struct JinjaTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The model has no chat template (a base model): only raw completions.
    empty: bool,
}

#[derive(Serialize)]
struct Msg {
    role: &'static str,
    content: String,
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

impl JinjaTemplate {
    /// Compiles `source`; an error names what does not parse.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<JinjaTemplate, String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.set_trim_blocks(false);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("chat template does not parse: {e}"))?;
        Ok(JinjaTemplate {
            env,
            bos: bos.into(),
            eos: eos.into(),
            empty: source.trim().is_empty(),
        })
    }

    /// The template's text for `messages` with message i's content as a sentinel.
    fn render_sentinels(&self, messages: &[Message]) -> Result<String, String> {
        if self.empty {
            return Err(
                "this model has no chat template (a base model): use raw completions".into(),
            );
        }
        let msgs: Vec<Msg> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Msg {
                role: role_name(m.role),
                content: format!("{OPEN}{i}{CLOSE}"),
            })
            .collect();
        let t = self.env.get_template("chat").expect("added in new");
        t.render(minijinja::context! {
            messages => msgs,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| {
            let mut s = format!("chat template: {e}");
            if let Some(d) = e.detail() {
                s = format!("{s} ({d})");
            }
            s
        })
    }

    /// The rendered conversation as text (message contents in place), for display.
    pub fn render_text(&self, messages: &[Message]) -> Result<String, String> {
        Ok(pieces(&self.render_sentinels(messages)?, messages)
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }

    /// Token ids of the conversation up to where the assistant's reply starts.
    pub fn render(&self, tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>, String> {
        let rendered = self.render_sentinels(messages)?;
        let controls = tok.control_tokens();
        // (text, from the template?) runs; control tokens are searched in template runs only
        let mut ids = vec![];
        let mut text = String::new();
        for (piece, template) in pieces(&rendered, messages) {
            if !template {
                text += &piece;
                continue;
            }
            let mut rest = piece.as_str();
            while !rest.is_empty() {
                let hit = controls
                    .iter()
                    .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                    // earliest match; at one position the longest (the list is longest first)
                    .min_by_key(|&(at, ..)| at);
                match hit {
                    Some((at, len, id)) => {
                        text += &rest[..at];
                        if !text.is_empty() {
                            ids.extend(tok.encode(&text));
                            text.clear();
                        }
                        ids.push(id);
                        rest = &rest[at + len..];
                    }
                    None => {
                        text += rest;
                        rest = "";
                    }
                }
            }
        }
        if !text.is_empty() {
            ids.extend(tok.encode(&text));
        }
        Ok(ids)
    }
}

/// `rendered` cut into (text, is template text) runs with each sentinel replaced by its
/// message's content.
fn pieces(rendered: &str, messages: &[Message]) -> Vec<(String, bool)> {
    let mut out = vec![];
    let mut rest = rendered;
    while let Some(open) = rest.find(OPEN) {
        let after = &rest[open + OPEN.len_utf8()..];
        let idx = after.find(CLOSE).and_then(|close| {
            after[..close]
                .parse::<usize>()
                .ok()
                .filter(|&i| i < messages.len())
                .map(|i| (i, close))
        });
        match idx {
            Some((i, close)) => {
                out.push((rest[..open].to_string(), true));
                out.push((messages[i].content.clone(), false));
                rest = &after[close + CLOSE.len_utf8()..];
            }
            None => {
                // not a sentinel of ours: template text
                out.push((rest[..open + OPEN.len_utf8()].to_string(), true));
                rest = after;
            }
        }
    }
    out.push((rest.to_string(), true));
    out
}
