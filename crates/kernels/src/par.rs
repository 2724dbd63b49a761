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
/// `f`'s own rayon loops still run, but without the helper's thread (it is spinning), so
/// use this only around work made of such small loops. If the pool has no free thread to
/// run the helper, `f` does every task itself. Which thread runs a task never changes a
/// result (the callers' tasks write disjoint outputs in a fixed order each).
pub fn with_team<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_num_threads() < 2 || TEAM.with(|t| !t.get().is_null()) {
        return f();
    }
    let team = Team::default();
    let (r, ()) = rayon::join(
        || {
            TEAM.with(|t| t.set(&team));
            // reset and stop the helper even if `f` panics
            struct Leave<'a>(&'a Team);
            impl Drop for Leave<'_> {
                fn drop(&mut self) {
                    TEAM.with(|t| t.set(std::ptr::null()));
                    self.0.stop.store(true, Ordering::Release);
                }
            }
            let _leave = Leave(&team);
            f()
        },
        || team.help(),
    );
    r
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
    // SAFETY: the pointer is set only while `with_team`'s frame (which owns the team) runs
    // `f` on this thread.
    let team = unsafe { &*team };
    team.run(tasks, run);
    true
}

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

thread_local! {
    static TEAM: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
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
    stop: AtomicBool,
    panicked: AtomicBool,
}

type Job<'a> = &'a (dyn Fn(usize) + Sync);

impl Team {
    const MAX_TASKS: usize = 0xffff;

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

    /// The helper: claims tasks of whatever job is current until `stop`.
    fn help(&self) {
        while !self.stop.load(Ordering::Acquire) {
            let s = self.state.load(Ordering::Acquire);
            let (next, tasks) = ((s >> 16) & 0xffff, s & 0xffff);
            if next >= tasks {
                std::hint::spin_loop();
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
