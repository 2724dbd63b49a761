//! What this machine is (a helper, not a command): CPU clock, nominal fp32 peak, peak
//! resident memory.

pub fn cpu_ghz() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("cpu MHz"))?;
    Some(line.split(':').nth(1)?.trim().parse::<f64>().ok()? / 1000.0)
}

/// Peak resident memory of this process in MiB (VmHWM).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Nominal fp32 peak for `threads` threads: threads x 64 FLOP/cycle x clock.
pub fn nominal_peak_gflops(threads: usize) -> Option<f64> {
    cpu_ghz().map(|g| threads as f64 * 64.0 * g)
}
