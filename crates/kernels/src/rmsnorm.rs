//! RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w` (Zhang & Sennrich 2019), as in Llama.

use crate::par::{REDUCE_ROWS, ROWS_PER_TASK};
use crate::simd;
use crate::vmath::dot;
use rayon::prelude::*;

simd! {
    fn forward_row(o: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
        let s = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
            *o = x * s * w;
        }
        s
    }
}

simd! {
    /// One row of dx (accumulated) and its contribution to dw (accumulated into `dw`).
    fn backward_row(dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], s: f32, tmp: &mut [f32]) {
        let c = x.len();
        for j in 0..c {
            tmp[j] = dy[j] * w[j];
            dw[j] += dy[j] * x[j] * s;
        }
        // mean_c(dy * w * xhat), xhat = x * s
        let m = dot(&tmp[..c], x) * s / c as f32;
        for j in 0..c {
            dx[j] += s * (tmp[j] - x[j] * s * m);
        }
    }
}

/// `out (N,C) = rmsnorm(x (N,C)) * w (C)`; saves `rstd (N)` for the backward pass.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let c = w.len();
    out.par_chunks_mut(c * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(c * ROWS_PER_TASK))
        .for_each(|((o, r), x)| {
            for ((o, r), x) in o.chunks_mut(c).zip(r.iter_mut()).zip(x.chunks(c)) {
                *r = forward_row(o, x, w, eps);
            }
        });
}

/// Backward of [`rmsnorm_forward`]. ACCUMULATES into `dx` (the residual stream's gradient)
/// and into `dw`.
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
) {
    let c = w.len();
    // One pass over row blocks: dx rows, and a dw partial per block; the partials are then
    // added in block order (fixed, so dw does not depend on the thread count).
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(c * REDUCE_ROWS)
        .enumerate()
        .map(|(blk, dxs)| {
            let mut part = vec![0.0f32; c];
            let mut tmp = vec![0.0f32; c];
            for (i, dx) in dxs.chunks_mut(c).enumerate() {
                let r = blk * REDUCE_ROWS + i;
                let rows = r * c..(r + 1) * c;
                backward_row(
                    dx,
                    &mut part,
                    &dout[rows.clone()],
                    &x[rows],
                    w,
                    rstd[r],
                    &mut tmp,
                );
            }
            part
        })
        .collect();
    for part in &partials {
        for (a, p) in dw.iter_mut().zip(part) {
            *a += p;
        }
    }
}
