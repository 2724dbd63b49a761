//! Deterministic parallel helpers shared by the kernels.
//!
//! NOTE: the chunk sizes here are constants, never derived from the thread count; that is what
//! makes every reduction bit-identical for any `RAYON_NUM_THREADS`.

use rayon::prelude::*;
use std::cell::Cell;

/// Rows per parallel task for row-wise kernels (a scheduling choice only: row-wise kernels do
/// not reduce across rows, so any value gives identical results).
pub const ROWS_PER_TASK: usize = 16;

/// Rows per block for reductions over rows (weight gradients): each block's partial sum is
/// computed by one task, then the partials are added in block order.
pub const REDUCE_ROWS: usize = 64;

/// Elements per partial sum in [`sum_squares`].
pub const SUM_CHUNK: usize = 1 << 14;

/// Sum of squares of `x` in f64, in fixed chunks summed in order (thread-count independent).
pub fn sum_squares(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x.par_chunks(SUM_CHUNK).map(chunk_squares).collect();
    partials.iter().sum()
}

/// Lanes of [`chunk_squares`]: two AVX-512 registers of f64, so the adds overlap (one serial
/// f64 sum ran at its add latency: ~5 ms of a small-moe step's gradient norm).
const SQ_LANES: usize = 16;

crate::simd! {
    /// Sum of squares of one chunk: element i into lane i % 16, the lanes summed pairwise
    /// (lane j + lane j + 8, then + 4, + 2, + 1): a fixed order.
    fn chunk_squares(c: &[f32]) -> f64 {
        let mut acc = [0f64; SQ_LANES];
        let it = c.chunks_exact(SQ_LANES);
        let rem = it.remainder();
        for x in it {
            for j in 0..SQ_LANES {
                let v = x[j] as f64;
                acc[j] += v * v;
            }
        }
        for (j, &x) in rem.iter().enumerate() {
            acc[j] += (x as f64) * (x as f64);
        }
        let mut w = SQ_LANES;
        while w > 1 {
            w /= 2;
            for j in 0..w {
                acc[j] += acc[j + w];
            }
        }
        acc[0]
    }
}

/// True where nested parallelism would only add overhead, so kernels run their inner matmuls
/// single-threaded: while a [`Task`] guard lives, or on a rayon worker other than the root of an
/// [`on_pool`] computation. A call this misses still gives the same bits (every kernel's
/// result is independent of how its work is split), only more scheduling.
pub fn in_worker() -> bool {
    TASK.with(|d| d.get() > 0) || (rayon::current_thread_index().is_some() && !ROOT.with(Cell::get))
}

thread_local! {
    static ROOT: Cell<bool> = const { Cell::new(false) };
    static TASK: Cell<u32> = const { Cell::new(0) };
}

/// Held by one task of a parallel loop whose tasks call matmuls: while it lives, those run
/// serially on this thread (the loop already keeps every thread busy).
#[must_use = "the task is serial only while the guard lives"]
pub struct Task(());

impl Task {
    pub fn enter() -> Task {
        TASK.with(|d| d.set(d.get() + 1));
        Task(())
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        TASK.with(|d| d.set(d.get() - 1));
    }
}

/// Runs `f` on a worker of a new pool of `threads` threads, as the root of its computation:
/// its parallel regions then start from inside the pool (the caller keeps working and
/// stealing) instead of each waking a sleeping outside thread: 7x fewer context switches,
/// small-moe bf16 training 3-5% faster (fp32 about 1%). Same bits as calling `f` directly.
pub fn on_pool<R: Send>(
    threads: usize,
    f: impl FnOnce() -> R + Send,
) -> Result<R, rayon::ThreadPoolBuildError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        // the main thread's size: `f` is usually a whole command
        .stack_size(8 << 20)
        .build()?;
    Ok(pool.install(|| {
        ROOT.with(|r| r.set(true));
        f()
    }))
}

/// A second thread spinning beside a latency-bound sequence of small parallel loops (one
/// decode step of a small model: ~30 matmuls of tens of microseconds each). Handing such a
/// loop to rayon costs a wake-up or a steal each time, more than the loop saves; a helper
/// that spins on an epoch counter for the duration of `f` picks up a loop's tasks within
/// a few hundred nanoseconds. Inside `f`, [`team_for_each`] runs a loop on both threads.
///
/// The helper outlives `f` by [`Team::LINGER`]: a rayon task that keeps spinning for the
/// next `with_team` of the same thread (the next decode step, after sampling a token), so
/// consecutive calls do not each wait for a worker to pick the helper up (the student's
/// decode: 13,141 against 12,765 tokens/s with a new helper per step, medians of 25
/// alternating rounds on the Intel host). It leaves once no call has come for that long.
///
/// `f`'s own rayon loops still run, but without the helper's thread while it spins, so use
/// this only around work made of such small loops. If the pool has no free thread to run the
/// helper, `f` does every task itself. Which thread runs a task never changes a result (the
/// callers' tasks write disjoint outputs in a fixed order each).
pub fn with_team<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_num_threads() < 2 || TEAM.with(|t| !t.get().is_null()) {
        return f();
    }
    if rayon::current_thread_index().is_none() {
        // a thread outside the pool: run `f` on one of its workers (blocking here), so that
        // rayon loops inside `f`'s tasks wait as workers do (by running jobs), not asleep
        // while the pool's workers spin as helpers
        return rayon::scope(|_| with_team(f));
    }
    // SAFETY: this thread's team lives as long as the thread
    let team = unsafe { &*MY_TEAM.with(Arc::as_ptr) };
    // inside a task of this thread's own team loop (`Team::run` clears TEAM while it runs
    // them): a nested call would reuse the team in the middle of its loop
    if !team.life.0.calls.load(Ordering::Relaxed).is_multiple_of(2) {
        return f();
    }
    team.enter();
    TEAM.with(|t| t.set(team));
    // leave the team even if `f` panics
    struct Leave<'a>(&'a Team);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            TEAM.with(|t| t.set(std::ptr::null()));
            self.0.leave();
        }
    }
    let _leave = Leave(team);
    f()
}

/// True inside [`with_team`]'s `f` on its thread.
pub fn in_team() -> bool {
    TEAM.with(|t| !t.get().is_null())
}

/// Runs `run(0..tasks)` on the calling thread and the helper of its [`with_team`], returning
/// when all are done; false (nothing run) when the calling thread has no team.
pub fn team_for_each(tasks: usize, run: &(dyn Fn(usize) + Sync)) -> bool {
    let team = TEAM.with(Cell::get);
    if team.is_null() {
        return false;
    }
    // SAFETY: the pointer is set only while `with_team` runs `f` on this thread, and the
    // team lives as long as the thread.
    let team = unsafe { &*team };
    team.run(tasks, run);
    true
}

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

thread_local! {
    /// The team of [`with_team`]'s `f` while it runs on this thread.
    static TEAM: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// This thread's team, kept between calls so that its helper can linger.
    static MY_TEAM: Arc<Team> = Arc::new(Team::default());
}

/// The shared state of [`with_team`]. `state` packs the job's epoch (high 32 bits), the next
/// unclaimed task (16 bits) and the task count (16 bits): a task is claimed by a
/// compare-and-swap of the whole word, so a claim can only succeed on the job whose epoch
/// was read, and that job's closure (`job`) lives until its tasks are all done.
#[derive(Default)]
struct Team {
    state: AtomicU64,
    job: AtomicPtr<()>,
    done: AtomicUsize,
    panicked: AtomicBool,
    /// Calls of `with_team` on the owner's thread (which alone changes it), and whether a
    /// helper is spawned and has not decided to leave: on a cache line of their own, away
    /// from the loops' words.
    life: Line<Life>,
}

#[derive(Default)]
struct Life {
    /// Bumped when a call starts and when it ends: odd while one runs.
    calls: AtomicU64,
    helper: AtomicBool,
    /// Helpers spawned so far.
    spawns: AtomicU64,
}

#[derive(Default)]
#[repr(align(64))]
struct Line<T>(T);

type Job<'a> = &'a (dyn Fn(usize) + Sync);

impl Team {
    const MAX_TASKS: usize = 0xffff;

    /// How long the helper spins after a `with_team` returns, waiting for the next.
    const LINGER: std::time::Duration = std::time::Duration::from_micros(200);

    /// Starts a call of `with_team` on the owner's thread: makes sure a helper is spawned
    /// (or still lingering).
    fn enter(&self) {
        let life = &self.life.0;
        life.calls.fetch_add(1, Ordering::SeqCst);
        // a leaving helper clears `helper` before its last look at `calls`, so either it
        // sees this call and stays, or this call sees it gone and spawns another
        if !life.helper.load(Ordering::SeqCst) && !life.helper.swap(true, Ordering::SeqCst) {
            life.spawns.fetch_add(1, Ordering::Relaxed);
            let team = MY_TEAM.with(Arc::clone);
            rayon::spawn(move || team.help());
        }
    }

    fn leave(&self) {
        self.life.0.calls.fetch_add(1, Ordering::SeqCst);
    }

    fn run(&self, tasks: usize, run: Job) {
        if tasks == 0 {
            return;
        }
        if tasks > Self::MAX_TASKS {
            (0..tasks).for_each(run);
            return;
        }
        let epoch = (self.state.load(Ordering::Relaxed) >> 32) + 1;
        self.done.store(0, Ordering::Relaxed);
        self.job
            .store(&run as *const Job as *mut (), Ordering::Release);
        self.state
            .store(epoch << 32 | tasks as u64, Ordering::Release);
        // a panicking task must not unwind past `run` while the helper may still be in one;
        // inside a task this thread is not in the team (a loop in a task runs on its own)
        let mut failed = None;
        let me = TEAM.with(|t| t.replace(std::ptr::null()));
        while let Some(i) = self.claim() {
            if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(i))) {
                failed.get_or_insert(e);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
        TEAM.with(|t| t.set(me));
        while self.done.load(Ordering::Acquire) < tasks {
            std::hint::spin_loop();
        }
        if let Some(e) = failed {
            self.panicked.store(false, Ordering::Release);
            std::panic::resume_unwind(e);
        }
        if self.panicked.swap(false, Ordering::AcqRel) {
            panic!("a task of a team loop panicked on the helper thread");
        }
    }

    /// The next unclaimed task of the current job, if any.
    fn claim(&self) -> Option<usize> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (next, tasks) = ((s >> 16) & 0xffff, s & 0xffff);
            if next >= tasks {
                return None;
            }
            match self.state.compare_exchange_weak(
                s,
                s + (1 << 16),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(next as usize),
                Err(now) => s = now,
            }
        }
    }

    /// The helper: claims tasks of whatever job is current while a `with_team` runs, and
    /// for [`Team::LINGER`] after the last one returned.
    fn help(self: &Arc<Self>) {
        // the owner's thread may pick its own spawned helper up while it waits inside `f`
        // for a rayon job: spinning there for a call that cannot end would hang it
        if MY_TEAM.with(|t| Arc::ptr_eq(t, self)) {
            self.life.0.helper.store(false, Ordering::SeqCst);
            return;
        }
        // (calls seen, since when) while no call runs
        let mut idle: Option<(u64, std::time::Instant)> = None;
        let mut spins = 0u32;
        loop {
            let s = self.state.load(Ordering::Acquire);
            let (next, tasks) = ((s >> 16) & 0xffff, s & 0xffff);
            if next >= tasks {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) {
                    let calls = self.life.0.calls.load(Ordering::SeqCst);
                    match idle {
                        _ if !calls.is_multiple_of(2) => idle = None,
                        Some((c, t)) if c == calls => {
                            if t.elapsed() >= Self::LINGER && self.try_leave(calls) {
                                return;
                            }
                        }
                        _ => idle = Some((calls, std::time::Instant::now())),
                    }
                }
                continue;
            }
            // read before the claim: a successful claim proves this job was still current
            // (its tasks not all done, so its closure alive and `job` not yet replaced)
            let job = self.job.load(Ordering::Acquire) as *const Job;
            if self
                .state
                .compare_exchange(s, s + (1 << 16), Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: see above; the owner waits for `done` before the closure goes.
            let run = unsafe { *job };
            let i = next as usize;
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(i))).is_err() {
                self.panicked.store(true, Ordering::Release);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    /// The lingering helper's exit, `calls` the count it has seen unchanged for
    /// [`Team::LINGER`]: true when it may return.
    fn try_leave(&self, calls: u64) -> bool {
        let life = &self.life.0;
        life.helper.store(false, Ordering::SeqCst);
        if life.calls.load(Ordering::SeqCst) == calls {
            return true;
        }
        // a call came: stay its helper, unless it saw this one gone and spawned another
        life.helper.swap(true, Ordering::SeqCst)
    }
}

/// A raw pointer that may cross threads; each user documents why its writes are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Every task of every loop runs exactly once, loops of any size (none, one, more than
    /// the threads) in sequence, on 1, 2 and 3 threads; outside a team nothing runs.
    #[test]
    fn team_runs_each_task_once() {
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        assert!(!team_for_each(3, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        }));
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 0));
        for threads in [1, 2, 3] {
            let total = pool(threads).install(|| {
                with_team(|| {
                    let mut total = 0;
                    for round in 0..200 {
                        let tasks = [0, 1, 2, 7, 64, 1000][round % 6];
                        let ran = team_for_each(tasks, &|i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert_eq!(ran, threads > 1);
                        if !ran {
                            (0..tasks).for_each(|i| {
                                hits[i].fetch_add(1, Ordering::Relaxed);
                            });
                        }
                        total += tasks;
                    }
                    total
                })
            });
            let counted: usize = hits.iter().map(|h| h.swap(0, Ordering::Relaxed)).sum();
            assert_eq!(counted, total, "{threads} threads");
        }
    }

    /// The helper outlives a call by `Team::LINGER` and serves the next call; once no call
    /// has come for that long it leaves, and the next call spawns a new one that runs tasks
    /// too. A helper picked up by the owner's own thread returns at once.
    #[test]
    fn team_helper_lingers_then_leaves() {
        let p = pool(2);
        p.install(|| {
            let helper = || MY_TEAM.with(|t| t.life.0.helper.load(Ordering::SeqCst));
            // the threads that ran tasks of a loop whose tasks wait (up to 10 s, for a busy
            // host) until two threads have
            let loop_threads = || {
                let ids = std::sync::Mutex::new(std::collections::HashSet::new());
                let t0 = std::time::Instant::now();
                with_team(|| {
                    team_for_each(8, &|_| {
                        ids.lock().unwrap().insert(std::thread::current().id());
                        while ids.lock().unwrap().len() < 2 && t0.elapsed().as_secs() < 10 {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    })
                });
                ids.into_inner().unwrap().len()
            };
            let spawns = || MY_TEAM.with(|t| t.life.0.spawns.load(Ordering::Relaxed));
            assert_eq!(loop_threads(), 2, "both threads ran tasks");
            // (a preempted test thread may see a helper leave now and then)
            let before = spawns();
            for _ in 0..100 {
                with_team(|| assert!(in_team()));
                // a gap between calls (a token sampled) shorter than LINGER
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
            assert!(spawns() - before < 50, "calls reuse the lingering helper");
            let t0 = std::time::Instant::now();
            while helper() && t0.elapsed().as_secs() < 10 {
                std::thread::sleep(Team::LINGER);
            }
            assert!(!helper(), "the helper left after LINGER without a call");
            assert_eq!(loop_threads(), 2, "a new helper ran tasks");
            // the owner running its own helper's job (as a rayon wait inside `f` could)
            let team = MY_TEAM.with(Arc::clone);
            team.life.0.helper.store(true, Ordering::SeqCst);
            team.help();
            assert!(!helper(), "the owner's thread does not stay as the helper");
        });
    }

    /// A call from a thread outside any pool runs `f` on a worker of the global pool (where a
    /// rayon loop inside a task waits by running jobs); a call inside a task of the thread's
    /// own team loop runs alone, and both loops still run each task once.
    #[test]
    fn team_calls_from_outside_the_pool_and_from_its_own_tasks() {
        let outside = std::thread::spawn(|| {
            with_team(|| (rayon::current_thread_index(), rayon::current_num_threads()))
        })
        .join()
        .unwrap();
        if outside.1 >= 2 {
            assert!(outside.0.is_some(), "f ran outside the pool");
        }
        pool(2).install(|| {
            let outer: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
            let inner: Vec<AtomicUsize> = (0..64 * 8).map(|_| AtomicUsize::new(0)).collect();
            with_team(|| {
                team_for_each(64, &|i| {
                    outer[i].fetch_add(1, Ordering::Relaxed);
                    with_team(|| {
                        let run = |j: usize| {
                            inner[i * 8 + j].fetch_add(1, Ordering::Relaxed);
                        };
                        if !team_for_each(8, &run) {
                            (0..8).for_each(run);
                        }
                    });
                });
            });
            assert!(outer.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            assert!(inner.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        });
    }

    /// A task that panics on either thread panics the caller of the loop, and the team is
    /// left cleanly (the next `with_team` works).
    #[test]
    fn team_task_panics_reach_the_caller() {
        let p = pool(2);
        for bad in [0, 5] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                p.install(|| {
                    with_team(|| {
                        team_for_each(8, &|i| {
                            // slow tasks so the helper takes some of them
                            std::thread::sleep(std::time::Duration::from_millis(2));
                            assert_ne!(i, bad, "task {i}");
                        })
                    })
                })
            }));
            assert!(r.is_err(), "task {bad} panicked, the loop did not");
            assert!(TEAM.with(|t| t.get().is_null()));
        }
        let n = AtomicUsize::new(0);
        p.install(|| {
            with_team(|| {
                team_for_each(4, &|_| {
                    n.fetch_add(1, Ordering::Relaxed);
                })
            })
        });
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }
}
