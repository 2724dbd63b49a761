//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), written to follow
//! `torch.optim.AdamW` operation for operation, and global-norm gradient clipping.

use crate::par::sum_squares;
use crate::simd;
use rayon::prelude::*;

simd! {
    #[allow(clippy::too_many_arguments)]
    fn update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], gscale: f32, shrink: f32, b1: f32, b2: f32, eps: f32, step_size: f32, bc2_sqrt: f32) {
        for i in 0..p.len() {
            let g = g[i] * gscale;
            p[i] *= shrink;
            m[i] += (g - m[i]) * (1.0 - b1);
            v[i] = v[i] * b2 + (1.0 - b2) * g * g;
            let denom = v[i].sqrt() / bc2_sqrt + eps;
            p[i] -= step_size * m[i] / denom;
        }
    }
}

/// AdamW hyper-parameters for one step.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

const CHUNK: usize = 4096;

impl AdamW {
    /// Updates `param` in place with the gradient `grad * gscale` (`gscale` is the clipping
    /// factor, fused here to save a pass over the gradients). `step` counts from 1. `decay`
    /// turns weight decay on for this tensor (off for norms and biases).
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        step: u64,
        decay: bool,
        gscale: f32,
    ) {
        let bc1 = 1.0 - (self.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(step as i32);
        let step_size = (self.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let shrink = if decay {
            1.0 - self.lr * self.weight_decay
        } else {
            1.0
        };
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                update_chunk(p, g, m, v, gscale, shrink, b1, b2, eps, step_size, bc2_sqrt)
            });
    }
}

/// Global L2 norm of a set of gradient slices (deterministic order).
pub fn global_norm<'a>(grads: impl Iterator<Item = &'a [f32]>) -> f32 {
    grads.map(sum_squares).sum::<f64>().sqrt() as f32
}

/// Scale factor that clips a gradient of norm `norm` to `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`): 1 when already within bounds.
pub fn clip_scale(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}
