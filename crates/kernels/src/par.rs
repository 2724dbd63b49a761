//! Deterministic parallel helpers shared by the kernels.
//!
//! NOTE: the chunk sizes here are constants, never derived from the thread count; that is what
//! makes every reduction bit-identical for any `RAYON_NUM_THREADS`.

use rayon::prelude::*;

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
    let partials: Vec<f64> = x
        .par_chunks(SUM_CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .collect();
    partials.iter().sum()
}

/// True when called from inside a rayon worker, where nested parallelism would only add
/// overhead (kernels then run their inner matmuls single-threaded).
pub fn in_worker() -> bool {
    rayon::current_thread_index().is_some()
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
