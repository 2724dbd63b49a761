//! `moelab keys`: API keys and the usage ledger, in the SQLite file `moelab serve` reads.

use crate::runs::KEYS_DB;
use anyhow::{bail, Result};
use clap::Subcommand;
use server::keys::KeyStore;
use std::path::PathBuf;

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
        #[arg(long, default_value = KEYS_DB)]
        db: PathBuf,
    },
    /// List keys (name, prefix, created, revoked, limit).
    List {
        #[arg(long, default_value = KEYS_DB)]
        db: PathBuf,
    },
    /// Revoke a key by name; requests with it get 401 from then on.
    Revoke {
        name: String,
        #[arg(long, default_value = KEYS_DB)]
        db: PathBuf,
    },
    /// Requests and tokens per key, from the usage ledger.
    Usage {
        #[arg(long, default_value = KEYS_DB)]
        db: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
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

pub fn run(c: KeysCmd) -> Result<()> {
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
