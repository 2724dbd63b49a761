//! SwiGLU activation (Shazeer 2020): `a = silu(g) * u` on a fused (N, 2F) gate|up buffer.

use crate::par::ROWS_PER_TASK;
use crate::simd;
use crate::vmath::sigmoid;
use rayon::prelude::*;

simd! {
    fn forward_rows(out: &mut [f32], gu: &[f32], f: usize) {
        for (o, gu) in out.chunks_mut(f).zip(gu.chunks(2 * f)) {
            let (g, u) = gu.split_at(f);
            for j in 0..f {
                o[j] = g[j] * sigmoid(g[j]) * u[j];
            }
        }
    }
}

simd! {
    fn backward_rows(dgu: &mut [f32], dout: &[f32], gu: &[f32], f: usize) {
        for ((dgu, d), gu) in dgu.chunks_mut(2 * f).zip(dout.chunks(f)).zip(gu.chunks(2 * f)) {
            let (g, u) = gu.split_at(f);
            let (dg, du) = dgu.split_at_mut(f);
            for j in 0..f {
                let s = sigmoid(g[j]);
                du[j] = d[j] * g[j] * s;
                dg[j] = d[j] * u[j] * s * (1.0 + g[j] * (1.0 - s));
            }
        }
    }
}

/// `out (N,F) = silu(gu[:, :F]) * gu[:, F:]` for `gu (N, 2F)`.
pub fn swiglu_forward(out: &mut [f32], gu: &[f32], f: usize) {
    out.par_chunks_mut(f * ROWS_PER_TASK)
        .zip(gu.par_chunks(2 * f * ROWS_PER_TASK))
        .for_each(|(o, gu)| forward_rows(o, gu, f));
}

/// Backward of [`swiglu_forward`]: `dgu (N, 2F)` is overwritten.
pub fn swiglu_backward(dgu: &mut [f32], dout: &[f32], gu: &[f32], f: usize) {
    dgu.par_chunks_mut(2 * f * ROWS_PER_TASK)
        .zip(dout.par_chunks(f * ROWS_PER_TASK))
        .zip(gu.par_chunks(2 * f * ROWS_PER_TASK))
        .for_each(|((dgu, dout), gu)| backward_rows(dgu, dout, gu, f));
}
