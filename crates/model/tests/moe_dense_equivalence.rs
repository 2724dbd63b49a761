//! "Every path agrees": the sparse, dropless expert dispatch equals a dense loop that runs
//! every expert on every token and masks by the router's choice, forward and backward.
//! Tolerance: 1e-5 normalised max error (the two differ only in float32 summation order).

use kernels::matmul::linear_forward;
use model::moe::{experts_backward, experts_forward, ExpertActs, ExpertScratch, ExpertShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Dense reference in f64: y[t] = sum_e mask[t,e] * w[t,e] * expert_e(h[t]), and the
/// gradients of sum(y * r) w.r.t. h, the weights and w.
#[allow(clippy::type_complexity)]
fn dense(
    h: &[f32],
    idx: &[u32],
    w: &[f32],
    w_gu: &[f32],
    w_down: &[f32],
    r: &[f32],
    s: ExpertShape,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let ExpertShape { n, e, k, c, f, .. } = s;
    let (mut y, mut dh, mut dgu, mut dd, mut dw) = (
        vec![0.0; n * c],
        vec![0.0; n * c],
        vec![0.0; e * 2 * f * c],
        vec![0.0; e * c * f],
        vec![0.0; n * k],
    );
    for ex in 0..e {
        for t in 0..n {
            // the mask: weight of expert ex for token t, zero when not chosen
            let slot = (0..k).find(|&j| idx[t * k + j] as usize == ex);
            let m = slot.map_or(0.0, |j| w[t * k + j] as f64);
            let x = &h[t * c..(t + 1) * c];
            let wg = &w_gu[ex * 2 * f * c..];
            let g: Vec<f64> = (0..f)
                .map(|i| (0..c).map(|j| wg[i * c + j] as f64 * x[j] as f64).sum())
                .collect();
            let u: Vec<f64> = (0..f)
                .map(|i| {
                    (0..c)
                        .map(|j| wg[(f + i) * c + j] as f64 * x[j] as f64)
                        .sum()
                })
                .collect();
            let a: Vec<f64> = (0..f).map(|i| silu(g[i]) * u[i]).collect();
            let wd = &w_down[ex * c * f..];
            let out: Vec<f64> = (0..c)
                .map(|o| (0..f).map(|i| wd[o * f + i] as f64 * a[i]).sum())
                .collect();
            let rr = &r[t * c..(t + 1) * c];
            for o in 0..c {
                y[t * c + o] += m * out[o];
            }
            if let Some(j) = slot {
                dw[t * k + j] = (0..c).map(|o| rr[o] as f64 * out[o]).sum();
            }
            // backward of m * out . r
            let da: Vec<f64> = (0..f)
                .map(|i| {
                    (0..c)
                        .map(|o| m * rr[o] as f64 * wd[o * f + i] as f64)
                        .sum()
                })
                .collect();
            for o in 0..c {
                for i in 0..f {
                    dd[ex * c * f + o * f + i] += m * rr[o] as f64 * a[i];
                }
            }
            for i in 0..f {
                let sg = 1.0 / (1.0 + (-g[i]).exp());
                let dgi = da[i] * u[i] * sg * (1.0 + g[i] * (1.0 - sg));
                let dui = da[i] * silu(g[i]);
                for j in 0..c {
                    dgu[ex * 2 * f * c + i * c + j] += dgi * x[j] as f64;
                    dgu[ex * 2 * f * c + (f + i) * c + j] += dui * x[j] as f64;
                    dh[t * c + j] += dgi * wg[i * c + j] as f64 + dui * wg[(f + i) * c + j] as f64;
                }
            }
        }
    }
    (y, dh, dgu, dd, dw)
}

fn err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs() / scale)
        .fold(0.0, f64::max)
}

#[test]
fn sparse_dispatch_equals_dense_masked_loop() {
    let s = ExpertShape {
        n: 40,
        e: 5,
        k: 2,
        c: 12,
        f: 9,
        precision: Default::default(),
    };
    let ExpertShape { n, e, k, c, f, .. } = s;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut v =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect() };
    let h = v(n * c);
    let w_gu = v(e * 2 * f * c);
    let w_down = v(e * c * f);
    let w = v(n * k);
    let r = v(n * c);
    // routing from a random router so groups have uneven sizes; expert 4 gets no tokens
    let router = v(e * c);
    let mut logits = vec![0.0; n * e];
    linear_forward(&mut logits, &h, &router, n, c, e);
    let mut idx = vec![0u32; n * k];
    for t in 0..n {
        let mut order: Vec<usize> = (0..e - 1).collect();
        order.sort_by(|&a, &b| {
            logits[t * e + b]
                .total_cmp(&logits[t * e + a])
                .then(a.cmp(&b))
        });
        for j in 0..k {
            idx[t * k + j] = order[j] as u32;
        }
    }
    let mut acts = ExpertActs::new(s);
    let mut y = vec![0.0; n * c];
    experts_forward(&mut y, &h, &idx, &w, &w_gu, &w_down, s, &mut acts);
    assert_eq!(
        acts.disp.range(4).len(),
        0,
        "expert 4 should be empty in this test"
    );
    let (dy_ref, dh_ref, dgu_ref, dd_ref, dw_ref) = dense(&h, &idx, &w, &w_gu, &w_down, &r, s);
    let ey = err(&y, &dy_ref);
    let (mut dh, mut dw, mut dgu, mut dd) = (
        vec![0.0; n * c],
        vec![0.0; n * k],
        vec![0.0; e * 2 * f * c],
        vec![0.0; e * c * f],
    );
    let nk = n * k;
    let (mut dye, mut da, mut dgus, mut dxe) = (
        vec![0.0; nk * c],
        vec![0.0; nk * f],
        vec![0.0; nk * 2 * f],
        vec![0.0; nk * c],
    );
    let scratch = ExpertScratch {
        dye: &mut dye,
        da: &mut da,
        dgu: &mut dgus,
        dxe: &mut dxe,
    };
    experts_backward(
        &mut dh, &mut dw, &mut dgu, &mut dd, &r, &w, &w_gu, &w_down, s, &acts, scratch,
    );
    let errs = [
        ("y", ey),
        ("dh", err(&dh, &dh_ref)),
        ("dw_gate_up", err(&dgu, &dgu_ref)),
        ("dw_down", err(&dd, &dd_ref)),
        ("dweights", err(&dw, &dw_ref)),
    ];
    for (name, e) in errs {
        println!("{name}: normalised max error {e:.2e}");
        assert!(e <= 1e-5, "{name}: sparse vs dense error {e:.2e} > 1e-5");
    }
}
