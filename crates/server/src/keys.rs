//! API keys and the usage ledger in one SQLite file (WAL journal, so a crash of the server
//! loses nothing that was committed, and `moelab keys usage` can read while it serves).
//!
//! Key checks use a connection of their own, so they never wait behind the ledger's writes
//! or behind another process holding the write lock (in WAL mode readers do not block on a
//! writer); were that read to fail anyway, the last answer read for that key is used
//! (issue 11).
//!
//! Keys are `ml-` + 32 random hex digits shown once at creation; only their sha256 is stored
//! (a key has 128 random bits, so a fast hash is enough: there is nothing to brute-force).
//! Every request's prompt and completion tokens go into `usage`, one row per request, with
//! the key's id (NULL when the server runs without keys).

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// `PRAGMA user_version` of the schema below.
const FORMAT_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created INTEGER NOT NULL,
    revoked INTEGER,
    rpm INTEGER
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    key_id INTEGER REFERENCES keys(id),
    ts INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key ON usage(key_id);
";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: key database format {found}, this moelab reads format {FORMAT_VERSION}")]
    Version { path: PathBuf, found: i64 },
    #[error("a key named {0:?} already exists; pick another name or revoke it first")]
    Exists(String),
    #[error("no key named {0:?} (see `moelab keys list`)")]
    NoSuchKey(String),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: i64,
    pub name: String,
    /// First characters of the key, for telling keys apart.
    pub prefix: String,
    pub created: i64,
    pub revoked: Option<i64>,
    /// Requests per minute (None: the server's default).
    pub rpm: Option<u32>,
}

/// Per-key totals from the ledger (`name` is "(no key)" for requests made without keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    pub name: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One request, as recorded in the ledger.
#[derive(Clone, Debug)]
pub struct UsageRecord {
    pub key_id: Option<i64>,
    /// When the request ended (Unix seconds), not when the ledger caught up with it.
    pub ts: i64,
    pub endpoint: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish: &'static str,
}

pub enum Auth {
    /// No key exists: the API is open.
    Open,
    Key(KeyInfo),
    Revoked,
    Unknown,
}

/// The columns [`key_row`] reads, in order.
const KEY_COLUMNS: &str = "id, name, prefix, created, revoked, rpm";

fn key_row(r: &rusqlite::Row) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        prefix: r.get(2)?,
        created: r.get(3)?,
        revoked: r.get(4)?,
        rpm: r.get(5)?,
    })
}

pub struct KeyStore {
    path: PathBuf,
    /// Writes (keys, ledger) and the CLI's reads.
    conn: Mutex<Connection>,
    /// Key checks only.
    read: Mutex<Connection>,
    /// The last answer read for each known key hash, and whether any key existed: used when
    /// the database cannot be read at the moment.
    seen: Mutex<(Option<bool>, HashMap<String, KeyInfo>)>,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl KeyStore {
    /// Opens (creating if needed) the key database at `path`.
    pub fn open(path: &Path) -> Result<KeyStore> {
        let db = |source| Error::Db {
            path: path.into(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(db)?;
        let found: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        let has_tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        if found != FORMAT_VERSION && (found != 0 || has_tables != 0) {
            return Err(Error::Version {
                path: path.into(),
                found,
            });
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        // NORMAL in WAL mode: every commit survives a crash of the process (not a power cut).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.pragma_update(None, "user_version", FORMAT_VERSION)
            .map_err(db)?;
        let read = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db)?;
        // NOTE: a reader in WAL mode waits only in rare moments (WAL recovery); a key check
        // gives up quickly and falls back to what it read last
        read.busy_timeout(Duration::from_millis(200)).map_err(db)?;
        Ok(KeyStore {
            path: path.into(),
            conn: Mutex::new(conn),
            read: Mutex::new(read),
            seen: Mutex::new((None, HashMap::new())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self, source: rusqlite::Error) -> Error {
        Error::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // a panic while holding the lock cannot leave SQLite inconsistent
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a key; returns it (the only time it is shown) and its record.
    pub fn create(&self, name: &str, rpm: Option<u32>) -> Result<(String, KeyInfo)> {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let key = format!("ml-{}", hex::encode(bytes));
        let prefix = key[..7].to_string();
        let created = now();
        let conn = self.conn();
        let exists: Option<i64> = conn
            .query_row("SELECT id FROM keys WHERE name = ?1", [name], |r| r.get(0))
            .optional()
            .map_err(|e| self.db(e))?;
        if exists.is_some() {
            return Err(Error::Exists(name.into()));
        }
        conn.execute(
            "INSERT INTO keys (name, hash, prefix, created, rpm) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, hash(&key), prefix, created, rpm],
        )
        .map_err(|e| self.db(e))?;
        let info = KeyInfo {
            id: conn.last_insert_rowid(),
            name: name.into(),
            prefix,
            created,
            revoked: None,
            rpm,
        };
        Ok((key, info))
    }

    pub fn list(&self) -> Result<Vec<KeyInfo>> {
        let conn = self.conn();
        let mut st = conn
            .prepare(&format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY id"))
            .map_err(|e| self.db(e))?;
        let rows = st.query_map([], key_row).map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.db(e))
    }

    /// Revokes the key named `name` (it stays in the ledger).
    pub fn revoke(&self, name: &str) -> Result<()> {
        let n = self
            .conn()
            .execute(
                "UPDATE keys SET revoked = ?1 WHERE name = ?2 AND revoked IS NULL",
                params![now(), name],
            )
            .map_err(|e| self.db(e))?;
        if n == 0 {
            return Err(Error::NoSuchKey(name.into()));
        }
        Ok(())
    }

    /// Who presents `key` (None: no Authorization header). Reads on its own connection; if
    /// the database cannot be read right now, answers from what it read last.
    pub fn authenticate(&self, key: Option<&str>) -> Result<Auth> {
        let h = key.map(hash);
        let read = self.lookup(h.as_deref());
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (any, info) = match read {
            Ok((any, info)) => {
                seen.0 = Some(any);
                if let (Some(h), Some(k)) = (&h, &info) {
                    seen.1.insert(h.clone(), k.clone());
                }
                (any, info)
            }
            Err(e) => match seen.0 {
                Some(any) => {
                    eprintln!("warning: checking an API key: {e}; using the keys read last");
                    (any, h.as_ref().and_then(|h| seen.1.get(h).cloned()))
                }
                None => return Err(e),
            },
        };
        if !any {
            return Ok(Auth::Open);
        }
        Ok(match info {
            None => Auth::Unknown,
            Some(k) if k.revoked.is_some() => Auth::Revoked,
            Some(k) => Auth::Key(k),
        })
    }

    /// (whether any key exists, the key with hash `h`).
    fn lookup(&self, h: Option<&str>) -> Result<(bool, Option<KeyInfo>)> {
        let conn = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let any: bool = conn
            .query_row("SELECT EXISTS (SELECT 1 FROM keys)", [], |r| r.get(0))
            .map_err(|e| self.db(e))?;
        let Some(h) = h.filter(|_| any) else {
            return Ok((any, None));
        };
        let info = conn
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE hash = ?1"),
                [h],
                key_row,
            )
            .optional()
            .map_err(|e| self.db(e))?;
        Ok((any, info))
    }

    /// Appends one request to the ledger (committed before returning).
    pub fn record(&self, u: &UsageRecord) -> Result<()> {
        self.record_all(std::slice::from_ref(u))
    }

    /// Appends requests to the ledger in one transaction: all of them are committed, or
    /// none (then the caller may retry them all).
    pub fn record_all(&self, us: &[UsageRecord]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| self.db(e))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO usage (key_id, ts, endpoint, prompt_tokens, completion_tokens, finish)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(|e| self.db(e))?;
            for u in us {
                st.execute(params![
                    u.key_id,
                    u.ts,
                    u.endpoint,
                    u.prompt_tokens as i64,
                    u.completion_tokens as i64,
                    u.finish
                ])
                .map_err(|e| self.db(e))?;
            }
        }
        tx.commit().map_err(|e| self.db(e))
    }

    /// Totals per key (every key, used or not, then requests made without a key).
    pub fn usage(&self) -> Result<Vec<Usage>> {
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT coalesce(k.name, '(no key)'), count(u.id),
                        coalesce(sum(u.prompt_tokens), 0), coalesce(sum(u.completion_tokens), 0)
                 FROM keys k LEFT JOIN usage u ON u.key_id = k.id GROUP BY k.id
                 UNION ALL
                 SELECT '(no key)', count(*), coalesce(sum(prompt_tokens), 0),
                        coalesce(sum(completion_tokens), 0)
                 FROM usage WHERE key_id IS NULL HAVING count(*) > 0",
            )
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(Usage {
                    name: r.get(0)?,
                    requests: r.get::<_, i64>(1)? as u64,
                    prompt_tokens: r.get::<_, i64>(2)? as u64,
                    completion_tokens: r.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.db(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> (KeyStore, PathBuf) {
        let p = std::env::temp_dir().join(format!("moelab-keys-{name}-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&p);
        (KeyStore::open(&p).unwrap(), p)
    }

    #[test]
    fn keys_authenticate_revoke_and_meter() {
        let (s, p) = store("unit");
        assert!(matches!(s.authenticate(None).unwrap(), Auth::Open));
        let (key, info) = s.create("alice", Some(10)).unwrap();
        assert!(key.starts_with("ml-") && key.len() == 35);
        assert!(matches!(s.create("alice", None), Err(Error::Exists(_))));
        assert!(matches!(s.authenticate(None).unwrap(), Auth::Unknown));
        assert!(matches!(
            s.authenticate(Some("ml-wrong")).unwrap(),
            Auth::Unknown
        ));
        match s.authenticate(Some(&key)).unwrap() {
            Auth::Key(k) => assert_eq!(k, info),
            _ => panic!("alice's key is valid"),
        }
        let rec = |key_id, p, c| UsageRecord {
            key_id,
            ts: now(),
            endpoint: "chat",
            prompt_tokens: p,
            completion_tokens: c,
            finish: "stop",
        };
        s.record(&rec(Some(info.id), 10, 5)).unwrap();
        s.record(&rec(Some(info.id), 1, 2)).unwrap();
        s.record(&rec(None, 7, 7)).unwrap();
        s.revoke("alice").unwrap();
        assert!(matches!(s.authenticate(Some(&key)).unwrap(), Auth::Revoked));
        assert!(matches!(s.revoke("bob"), Err(Error::NoSuchKey(_))));
        s.create("bob", None).unwrap();
        // the plaintext key is not stored anywhere in the file
        drop(s);
        let raw = std::fs::read(&p).unwrap();
        let needle = key.as_bytes();
        assert!(!raw.windows(needle.len()).any(|w| w == needle));
        // reopened: the ledger is on disk
        let s = KeyStore::open(&p).unwrap();
        let u = s.usage().unwrap();
        let row = |n: &str| u.iter().find(|x| x.name == n).unwrap().clone();
        assert_eq!(
            (
                row("alice").requests,
                row("alice").prompt_tokens,
                row("alice").completion_tokens
            ),
            (2, 11, 7)
        );
        assert_eq!((row("bob").requests, row("(no key)").prompt_tokens), (0, 7));
        assert_eq!(s.list().unwrap().len(), 2);
    }

    #[test]
    fn a_database_of_another_format_is_refused() {
        let (s, p) = store("version");
        s.conn().pragma_update(None, "user_version", 99).unwrap();
        drop(s);
        let e = KeyStore::open(&p).err().unwrap();
        assert!(e.to_string().contains("format 99"), "{e}");
    }
}
