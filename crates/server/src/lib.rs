//! moelab serving: an axum [`app`] with OpenAI-compatible routes (reasoning in
//! `reasoning_content`), API keys and a usage ledger in SQLite, request limits, Prometheus
//! metrics and a web chat page, over an [`infer::Engine`] that batches requests continuously.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`, `GET /` (the chat page). When any API key exists, `/v1`
//! routes require `Authorization: Bearer KEY`.
//!
//! What it is not: model logic (the engine owns it) or the command line (`moelab serve`).
//! References: OpenAI's API reference for the request/response/chunk shapes; DeepSeek's API
//! for `reasoning_content`; the axum examples for `app()` separate from `main`.

mod conn;
pub mod error;
pub mod keys;
mod ledger;
pub mod metrics;
mod openai;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
pub use error::ApiError;
use infer::chat::ChatFormat;
use infer::Engine;
use keys::{Auth, KeyStore, UsageRecord};
use metrics::Metrics;
pub use openai::MAX_STOP_BYTES;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokenizer::Tokenizer;

/// Server settings (`moelab serve` flags).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The id clients see in `/v1/models` and in responses.
    pub model_name: String,
    /// Request bodies larger than this are refused (413).
    pub max_body_bytes: usize,
    /// `max_tokens` is clamped to this (and to what the context leaves).
    pub max_tokens_cap: usize,
    /// Requests per minute per key (and for keyless access); 0 = unlimited. A key's own
    /// limit (`moelab keys create --rpm`) overrides it.
    pub rate_limit_rpm: u32,
    /// Temperature when a request gives none (0 = greedy: small reasoning models answer
    /// best greedily).
    pub default_temperature: f32,
    /// A connection must send a whole request head within this (also the idle time allowed
    /// between requests on a keep-alive connection); otherwise it is closed.
    pub header_timeout: Duration,
    /// A request body must arrive whole within this after its head; otherwise 408.
    pub body_timeout: Duration,
    /// A response write that waits this long (the client stopped reading) ends the connection.
    pub write_timeout: Duration,
    /// Open connections at most; more get an immediate 503 and are closed.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_name: "moelab".into(),
            max_body_bytes: 1 << 20,
            max_tokens_cap: 4096,
            rate_limit_rpm: 0,
            default_temperature: 0.0,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            // NOTE: not a flag: a client that reads nothing for a minute has gone
            write_timeout: Duration::from_secs(60),
            max_connections: 256,
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub engine: Engine,
    pub tok: Arc<Tokenizer>,
    /// The model's chat format (template, stop tokens, reasoning markers).
    pub chat: Arc<ChatFormat>,
    pub keys: Arc<KeyStore>,
    pub cfg: ServerConfig,
    pub metrics: Arc<Metrics>,
    /// [`Tokenizer::max_token_bytes`], for refusing prompts that cannot fit before encoding them.
    max_token_bytes: usize,
    /// Usage records go to a writer thread that commits them to the ledger (ledger.rs).
    ledger: Mutex<Option<mpsc::Sender<UsageRecord>>>,
    ledger_writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    limiter: Mutex<HashMap<Option<i64>, VecDeque<Instant>>>,
}

impl AppState {
    pub fn new(
        engine: Engine,
        chat: impl Into<Arc<ChatFormat>>,
        keys: KeyStore,
        cfg: ServerConfig,
    ) -> Arc<AppState> {
        let chat = chat.into();
        let tok = chat.tok.clone();
        let keys = Arc::new(keys);
        let (ledger, rx) = mpsc::channel::<UsageRecord>();
        let writer = {
            let keys = keys.clone();
            std::thread::Builder::new()
                .name("moelab-ledger".into())
                .spawn(move || ledger::write(&keys, rx))
                .expect("spawn the ledger thread")
        };
        Arc::new(AppState {
            engine,
            max_token_bytes: tok.max_token_bytes(),
            tok,
            chat,
            keys,
            cfg,
            metrics: Arc::new(Metrics::default()),
            ledger: Mutex::new(Some(ledger)),
            ledger_writer: Mutex::new(Some(writer)),
            limiter: Mutex::new(HashMap::new()),
        })
    }

    /// Lets running requests finish (with `abort`: ends them at the engine's next step), then
    /// commits the last ledger records.
    pub fn shutdown(&self, abort: bool) {
        if abort {
            self.engine.abort();
        } else {
            self.engine.shutdown();
        }
        // the engine has dropped every request's sender; with ours gone the writer drains
        // its queue and ends
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).take();
        let w = self
            .ledger_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = w {
            let _ = w.join();
        }
    }

    fn ledger(&self) -> Option<mpsc::Sender<UsageRecord>> {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Who is calling (set by the auth layer for `/v1` routes).
#[derive(Clone, Debug)]
pub struct Caller {
    pub key_id: Option<i64>,
    pub name: Option<String>,
}

/// The whole HTTP API.
pub fn app(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(openai::chat_completions))
        .route("/completions", post(openai::completions))
        .route("/models", get(models))
        .route("/models/{id}", get(model))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .nest("/v1", v1)
        .route("/", get(index))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// How long requests ended by the shutdown deadline get to write their last event.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting connections,
/// lets in-flight requests finish for up to `deadline`, and stops the engine. Connections are
/// bounded and timed out as `state.cfg` says (see conn.rs).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    deadline: Duration,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let limits = conn::Limits {
        header_timeout: state.cfg.header_timeout,
        write_timeout: state.cfg.write_timeout,
        max_connections: state.cfg.max_connections,
    };
    let server = conn::accept_loop(listener, app(state.clone()), limits, async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let expired = async move {
        if rx.await.is_ok() {
            tokio::time::sleep(deadline).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    // NOTE: past the deadline the requests still running are ended (their clients get the
    // end of their stream): only dropping the accept loop left the engine to finish every
    // queued and running generation before the process could exit
    tokio::pin!(server);
    let abort = tokio::select! {
        _ = &mut server => false,
        _ = expired => {
            eprintln!("shutdown deadline of {deadline:?} passed; ending the remaining requests");
            true
        }
    };
    let s = state.clone();
    let _ = tokio::task::spawn_blocking(move || s.shutdown(abort)).await;
    if abort {
        // the requests just ended get a moment to send their clients the error that says so
        let _ = tokio::time::timeout(CUT_GRACE, server).await;
    }
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = int => {},
        _ = term => {},
    }
}

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |m| m.as_str())
        .to_string();
    let resp = next.run(req).await;
    state.metrics.request(&route, resp.status().as_u16());
    resp
}

/// Reads the whole request body within `body_timeout` (the handlers then take it from
/// memory). A body that trickles in or never ends gets 408 and its connection is closed,
/// instead of holding the connection open for as long as the client likes (issue 11).
async fn read_body(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    // `Bytes` applies the DefaultBodyLimit layer's limit (413 past it)
    let req = Request::from_parts(parts.clone(), body);
    let limit = state.cfg.body_timeout;
    let bytes = match tokio::time::timeout(limit, Bytes::from_request(req, &())).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(openai::body_error(e)),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s",
                    limit.as_secs_f64()
                ),
            )
            .code("request_timeout"))
        }
    };
    Ok(next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await)
}

async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = req.headers().get(header::AUTHORIZATION);
    let key = match header {
        None => None,
        Some(h) => {
            let h = h.to_str().map_err(|_| {
                ApiError::unauthorized("the Authorization header is not valid text")
            })?;
            let key = h
                .strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
                .ok_or_else(|| {
                    ApiError::unauthorized("the Authorization header must be `Bearer YOUR_KEY`")
                })?;
            Some(key.trim().to_string())
        }
    };
    let keys = state.keys.clone();
    let k = key.clone();
    let auth = tokio::task::spawn_blocking(move || keys.authenticate(k.as_deref()))
        .await
        .map_err(|e| ApiError::internal("checking the API key", e))?
        .map_err(|e| ApiError::internal("checking the API key", e))?;
    let (caller, rpm) = match auth {
        Auth::Open => (
            Caller {
                key_id: None,
                name: None,
            },
            state.cfg.rate_limit_rpm,
        ),
        Auth::Key(k) => (
            Caller {
                key_id: Some(k.id),
                name: Some(k.name),
            },
            k.rpm.unwrap_or(state.cfg.rate_limit_rpm),
        ),
        Auth::Revoked => return Err(ApiError::unauthorized("this API key has been revoked")),
        Auth::Unknown if key.is_none() => {
            return Err(ApiError::unauthorized(
                "missing API key: send `Authorization: Bearer YOUR_KEY` (keys come from `moelab keys create`)",
            ))
        }
        Auth::Unknown => return Err(ApiError::unauthorized("incorrect API key")),
    };
    if rpm > 0 {
        check_rate(&state, &caller, rpm)?;
    }
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// Sliding one-minute window of request times per key.
fn check_rate(state: &AppState, caller: &Caller, rpm: u32) -> Result<(), ApiError> {
    let mut lim = state.limiter.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let window = lim.entry(caller.key_id).or_default();
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
    {
        window.pop_front();
    }
    if window.len() >= rpm as usize {
        let wait = wait_for_room(window, rpm as usize, now);
        return Err(ApiError::rate_limited(
            format!(
                "rate limit of {rpm} requests per minute reached for {}; retry in {wait} s",
                caller
                    .name
                    .as_deref()
                    .map_or("this server".to_string(), |n| format!("key {n:?}"))
            ),
            "rate_limit_exceeded",
        )
        .retry_after(wait));
    }
    window.push_back(now);
    Ok(())
}

/// Whole seconds until `window` (the request times of the last minute, oldest first, at least
/// `rpm` of them) holds fewer than `rpm`: when its `len - rpm`-th entry is a minute old. (Not
/// the oldest's: a key whose limit was lowered has more than `rpm` in its window.)
fn wait_for_room(window: &VecDeque<Instant>, rpm: usize, now: Instant) -> u64 {
    let t = window[window.len() - rpm];
    60u64.saturating_sub(now.duration_since(t).as_secs()).max(1)
}

fn model_object(state: &AppState) -> serde_json::Value {
    json!({"id": state.cfg.model_name, "object": "model", "created": 0, "owned_by": "moelab"})
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [model_object(&state)]}))
}

async fn model(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // (axum's own rejection of a path that is not UTF-8, `/v1/models/%FF`, is plain text)
    let Path(id) = id.map_err(|e| ApiError::invalid(format!("the model id: {e}")))?;
    if id != state.cfg.model_name {
        return Err(ApiError::not_found(format!(
            "the model {id:?} does not exist; this server serves {:?}",
            state.cfg.model_name
        ))
        .code("model_not_found"));
    }
    Ok(Json(model_object(&state)))
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let s = state.engine.stats();
    Json(
        json!({"status": "ok", "model": state.cfg.model_name, "running": s.active, "queued": s.queued}),
    )
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(state.engine.stats()),
    )
}

async fn index() -> Html<&'static str> {
    Html(include_str!("../static/index.html"))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_waits_for_the_entry_that_makes_room() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // requests 50, 40, 30, 20 and 10 s ago
        let window: VecDeque<Instant> = [5, 15, 25, 35, 45].into_iter().map(at).collect();
        let now = at(55);
        // at the limit of 5: room when the oldest expires
        assert_eq!(wait_for_room(&window, 5, now), 10);
        // the limit lowered to 2: room once three more have expired (the one 20 s old)
        assert_eq!(wait_for_room(&window, 2, now), 40);
        assert_eq!(wait_for_room(&window, 1, now), 50);
        // never 0 (a client would retry at once)
        assert_eq!(wait_for_room(&window, 5, at(65)), 1);
    }
}
