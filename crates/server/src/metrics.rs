//! Prometheus text-format metrics for `GET /metrics`: request counts by route and status,
//! prompt and completion tokens, engine gauges (running batch, queue depth), decode steps,
//! and latency histograms (whole request, time to first token).

use infer::Stats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Bucket upper bounds in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (c, &b) in self.counts.iter_mut().zip(&BUCKETS) {
            if secs <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    latency: Histogram,
    ttft: Histogram,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn request(&self, route: &str, status: u16) {
        *self
            .lock()
            .requests
            .entry((route.into(), status))
            .or_default() += 1;
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        let mut m = self.lock();
        m.prompt_tokens += prompt as u64;
        m.completion_tokens += completion as u64;
    }

    pub fn latency(&self, secs: f64) {
        self.lock().latency.observe(secs);
    }

    pub fn first_token(&self, secs: f64) {
        self.lock().ttft.observe(secs);
    }

    pub fn render(&self, engine: Stats) -> String {
        let m = self.lock();
        let mut s = String::new();
        s += "# HELP moelab_requests_total HTTP requests by route and status.\n# TYPE moelab_requests_total counter\n";
        for ((route, status), n) in &m.requests {
            let _ = writeln!(
                s,
                "moelab_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |s: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut s,
            "moelab_prompt_tokens_total",
            "Prompt tokens of finished requests.",
            m.prompt_tokens,
        );
        counter(
            &mut s,
            "moelab_completion_tokens_total",
            "Generated tokens of finished requests.",
            m.completion_tokens,
        );
        counter(
            &mut s,
            "moelab_decode_steps_total",
            "Batched decode steps of the engine.",
            engine.steps,
        );
        counter(
            &mut s,
            "moelab_decode_rows_total",
            "Sequence-steps decoded (rows over all steps; divided by steps, the mean batch size).",
            engine.batched_rows,
        );
        counter(
            &mut s,
            "moelab_generated_tokens_total",
            "Tokens sampled by the engine.",
            engine.generated,
        );
        gauge(
            &mut s,
            "moelab_batch_size",
            "Sequences in the running batch.",
            engine.active as f64,
        );
        gauge(
            &mut s,
            "moelab_queue_depth",
            "Requests waiting for a batch slot.",
            engine.queued as f64,
        );
        m.latency.render(
            &mut s,
            "moelab_request_duration_seconds",
            "Time from request to last byte of the response.",
        );
        m.ttft.render(
            &mut s,
            "moelab_time_to_first_token_seconds",
            "Time from request to the first generated token.",
        );
        s
    }
}
