//! Optimizer state over the model's parameter layout: AdamW moments (Muon's momentum lives
//! in `m` of the tensors it updates), step count, and the global-norm clip applied before
//! each update.

use crate::config::{OptimizerKind, TrainConfig};
use crate::model::Model;
use kernels::adamw::{clip_scale, global_norm, AdamW};
use kernels::muon::{orthogonalize, Muon};
use rayon::prelude::*;

/// Optimizer state for every trainable tensor of a [`Model`]: AdamW's moments, or for the
/// tensors Muon updates (`train.optimizer = "muon"`) its momentum in `m` (their `v` stays 0),
/// so a checkpoint has the same two buffers for either optimizer.
#[derive(Clone)]
pub struct Optimizer {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
    /// Muon's updates being orthogonalised (scratch, not state).
    scratch: Vec<f32>,
}

impl Optimizer {
    pub fn new(model: &Model) -> Optimizer {
        Optimizer {
            m: vec![0.0; model.layout.total],
            v: vec![0.0; model.layout.total],
            step: 0,
            scratch: vec![],
        }
    }

    /// Global L2 norm of the trainable parameters' gradients (what clipping uses).
    pub fn grad_norm(model: &Model) -> f32 {
        global_norm(
            model
                .layout
                .tensors
                .iter()
                .filter(|t| t.trainable)
                .map(|t| &model.grads[t.offset..t.offset + t.len]),
        )
    }

    /// Clips the accumulated gradients to `tc.grad_clip` and applies one step at `lr` (Muon's
    /// tensors at `tc.muon_lr * lr / tc.lr`). Returns the gradient norm before clipping.
    pub fn step(&mut self, model: &mut Model, tc: &TrainConfig, lr: f32) -> f32 {
        let norm = Optimizer::grad_norm(model);
        self.step_with_norm(model, tc, lr, norm);
        norm
    }

    /// [`Optimizer::step`] with the gradient norm already computed (the training loop checks
    /// it for anomalies first).
    pub fn step_with_norm(&mut self, model: &mut Model, tc: &TrainConfig, lr: f32, norm: f32) {
        let lay = &model.layout;
        let s = clip_scale(norm, tc.grad_clip);
        self.step += 1;
        let opt = AdamW {
            lr,
            beta1: tc.beta1,
            beta2: tc.beta2,
            eps: tc.eps,
            weight_decay: tc.weight_decay,
        };
        let muon = (tc.optimizer == OptimizerKind::Muon).then(|| Muon {
            lr: tc.muon_lr * (lr / tc.lr),
            momentum: tc.muon_momentum,
            weight_decay: tc.weight_decay,
            ns_steps: tc.muon_ns_steps,
            precision: tc.precision.kernels(),
        });
        for t in lay.tensors.iter().filter(|t| t.trainable) {
            if muon.is_some() && !t.blocks.is_empty() {
                continue;
            }
            let r = t.offset..t.offset + t.len;
            opt.update(
                &mut model.params[r.clone()],
                &model.grads[r.clone()],
                &mut self.m[r.clone()],
                &mut self.v[r],
                self.step,
                t.decay,
                s,
            );
        }
        if let Some(mu) = muon {
            self.muon_step(model, &mu, s);
        }
    }

    /// Muon on every tensor with [`crate::params::TensorSpec::blocks`]: momentum, then each
    /// block's Nesterov update orthogonalised (the blocks in parallel, each on one thread:
    /// the same bits for any thread count) and applied.
    fn muon_step(&mut self, model: &mut Model, mu: &Muon, gscale: f32) {
        let hidden: Vec<_> = model
            .layout
            .tensors
            .iter()
            .filter(|t| t.trainable && !t.blocks.is_empty())
            .collect();
        let total = hidden.iter().map(|t| t.len).sum();
        self.scratch.resize(total, 0.0);
        // (param offset, rows, cols, decay) of each block, and its slice of the scratch
        let mut blocks = Vec::new();
        let mut rest = self.scratch.as_mut_slice();
        for t in &hidden {
            let r = t.offset..t.offset + t.len;
            let (u, tail) = rest.split_at_mut(t.len);
            rest = tail;
            mu.momentum(u, &mut self.m[r.clone()], &model.grads[r], gscale);
            let cols = *t.shape.last().expect("a matrix");
            let mut u = u;
            let mut at = t.offset;
            for &rows in &t.blocks {
                let (b, tail) = u.split_at_mut(rows * cols);
                u = tail;
                blocks.push(((at, rows, cols, t.decay), b));
                at += rows * cols;
            }
        }
        // one work buffer per rayon job, reused across the blocks it takes
        blocks.par_iter_mut().with_max_len(1).for_each_init(
            Vec::new,
            |work, ((_, rows, cols, _), u)| {
                let _serial = kernels::par::Task::enter();
                orthogonalize(u, *rows, *cols, mu.ns_steps, mu.precision, work)
            },
        );
        for ((at, rows, cols, decay), u) in &blocks {
            let p = &mut model.params[*at..*at + rows * cols];
            mu.apply(p, u, *rows, *cols, *decay);
        }
    }
}

/// One optimisation step on one micro-batch: zero gradients, forward, backward, clip +
/// AdamW, bias balancing. Returns the losses and the gradient norm before clipping.
pub fn train_step(
    model: &mut Model,
    opt: &mut Optimizer,
    tokens: &[u32],
    targets: &[u32],
    tc: &TrainConfig,
    lr: f32,
) -> (crate::model::Losses, f32) {
    model.zero_grad();
    let losses = model.forward(tokens, targets);
    model.backward(1.0);
    let norm = opt.step(model, tc, lr);
    model.update_balance_bias();
    (losses, norm)
}
