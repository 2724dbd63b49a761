//! The online generation engine behind `moelab serve` and `moelab chat`: one worker thread
//! owns the model and a continuous [`Batch`]; requests arrive on a channel from any thread,
//! wait in a bounded queue, join the running batch between decode steps as slots free up,
//! and stream their tokens to a per-request sink. A sink that returns `false` (its client
//! went away) cancels its request at the next step.
//!
//! What it is not: HTTP, tokenization or the chat template (see `chat.rs`).

use crate::batch::{Batch, Event, Finish, Seq};
use model::quant::QuantWeights;
use model::ModelConfig;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// Receives a request's events on the engine thread: every token, then one `Done`.
/// Returning `false` from a token cancels the request. Keep it cheap (it runs between steps).
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// Whether a request's client is still there (e.g. its channel's receiver is open). Checked
/// between steps while the request waits in the queue or reads its prompt, when no token
/// goes to its sink: a client that left gives up its place in the queue at once and stops
/// its prefill, instead of holding both until its first token. Keep it cheap.
pub type Alive = Box<dyn Fn() -> bool + Send>;

#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Sequences decoding together (KV-cache slots).
    pub slots: usize,
    /// Requests waiting for a slot at most; more are refused with [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// Element type of the KV caches.
    pub kv: model::decode::KvType,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            slots: 16,
            max_queue: 64,
            kv: model::decode::KvType::F32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error("the prompt has {prompt} tokens; this model's context is {context} tokens and at least one must be left to generate")]
    TooLong { prompt: usize, context: usize },
    #[error("the prompt is empty")]
    Empty,
    #[error("the engine has stopped")]
    Stopped,
}

/// Counters for metrics; read with [`Engine::stats`].
#[derive(Default)]
struct Shared {
    queued: AtomicUsize,
    active: AtomicUsize,
    steps: AtomicU64,
    /// Sum over steps of the batch size (mean batch size = batched_rows / steps).
    batched_rows: AtomicU64,
    generated: AtomicU64,
    /// Set by [`Engine::abort`]: the loop cancels every request and ends.
    abort: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub queued: usize,
    pub active: usize,
    pub steps: u64,
    pub batched_rows: u64,
    pub generated: u64,
}

struct Job {
    seq: Seq,
    sink: Sink,
    alive: Option<Alive>,
}

pub struct Engine {
    cfg: ModelConfig,
    ec: EngineConfig,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the worker thread for a model's config and parameters.
    pub fn start(cfg: &ModelConfig, params: Vec<f32>, ec: EngineConfig) -> Engine {
        Engine::start_quant(cfg, params, None, ec)
    }

    /// [`Engine::start`] multiplying by quantized copies of the matrices (`quant`).
    pub fn start_quant(
        cfg: &ModelConfig,
        params: Vec<f32>,
        quant: Option<Arc<QuantWeights>>,
        ec: EngineConfig,
    ) -> Engine {
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared::default());
        let worker = {
            let (cfg, shared) = (cfg.clone(), shared.clone());
            std::thread::Builder::new()
                .name("moelab-engine".into())
                .spawn(move || {
                    // NOTE: the decode loop runs on a worker of its own rayon pool. Calling
                    // into a pool from outside costs a cross-thread wake-up per parallel
                    // region (dozens per step); from a worker, small kernels run inline and
                    // larger ones are stolen by the pool's other threads.
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(rayon::current_num_threads())
                        .thread_name(|i| format!("moelab-decode-{i}"))
                        .build()
                        .expect("build the decode thread pool");
                    pool.install(|| run(cfg, params, quant, ec, rx, shared))
                })
                .expect("spawn the engine thread")
        };
        Engine {
            cfg: cfg.clone(),
            ec,
            tx: Mutex::new(Some(tx)),
            shared,
            worker: Mutex::new(Some(worker)),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Queues a sequence; its events go to `sink` on the engine thread.
    pub fn submit(&self, seq: Seq, sink: Sink) -> Result<(), SubmitError> {
        self.submit_watched(seq, sink, None)
    }

    /// [`Engine::submit`], cancelling the request as soon as `alive` says its client left.
    pub fn submit_watched(
        &self,
        seq: Seq,
        sink: Sink,
        alive: Option<Alive>,
    ) -> Result<(), SubmitError> {
        let context = self.cfg.max_seq_len;
        if seq.prompt.is_empty() {
            return Err(SubmitError::Empty);
        }
        if seq.prompt.len() >= context {
            return Err(SubmitError::TooLong {
                prompt: seq.prompt.len(),
                context,
            });
        }
        let tx = self.tx.lock().expect("engine lock");
        let Some(tx) = tx.as_ref() else {
            return Err(SubmitError::Stopped);
        };
        let waiting = self.shared.queued.fetch_add(1, Relaxed);
        if waiting >= self.ec.max_queue {
            self.shared.queued.fetch_sub(1, Relaxed);
            return Err(SubmitError::QueueFull(waiting));
        }
        tx.send(Job { seq, sink, alive }).map_err(|_| {
            self.shared.queued.fetch_sub(1, Relaxed);
            SubmitError::Stopped
        })
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            queued: s.queued.load(Relaxed),
            active: s.active.load(Relaxed),
            steps: s.steps.load(Relaxed),
            batched_rows: s.batched_rows.load(Relaxed),
            generated: s.generated.load(Relaxed),
        }
    }

    /// Stops taking requests and ends every queued and running one at the next step (each
    /// reported `Done(Cancelled)`), then joins the worker: a shutdown whose grace period is
    /// over.
    pub fn abort(&self) {
        self.shared.abort.store(true, Relaxed);
        self.shutdown();
    }

    /// Stops taking requests, lets the queued and running ones finish, joins the worker.
    pub fn shutdown(&self) {
        self.tx.lock().expect("engine lock").take();
        if let Some(w) = self.worker.lock().expect("engine lock").take() {
            let _ = w.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(
    cfg: ModelConfig,
    params: Vec<f32>,
    quant: Option<Arc<QuantWeights>>,
    ec: EngineConfig,
    rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
) {
    let mut batch: Batch<u64> = Batch::new(&cfg, ec.slots);
    batch.set_quant(quant);
    batch.set_kv_type(ec.kv);
    let mut sinks: HashMap<u64, Sink> = HashMap::new();
    let mut alives: HashMap<u64, Alive> = HashMap::new();
    let mut pending: VecDeque<Job> = VecDeque::new();
    let mut next_id = 0u64;
    loop {
        if batch.is_empty() && pending.is_empty() {
            // idle: sleep until a request arrives or every sender is gone
            match rx.recv() {
                Ok(j) => pending.push_back(j),
                Err(_) => break,
            }
        }
        while let Ok(j) = rx.try_recv() {
            pending.push_back(j);
        }
        if shared.abort.load(Relaxed) {
            shared.queued.fetch_sub(pending.len(), Relaxed);
            for mut j in pending.drain(..) {
                (j.sink)(Event::Done(Finish::Cancelled));
            }
            for (id, mut sink) in sinks.drain() {
                batch.cancel(id);
                sink(Event::Done(Finish::Cancelled));
            }
            // a request submitted since the last look: its sender goes right after the flag
            // is set (`abort` shuts down), so this ends
            while let Ok(mut j) = rx.recv() {
                shared.queued.fetch_sub(1, Relaxed);
                (j.sink)(Event::Done(Finish::Cancelled));
            }
            break;
        }
        // clients that left: out of the queue, and out of the batch while reading the prompt
        let queued = pending.len();
        pending.retain_mut(|j| {
            let here = j.alive.as_ref().is_none_or(|a| a());
            if !here {
                (j.sink)(Event::Done(Finish::Cancelled));
            }
            here
        });
        shared.queued.fetch_sub(queued - pending.len(), Relaxed);
        alives.retain(|id, a| {
            if a() {
                return true;
            }
            if batch.cancel(*id) {
                if let Some(mut sink) = sinks.remove(id) {
                    sink(Event::Done(Finish::Cancelled));
                }
            }
            false
        });
        while !batch.is_full() {
            let Some(mut job) = pending.pop_front() else {
                break;
            };
            shared.queued.fetch_sub(1, Relaxed);
            let id = next_id;
            next_id += 1;
            match batch.admit(id, job.seq) {
                Ok(()) => {
                    sinks.insert(id, job.sink);
                    if let Some(a) = job.alive {
                        alives.insert(id, a);
                    }
                }
                Err(f) => {
                    (job.sink)(Event::Done(f));
                }
            }
        }
        let n = batch.len();
        shared.active.store(n, Relaxed);
        if n == 0 {
            continue;
        }
        let mut generated = 0;
        batch.step(&params, &mut |id, ev| {
            let sink = sinks.get_mut(&id).expect("a sink per running request");
            let (token, done) = (matches!(ev, Event::Token(_)), matches!(ev, Event::Done(_)));
            let keep = sink(ev);
            generated += token as u64;
            if done {
                sinks.remove(&id);
                alives.remove(&id);
            }
            keep
        });
        shared.steps.fetch_add(1, Relaxed);
        shared.batched_rows.fetch_add(n as u64, Relaxed);
        shared.generated.fetch_add(generated, Relaxed);
        shared.active.store(batch.len(), Relaxed);
    }
    shared.active.store(0, Relaxed);
}
