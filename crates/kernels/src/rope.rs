//! Rotary position embedding (Su et al. 2021), "rotate half" layout as in Hugging Face Llama:
//! dimension i pairs with i + D/2.

use crate::par::ROWS_PER_TASK;
use rayon::prelude::*;

/// Precomputed `cos`/`sin` tables, each (T, D/2).
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeTable {
    pub fn new(max_t: usize, d: usize, theta: f32) -> Self {
        let half = d / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / (theta as f64).powf((2 * i) as f64 / d as f64))
            .collect();
        RopeTable::from_inv_freq(max_t, d, &inv, 1.0)
    }

    /// The table of inverse frequencies `inv` (one per dim pair, e.g. stretched by a RoPE
    /// scaling), cos and sin multiplied by `scale` (YaRN's attention factor).
    pub fn from_inv_freq(max_t: usize, d: usize, inv: &[f64], scale: f64) -> Self {
        assert!(d.is_multiple_of(2), "head dim {d} must be even for RoPE");
        let half = d / 2;
        assert_eq!(inv.len(), half);
        let mut cos = vec![0.0; max_t * half];
        let mut sin = vec![0.0; max_t * half];
        for t in 0..max_t {
            for (i, f) in inv.iter().enumerate() {
                // Computed in f64 so the table does not depend on libm's f32 rounding.
                let a = t as f64 * f;
                cos[t * half + i] = (a.cos() * scale) as f32;
                sin[t * half + i] = (a.sin() * scale) as f32;
            }
        }
        RopeTable { cos, sin, half }
    }
}

/// Rotates, in place, `n_heads` heads of width D starting at column `col0` of every row of
/// `x (N, row_len)`. Row n has position `n % t`. `inverse` applies the transpose rotation,
/// which is the backward pass.
pub fn rope_apply(
    x: &mut [f32],
    row_len: usize,
    col0: usize,
    n_heads: usize,
    t: usize,
    table: &RopeTable,
    inverse: bool,
) {
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(row_len * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (i, row) in rows.chunks_mut(row_len).enumerate() {
                let pos = (blk * ROWS_PER_TASK + i) % t;
                rotate_row(row, col0, n_heads, pos, table, sign);
            }
        });
}

fn rotate_row(
    row: &mut [f32],
    col0: usize,
    n_heads: usize,
    pos: usize,
    table: &RopeTable,
    sign: f32,
) {
    let half = table.half;
    let d = 2 * half;
    let cos = &table.cos[pos * half..(pos + 1) * half];
    let sin = &table.sin[pos * half..(pos + 1) * half];
    for h in 0..n_heads {
        let head = &mut row[col0 + h * d..col0 + (h + 1) * d];
        let (a, b) = head.split_at_mut(half);
        for j in 0..half {
            let (x1, x2) = (a[j], b[j]);
            let s = sign * sin[j];
            a[j] = x1 * cos[j] - x2 * s;
            b[j] = x2 * cos[j] + x1 * s;
        }
    }
}

/// Rotates one row (a single token at position `pos`) in place: the decode-time form.
pub fn rope_apply_at(row: &mut [f32], col0: usize, n_heads: usize, pos: usize, table: &RopeTable) {
    assert!(
        pos < table.cos.len() / table.half,
        "position {pos} beyond the RoPE table"
    );
    rotate_row(row, col0, n_heads, pos, table, 1.0);
}
