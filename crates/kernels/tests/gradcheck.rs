//! Finite-difference checks of every kernel's backward pass.
//!
//! Each check forms a scalar `L = sum(out * r)` with a fixed random `r`, takes the analytic
//! gradient from the kernel's backward, and compares it with central differences
//! (step 1e-2 in float32, loss summed in float64) on every input element. Tolerance: max
//! |analytic - numeric| / max |numeric| <= 2e-3 (float32 forward rounding bounds the
//! achievable agreement); the worst element is printed.

use kernels::attention::{attention_backward, attention_forward, AttnShape};
use kernels::dispatch::{
    combine_backward, combine_forward, gather_backward, gather_forward, Dispatch,
};
use kernels::embedding::{embedding_backward, embedding_forward};
use kernels::loss::{
    cross_entropy_backward, cross_entropy_distill_backward, cross_entropy_forward, distill_forward,
};
use kernels::matmul::{linear_backward, linear_forward};
use kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use kernels::rope::{rope_apply, RopeTable};
use kernels::router::*;
use kernels::swiglu::{swiglu_backward, swiglu_forward};
use kernels::IGNORE_INDEX;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const EPS: f32 = 1e-2;
const TOL: f64 = 2e-3;

fn randv(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Central differences of `f` at `x`, compared with `analytic`.
fn check(name: &str, x: &[f32], analytic: &[f32], f: impl Fn(&[f32]) -> f64) {
    let mut xp = x.to_vec();
    let mut numeric = vec![0.0f64; x.len()];
    for i in 0..x.len() {
        let orig = xp[i];
        xp[i] = orig + EPS;
        let up = f(&xp);
        xp[i] = orig - EPS;
        let down = f(&xp);
        xp[i] = orig;
        numeric[i] = (up - down) / (2.0 * EPS as f64);
    }
    let scale = numeric
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-12);
    let (mut worst, mut at) = (0.0, 0);
    for i in 0..x.len() {
        let e = (analytic[i] as f64 - numeric[i]).abs() / scale;
        if e > worst {
            worst = e;
            at = i;
        }
    }
    println!(
        "{name}: worst normalised error {worst:.2e} at {at} (analytic {} numeric {:.6})",
        analytic[at], numeric[at]
    );
    assert!(
        worst <= TOL,
        "{name}: FD mismatch {worst:.2e} > {TOL} at {at}: analytic {} numeric {}",
        analytic[at],
        numeric[at]
    );
}

#[test]
fn linear() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (n, i, o) = (5, 7, 3);
    let x = randv(&mut rng, n * i, 1.0);
    let w = randv(&mut rng, o * i, 1.0);
    let r = randv(&mut rng, n * o, 1.0);
    let fwd = |x: &[f32], w: &[f32]| {
        let mut out = vec![0.0; n * o];
        linear_forward(&mut out, x, w, n, i, o);
        dot(&out, &r)
    };
    let mut dx = vec![0.0; n * i];
    let mut dw = vec![0.0; o * i];
    linear_backward(Some(&mut dx), &mut dw, &r, &x, &w, n, i, o, false);
    check("linear dx", &x, &dx, |x| fwd(x, &w));
    check("linear dw", &w, &dw, |w| fwd(&x, w));
}

#[test]
fn rmsnorm() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (n, c) = (4, 19);
    let x = randv(&mut rng, n * c, 1.0);
    let w = randv(&mut rng, c, 1.0);
    let r = randv(&mut rng, n * c, 1.0);
    let fwd = |x: &[f32], w: &[f32]| {
        let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        rmsnorm_forward(&mut out, &mut rstd, x, w, 1e-5);
        dot(&out, &r)
    };
    let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
    rmsnorm_forward(&mut out, &mut rstd, &x, &w, 1e-5);
    let (mut dx, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
    rmsnorm_backward(&mut dx, &mut dw, &r, &x, &w, &rstd);
    check("rmsnorm dx", &x, &dx, |x| fwd(x, &w));
    check("rmsnorm dw", &w, &dw, |w| fwd(&x, w));
}

#[test]
fn rope() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (t, heads, d) = (6, 3, 8);
    let row = heads * d + 4; // extra columns that must stay untouched
    let table = RopeTable::new(t, d, 10000.0);
    let x = randv(&mut rng, 2 * t * row, 1.0);
    let r = randv(&mut rng, 2 * t * row, 1.0);
    let fwd = |x: &[f32]| {
        let mut y = x.to_vec();
        rope_apply(&mut y, row, 2, heads, t, &table, false);
        dot(&y, &r)
    };
    let mut dx = r.clone();
    rope_apply(&mut dx, row, 2, heads, t, &table, true);
    check("rope", &x, &dx, fwd);
}

fn attention_case(g: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(4 + g as u64);
    // T > ROW_BLOCK so the causal row blocks are exercised
    let s = AttnShape {
        b: 2,
        t: 37,
        h: 4,
        g,
        d: 4,
    };
    let rl = (s.h + 2 * s.g) * s.d;
    let n = s.b * s.t;
    let qkv = randv(&mut rng, n * rl, 1.0);
    let r = randv(&mut rng, n * s.h * s.d, 1.0);
    let fwd = |qkv: &[f32]| {
        let (mut out, mut att) = (vec![0.0; n * s.h * s.d], vec![0.0; s.b * s.h * s.t * s.t]);
        attention_forward(&mut out, &mut att, qkv, s);
        dot(&out, &r)
    };
    let (mut out, mut att) = (vec![0.0; n * s.h * s.d], vec![0.0; s.b * s.h * s.t * s.t]);
    attention_forward(&mut out, &mut att, &qkv, s);
    let (mut dqkv, mut datt) = (vec![f32::NAN; n * rl], vec![0.0; att.len()]);
    attention_backward(&mut dqkv, &mut datt, &r, &qkv, &att, s);
    check(&format!("attention G={g}"), &qkv, &dqkv, fwd);
}

#[test]
fn attention_mha() {
    attention_case(4);
}

#[test]
fn attention_gqa() {
    attention_case(2);
}

#[test]
fn attention_mqa() {
    attention_case(1);
}

#[test]
fn swiglu() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (n, f) = (3, 11);
    let gu = randv(&mut rng, n * 2 * f, 2.0);
    let r = randv(&mut rng, n * f, 1.0);
    let fwd = |gu: &[f32]| {
        let mut out = vec![0.0; n * f];
        swiglu_forward(&mut out, gu, f);
        dot(&out, &r)
    };
    let mut dgu = vec![0.0; n * 2 * f];
    swiglu_backward(&mut dgu, &r, &gu, f);
    check("swiglu", &gu, &dgu, fwd);
}

#[test]
fn cross_entropy() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (n, v) = (5, 13);
    let logits = randv(&mut rng, n * v, 3.0);
    let targets: Vec<u32> = vec![3, IGNORE_INDEX, 0, 12, 7];
    let fwd = |l: &[f32]| {
        let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
        let (sum, cnt) = cross_entropy_forward(&mut losses, &mut lse, l, &targets, v);
        sum / cnt as f64
    };
    let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
    let (_, cnt) = cross_entropy_forward(&mut losses, &mut lse, &logits, &targets, v);
    assert_eq!(cnt, 4);
    let mut d = logits.clone();
    cross_entropy_backward(&mut d, &lse, &targets, v, 1.0 / cnt as f32);
    check("cross_entropy", &logits, &d, fwd);
}

#[test]
fn cross_entropy_with_distillation() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let (n, v) = (5, 13);
    let logits = randv(&mut rng, n * v, 3.0);
    let teacher = randv(&mut rng, n * v, 3.0);
    let targets: Vec<u32> = vec![3, IGNORE_INDEX, 0, 12, 7];
    let (w, temp) = (0.4f32, 2.0f32);
    let fwd = |l: &[f32]| {
        let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
        let (ce, cnt) = cross_entropy_forward(&mut losses, &mut lse, l, &targets, v);
        let (kd, _) = distill_forward(l, &teacher, &targets, v, temp);
        ((1.0 - w as f64) * ce + w as f64 * kd) / cnt as f64
    };
    let (mut losses, mut lse) = (vec![0.0; n], vec![0.0; n]);
    let (_, cnt) = cross_entropy_forward(&mut losses, &mut lse, &logits, &targets, v);
    let mut d = logits.clone();
    let s = 1.0 / cnt as f32;
    cross_entropy_distill_backward(
        &mut d,
        &lse,
        &targets,
        &teacher,
        v,
        (1.0 - w) * s,
        w * s,
        temp,
    );
    check("cross_entropy + distillation", &logits, &d, fwd);
    // the distillation loss is zero when the student equals the teacher, positive otherwise
    let (same, _) = distill_forward(&teacher, &teacher, &targets, v, temp);
    let (diff, _) = distill_forward(&logits, &teacher, &targets, v, temp);
    assert!(same.abs() < 1e-5 && diff > 0.1, "{same} {diff}");
}

#[test]
fn embedding() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (v, c) = (6, 70); // c > COLS_PER_TASK: several column blocks
    let tokens = vec![1u32, 4, 1, 0, 5, 1];
    let wte = randv(&mut rng, v * c, 1.0);
    let r = randv(&mut rng, tokens.len() * c, 1.0);
    let fwd = |w: &[f32]| {
        let mut out = vec![0.0; tokens.len() * c];
        embedding_forward(&mut out, &tokens, w, c);
        dot(&out, &r)
    };
    let mut dw = vec![0.0; v * c];
    embedding_backward(&mut dw, &tokens, &r, c);
    check("embedding", &wte, &dw, fwd);
}

/// Router: logits -> scores -> top-k weights, plus the aux and z losses, for both score
/// functions with and without renormalisation. The perturbation is small enough that the
/// top-k choice does not change (asserted).
#[test]
fn router() {
    for score_fn in [ScoreFn::Softmax, ScoreFn::Sigmoid] {
        for (renorm, scale, groups) in [
            (false, 1.0, 1),
            (true, 1.0, 1),
            (false, 2.5, 1),
            (true, 2.5, 3),
        ] {
            let mut rng = ChaCha8Rng::seed_from_u64(8);
            let (n, e, k) = (6, 6, 2);
            let rt = Route {
                scale,
                n_group: groups,
                topk_group: groups.min(2),
                ..Route::new(e, k, score_fn, renorm)
            };
            let logits = randv(&mut rng, n * e, 2.0);
            let bias = randv(&mut rng, e, 0.1);
            let rw = randv(&mut rng, n * k, 1.0);
            let (aux_c, z_c) = (0.3f32, 0.2f32);
            let route = |l: &[f32]| {
                let (mut s, mut idx, mut w) =
                    (vec![0.0; n * e], vec![0u32; n * k], vec![0.0; n * k]);
                router_forward(&mut s, &mut idx, &mut w, l, Some(&bias), &rt);
                (s, idx, w)
            };
            let (s0, idx0, w0) = route(&logits);
            let mut counts = vec![0u32; e];
            expert_counts(&mut counts, &idx0);
            let fwd = |l: &[f32]| {
                let (s, idx, w) = route(l);
                assert_eq!(idx, idx0, "perturbation changed the routing");
                dot(&w, &rw)
                    + aux_c as f64 * aux_loss_forward(&s, &counts, e, k, score_fn) as f64
                    + z_c as f64 * z_loss_forward(l, e) as f64
            };
            let mut ds = vec![0.0; n * e];
            topk_weights_backward(&mut ds, &rw, &w0, &idx0, &s0, &rt);
            aux_loss_backward(&mut ds, &s0, &counts, e, k, score_fn, aux_c);
            let mut dl = vec![0.0; n * e];
            scores_backward(&mut dl, &ds, &s0, e, score_fn);
            z_loss_backward(&mut dl, &logits, e, z_c);
            // a smaller step keeps the routing fixed
            let mut xp = logits.clone();
            let mut worst = 0.0f64;
            let h = 1e-3f32;
            let scale = dl.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            for i in 0..xp.len() {
                let o = xp[i];
                xp[i] = o + h;
                let up = fwd(&xp);
                xp[i] = o - h;
                let down = fwd(&xp);
                xp[i] = o;
                let num = (up - down) / (2.0 * h as f64);
                worst = worst.max((num - dl[i] as f64).abs() / scale);
            }
            println!("router {rt:?}: worst normalised error {worst:.2e}");
            assert!(worst <= TOL, "router {rt:?}: {worst:.2e}");
        }
    }
}

#[test]
fn topk_tie_break_prefers_lower_index() {
    let logits = vec![0.0f32; 4]; // all scores equal
    let (mut s, mut idx, mut w) = (vec![0.0; 4], vec![0u32; 2], vec![0.0; 2]);
    router_forward(
        &mut s,
        &mut idx,
        &mut w,
        &logits,
        None,
        &Route::new(4, 2, ScoreFn::Softmax, true),
    );
    assert_eq!(idx, vec![0, 1]);
    assert_eq!(w, vec![0.5, 0.5]);
    // bias decides selection only: expert 3 is chosen, its weight is its raw score
    let bias = vec![0.0, 0.0, 0.0, 1.0];
    router_forward(
        &mut s,
        &mut idx,
        &mut w,
        &logits,
        Some(&bias),
        &Route::new(4, 2, ScoreFn::Softmax, false),
    );
    assert_eq!(idx, vec![3, 0]);
    assert_eq!(w, vec![0.25, 0.25]);
}

#[test]
fn bias_update_moves_toward_balance() {
    let mut bias = vec![0.0f32; 4];
    bias_update(&mut bias, &[10, 2, 5, 3], 0.5); // mean load 5
    assert_eq!(bias, vec![-0.5, 0.5, 0.0, 0.5]);
}

#[test]
fn gather_and_combine() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (n, k, e, c) = (7, 2, 3, 5);
    let idx: Vec<u32> = vec![0, 2, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2, 0, 2];
    let mut d = Dispatch::new(n, k, e);
    d.build(&idx, e);
    // stable: expert 0's rows are its (token, slot) pairs in order
    let rows0: Vec<u32> = d.range(0).map(|r| d.src[r]).collect();
    assert_eq!(rows0, vec![0, 3, 6, 9, 12]);
    let x = randv(&mut rng, n * c, 1.0);
    let w = randv(&mut rng, n * k, 1.0);
    let rg = randv(&mut rng, n * k * c, 1.0);
    let g = |x: &[f32]| {
        let mut xe = vec![0.0; n * k * c];
        gather_forward(&mut xe, x, &d, k, c);
        dot(&xe, &rg)
    };
    let mut dx = vec![0.0; n * c];
    gather_backward(&mut dx, &rg, &d, k, c);
    check("gather", &x, &dx, g);
    let ye = randv(&mut rng, n * k * c, 1.0);
    let ry = randv(&mut rng, n * c, 1.0);
    let comb = |ye: &[f32], w: &[f32]| {
        let mut y = vec![0.0; n * c];
        combine_forward(&mut y, ye, w, &d, k, c);
        dot(&y, &ry)
    };
    let (mut dye, mut dw) = (vec![0.0; n * k * c], vec![0.0; n * k]);
    combine_backward(&mut dye, &mut dw, &ry, &ye, &w, &d, k, c);
    check("combine dye", &ye, &dye, |ye| comb(ye, &w));
    check("combine dw", &w, &dw, |w| comb(&ye, w));
}

/// DeepSeek-V3's group-limited routing over 256 experts (8 groups, the best 4 eligible, a
/// group scored by its two best experts, bias for choosing only), with renormalisation and a
/// routed scaling factor, against a direct reading of that rule on the kernel's own scores.
#[test]
fn group_limited_topk_over_256_experts() {
    let (n, e, k, ng, tg) = (40, 256, 8, 8, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let logits = randv(&mut rng, n * e, 3.0);
    let bias = randv(&mut rng, e, 0.5);
    let rt = Route {
        scale: 2.5,
        n_group: ng,
        topk_group: tg,
        ..Route::new(e, k, ScoreFn::Sigmoid, true)
    };
    let (mut s, mut idx, mut w) = (vec![0.0; n * e], vec![0u32; n * k], vec![0.0; n * k]);
    router_forward(&mut s, &mut idx, &mut w, &logits, Some(&bias), &rt);
    let gs = e / ng;
    for t in 0..n {
        let c: Vec<f32> = (0..e).map(|x| s[t * e + x] + bias[x]).collect();
        let mut gscore: Vec<(usize, f32)> = (0..ng)
            .map(|g| {
                let mut v: Vec<f32> = c[g * gs..(g + 1) * gs].to_vec();
                v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                (g, v[0] + v[1])
            })
            .collect();
        gscore.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        let groups: Vec<usize> = gscore[..tg].iter().map(|g| g.0).collect();
        let mut cand: Vec<usize> = (0..e).filter(|x| groups.contains(&(x / gs))).collect();
        cand.sort_by(|&a, &b| c[b].partial_cmp(&c[a]).unwrap().then(a.cmp(&b)));
        let want: Vec<u32> = cand[..k].iter().map(|&x| x as u32).collect();
        assert_eq!(&idx[t * k..(t + 1) * k], &want[..], "token {t}");
        let sum: f32 = want.iter().map(|&x| s[t * e + x as usize]).sum();
        for j in 0..k {
            let wj = s[t * e + want[j] as usize] / sum * 2.5;
            assert!((w[t * k + j] - wj).abs() <= 1e-6, "token {t} weight {j}");
        }
    }
}
