//! Dropless MoE dispatch and combine: tokens are grouped by expert with a stable counting sort
//! (order of (token, slot)), every expert then runs one matmul over its contiguous rows, and
//! outputs are combined per token in slot order. Nothing is dropped, nothing depends on
//! thread timing.

use crate::par::ROWS_PER_TASK;
use crate::simd;
use crate::vmath::dot;
use rayon::prelude::*;

/// The grouping of N*K (token, slot) pairs by expert. Allocated once, refilled every step.
#[derive(Clone, Debug, Default)]
pub struct Dispatch {
    /// Start row of each expert's group in the sorted order (E + 1).
    pub offsets: Vec<usize>,
    /// Sorted row -> source pair `token * K + slot` (N*K).
    pub src: Vec<u32>,
    /// Pair `token * K + slot` -> sorted row (N*K).
    pub pos: Vec<u32>,
}

impl Dispatch {
    pub fn new(n: usize, k: usize, e: usize) -> Self {
        Dispatch {
            offsets: vec![0; e + 1],
            src: vec![0; n * k],
            pos: vec![0; n * k],
        }
    }

    /// Stable counting sort of `idx (N,K)` by expert id.
    pub fn build(&mut self, idx: &[u32], e: usize) {
        assert_eq!(idx.len(), self.src.len());
        self.offsets.fill(0);
        for &x in idx {
            self.offsets[x as usize + 1] += 1;
        }
        for j in 0..e {
            self.offsets[j + 1] += self.offsets[j];
        }
        let mut next: Vec<usize> = self.offsets[..e].to_vec();
        for (pair, &x) in idx.iter().enumerate() {
            let row = next[x as usize];
            next[x as usize] += 1;
            self.src[row] = pair as u32;
            self.pos[pair] = row as u32;
        }
    }

    /// Rows of expert `j` in the sorted order.
    pub fn range(&self, j: usize) -> std::ops::Range<usize> {
        self.offsets[j]..self.offsets[j + 1]
    }
}

/// `xe (N*K, C)[row] = x (N,C)[token of row]`.
pub fn gather_forward(xe: &mut [f32], x: &[f32], d: &Dispatch, k: usize, c: usize) {
    xe.par_chunks_mut(c * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (i, row) in rows.chunks_mut(c).enumerate() {
                let tok = d.src[blk * ROWS_PER_TASK + i] as usize / k;
                row.copy_from_slice(&x[tok * c..(tok + 1) * c]);
            }
        });
}

/// Backward of [`gather_forward`]: `dx[t] += sum_slot dxe[pos(t, slot)]`, slots in order.
pub fn gather_backward(dx: &mut [f32], dxe: &[f32], d: &Dispatch, k: usize, c: usize) {
    dx.par_chunks_mut(c * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (i, row) in rows.chunks_mut(c).enumerate() {
                let t = blk * ROWS_PER_TASK + i;
                for slot in 0..k {
                    let r = d.pos[t * k + slot] as usize;
                    for (a, b) in row.iter_mut().zip(&dxe[r * c..(r + 1) * c]) {
                        *a += b;
                    }
                }
            }
        });
}

/// `y[t] += sum_slot w[t,slot] * ye[pos(t,slot)]`, slots in order.
pub fn combine_forward(y: &mut [f32], ye: &[f32], w: &[f32], d: &Dispatch, k: usize, c: usize) {
    y.par_chunks_mut(c * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (i, row) in rows.chunks_mut(c).enumerate() {
                let t = blk * ROWS_PER_TASK + i;
                for slot in 0..k {
                    let r = d.pos[t * k + slot] as usize;
                    let wt = w[t * k + slot];
                    for (a, b) in row.iter_mut().zip(&ye[r * c..(r + 1) * c]) {
                        *a += wt * b;
                    }
                }
            }
        });
}

/// Backward of [`combine_forward`]: `dye (N*K, C)` and `dw (N,K)` are overwritten.
pub fn combine_backward(
    dye: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    ye: &[f32],
    w: &[f32],
    d: &Dispatch,
    k: usize,
    c: usize,
) {
    dye.par_chunks_mut(c * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (i, row) in rows.chunks_mut(c).enumerate() {
                let pair = d.src[blk * ROWS_PER_TASK + i] as usize;
                let (t, wt) = (pair / k, w[pair]);
                for (a, b) in row.iter_mut().zip(&dy[t * c..(t + 1) * c]) {
                    *a = wt * b;
                }
            }
        });
    dw.par_chunks_mut(k * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, dws)| combine_weight_grads(dws, blk * ROWS_PER_TASK, dy, ye, d, k, c));
}

simd! {
    /// d(combine weight) of tokens `t0..` (k per token): the dot of the token's output
    /// gradient with the expert output it weighted, in [`dot`]'s lane order (a plain
    /// iterator sum ran at add latency: ~3 ms of a small-moe step).
    #[allow(clippy::too_many_arguments)]
    fn combine_weight_grads(dws: &mut [f32], t0: usize, dy: &[f32], ye: &[f32], d: &Dispatch, k: usize, c: usize) {
        for (i, dw) in dws.chunks_mut(k).enumerate() {
            let t = t0 + i;
            for (slot, g) in dw.iter_mut().enumerate() {
                let r = d.pos[t * k + slot] as usize;
                *g = dot(&dy[t * c..(t + 1) * c], &ye[r * c..(r + 1) * c]);
            }
        }
    }
}
