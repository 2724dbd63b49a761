//! Muon (Jordan et al. 2024, the modded-nanogpt speedrun's optimizer): SGD momentum whose
//! update is replaced by the nearest semi-orthogonal matrix, computed by a fixed number of
//! Newton–Schulz iterations. For 2-D hidden weights only; embeddings, the head, norms and
//! routers keep AdamW.
//!
//! Every product goes through [`crate::matmul::matmul`] (the same bits on any thread count)
//! and the normalising norm is summed in f64 in a fixed order, so an update is deterministic.

use crate::matmul::Precision;
use crate::par::sum_squares;
use crate::simd;

/// The quintic iteration's coefficients (modded-nanogpt's `zeropower_via_newtonschulz5`):
/// chosen to push every singular value in (0, 1] towards 1 fast, not to converge exactly
/// (they end in roughly 0.7..1.2).
pub const NS_COEFFS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);

/// Muon hyper-parameters for one step.
#[derive(Clone, Copy, Debug)]
pub struct Muon {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    /// Newton–Schulz iterations (5 in the speedrun).
    pub ns_steps: usize,
    /// Arithmetic of the Newton–Schulz products.
    pub precision: Precision,
}

simd! {
    /// `m = momentum * m + (1 - momentum) * g * gscale`, then the Nesterov look-ahead
    /// `u = (1 - momentum) * g * gscale + momentum * m` (PyTorch's `lerp_` pair).
    fn momentum_rows(u: &mut [f32], m: &mut [f32], g: &[f32], gscale: f32, beta: f32) {
        for i in 0..u.len() {
            let g = g[i] * gscale;
            m[i] += (g - m[i]) * (1.0 - beta);
            u[i] = g + (m[i] - g) * beta;
        }
    }
}

simd! {
    fn axpby(x: &mut [f32], a: f32, y: &[f32]) {
        for i in 0..x.len() {
            x[i] = a * x[i] + y[i];
        }
    }
}

simd! {
    fn apply_rows(p: &mut [f32], u: &[f32], shrink: f32, step: f32) {
        for i in 0..p.len() {
            p[i] = p[i] * shrink - step * u[i];
        }
    }
}

/// Replaces the (rows, cols) matrix `x` by its Newton–Schulz orthogonalisation: `x / |x|_F`,
/// then `steps` times `X = a X + B X` with `B = b A + c A A` and `A = X X^T` — or, for a
/// tall matrix, `X = a X + X B` with `A = X^T X` (the same iteration on `X^T`, so `A` is
/// always the smaller Gram matrix). In place; `work` is grown to the buffers it needs and
/// can be reused from call to call. The products run in `precision` (bf16 with f32
/// accumulation under `train.precision = "bf16"`, as the speedrun runs them in bf16).
pub fn orthogonalize(
    x: &mut [f32],
    rows: usize,
    cols: usize,
    steps: usize,
    precision: Precision,
    work: &mut Vec<f32>,
) {
    let matmul = |out: &mut [f32], a: &[f32], ta, b: &[f32], tb, m, n, k| {
        precision.matmul(out, a, ta, b, tb, m, n, k, false)
    };
    assert_eq!(
        x.len(),
        rows * cols,
        "orthogonalize: {} != {rows}x{cols}",
        x.len()
    );
    let tall = rows > cols;
    let s = rows.min(cols);
    let inv = 1.0 / (sum_squares(x).sqrt() + 1e-7);
    x.iter_mut().for_each(|v| *v = (*v as f64 * inv) as f32);
    work.resize(2 * s * s + x.len(), 0.0);
    let (gram, rest) = work.split_at_mut(s * s);
    let (poly, bx) = rest.split_at_mut(s * s);
    let (a, b, c) = NS_COEFFS;
    for _ in 0..steps {
        if tall {
            matmul(gram, x, true, x, false, s, s, rows);
        } else {
            matmul(gram, x, false, x, true, s, s, cols);
        }
        matmul(poly, gram, false, gram, false, s, s, s);
        // poly = b A + c A A (symmetric, so X B = X B^T)
        for (p, g) in poly.iter_mut().zip(gram.iter()) {
            *p = b * *g + c * *p;
        }
        if tall {
            matmul(bx, x, false, poly, false, rows, cols, s);
        } else {
            matmul(bx, poly, false, x, false, rows, cols, s);
        }
        axpby(x, a, bx);
    }
}

impl Muon {
    /// Momentum step of one tensor: updates its buffer `m` and writes the Nesterov update
    /// into `u` (to be orthogonalised block by block, then [`Muon::apply`]).
    pub fn momentum(&self, u: &mut [f32], m: &mut [f32], grad: &[f32], gscale: f32) {
        momentum_rows(u, m, grad, gscale, self.momentum);
    }

    /// `p = p * (1 - lr * weight_decay) - lr * sqrt(max(1, rows / cols)) * u` for one
    /// orthogonalised (rows, cols) block (the speedrun's scale: a tall matrix's update has
    /// the RMS a square one's has).
    pub fn apply(&self, p: &mut [f32], u: &[f32], rows: usize, cols: usize, decay: bool) {
        let shrink = if decay {
            1.0 - self.lr * self.weight_decay
        } else {
            1.0
        };
        let scale = (rows as f32 / cols as f32).max(1.0).sqrt();
        apply_rows(p, u, shrink, self.lr * scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The iteration in f64 with plain loops: the reference.
    fn orthogonalize_f64(x: &[f32], rows: usize, cols: usize, steps: usize) -> Vec<f64> {
        let tall = rows > cols;
        let (r, c) = if tall { (cols, rows) } else { (rows, cols) };
        let at = |i: usize, j: usize| {
            if tall {
                x[j * cols + i] as f64
            } else {
                x[i * cols + j] as f64
            }
        };
        let mut w: Vec<f64> = (0..r * c).map(|k| at(k / c, k % c)).collect();
        let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt() + 1e-7;
        w.iter_mut().for_each(|v| *v /= norm);
        let (a, b, cc) = (NS_COEFFS.0 as f64, NS_COEFFS.1 as f64, NS_COEFFS.2 as f64);
        for _ in 0..steps {
            let mut g = vec![0.0f64; r * r];
            for i in 0..r {
                for j in 0..r {
                    g[i * r + j] = (0..c).map(|k| w[i * c + k] * w[j * c + k]).sum();
                }
            }
            let mut bm = vec![0.0f64; r * r];
            for i in 0..r {
                for j in 0..r {
                    let gg: f64 = (0..r).map(|k| g[i * r + k] * g[k * r + j]).sum();
                    bm[i * r + j] = b * g[i * r + j] + cc * gg;
                }
            }
            let mut next = vec![0.0f64; r * c];
            for i in 0..r {
                for j in 0..c {
                    let bx: f64 = (0..r).map(|k| bm[i * r + k] * w[k * c + j]).sum();
                    next[i * c + j] = a * w[i * c + j] + bx;
                }
            }
            w = next;
        }
        if tall {
            (0..rows * cols)
                .map(|k| w[(k % cols) * rows + k / cols])
                .collect()
        } else {
            w
        }
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn newton_schulz_matches_float64() {
        for (rows, cols, steps) in [
            (16, 48, 1),
            (16, 48, 5),
            (40, 24, 5),
            (33, 33, 5),
            (1, 7, 5),
        ] {
            let x = random(rows * cols, (rows * cols + steps) as u64);
            let mut ours = x.clone();
            orthogonalize(&mut ours, rows, cols, steps, Precision::F32, &mut vec![]);
            let want = orthogonalize_f64(&x, rows, cols, steps);
            let err = ours
                .iter()
                .zip(&want)
                .map(|(&o, &w)| (o as f64 - w).abs())
                .fold(0.0, f64::max);
            let scale = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
            assert!(
                err <= 1e-5 * scale,
                "{rows}x{cols}, {steps} steps: {err} of {scale}"
            );
        }
    }

    /// In bf16 (operands rounded to 8 bits, sums in f32) the iteration stays within bf16's
    /// rounding of the float64 one.
    #[test]
    fn newton_schulz_in_bf16_stays_near_float64() {
        for (rows, cols) in [(16, 48), (40, 24), (64, 64)] {
            let x = random(rows * cols, (rows + cols) as u64);
            let mut ours = x.clone();
            orthogonalize(&mut ours, rows, cols, 5, Precision::Bf16, &mut vec![]);
            let want = orthogonalize_f64(&x, rows, cols, 5);
            let err = ours
                .iter()
                .zip(&want)
                .map(|(&o, &w)| (o as f64 - w).abs())
                .fold(0.0, f64::max);
            let scale = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
            assert!(err <= 0.05 * scale, "{rows}x{cols}: {err} of {scale}");
            assert!(
                err > 0.0,
                "{rows}x{cols}: bf16 gave the float64 values exactly"
            );
        }
    }

    #[test]
    fn five_steps_bring_singular_values_near_one() {
        for precision in [Precision::F32, Precision::Bf16] {
            singular_values_near_one(precision);
        }
    }

    fn singular_values_near_one(precision: Precision) {
        // X X^T of the wide result is near the identity: singular values in roughly 0.7..1.2
        let (r, c) = (24, 64);
        let mut x = random(r * c, 3);
        orthogonalize(&mut x, r, c, 5, precision, &mut vec![]);
        for i in 0..r {
            let d: f32 = (0..c).map(|k| x[i * c + k] * x[i * c + k]).sum();
            assert!((0.4..1.5).contains(&d), "row {i}: |x_i|^2 = {d}");
            for j in 0..i {
                let o: f32 = (0..c).map(|k| x[i * c + k] * x[j * c + k]).sum();
                assert!(o.abs() < 0.35, "rows {i}, {j}: {o}");
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_the_bits() {
        let x = random(96 * 160, 9);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut y = x.clone();
            pool.install(|| orthogonalize(&mut y, 96, 160, 5, Precision::F32, &mut vec![]));
            y
        };
        let one = run(1);
        for t in [2, 4] {
            assert!(one
                .iter()
                .zip(run(t))
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
