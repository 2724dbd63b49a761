//! `moelab serve`: the OpenAI-compatible server of the `server` crate on a trained run.

use crate::runs::{load_reasoner, KEYS_DB};
use anyhow::{bail, Context, Result};
use clap::Args;
use infer::{Engine, EngineConfig};
use server::keys::KeyStore;
use server::{AppState, ServerConfig};
use std::path::PathBuf;
use std::time::Duration;

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab serve --run runs/student\n  moelab serve --run runs/student --addr 0.0.0.0:8080 --keys-db keys.db --rate-limit 60\n\nThen: open http://127.0.0.1:8080/ or point an OpenAI client at http://127.0.0.1:8080/v1.\nSIGINT/SIGTERM stop it gracefully (in-flight requests finish within --shutdown-deadline).\nLimits: --max-body, --max-connections, --header-timeout and --body-timeout bound what one\nclient can hold; a stop sequence is at most 128 bytes.";

#[derive(Args)]
pub struct ServeArgs {
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
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// API keys and usage ledger (SQLite). While it holds no key, the API is open.
    #[arg(long, default_value = KEYS_DB)]
    keys_db: PathBuf,
    /// Model id clients use and see (default: the run dir's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 16)]
    slots: usize,
    /// Requests waiting for a slot at most; more get 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest max_tokens a request gets (larger values are clamped).
    #[arg(long, default_value_t = 4096)]
    max_tokens_cap: usize,
    /// Largest request body in bytes (larger: 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Requests per minute per API key (0: unlimited); `keys create --rpm` overrides it.
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// Temperature for requests that give none (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 10)]
    shutdown_deadline: u64,
    /// Seconds a connection gets to send a whole request head (and may sit idle between
    /// requests); then it is closed.
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a request body gets to arrive whole after its head (slower: 408).
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// Open connections at most; more get an immediate 503 and are closed.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
}

/// `secs` as a Duration, refusing what is not a positive number of seconds.
fn seconds(flag: &str, secs: f64) -> Result<Duration> {
    if !(secs > 0.0 && secs.is_finite()) {
        bail!("{flag} must be a positive number of seconds, got {secs}");
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn run(a: ServeArgs) -> Result<()> {
    let r = load_reasoner(&a.run, &a.quant)?;
    let chat = r.chat.clone();
    let keys = KeyStore::open(&a.keys_db)?;
    let n_keys = keys.list()?.iter().filter(|k| k.revoked.is_none()).count();
    let name = a.model_name.clone().unwrap_or_else(|| {
        a.run
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "moelab".into())
    });
    if a.slots == 0 {
        bail!("--slots must be at least 1");
    }
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    if a.max_tokens_cap == 0 {
        bail!("--max-tokens-cap must be at least 1");
    }
    // (the requests' own limit: a default outside it failed every request that did not set
    // one, with an error about a field the client never sent)
    if !(0.0..=2.0).contains(&a.temperature) {
        bail!("--temperature {} must be between 0 and 2", a.temperature);
    }
    let header_timeout = seconds("--header-timeout", a.header_timeout)?;
    let body_timeout = seconds("--body-timeout", a.body_timeout)?;
    let cfg = r.cfg.clone();
    let engine = Engine::start_quant(
        &cfg,
        r.params,
        r.quant,
        EngineConfig {
            slots: a.slots,
            max_queue: a.max_queue,
            kv: a.kv_cache,
        },
    );
    let state = AppState::new(
        engine,
        chat,
        keys,
        ServerConfig {
            model_name: name.clone(),
            max_body_bytes: a.max_body,
            max_tokens_cap: a.max_tokens_cap,
            rate_limit_rpm: a.rate_limit,
            default_temperature: a.temperature,
            header_timeout,
            body_timeout,
            max_connections: a.max_connections,
            ..ServerConfig::default()
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.addr)
            .await
            .with_context(|| format!("cannot listen on {} (is another server there?)", a.addr))?;
        let addr = listener.local_addr()?;
        println!(
            "serving {name} ({} context, {} slots) on http://{addr}/  (API: http://{addr}/v1, {})",
            cfg.max_seq_len,
            a.slots,
            if n_keys == 0 {
                format!("open: no API keys in {}", a.keys_db.display())
            } else {
                format!("{n_keys} API key(s) in {}", a.keys_db.display())
            }
        );
        server::serve(
            listener,
            state,
            async {
                server::shutdown_signal().await;
                eprintln!("shutting down: finishing in-flight requests");
            },
            Duration::from_secs(a.shutdown_deadline),
        )
        .await?;
        eprintln!("stopped");
        Ok(())
    })
}
