//! `moelab serve` (the OpenAI-compatible server of the `server` crate on a trained run) and
//! `moelab keys` (API keys and the usage ledger, in the same SQLite file the server reads).

use crate::runs::load_reasoner;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use infer::{Engine, EngineConfig};
use server::keys::KeyStore;
use server::{AppState, ServerConfig};
use std::path::PathBuf;
use std::time::Duration;

/// Where keys and usage live unless `--keys-db` / `--db` says otherwise.
const DEFAULT_DB: &str = "moelab-keys.db";

#[derive(Args)]
pub struct ServeArgs {
    /// Run dir (its latest checkpoint) or a checkpoint dir.
    #[arg(long)]
    run: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// API keys and usage ledger (SQLite). While it holds no key, the API is open.
    #[arg(long, default_value = DEFAULT_DB)]
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

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create a key (printed once; only its hash is stored).
    #[command(
        after_help = "Examples:\n  moelab keys create --name alice\n  moelab keys create --name batch-jobs --rpm 600"
    )]
    Create {
        #[arg(long)]
        name: String,
        /// Requests per minute for this key (default: the server's --rate-limit).
        #[arg(long)]
        rpm: Option<u32>,
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
    /// List keys (name, prefix, created, revoked, limit).
    List {
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
    /// Revoke a key by name; requests with it get 401 from then on.
    Revoke {
        name: String,
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
    /// Requests and tokens per key, from the usage ledger.
    Usage {
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let r = load_reasoner(&a.run)?;
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
    let header_timeout = seconds("--header-timeout", a.header_timeout)?;
    let body_timeout = seconds("--body-timeout", a.body_timeout)?;
    let cfg = r.cfg.clone();
    let engine = Engine::start(
        &cfg,
        r.params,
        EngineConfig {
            slots: a.slots,
            max_queue: a.max_queue,
        },
    );
    let state = AppState::new(
        engine,
        r.tok,
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

fn date(ts: i64) -> String {
    // days since the epoch -> y-m-d (civil from days, H. Hinnant)
    let z = ts.div_euclid(86400) + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}-{m:02}-{d:02}")
}

pub fn keys(c: KeysCmd) -> Result<()> {
    match c {
        KeysCmd::Create { name, rpm, db } => {
            if name.trim().is_empty() {
                bail!("--name must not be empty");
            }
            let (key, _) = KeyStore::open(&db)?.create(&name, rpm)?;
            eprintln!(
                "created key {name:?} in {} (shown once; store it now):",
                db.display()
            );
            println!("{key}");
        }
        KeysCmd::List { db } => {
            let keys = KeyStore::open(&db)?.list()?;
            if keys.is_empty() {
                println!("no keys in {} (the API is open); create one with `moelab keys create --name NAME`", db.display());
            }
            println!(
                "{:<20} {:<10} {:<11} {:<11} {:>6}",
                "name", "prefix", "created", "revoked", "rpm"
            );
            for k in keys {
                println!(
                    "{:<20} {:<10} {:<11} {:<11} {:>6}",
                    k.name,
                    format!("{}...", k.prefix),
                    date(k.created),
                    k.revoked.map_or("-".into(), date),
                    k.rpm.map_or("-".into(), |r| r.to_string())
                );
            }
        }
        KeysCmd::Revoke { name, db } => {
            KeyStore::open(&db)?.revoke(&name)?;
            println!("revoked {name:?}");
        }
        KeysCmd::Usage { db, json } => {
            let usage = KeyStore::open(&db)?.usage()?;
            if json {
                let rows: Vec<_> = usage
                    .iter()
                    .map(|u| {
                        serde_json::json!({"key": u.name, "requests": u.requests,
                            "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
                return Ok(());
            }
            println!(
                "{:<20} {:>9} {:>14} {:>18} {:>13}",
                "key", "requests", "prompt_tokens", "completion_tokens", "total_tokens"
            );
            for u in usage {
                println!(
                    "{:<20} {:>9} {:>14} {:>18} {:>13}",
                    u.name,
                    u.requests,
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.prompt_tokens + u.completion_tokens
                );
            }
        }
    }
    Ok(())
}
