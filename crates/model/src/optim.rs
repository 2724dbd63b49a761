//! Optimizer state over the model's parameter layout: AdamW moments, step count, and the
//! global-norm clip applied before each update.

use crate::config::TrainConfig;
use crate::model::Model;
use kernels::adamw::{clip_scale, global_norm, AdamW};

/// AdamW state for every trainable tensor of a [`Model`].
#[derive(Clone)]
pub struct Optimizer {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
}

impl Optimizer {
    pub fn new(model: &Model) -> Optimizer {
        Optimizer {
            m: vec![0.0; model.layout.total],
            v: vec![0.0; model.layout.total],
            step: 0,
        }
    }

    /// Clips the accumulated gradients to `tc.grad_clip` and applies one AdamW step at `lr`.
    /// Returns the gradient norm before clipping.
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
        for t in lay.tensors.iter().filter(|t| t.trainable) {
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
