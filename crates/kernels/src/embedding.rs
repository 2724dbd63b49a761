//! Token embedding lookup and its backward (a deterministic scatter-add).

use crate::par::{SendPtr, ROWS_PER_TASK};

/// Columns per task of the embedding backward: each task owns a block of every row.
const COLS_PER_TASK: usize = 64;
use rayon::prelude::*;

/// `out (N,C) = wte (V,C)[tokens (N)]`.
pub fn embedding_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], c: usize) {
    let v = wte.len() / c;
    out.par_chunks_mut(c * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (r, row) in rows.chunks_mut(c).enumerate() {
                let tok = tokens[blk * ROWS_PER_TASK + r] as usize;
                assert!(tok < v, "token id {tok} out of range for vocab {v}");
                row.copy_from_slice(&wte[tok * c..(tok + 1) * c]);
            }
        });
}

/// `dwte[tokens[n]] += dout[n]` for every row n, in row order (so repeated tokens sum in a
/// fixed order). Parallel over column blocks of the embedding table's rows: each task owns
/// columns [c0, c0+64) of every vocab row.
pub fn embedding_backward(dwte: &mut [f32], tokens: &[u32], dout: &[f32], c: usize) {
    let v = dwte.len() / c;
    let blocks = c.div_ceil(COLS_PER_TASK);
    let ptr = SendPtr(dwte.as_mut_ptr());
    (0..blocks).into_par_iter().for_each(|blk| {
        let c0 = blk * COLS_PER_TASK;
        let c1 = (c0 + COLS_PER_TASK).min(c);
        for (n, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            assert!(tok < v, "token id {tok} out of range for vocab {v}");
            let src = &dout[n * c + c0..n * c + c1];
            // SAFETY: task `blk` writes only columns [c0, c1) of each row, disjoint from
            // every other task; the index is in bounds by the assert above.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(ptr.get().add(tok * c + c0), c1 - c0) };
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
    });
}
