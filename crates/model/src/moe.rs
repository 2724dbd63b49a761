//! The routed-experts half of an MoE FFN: dropless dispatch (tokens grouped by expert), one
//! SwiGLU matmul pair per expert over its contiguous rows, weighted combine per token.
//! Routing itself (scores, top-k) is in `kernels::router`; the block wiring is in `model`.
//!
//! Shapes: h (N,C); idx, w (N,K); w_gu (E,2F,C); w_down (E,C,F); sorted rows NK.

use kernels::dispatch::{
    combine_backward, combine_forward, gather_backward, gather_forward, Dispatch,
};
use kernels::matmul::{linear_backward, linear_forward};
use kernels::swiglu::{swiglu_backward, swiglu_forward};

#[derive(Clone, Copy, Debug)]
pub struct ExpertShape {
    pub n: usize,
    pub e: usize,
    pub k: usize,
    pub c: usize,
    pub f: usize,
}

/// Activations the backward pass needs, allocated once for (N, K).
pub struct ExpertActs {
    pub disp: Dispatch,
    pub xe: Vec<f32>,  // (NK,C) inputs grouped by expert
    pub gue: Vec<f32>, // (NK,2F)
    pub ae: Vec<f32>,  // (NK,F)
    pub ye: Vec<f32>,  // (NK,C)
}

impl ExpertActs {
    pub fn new(s: ExpertShape) -> Self {
        let nk = s.n * s.k;
        ExpertActs {
            disp: Dispatch::new(s.n, s.k, s.e),
            xe: vec![0.0; nk * s.c],
            gue: vec![0.0; nk * 2 * s.f],
            ae: vec![0.0; nk * s.f],
            ye: vec![0.0; nk * s.c],
        }
    }
}

/// Backward scratch, shared by all blocks.
pub struct ExpertScratch<'a> {
    pub dye: &'a mut [f32], // (NK,C)
    pub da: &'a mut [f32],  // (NK,F)
    pub dgu: &'a mut [f32], // (NK,2F)
    pub dxe: &'a mut [f32], // (NK,C)
}

/// `y (N,C) += sum_slot w[t,slot] * expert_{idx[t,slot]}(h[t])`.
#[allow(clippy::too_many_arguments)]
pub fn experts_forward(
    y: &mut [f32],
    h: &[f32],
    idx: &[u32],
    w: &[f32],
    w_gu: &[f32],
    w_down: &[f32],
    s: ExpertShape,
    a: &mut ExpertActs,
) {
    let ExpertShape { e, k, c, f, .. } = s;
    a.disp.build(idx, e);
    gather_forward(&mut a.xe, h, &a.disp, k, c);
    for j in 0..e {
        let rg = a.disp.range(j);
        let wg = &w_gu[j * 2 * f * c..(j + 1) * 2 * f * c];
        linear_forward(
            &mut a.gue[rg.start * 2 * f..rg.end * 2 * f],
            &a.xe[rg.start * c..rg.end * c],
            wg,
            rg.len(),
            c,
            2 * f,
        );
    }
    swiglu_forward(&mut a.ae, &a.gue, f);
    for j in 0..e {
        let rg = a.disp.range(j);
        let wd = &w_down[j * c * f..(j + 1) * c * f];
        linear_forward(
            &mut a.ye[rg.start * c..rg.end * c],
            &a.ae[rg.start * f..rg.end * f],
            wd,
            rg.len(),
            f,
            c,
        );
    }
    combine_forward(y, &a.ye, w, &a.disp, k, c);
}

/// Backward of [`experts_forward`]: ACCUMULATES into `dh` and the weight gradients; `dw (N,K)`
/// (gradient of the combine weights) is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn experts_backward(
    dh: &mut [f32],
    dw: &mut [f32],
    dw_gu: &mut [f32],
    dw_down: &mut [f32],
    dy: &[f32],
    w: &[f32],
    w_gu: &[f32],
    w_down: &[f32],
    s: ExpertShape,
    a: &ExpertActs,
    g: ExpertScratch,
) {
    let ExpertShape { n, e, k, c, f } = s;
    let nk = n * k;
    combine_backward(g.dye, dw, dy, &a.ye, w, &a.disp, k, c);
    for j in 0..e {
        let rg = a.disp.range(j);
        linear_backward(
            Some(&mut g.da[rg.start * f..rg.end * f]),
            &mut dw_down[j * c * f..(j + 1) * c * f],
            &g.dye[rg.start * c..rg.end * c],
            &a.ae[rg.start * f..rg.end * f],
            &w_down[j * c * f..(j + 1) * c * f],
            rg.len(),
            f,
            c,
            false,
        );
    }
    swiglu_backward(&mut g.dgu[..nk * 2 * f], &g.da[..nk * f], &a.gue, f);
    for j in 0..e {
        let rg = a.disp.range(j);
        linear_backward(
            Some(&mut g.dxe[rg.start * c..rg.end * c]),
            &mut dw_gu[j * 2 * f * c..(j + 1) * 2 * f * c],
            &g.dgu[rg.start * 2 * f..rg.end * 2 * f],
            &a.xe[rg.start * c..rg.end * c],
            &w_gu[j * 2 * f * c..(j + 1) * 2 * f * c],
            rg.len(),
            c,
            2 * f,
            false,
        );
    }
    gather_backward(dh, g.dxe, &a.disp, k, c);
}
