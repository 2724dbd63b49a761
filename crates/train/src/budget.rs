//! `moelab train --time-budget 10m`: the step count of a run taken from this machine's
//! measured speed instead of assumed from another host's.
//!
//! Before the run, a few optimizer steps of the run's own config (same shapes, threads and
//! precision; random tokens, on a scratch model whose weights are thrown away) give seconds
//! per step. The steps that fit in what is left of the budget, after the evaluations and
//! checkpoints the config asks for, become `train.steps`, written to the run's config.toml
//! and recorded in the manifest ([`crate::manifest::TimeBudget`]). Inside the warm-up the run
//! times its own steps and fits again ([`crate::trainer::RunOptions::refit`]): a scratch
//! model's steps were 7-15% off the run's (real routing, caches, host drift). The
//! warm-up's learning rates do not depend on `train.steps`, so `moelab verify` replays the
//! run with its final steps bit for bit on any host, however fast.

use crate::manifest::TimeBudget;
use model::optim::train_step;
use model::{Config, Model, Optimizer, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// Seconds in a duration written as `90s`, `10m`, `1h30m`, `1.5h` or a plain number of
/// seconds.
pub fn parse_duration(text: &str) -> Result<f64, String> {
    let bad = || format!("'{text}' is not a duration: write e.g. 90s, 10m, 1h30m or 600 (seconds)");
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    if let Ok(v) = s.parse::<f64>() {
        return if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(bad())
        };
    }
    let (mut total, mut num) = (0.0f64, String::new());
    for c in s.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => return Err(bad()),
        };
        let v: f64 = num.parse().map_err(|_| bad())?;
        total += v * unit;
        num.clear();
    }
    if !(num.is_empty() && total.is_finite() && total > 0.0) {
        return Err(bad());
    }
    Ok(total)
}

/// Seconds per optimizer step of `cfg` on this machine: the median of `timed` steps after
/// `warmup` untimed ones, each `grad_accum` micro-batches, on a scratch model of the run's
/// shapes and precision with random tokens. A median, not a mean: the first steps of a
/// process page in their buffers and one slow step would shorten the whole run.
pub fn measure_step(cfg: &Config, warmup: usize, timed: usize) -> f64 {
    let tc = &cfg.train;
    let (b, t) = (tc.batch_size, tc.seq_len);
    let mut model = Model::new(&cfg.model, b, t, tc.seed);
    model.set_precision(tc.precision.kernels());
    model.training = true;
    let mut opt = Optimizer::new(&model);
    let mut rng = ChaCha8Rng::seed_from_u64(tc.seed);
    let v = cfg.model.vocab_size as u32;
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..v)).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..v)).collect();
    let mut step = || {
        // one optimizer update per micro-batch: the update's share is overestimated with
        // grad_accum > 1, which only errs on the safe side
        for _ in 0..tc.grad_accum {
            train_step(&mut model, &mut opt, &tokens, &targets, tc, tc.lr * 1e-3);
        }
    };
    for _ in 0..warmup {
        step();
    }
    let mut times: Vec<f64> = (0..timed.max(1))
        .map(|_| {
            let start = Instant::now();
            step();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let n = times.len();
    (times[(n - 1) / 2] + times[n / 2]) / 2.0
}

/// What a run spends besides its steps, per unit of what the config asks for.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    /// Seconds per optimizer step.
    pub step: f64,
    /// Seconds per periodic evaluation (eval_batches forward passes).
    pub eval: f64,
    /// Seconds of the final evaluation (the whole validation split).
    pub final_eval: f64,
    /// Seconds per checkpoint written.
    pub checkpoint: f64,
}

impl Costs {
    /// Estimates from a measured step, for a validation split of `val_batches` batches: a
    /// forward pass is about a third of a micro-batch's step, a checkpoint (weights and the
    /// two moment buffers) writes at 200 MB/s.
    pub fn estimate(tc: &TrainConfig, step: f64, val_batches: u64, params: usize) -> Costs {
        let forward = 0.4 * step / tc.grad_accum as f64;
        let periodic = match tc.eval_batches {
            0 => val_batches,
            n => n.min(val_batches),
        };
        Costs {
            step,
            eval: periodic as f64 * forward,
            final_eval: val_batches as f64 * forward,
            checkpoint: (params * 3 * 4) as f64 / 200e6,
        }
    }

    /// The same costs for another measured step time (evaluations scale with it).
    pub fn with_step(&self, step: f64) -> Costs {
        let scale = step / self.step;
        Costs {
            step,
            eval: self.eval * scale,
            final_eval: self.final_eval * scale,
            checkpoint: self.checkpoint,
        }
    }

    /// Seconds a run of `steps` steps spends, evaluations and checkpoints included.
    pub fn run_seconds(&self, tc: &TrainConfig, steps: u64) -> f64 {
        // periodic evaluations, the one at the last step being the final one
        let evals = (steps - 1).checked_div(tc.eval_every).unwrap_or(0);
        let checkpoints = steps.checked_div(tc.checkpoint_every).unwrap_or(0) + 1;
        steps as f64 * self.step
            + evals as f64 * self.eval
            + self.final_eval
            + checkpoints as f64 * self.checkpoint
    }
}

/// Share of the whole budget kept in reserve at every fit for what the estimates miss
/// (loading the data, host noise). Of the whole budget, not of the time left: the steps
/// after the last fit (a "wsd" run's decay, 30% of it) ran about 12% slower than the steps
/// before it in one 10-minute run on a drifting host, and 3% of what was left then did not cover that.
pub const MARGIN: f64 = 0.03;

/// The most steps whose run fits in the `left` seconds of a `budget` (less [`MARGIN`] of
/// the budget); 0 if none does.
pub fn fit_steps(tc: &TrainConfig, costs: &Costs, left: f64, budget: f64) -> u64 {
    let usable = left - budget * MARGIN;
    if costs.run_seconds(tc, 1) > usable {
        return 0;
    }
    // run_seconds grows with steps: binary search the last that fits
    let (mut lo, mut hi) = (1u64, 1u64);
    while costs.run_seconds(tc, hi) <= usable {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if costs.run_seconds(tc, mid) <= usable {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The record of a budgeted run's choice, for its manifest.
pub fn record(seconds: f64, spent: f64, costs: &Costs, steps: u64) -> TimeBudget {
    TimeBudget {
        seconds,
        spent_seconds: spent,
        step_seconds: costs.step,
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(600.0));
        assert_eq!(parse_duration("90s"), Ok(90.0));
        assert_eq!(parse_duration("1h30m"), Ok(5400.0));
        assert_eq!(parse_duration("1.5h"), Ok(5400.0));
        assert_eq!(parse_duration("600"), Ok(600.0));
        for bad in ["", "m", "10x", "10m5", "-5", "0", "0s", "nan", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn steps_fill_the_budget_with_evals_and_checkpoints() {
        let tc = TrainConfig {
            eval_every: 100,
            checkpoint_every: 250,
            ..TrainConfig::default()
        };
        let costs = Costs {
            step: 0.5,
            eval: 2.0,
            final_eval: 8.0,
            checkpoint: 1.0,
        };
        let left = 600.0;
        let s = fit_steps(&tc, &costs, left, left);
        let usable = left * (1.0 - MARGIN);
        assert!(costs.run_seconds(&tc, s) <= usable);
        assert!(costs.run_seconds(&tc, s + 1) > usable);
        // about (582 - 8 - evals - checkpoints) / 0.5
        assert!((1080..1148).contains(&s), "{s}");
        assert_eq!(fit_steps(&tc, &costs, 1.0, 1.0), 0);
        // late in a run the reserve is still 3% of the whole budget
        let late = fit_steps(&tc, &costs, 100.0, left);
        assert!(costs.run_seconds(&tc, late) <= 100.0 - 18.0);
        assert!(costs.run_seconds(&tc, late + 1) > 100.0 - 18.0);
    }
}
