//! The OpenAI-compatible routes: `POST /v1/chat/completions` and `POST /v1/completions`,
//! streamed (SSE `chat.completion.chunk` / `text_completion` events, then `data: [DONE]`) or
//! not. Reasoning goes in `reasoning_content` (the DeepSeek API convention), beside
//! `content`, in `message` and in stream `delta`s.
//!
//! Requests are parsed by hand from the body bytes so that every malformed input (bad JSON,
//! invalid UTF-8, wrong types, out-of-range values) gets a 400 in OpenAI's error shape that
//! names the field.

use crate::error::ApiError;
use crate::keys::{now, UsageRecord};
use crate::{AppState, Caller};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream::{self, Stream};
use infer::chat::{Delta, Message, ReplyParser, Role};
use infer::{Event, Finish, SamplingParams, Seq, TokenLogprobs};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Sampling and length fields common to both endpoints.
#[derive(Deserialize)]
struct Common {
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// Extension (vLLM and llama.cpp have it too): keep the k most likely tokens.
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    /// Return each content token's log-probability (`choices[].logprobs.content`).
    logprobs: Option<bool>,
    /// With `logprobs`: this many most likely alternatives per token (0-20).
    top_logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
    /// Token ids, fed as they are.
    Ids(Vec<u32>),
    ManyIds(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    /// The legacy shape: log-probabilities of each token and of this many alternatives (0-20).
    logprobs: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

/// Alternatives per token at most (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;

fn top_logprobs(n: i64, param: &'static str) -> Result<usize, ApiError> {
    if !(0..=MAX_TOP_LOGPROBS).contains(&n) {
        return Err(ApiError::invalid(format!(
            "{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"
        ))
        .param(param));
    }
    Ok(n as usize)
}

/// The error for a body that could not be read (413 when it is over the limit).
pub(crate) fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    let msg = if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        "request body too large".to_string()
    } else {
        format!("could not read the request body: {e}")
    };
    ApiError::new(status, "invalid_request_error", msg)
}

fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(body_error)?;
    if std::str::from_utf8(&body).is_err() {
        return Err(ApiError::invalid("the request body is not valid UTF-8"));
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(format!(
            "invalid request: {e} (the body must be a JSON object as in OpenAI's API)"
        ))
    })
}

/// A validated generation request.
struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Alternatives per token when log-probabilities are asked for.
    logprobs: Option<usize>,
}

/// Stop sequences per request at most (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// Bytes per stop sequence at most. NOTE: every generated token is checked against every stop
/// string, on the async workers: an uncapped length let a few requests slow the whole server
/// (issue 11). Stop strings are short markers in practice.
pub const MAX_STOP_BYTES: usize = 128;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl Common {
    /// Checks the fields and builds the job for `prompt` (the request's field `param`);
    /// `default_max` applies when the request gives no `max_tokens`.
    fn job(
        self,
        state: &AppState,
        (prompt, param): (Vec<u32>, &'static str),
        default_max: usize,
    ) -> Result<Job, ApiError> {
        let context = state.engine.config().max_seq_len;
        if prompt.len() >= context {
            return Err(ApiError::invalid(format!(
                "this model's maximum context length is {context} tokens; the prompt has {} tokens and at least one must be left for the reply",
                prompt.len()
            ))
            .code("context_length_exceeded")
            .param(param));
        }
        let left = context - prompt.len();
        let max = match self.max_completion_tokens.or(self.max_tokens) {
            None => default_max,
            Some(m) if m < 1 => {
                return Err(
                    ApiError::invalid(format!("max_tokens must be at least 1, got {m}"))
                        .param("max_tokens"),
                )
            }
            Some(m) => (m as u64).min(usize::MAX as u64) as usize,
        };
        let max_tokens = max.min(state.cfg.max_tokens_cap).min(left);
        let temperature = self
            .temperature
            .unwrap_or(state.cfg.default_temperature as f64);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(format!(
                "temperature must be between 0 and 2, got {temperature}"
            ))
            .param("temperature"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(
                ApiError::invalid(format!("top_p must be in (0, 1], got {top_p}")).param("top_p"),
            );
        }
        let top_k = self.top_k.unwrap_or(0);
        if top_k < 0 {
            return Err(
                ApiError::invalid(format!("top_k must be >= 0, got {top_k}")).param("top_k"),
            );
        }
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(format!("only n = 1 is supported, got {n}")).param("n"));
        }
        let stops = match self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(format!(
                "stop has {} sequences; at most {MAX_STOPS} are allowed",
                stops.len()
            ))
            .param("stop"));
        }
        if let Some((i, s)) = stops
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > MAX_STOP_BYTES)
        {
            return Err(ApiError::invalid(format!(
                "stop[{i}] is {} bytes long; a stop sequence is at most {MAX_STOP_BYTES} bytes",
                s.len()
            ))
            .param("stop"));
        }
        // without a seed, each request samples differently
        let seed = self
            .seed
            .map(|s| s as u64)
            .unwrap_or_else(|| next_id() ^ (now() as u64).rotate_left(32));
        let stream = self.stream.unwrap_or(false);
        Ok(Job {
            prompt,
            params: SamplingParams {
                temperature: temperature as f32,
                top_k: top_k as usize,
                top_p: top_p as f32,
                seed,
            },
            max_tokens,
            stops,
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .unwrap_or_default()
                    .include_usage
                    .unwrap_or(false),
            logprobs: None,
        })
    }
}

fn to_messages(msgs: Vec<ChatMessage>) -> Result<Vec<Message>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::invalid("messages must not be empty").param("messages"));
    }
    msgs.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                r => {
                    return Err(ApiError::invalid(format!(
                        "messages[{i}].role {r:?} is not supported (system, developer, user, assistant)"
                    ))
                    .param("messages"))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(ps)) => {
                    let mut s = String::new();
                    for p in ps {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => s += &t,
                            (k, _) => {
                                return Err(ApiError::invalid(format!(
                                    "messages[{i}]: content part of type {k:?} is not supported (text only)"
                                ))
                                .param("messages"))
                            }
                        }
                    }
                    s
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// How the parser reads the generated tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completions",
            Kind::Completion => "completions",
        }
    }
}

/// The finish reason of a reply that ended by itself. (`Cancelled` reaches a reader only when
/// the server ends it, which [`Reader::next`] reports as a cut instead; a cancel the reader
/// asks for, after a stop string, ends its reading first.)
fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop | Finish::Cancelled => "stop",
        Finish::Length => "length",
    }
}

/// Why a reply ended before it was finished.
#[derive(Clone, Copy)]
enum Cut {
    /// The server's shutdown deadline passed.
    Shutdown,
    /// The engine dropped the request without reporting an end.
    Lost,
}

impl Cut {
    /// What the client gets instead of a finish reason.
    fn error(self) -> ApiError {
        match self {
            Cut::Shutdown => ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server shut down before the reply was finished; retry",
            )
            .code("server_shutdown"),
            Cut::Lost => ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the generation ended before the reply was finished; see the server log",
            ),
        }
    }
}

/// Queues `job` on the engine; its events arrive on the returned channel. The ledger and
/// token metrics are written from the engine's side when the request ends, whether the
/// client is still there or not.
fn submit(
    state: &Arc<AppState>,
    caller: &Caller,
    kind: Kind,
    job: &Job,
) -> Result<(UnboundedReceiver<Event>, Arc<AtomicBool>), ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // set by the reader when a stop string ends the reply: the engine then sees the closed
    // channel as a cancel, but the ledger records what the client was told ("stop")
    let stopped = Arc::new(AtomicBool::new(false));
    let by_stop = stopped.clone();
    // a client that disconnects drops the receiver: its request leaves the queue, or stops
    // its prefill, at the engine's next step
    let watch = tx.clone();
    let alive: infer::Alive = Box::new(move || !watch.is_closed());
    let prompt_tokens = job.prompt.len();
    let (ledger, metrics, key_id) = (state.ledger(), state.metrics.clone(), caller.key_id);
    let start = Instant::now();
    let mut generated = 0usize;
    let sink = Box::new(move |ev: Event| {
        match ev {
            Event::Logprobs(_) => {}
            Event::Token(_) => {
                if generated == 0 {
                    metrics.first_token(start.elapsed().as_secs_f64());
                }
                generated += 1;
            }
            Event::Done(f) => {
                metrics.tokens(prompt_tokens, generated);
                metrics.latency(start.elapsed().as_secs_f64());
                let _ = ledger.as_ref().map(|l| {
                    l.send(UsageRecord {
                        key_id,
                        ts: now(),
                        endpoint: kind.endpoint(),
                        prompt_tokens,
                        completion_tokens: generated,
                        finish: match f {
                            Finish::Stop => "stop",
                            Finish::Length => "length",
                            Finish::Cancelled if by_stop.load(Ordering::Relaxed) => "stop",
                            Finish::Cancelled => "cancelled",
                        },
                    })
                });
            }
        }
        tx.send(ev).is_ok()
    });
    let seq = Seq {
        prompt: job.prompt.clone(),
        params: job.params,
        max_tokens: job.max_tokens,
        stop: state.chat.stop_tokens(),
        logprobs: job.logprobs,
    };
    state
        .engine
        .submit_watched(seq, sink, Some(alive))
        .map_err(|e| match e {
            infer::SubmitError::QueueFull(_) => ApiError::rate_limited(
                format!("the server is busy ({e}); retry shortly"),
                "queue_full",
            ),
            infer::SubmitError::TooLong { .. } => {
                ApiError::invalid(e.to_string()).code("context_length_exceeded")
            }
            infer::SubmitError::Empty => ApiError::invalid(e.to_string()).param(match kind {
                Kind::Chat => "messages",
                Kind::Completion => "prompt",
            }),
            infer::SubmitError::Stopped => ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            )
            .code("server_shutdown"),
        })?;
    Ok((rx, stopped))
}

/// A running generation read through the reply parser.
struct Reader {
    rx: UnboundedReceiver<Event>,
    /// Set when a stop string ends the reply (see [`submit`]).
    stopped: Arc<AtomicBool>,
    parser: ReplyParser,
    tok: Arc<Tokenizer>,
    completion_tokens: usize,
    finish: Option<&'static str>,
    /// Set when the request ended before it finished, and why.
    cut: Option<Cut>,
    /// Log-probabilities of text tokens not yet returned with a chunk, each with where the
    /// token starts in the reply text (legacy `text_offset`).
    logprobs: Vec<(TokenLogprobs, usize)>,
    /// Characters of reply text let out so far. `text_offset`s come from the text as the parser
    /// decodes it, so they index into the `text` the client gets.
    text_chars: usize,
    /// The log-probability of the token reported next (kept when that token is answer text).
    pending: Option<TokenLogprobs>,
}

impl Reader {
    fn new(
        rx: UnboundedReceiver<Event>,
        stopped: Arc<AtomicBool>,
        parser: ReplyParser,
        tok: Arc<Tokenizer>,
    ) -> Reader {
        Reader {
            rx,
            stopped,
            parser,
            tok,
            completion_tokens: 0,
            finish: None,
            cut: None,
            text_chars: 0,
            logprobs: vec![],
            pending: None,
        }
    }

    /// The log-probabilities gathered since the last call, in `kind`'s shape (null when the
    /// request asked for none).
    fn take_logprobs(&mut self, kind: Kind, asked: bool) -> Value {
        if !asked {
            return Value::Null;
        }
        let (entries, offsets): (Vec<TokenLogprobs>, Vec<usize>) =
            std::mem::take(&mut self.logprobs).into_iter().unzip();
        let tok = &self.tok;
        let text = |id: u32| String::from_utf8_lossy(&tok.token_bytes(id)).into_owned();
        match kind {
            Kind::Chat => {
                let one = |id: u32, lp: f32| json!({"token": text(id), "logprob": lp, "bytes": tok.token_bytes(id)});
                let content: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let mut v = one(e.id, e.logprob);
                        v["top_logprobs"] =
                            Value::Array(e.top.iter().map(|&(i, l)| one(i, l)).collect());
                        v
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Completion => {
                json!({
                    "tokens": entries.iter().map(|e| text(e.id)).collect::<Vec<_>>(),
                    "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                    "top_logprobs": entries.iter().map(|e| {
                        Value::Object(e.top.iter().map(|&(i, l)| (text(i), json!(l))).collect())
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    /// The next piece of text, or None once the reply has ended (then `finish` is set).
    async fn next(&mut self) -> Option<Delta> {
        while self.finish.is_none() {
            let ev = self.rx.recv().await;
            match ev {
                Some(Event::Logprobs(lp)) => {
                    if !self.parser.stopped() {
                        self.pending = Some(*lp);
                    }
                }
                Some(Event::Token(t)) => {
                    self.completion_tokens += 1;
                    let before = self.text_chars;
                    let d = self.parser.push(t);
                    self.text_chars += d.content.chars().count();
                    // only answer text has log-probabilities (the entries' texts join up to
                    // the content): not control tokens, reasoning markers or reasoning
                    if let Some(lp) = self.pending.take() {
                        if lp.id == t && self.parser.was_answer(t) {
                            // a token that is whole characters ends the text it let out (after
                            // a U+FFFD for bytes before it that it showed invalid); one with
                            // part of a character starts where that character will be
                            let own = std::str::from_utf8(&self.tok.token_bytes(t))
                                .map_or(0, |s| s.chars().count());
                            let at = before.max(self.text_chars.saturating_sub(own));
                            self.logprobs.push((lp, at));
                        }
                    }
                    if self.parser.stopped() {
                        // dropping the receiver cancels the request at the next step
                        self.stopped.store(true, Ordering::Relaxed);
                        self.rx.close();
                        self.finish = Some("stop");
                    }
                    if !d.is_empty() {
                        return Some(d);
                    }
                }
                // a cancel the reader did not ask for (it asks by closing the channel, after
                // a stop string): the server shut down before the reply was finished
                Some(Event::Done(Finish::Cancelled)) => {
                    self.cut = Some(Cut::Shutdown);
                    self.finish = Some("stop");
                }
                // the engine dropped the request without a word (its thread died)
                None => {
                    self.cut = Some(Cut::Lost);
                    self.finish = Some("stop");
                }
                Some(Event::Done(f)) => self.finish = Some(finish_reason(f)),
            }
        }
        let d = self.parser.finish();
        (!d.is_empty()).then_some(d)
    }

    fn usage(&self, prompt_tokens: usize) -> Value {
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt_tokens + self.completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": self.parser.reasoning_tokens()},
        })
    }
}

/// What a prompt's text may be before it is encoded.
#[derive(Clone, Copy)]
struct Fits {
    context: usize,
    max_token_bytes: usize,
}

impl Fits {
    fn of(state: &AppState) -> Fits {
        Fits {
            context: state.engine.config().max_seq_len,
            max_token_bytes: state.max_token_bytes,
        }
    }

    /// Refuses `bytes` of prompt text that are more tokens than the context however they
    /// encode. NOTE: a body of `--max-body` bytes is far over any context; encoding it only to
    /// count its tokens cost seconds of CPU per request (issue 11).
    fn check(self, bytes: usize, param: &'static str) -> Result<(), ApiError> {
        let at_least = bytes / self.max_token_bytes;
        if at_least >= self.context {
            return Err(ApiError::invalid(format!(
                "this model's maximum context length is {} tokens; the prompt has at least {at_least} tokens and at least one must be left for the reply",
                self.context
            ))
            .code("context_length_exceeded")
            .param(param));
        }
        Ok(())
    }
}

/// Runs `f` on tokio's blocking pool.
///
/// NOTE: parsing a body of up to `--max-body` bytes and tokenizing its prompt take up to a
/// second of CPU; on the async workers (two) that would stall every other connection,
/// `/health` included (issue 11).
async fn off_the_workers<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("reading the request", e))?
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (chat, fits) = (state.chat.clone(), Fits::of(&state));
    let (common, prompt, logprobs) = off_the_workers(move || {
        let req: ChatRequest = parse(body)?;
        let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
            (true, n) => Some(top_logprobs(n.unwrap_or(0), "top_logprobs")?),
            (false, Some(_)) => {
                return Err(
                    ApiError::invalid("top_logprobs needs logprobs: true").param("top_logprobs")
                )
            }
            (false, None) => None,
        };
        let messages = to_messages(req.messages)?;
        // NOTE: every message renders to at least one token; 60,000 empty ones fit in a 1 MiB
        // body and cost seconds of template rendering and encoding before the context check
        if messages.len() >= fits.context {
            return Err(ApiError::invalid(format!(
                "{} messages: more than this model's context of {} tokens can hold",
                messages.len(),
                fits.context
            ))
            .code("context_length_exceeded")
            .param("messages"));
        }
        fits.check(messages.iter().map(|m| m.content.len()).sum(), "messages")?;
        let prompt = chat
            .render(&messages)
            .map_err(|e| ApiError::invalid(e).param("messages"))?;
        Ok((req.common, prompt, logprobs))
    })
    .await?;
    let mut job = common.job(&state, (prompt, "messages"), usize::MAX)?;
    job.logprobs = logprobs;
    let parser = state.chat.parser(&job.prompt, job.stops.clone());
    respond(state, caller, Kind::Chat, job, parser).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (chat, fits) = (state.chat.clone(), Fits::of(&state));
    let vocab = state.engine.config().vocab_size;
    let (common, prompt, logprobs) = off_the_workers(move || {
        let req: CompletionRequest = parse(body)?;
        let logprobs = req
            .logprobs
            .map(|n| top_logprobs(n, "logprobs"))
            .transpose()?;
        let one = || ApiError::invalid("only one prompt per request is supported").param("prompt");
        let text = match req.prompt {
            Prompt::One(s) => s,
            Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
            Prompt::Many(v) if v.is_empty() => {
                return Err(ApiError::invalid("prompt must not be empty").param("prompt"))
            }
            Prompt::Many(_) => return Err(one()),
            Prompt::Ids(ids) => return Ok((req.common, check_ids(ids, vocab)?, logprobs)),
            Prompt::ManyIds(mut v) if v.len() == 1 => {
                return Ok((req.common, check_ids(v.remove(0), vocab)?, logprobs))
            }
            Prompt::ManyIds(_) => return Err(one()),
        };
        fits.check(text.len(), "prompt")?;
        // the format's document start (moelab: <|end|>, a Llama: its BOS); the prompt itself
        // is text, whatever markers it spells
        let mut prompt = chat.prefix().to_vec();
        prompt.extend(chat.tok.encode(&text));
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                "prompt is empty: this model's prompts start with no special token, so a completion needs at least one character of text",
            )
            .param("prompt"));
        }
        Ok((req.common, prompt, logprobs))
    })
    .await?;
    // OpenAI's default for completions
    let mut job = common.job(&state, (prompt, "prompt"), 16)?;
    job.logprobs = logprobs;
    let parser = state.chat.plain_parser(job.stops.clone());
    respond(state, caller, Kind::Completion, job, parser).await
}

/// A prompt given as token ids: fed as they are (ids the client chose, control tokens
/// included), each below the vocabulary size.
fn check_ids(ids: Vec<u32>, vocab: usize) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt must not be empty").param("prompt"));
    }
    if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        return Err(ApiError::invalid(format!(
            "prompt[{i}] = {t} is not a token id (the vocabulary has {vocab})"
        ))
        .param("prompt"));
    }
    Ok(ids)
}

async fn respond(
    state: Arc<AppState>,
    caller: Caller,
    kind: Kind,
    job: Job,
    parser: ReplyParser,
) -> Result<Response, ApiError> {
    let (rx, stopped) = submit(&state, &caller, kind, &job)?;
    let reader = Reader::new(rx, stopped, parser, state.tok.clone());
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{:x}{:08x}", now(), next_id()),
        Kind::Completion => format!("cmpl-{:x}{:08x}", now(), next_id()),
    };
    let head = Head {
        id,
        created: now(),
        model: state.cfg.model_name.clone(),
        kind,
        prompt_tokens: job.prompt.len(),
        logprobs: job.logprobs.is_some(),
    };
    if job.stream {
        Ok(stream_response(head, reader, job.include_usage).into_response())
    } else {
        Ok(Json(whole_response(head, reader).await?).into_response())
    }
}

/// Fields every response and chunk of one request share.
struct Head {
    id: String,
    created: i64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
}

async fn whole_response(h: Head, mut r: Reader) -> Result<Value, ApiError> {
    let (mut reasoning, mut content) = (String::new(), String::new());
    while let Some(d) = r.next().await {
        reasoning += &d.reasoning;
        content += &d.content;
    }
    if let Some(cut) = r.cut {
        return Err(cut.error());
    }
    let logprobs = r.take_logprobs(h.kind, h.logprobs);
    let finish = r.finish.unwrap_or("stop");
    let usage = r.usage(h.prompt_tokens);
    Ok(match h.kind {
        Kind::Chat => json!({
            "id": h.id, "object": "chat.completion", "created": h.created, "model": h.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "reasoning_content": reasoning},
                "logprobs": logprobs,
                "finish_reason": finish,
            }],
            "usage": usage,
        }),
        Kind::Completion => json!({
            "id": h.id, "object": "text_completion", "created": h.created, "model": h.model,
            "choices": [{"index": 0, "text": content, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage,
        }),
    })
}

impl Head {
    fn chunk(&self, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }),
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                             "logprobs": logprobs, "finish_reason": finish}],
            }),
        }
    }

    fn usage_chunk(&self, usage: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [], "usage": usage})
    }
}

enum Phase {
    Start,
    Body,
    Usage,
    Done,
    End,
}

fn stream_response(
    h: Head,
    r: Reader,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let events = stream::unfold((h, r, Phase::Start), move |(h, mut r, phase)| async move {
        let (ev, phase) = match phase {
            Phase::Start => {
                let first = match h.kind {
                    Kind::Chat => h.chunk(
                        json!({"role": "assistant", "content": ""}),
                        Value::Null,
                        None,
                    ),
                    Kind::Completion => h.chunk(json!({"content": ""}), Value::Null, None),
                };
                (data(first), Phase::Body)
            }
            Phase::Body => match (r.next().await, r.cut) {
                (Some(d), _) => {
                    let mut delta = serde_json::Map::new();
                    if !d.reasoning.is_empty() {
                        delta.insert("reasoning_content".into(), json!(d.reasoning));
                    }
                    if !d.content.is_empty() {
                        delta.insert("content".into(), json!(d.content));
                    }
                    let lp = r.take_logprobs(h.kind, h.logprobs);
                    (data(h.chunk(Value::Object(delta), lp, None)), Phase::Body)
                }
                // no finish reason for a reply the shutdown cut: an error event (the
                // OpenAI SDKs raise it) and the end of the stream, without [DONE]
                (None, Some(cut)) => (data(cut.error().body()), Phase::End),
                (None, None) => {
                    let next = if include_usage {
                        Phase::Usage
                    } else {
                        Phase::Done
                    };
                    let lp = r.take_logprobs(h.kind, h.logprobs);
                    (data(h.chunk(json!({}), lp, r.finish)), next)
                }
            },
            Phase::Usage => (data(h.usage_chunk(r.usage(h.prompt_tokens))), Phase::Done),
            Phase::Done => (SseEvent::default().data("[DONE]"), Phase::End),
            Phase::End => return None,
        };
        Some((Ok(ev), (h, r, phase)))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
