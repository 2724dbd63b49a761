//! Sparse upcycling (Komatsuzaki et al. 2022; Qwen1.5-MoE was built this way): a dense
//! model becomes a Mixture-of-Experts whose experts all start as copies of each block's FFN.
//!
//! The router is drawn at random (small), but every routed expert computes the same
//! function and the chosen experts' weights sum to one (softmax scores, renormalised), so the
//! upcycled model computes what the dense one did, whatever it routes; with N shared experts
//! (also copies) every down projection is divided by N + 1 so the sum is still the dense
//! FFN. Training then lets the experts drift apart.

use crate::{ferr, Result};
use model::config::RouterScore;
use model::{Layout, ModelConfig};
use std::path::Path;

/// What to turn a dense model into.
#[derive(Clone, Copy, Debug)]
pub struct Upcycle {
    pub experts: usize,
    pub top_k: usize,
    /// Always-on shared experts, each a copy of the FFN too.
    pub shared: usize,
    /// Seed of the router's random init.
    pub seed: u64,
}

/// The MoE config and weights of `dense` (config `cfg`), upcycled as `u` says.
pub fn upcycle(
    cfg: &ModelConfig,
    dense: &[f32],
    u: Upcycle,
    what: &Path,
) -> Result<(ModelConfig, Vec<f32>)> {
    if (0..cfg.n_layers).any(|l| cfg.is_moe_layer(l)) {
        return Err(ferr(
            what,
            "is already a Mixture-of-Experts model; upcycle a dense one",
        ));
    }
    if u.experts < 2 || u.top_k < 1 || u.top_k > u.experts {
        return Err(ferr(
            what,
            format!(
                "--experts {} --top-k {}: need at least 2 experts and 1 <= top-k <= experts",
                u.experts, u.top_k
            ),
        ));
    }
    let mut moe = cfg.clone();
    moe.n_experts = u.experts;
    moe.top_k = u.top_k;
    moe.expert_hidden = cfg.ffn_hidden;
    moe.n_shared_experts = u.shared;
    moe.shared_expert_hidden = None;
    moe.shared_expert_gate = false;
    moe.router_score = RouterScore::Softmax;
    moe.renormalize = true;
    moe.routed_scaling_factor = 1.0;
    moe.n_group = 1;
    moe.topk_group = 1;
    moe.first_dense_layers = 0;
    moe.moe_every = 1;
    moe.dense_layers = vec![];
    moe.validate().map_err(|e| ferr(what, e.to_string()))?;

    let (src, dst) = (Layout::new(cfg), Layout::new(&moe));
    let get = |name: &str| src.slice(dense, name);
    // random init (the router's), then every tensor the dense model has copied over
    let mut out = model::Model::new(&moe, 1, 1, u.seed).params;
    let (c, f) = (cfg.d_model, cfg.ffn_hidden);
    let copies = (u.shared + 1) as f32;
    for t in &dst.tensors {
        let o = &mut out[t.offset..t.offset + t.len];
        if let Some(rest) = t.name.strip_prefix("layers.") {
            let (l, part) = rest.split_once('.').expect("layers.L.x");
            let gu = get(&format!("layers.{l}.mlp.w_gate_up.weight"));
            let down = get(&format!("layers.{l}.mlp.w_down.weight"));
            match part {
                "moe.router.weight" => {
                    // small, so routing starts near uniform
                    for x in o.iter_mut() {
                        *x *= 0.1;
                    }
                    continue;
                }
                "moe.router.bias" => continue,
                "moe.experts.w_gate_up" => {
                    for e in o.chunks_exact_mut(gu.len()) {
                        e.copy_from_slice(gu);
                    }
                    continue;
                }
                "moe.experts.w_down" => {
                    for e in o.chunks_exact_mut(down.len()) {
                        for (y, x) in e.iter_mut().zip(down) {
                            *y = x / copies;
                        }
                    }
                    continue;
                }
                "moe.shared.w_gate_up.weight" => {
                    // all shared gates, then all shared ups: N copies of each half
                    let (g, up) = gu.split_at(f * c);
                    let n = u.shared;
                    for (i, rows) in o.chunks_exact_mut(f * c).enumerate() {
                        rows.copy_from_slice(if i < n { g } else { up });
                    }
                    continue;
                }
                "moe.shared.w_down.weight" => {
                    // row r of [C, N*F]: N copies of the dense row r
                    let n = u.shared;
                    for (r, row) in o.chunks_exact_mut(n * f).enumerate() {
                        for (k, y) in row.iter_mut().enumerate() {
                            *y = down[r * f + k % f] / copies;
                        }
                    }
                    continue;
                }
                _ => {}
            }
        }
        o.copy_from_slice(get(&t.name));
    }
    Ok((moe, out))
}
