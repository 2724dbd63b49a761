//! What the one-row matmul examples share.

/// Runs `run` on a new rayon pool, inside `kernels::par::with_team` (as the decoder runs)
/// when the first argument is `team`, else on one thread.
pub fn on_pool_maybe_team(run: fn()) {
    let team = std::env::args().nth(1).as_deref() == Some("team");
    let pool = rayon::ThreadPoolBuilder::new().build().expect("pool");
    pool.install(|| {
        if team {
            kernels::par::with_team(run)
        } else {
            run()
        }
    });
}
