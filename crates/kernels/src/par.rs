//! Deterministic parallel helpers shared by the kernels.
//!
//! NOTE: the chunk sizes here are constants, never derived from the thread count; that is what
//! makes every reduction bit-identical for any `RAYON_NUM_THREADS`.

use rayon::prelude::*;

/// Rows per parallel task for row-wise kernels (a scheduling choice only: row-wise kernels do
/// not reduce across rows, so any value gives identical results).
pub const ROWS_PER_TASK: usize = 16;

/// Columns per task for column-wise reductions over rows (weight gradients of norms,
/// embeddings): each task owns a block of output columns and sums over all rows in order.
pub const COLS_PER_TASK: usize = 64;

/// Elements per partial sum in [`sum_squares`].
pub const SUM_CHUNK: usize = 1 << 14;

/// `out[c] += sum_r f(r, c)` for c in the columns of `out`, summing rows in order 0..n_rows.
/// `f` receives the row index and the column range and adds into the given slice.
pub fn column_reduce<F>(out: &mut [f32], n_rows: usize, f: F)
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    out.par_chunks_mut(COLS_PER_TASK)
        .enumerate()
        .for_each(|(blk, acc)| {
            let c0 = blk * COLS_PER_TASK;
            for r in 0..n_rows {
                f(r, c0, acc);
            }
        });
}

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
