//! The usage ledger's writer thread: usage records arrive on a channel as requests end and are
//! committed in batches. A record is never dropped because the database is busy (another
//! process holding the write lock, a long `moelab keys usage` read, a full disk that frees
//! up): a batch that fails is kept in memory and retried with backoff until it commits, with
//! the records that arrive meanwhile joining it (issue 11). On shutdown the queue is
//! flushed; only a database that stays unwritable past [`FLUSH_DEADLINE`] after shutdown
//! loses records, and then each is printed to stderr so that it can be re-entered by hand.
//!
//! What it is not: the schema or the SQL (keys.rs).

use crate::keys::{KeyStore, UsageRecord};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// How long the writer keeps retrying after the server has stopped taking requests.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(30);

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Commits every record from `rx` until the channel closes and the queue is empty.
pub fn write(keys: &KeyStore, rx: Receiver<UsageRecord>) {
    let mut batch: Vec<UsageRecord> = vec![];
    let mut closed_at: Option<Instant> = None;
    loop {
        if batch.is_empty() {
            match rx.recv() {
                Ok(r) => batch.push(r),
                Err(_) => return,
            }
        }
        // everything queued now goes in the same transaction
        drain(&rx, &mut batch, &mut closed_at);
        let mut backoff = BACKOFF_MIN;
        let mut failing = false;
        loop {
            match keys.record_all(&batch) {
                Ok(()) => {
                    if failing {
                        eprintln!(
                            "usage ledger: written again ({} held records committed)",
                            batch.len()
                        );
                    }
                    batch.clear();
                    break;
                }
                Err(e) => {
                    if !failing {
                        // NOTE: one line per outage, not per retry
                        eprintln!(
                            "warning: usage ledger: {e}; holding {} record(s) in memory and retrying",
                            batch.len()
                        );
                        failing = true;
                    }
                    if closed_at.is_some_and(|t| t.elapsed() >= FLUSH_DEADLINE) {
                        eprintln!(
                            "error: usage ledger: still failing {FLUSH_DEADLINE:?} after shutdown; {} record(s) not written:",
                            batch.len()
                        );
                        for r in batch.drain(..) {
                            eprintln!("unrecorded usage: {r:?}");
                        }
                        break;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    drain(&rx, &mut batch, &mut closed_at);
                }
            }
        }
    }
}

/// Moves what is queued into `batch`; notes when the channel has closed (shutdown).
fn drain(
    rx: &Receiver<UsageRecord>,
    batch: &mut Vec<UsageRecord>,
    closed_at: &mut Option<Instant>,
) {
    loop {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => {
                closed_at.get_or_insert_with(Instant::now);
                return;
            }
        }
    }
}
