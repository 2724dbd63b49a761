//! Wall-clock time per kernel group, for `moelab bench train --profile`: where a training
//! step's time goes. Off by default; when off, a lap is one branch.

use std::time::Instant;

#[derive(Debug, Default)]
pub struct Profiler {
    on: bool,
    last: Option<Instant>,
    /// Seconds per section, in first-seen order.
    pub totals: Vec<(&'static str, f64)>,
}

impl Profiler {
    pub fn enable(&mut self) {
        self.on = true;
        self.last = None;
    }

    /// Starts timing from now (call at the start of a pass).
    pub fn start(&mut self) {
        if self.on {
            self.last = Some(Instant::now());
        }
    }

    /// Attributes the time since the last lap (or start) to `name`.
    pub fn lap(&mut self, name: &'static str) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        let dt = self.last.map_or(0.0, |l| (now - l).as_secs_f64());
        self.last = Some(now);
        match self.totals.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += dt,
            None => self.totals.push((name, dt)),
        }
    }
}
