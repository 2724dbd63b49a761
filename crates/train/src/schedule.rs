//! Learning-rate schedule: linear warm-up, then a decay to `min_lr_ratio * lr` at `steps`:
//! cosine over all remaining steps, or warmup-stable-decay (`lr` held, then linear over the
//! last `decay_frac` of them).

use model::{Schedule, TrainConfig};

/// Learning rate for optimizer step `step` (0-based).
pub fn lr_at(step: u64, tc: &TrainConfig) -> f32 {
    let warm = tc.warmup_steps;
    if step < warm {
        return tc.lr * (step + 1) as f32 / warm as f32;
    }
    let span = tc.steps.saturating_sub(warm).max(1);
    let min = tc.min_lr_ratio as f64;
    let frac = match tc.schedule {
        Schedule::Cosine => {
            let p = ((step - warm) as f64 / span as f64).min(1.0);
            0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
        Schedule::Wsd => {
            let (start, decay) = wsd_decay(tc);
            let p = (step.saturating_sub(start) as f64 / decay as f64).min(1.0);
            1.0 - p
        }
    };
    (tc.lr as f64 * (min + (1.0 - min) * frac)) as f32
}

/// A step up to which (inclusive) no rate depends on `steps`: the end of the warm-up for a
/// cosine schedule, the start of the decay for "wsd" (at the given step count; the decay's
/// first step still runs at `lr`, so this is one step cautious). A run's step count may
/// change before this step without changing any rate already used.
pub fn steps_fixed_from(tc: &TrainConfig) -> u64 {
    match tc.schedule {
        Schedule::Cosine => tc.warmup_steps,
        Schedule::Wsd => wsd_decay(tc).0,
    }
}

/// A "wsd" schedule's decay: its first step and its length in steps (at least 1).
fn wsd_decay(tc: &TrainConfig) -> (u64, u64) {
    let span = tc.steps.saturating_sub(tc.warmup_steps).max(1);
    let decay = ((tc.decay_frac as f64 * span as f64).round() as u64).clamp(1, span);
    (tc.warmup_steps + span - decay, decay)
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

    #[test]
    fn warmup_stable_then_linear_decay() {
        let tc = TrainConfig {
            lr: 1.0,
            warmup_steps: 10,
            steps: 110,
            min_lr_ratio: 0.0,
            schedule: Schedule::Wsd,
            decay_frac: 0.2,
            ..TrainConfig::default()
        };
        assert!((lr_at(0, &tc) - 0.1).abs() < 1e-6);
        assert_eq!(steps_fixed_from(&tc), 90);
        for s in 9..=90 {
            assert_eq!(lr_at(s, &tc), 1.0, "step {s}");
        }
        assert!((lr_at(100, &tc) - 0.5).abs() < 1e-6);
        assert!((lr_at(109, &tc) - 0.05).abs() < 1e-6);
        assert_eq!(lr_at(110, &tc), 0.0);
        let min = TrainConfig {
            min_lr_ratio: 0.1,
            ..tc.clone()
        };
        assert!((lr_at(100, &min) - 0.55).abs() < 1e-6);
        assert!((lr_at(500, &min) - 0.1).abs() < 1e-6);
        // the stable phase does not depend on the step count either
        for steps in [100, 1_000, 123_457] {
            let longer = TrainConfig {
                steps,
                ..tc.clone()
            };
            for s in 0..steps_fixed_from(&tc).min(steps_fixed_from(&longer)) {
                assert_eq!(
                    lr_at(s, &longer).to_bits(),
                    lr_at(s, &tc).to_bits(),
                    "step {s}"
                );
            }
        }
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
        let window = |warmup_steps, schedule| {
            crate::trainer::refit_window(&TrainConfig {
                warmup_steps,
                schedule,
                ..tc(1_000)
            })
        };
        let (from, at) = window(100, Schedule::Cosine).unwrap();
        assert!(from >= 1 && at < 100 && at - from >= 4);
        for schedule in [Schedule::Cosine, Schedule::Wsd] {
            assert_eq!(window(12, schedule), Some((5, 11)));
            assert_eq!(window(100, schedule), Some((49, 99)));
        }
        assert_eq!(window(5, Schedule::Cosine), None);
        // a "wsd" warm-up too short to time: stable steps instead, before the decay
        assert_eq!(window(5, Schedule::Wsd), Some((5, 11)));
        assert_eq!(window(0, Schedule::Wsd), Some((5, 11)));
        let short = TrainConfig {
            warmup_steps: 2,
            schedule: Schedule::Wsd,
            ..tc(10)
        };
        assert!(steps_fixed_from(&short) < 11);
        assert_eq!(crate::trainer::refit_window(&short), None);
    }
}
