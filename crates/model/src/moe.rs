//! The routed-experts half of an MoE FFN: dropless dispatch (tokens grouped by expert), one
//! SwiGLU matmul pair per expert over its contiguous rows, weighted combine per token.
//! Routing itself (scores, top-k) is in `kernels::router`; the block wiring is in `model`.
//!
//! Shapes: h (N,C); idx, w (N,K); w_gu (E,2F,C); w_down (E,C,F); sorted rows NK.

use kernels::dispatch::{
    combine_backward, combine_forward, gather_backward, gather_forward, Dispatch,
};
use kernels::matmul::Precision;
use kernels::swiglu::{swiglu_backward, swiglu_forward};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct ExpertShape {
    pub n: usize,
    pub e: usize,
    pub k: usize,
    pub c: usize,
    pub f: usize,
    pub precision: Precision,
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
    pub da: &'a mut [f32],  // (NK,F) exactly
    pub dgu: &'a mut [f32], // (NK,2F) exactly
    pub dxe: &'a mut [f32], // (NK,C)
}

/// Splits `buf` (rows of `width`) into one mutable slice per expert group.
fn groups<'a>(mut buf: &'a mut [f32], d: &Dispatch, e: usize, width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(e);
    for j in 0..e {
        let (head, tail) = buf.split_at_mut(d.range(j).len() * width);
        out.push(head);
        buf = tail;
    }
    out
}

fn rows<'a>(buf: &'a [f32], d: &Dispatch, j: usize, width: usize) -> &'a [f32] {
    let r = d.range(j);
    &buf[r.start * width..r.end * width]
}

/// `y (N,C) += sum_slot w[t,slot] * expert_{idx[t,slot]}(h[t])`.
///
/// NOTE: experts run in parallel, one task per expert doing its whole SwiGLU (its rows stay in
/// cache between the two matmuls); each expert's arithmetic is the same whichever thread
/// runs it, so the result does not depend on the thread count.
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
    let ExpertShape {
        e,
        k,
        c,
        f,
        precision,
        ..
    } = s;
    a.disp.build(idx, e);
    gather_forward(&mut a.xe, h, &a.disp, k, c);
    let d = &a.disp;
    let xe = &a.xe;
    let tasks: Vec<_> = groups(&mut a.gue, d, e, 2 * f)
        .into_iter()
        .zip(groups(&mut a.ae, d, e, f))
        .zip(groups(&mut a.ye, d, e, c))
        .enumerate()
        .collect();
    tasks.into_par_iter().for_each(|(j, ((gue, ae), ye))| {
        let _serial = kernels::par::Task::enter();
        let ne = d.range(j).len();
        precision.linear_forward(
            gue,
            rows(xe, d, j, c),
            &w_gu[j * 2 * f * c..(j + 1) * 2 * f * c],
            ne,
            c,
            2 * f,
        );
        swiglu_forward(ae, gue, f);
        precision.linear_forward(ye, ae, &w_down[j * c * f..(j + 1) * c * f], ne, f, c);
    });
    combine_forward(y, &a.ye, w, &a.disp, k, c);
}

/// Backward of [`experts_forward`]: ACCUMULATES into `dh` and the weight gradients; `dw (N,K)`
/// (gradient of the combine weights) is overwritten. Parallel over experts, as the forward.
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
    let ExpertShape {
        e,
        k,
        c,
        f,
        precision,
        ..
    } = s;
    let d = &a.disp;
    combine_backward(g.dye, dw, dy, &a.ye, w, d, k, c);
    let dye: &[f32] = g.dye;
    let tasks: Vec<_> = groups(g.da, d, e, f)
        .into_iter()
        .zip(groups(g.dgu, d, e, 2 * f))
        .zip(groups(g.dxe, d, e, c))
        .zip(dw_gu.chunks_mut(2 * f * c))
        .zip(dw_down.chunks_mut(c * f))
        .enumerate()
        .collect();
    tasks
        .into_par_iter()
        .for_each(|(j, ((((da, dgu), dxe), dwg), dwd))| {
            let _serial = kernels::par::Task::enter();
            let ne = d.range(j).len();
            precision.linear_backward(
                Some(da),
                dwd,
                rows(dye, d, j, c),
                rows(&a.ae, d, j, f),
                &w_down[j * c * f..(j + 1) * c * f],
                ne,
                f,
                c,
                false,
            );
            swiglu_backward(dgu, da, rows(&a.gue, d, j, 2 * f), f);
            precision.linear_backward(
                Some(dxe),
                dwg,
                dgu,
                rows(&a.xe, d, j, c),
                &w_gu[j * 2 * f * c..(j + 1) * 2 * f * c],
                ne,
                c,
                2 * f,
                false,
            );
        });
    gather_backward(dh, g.dxe, d, k, c);
}
