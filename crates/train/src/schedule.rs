//! Learning-rate schedule: linear warm-up, then cosine decay to `min_lr_ratio * lr`.

use model::TrainConfig;

/// Learning rate for optimizer step `step` (0-based).
pub fn lr_at(step: u64, tc: &TrainConfig) -> f32 {
    let warm = tc.warmup_steps;
    if step < warm {
        return tc.lr * (step + 1) as f32 / warm as f32;
    }
    let span = tc.steps.saturating_sub(warm).max(1);
    let p = ((step - warm) as f64 / span as f64).min(1.0);
    let min = tc.min_lr_ratio as f64;
    (tc.lr as f64 * (min + (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min() {
        let tc = TrainConfig {
            lr: 1.0,
            warmup_steps: 10,
            steps: 110,
            min_lr_ratio: 0.1,
            ..TrainConfig::default()
        };
        assert!((lr_at(0, &tc) - 0.1).abs() < 1e-6);
        assert!((lr_at(9, &tc) - 1.0).abs() < 1e-6);
        assert!((lr_at(10, &tc) - 1.0).abs() < 1e-6);
        assert!((lr_at(60, &tc) - 0.55).abs() < 1e-6);
        assert!((lr_at(110, &tc) - 0.1).abs() < 1e-6);
        assert!((lr_at(500, &tc) - 0.1).abs() < 1e-6);
    }

    /// `train --time-budget` changes `steps` inside the warm-up (trainer::refit_window): a
    /// replay with the final steps is the same run only if no warm-up step's rate depends on
    /// them.
    #[test]
    fn warmup_rates_do_not_depend_on_the_step_count() {
        let tc = |steps| TrainConfig {
            lr: 2e-3,
            warmup_steps: 100,
            steps,
            ..TrainConfig::default()
        };
        for s in 0..100 {
            let r = lr_at(s, &tc(101));
            for steps in [150, 1_000, 123_457] {
                assert_eq!(lr_at(s, &tc(steps)).to_bits(), r.to_bits(), "step {s}");
            }
        }
        let (from, at) = crate::trainer::refit_window(100).unwrap();
        assert!(from >= 1 && at < 100 && at - from >= 4);
        assert_eq!(crate::trainer::refit_window(12), Some((5, 11)));
        assert_eq!(crate::trainer::refit_window(100), Some((49, 99)));
        assert_eq!(crate::trainer::refit_window(5), None);
    }
}
