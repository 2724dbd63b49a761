//! Incremental decoding with KV caches: tokens go through the same kernels as the training
//! forward, attending over cached keys and values. A [`BatchDecoder`] holds several
//! independent sequences ("slots"), each with its own preallocated cache and position; one
//! step feeds one token to any subset of slots, so matmuls see a batch of rows (the weights
//! are read once per step, not once per sequence) and sequences can join and leave between
//! steps (continuous batching). [`Decoder`] is the one-slot case.
//!
//! A step may also feed several tokens to a slot (a prompt, [`BatchDecoder::forward`]): its
//! rows go through every matmul together with the other slots' rows, each attending over the
//! cache up to its own position, so a prompt costs one batched forward instead of one step
//! per token, and gives the same bits as feeding it token by token.
//!
//! "Every path agrees": for every position, the logits equal those of a full forward over
//! the sequence so far, and a slot's logits do not depend on which other slots share its
//! steps (`tests/decode.rs`).

use crate::block::{add_bias, qk_norm_forward, AttnW, Dims, FfnWKind, MoeW, QkActs};
use crate::config::ModelConfig;
use crate::params::Layout;
use crate::quant::QuantWeights;
pub use kernels::attention::KvType;
use kernels::attention::{decode_attention, KvBuf, KvMut, KvShape};
use kernels::matmul::linear_rows;
use kernels::quant::{qlinear_rows, QActs};
use kernels::rmsnorm::rmsnorm_forward;
use kernels::rope::{rope_apply_at, RopeTable};
use kernels::router;
use kernels::swiglu::swiglu_forward;
use std::sync::Arc;

/// Rows one forward takes beyond one per slot: prompts are fed in chunks of at most this
/// many tokens (in all) per step, interleaved with the other slots' decode rows.
pub const PREFILL_CHUNK: usize = 64;

/// KV-cache decoder for up to `slots` sequences at once.
pub struct BatchDecoder {
    cfg: ModelConfig,
    layout: Layout,
    /// Quantized matrices used in place of the f32 ones (None: all f32).
    quant: Option<Arc<QuantWeights>>,
    /// Scratch: the activation rows of a quantized matmul.
    acts: QActs,
    /// Quantized activations of each task of a team loop over experts.
    task_acts: Vec<QActs>,
    /// Sizes for the weight views (B = slots, T = 1).
    dims: Dims,
    qk: Option<QkActs>,
    rope: RopeTable,
    slots: usize,
    /// Rows one forward takes at most: slots + PREFILL_CHUNK.
    max_rows: usize,
    k: Vec<KvBuf>, // per block (slots, cap, G*D): position p at p % cap
    v: Vec<KvBuf>,
    /// Positions each block's cache holds: max_seq_len, or its sliding window plus the rows
    /// of one forward (a ring buffer: a chunk's rows are all written before any attends).
    cap: Vec<usize>,
    pos: Vec<usize>,
    // scratch for up to `slots` rows
    x: Vec<f32>,
    h: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    scores: Vec<f32>,
    gu: Vec<f32>,
    a: Vec<f32>,
    hx: Vec<f32>,
    y: Vec<f32>,
    r_logits: Vec<f32>,
    r_scores: Vec<f32>,
    r_idx: Vec<u32>,
    r_w: Vec<f32>,
    logits: Vec<f32>,
    team: TeamChoice,
}

/// Whether a single-row forward runs faster with a spinning helper thread or alone, as
/// measured on this host now. It depends on how fast the two cores hand a cache line to each
/// other, which on our VMs changes by the hour: with a core-to-core round trip of ~100 ns the
/// team decoded the student's shape 45% faster than one thread, with ~350 ns 20% slower.
/// Both ways give the same bits, so the choice is speed only. It compares medians of
/// [`TeamChoice::BURST`] consecutive forwards each way (single forwards jitter by more than
/// the difference; consecutive ones cost nearly the same): a burst alone, then a trial burst
/// with the team, then trial bursts the other way against the burst just before them:
/// [`TeamChoice::EVERY`] forwards after the first decision or a switch, and twice as many
/// after each trial that keeps the way, up to [`TeamChoice::EVERY_MAX`]. A trial runs BURST
/// forwards the slower way: one every 256 forwards cost the student's decode ~1% (12,830
/// against 12,980 tokens/s in 25 alternating rounds), and one every 2,048 kept a wrong first
/// decision (a noisy trial burst) for a whole 1,280-token benchmark.
#[derive(Clone, Debug, Default)]
struct TeamChoice {
    /// The way forwards go outside trials.
    team: bool,
    /// Seconds of the latest BURST forwards that way.
    current: Vec<f64>,
    /// Seconds of the trial burst the other way, while one runs.
    trial: Vec<f64>,
    in_trial: bool,
    /// Forwards the current way since the last trial.
    run: usize,
    /// Forwards between trials now; 0 until the first trial has been decided.
    gap: usize,
    /// Trials so far.
    trials: usize,
    /// Every forward this way (tests, benchmarks), no trials.
    forced: Option<bool>,
}

impl TeamChoice {
    const BURST: usize = 8;
    const EVERY: usize = 256;
    const EVERY_MAX: usize = 4096;

    /// Whether the first trial has been decided.
    fn decided(&self) -> bool {
        self.gap > 0
    }

    /// The way of the next forward.
    fn pick(&mut self) -> bool {
        if let Some(team) = self.forced {
            return team;
        }
        if !self.in_trial
            && self.current.len() == Self::BURST
            && (!self.decided() || self.run >= self.gap)
        {
            self.trials += 1;
            self.in_trial = true;
            self.trial.clear();
        }
        self.team ^ self.in_trial
    }

    fn record(&mut self, team: bool, secs: f64) {
        if self.forced.is_some() {
            return;
        }
        if self.in_trial && team != self.team {
            self.trial.push(secs);
            if self.trial.len() == Self::BURST {
                let switch = median(&self.trial) < median(&self.current);
                if switch {
                    self.team = team;
                    std::mem::swap(&mut self.current, &mut self.trial);
                }
                self.gap = if switch || !self.decided() {
                    Self::EVERY
                } else {
                    (2 * self.gap).min(Self::EVERY_MAX)
                };
                self.in_trial = false;
                self.run = 0;
            }
        } else if team == self.team {
            if self.current.len() == Self::BURST {
                self.current.remove(0);
            }
            self.current.push(secs);
            self.run += 1;
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl BatchDecoder {
    pub fn new(cfg: &ModelConfig, slots: usize) -> BatchDecoder {
        let layout = Layout::new(cfg);
        let s = slots.max(1);
        let mr = s + PREFILL_CHUNK;
        let dims = Dims::of(cfg, s, 1);
        let (c, d, g, t) = (cfg.d_model, cfg.head_dim(), cfg.n_kv_heads, cfg.max_seq_len);
        let r = (cfg.n_heads + 2 * g) * d;
        let fmax = cfg
            .ffn_hidden
            .max(cfg.expert_hidden)
            .max(cfg.shared_hidden());
        let (e, k) = (cfg.n_experts.max(1), cfg.top_k.max(1));
        let cap: Vec<usize> = (0..cfg.n_layers)
            .map(|l| match cfg.window(l) {
                0 => t,
                w => (w + mr).min(t),
            })
            .collect();
        BatchDecoder {
            rope: cfg.rope_table(t),
            dims,
            qk: QkActs::new(&dims, mr),
            slots: s,
            max_rows: mr,
            k: cap
                .iter()
                .map(|&c| KvBuf::zeros(KvType::F32, s * c * g * d))
                .collect(),
            v: cap
                .iter()
                .map(|&c| KvBuf::zeros(KvType::F32, s * c * g * d))
                .collect(),
            cap,
            pos: vec![0; s],
            x: vec![0.0; mr * c],
            h: vec![0.0; mr * c],
            rstd: vec![0.0; mr],
            qkv: vec![0.0; mr * r],
            o: vec![0.0; mr * cfg.n_heads * d],
            scores: vec![0.0; mr * cfg.n_heads * t],
            gu: vec![0.0; mr * 2 * fmax],
            a: vec![0.0; mr * fmax],
            hx: vec![0.0; mr * c],
            y: vec![0.0; mr * c],
            r_logits: vec![0.0; mr * e],
            r_scores: vec![0.0; mr * e],
            r_idx: vec![0; mr * k],
            r_w: vec![0.0; mr * k],
            logits: vec![0.0; mr * cfg.vocab_size],
            team: TeamChoice::default(),
            cfg: cfg.clone(),
            layout,
            quant: None,
            acts: QActs::new(),
            task_acts: vec![],
        }
    }

    /// Multiplies by these quantized matrices instead of the f32 ones they were made from
    /// (the `params` of every later step must be those).
    pub fn set_quant(&mut self, q: Option<Arc<QuantWeights>>) {
        self.quant = q;
    }

    /// Keeps keys and values as `t` (f32 by default; f16 / bf16 halve the cache). Empties
    /// every slot.
    pub fn set_kv_type(&mut self, t: KvType) {
        let gd = self.cfg.n_kv_heads * self.cfg.head_dim();
        for (l, &c) in self.cap.iter().enumerate() {
            self.k[l] = KvBuf::zeros(t, self.slots * c * gd);
            self.v[l] = KvBuf::zeros(t, self.slots * c * gd);
        }
        self.pos.fill(0);
    }

    /// Bytes of all KV caches.
    pub fn cache_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(KvBuf::bytes).sum()
    }

    /// Fixes whether single-row forwards run with a team helper thread (`Some`) instead of
    /// measuring which way is faster (`None`, the default): for tests of the team paths
    /// and for benchmarks. The bits are the same either way.
    pub fn force_team(&mut self, team: Option<bool>) {
        self.team.forced = team;
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Tokens in a slot's cache.
    pub fn len(&self, slot: usize) -> usize {
        self.pos[slot]
    }

    /// Room left in a slot before max_seq_len.
    pub fn remaining(&self, slot: usize) -> usize {
        self.cfg.max_seq_len - self.pos[slot]
    }

    /// Empties a slot's cache.
    pub fn reset(&mut self, slot: usize) {
        self.pos[slot] = 0;
    }

    /// Rows one [`BatchDecoder::forward`] takes at most (tokens over all its inputs).
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Feeds `inputs[i] = (slot, token)` (distinct slots) at each slot's next position and
    /// returns the logits (len(inputs), V), row i for the token after `inputs[i]`.
    /// Panics when a slot's cache is full (check [`BatchDecoder::remaining`]).
    pub fn step(&mut self, params: &[f32], inputs: &[(usize, u32)]) -> &[f32] {
        let toks: Vec<u32> = inputs.iter().map(|&(_, t)| t).collect();
        let feeds: Vec<(usize, &[u32])> = inputs
            .iter()
            .zip(toks.chunks(1))
            .map(|(&(s, _), t)| (s, t))
            .collect();
        self.forward(params, &feeds, false)
    }

    /// Feeds `inputs[i] = (slot, tokens)` (distinct slots, at most [`BatchDecoder::max_rows`]
    /// tokens in all) at each slot's next positions in one batched forward. Returns the logits
    /// of each input's last token (len(inputs), V), or with `all` of every token (rows in input
    /// order). The bits equal feeding the tokens one step at a time.
    /// Panics when a slot's cache would overflow (check [`BatchDecoder::remaining`]).
    pub fn forward(&mut self, params: &[f32], inputs: &[(usize, &[u32])], all: bool) -> &[f32] {
        // one row (a single stream's decode step): a spinning helper takes half of each
        // matmul's columns and of the attention's heads or cache chunks
        // (kernels::par::with_team), when that measures faster (TeamChoice): a step's ~100-200
        // loops then hand off in ~100 ns each instead of waking a sleeping rayon worker. More
        // rows keep rayon (prefill's elementwise loops run in parallel there).
        let rows: usize = inputs.iter().map(|(_, t)| t.len()).sum();
        let len = if rows == 1 && rayon::current_num_threads() > 1 {
            let team = self.team.pick();
            let t = std::time::Instant::now();
            let len = if team {
                kernels::par::with_team(|| self.forward_rows(params, inputs, all))
            } else {
                self.forward_rows(params, inputs, all)
            };
            self.team.record(team, t.elapsed().as_secs_f64());
            len
        } else {
            self.forward_rows(params, inputs, all)
        };
        &self.logits[..len]
    }

    /// [`BatchDecoder::forward`]'s work; returns the length of its logits.
    fn forward_rows(&mut self, params: &[f32], inputs: &[(usize, &[u32])], all: bool) -> usize {
        let cfg = &self.cfg;
        assert!(
            inputs.len() <= self.slots,
            "{} inputs for {} slots",
            inputs.len(),
            self.slots
        );
        assert_eq!(
            params.len(),
            self.layout.total,
            "parameter buffer does not match the config"
        );
        for (i, &(s, toks)) in inputs.iter().enumerate() {
            assert!(s < self.slots, "slot {s} out of range");
            assert!(!toks.is_empty(), "no tokens for slot {s}");
            assert!(
                inputs[..i].iter().all(|&(o, _)| o != s),
                "slot {s} given twice"
            );
            assert!(
                self.pos[s] + toks.len() <= cfg.max_seq_len,
                "KV cache of slot {s} full ({} tokens)",
                cfg.max_seq_len
            );
            for &tok in toks {
                assert!(
                    (tok as usize) < cfg.vocab_size,
                    "token {tok} outside the vocab"
                );
            }
        }
        // one row per token: (slot, position, token)
        let trows: Vec<(usize, usize, u32)> = inputs
            .iter()
            .flat_map(|&(s, toks)| {
                let p0 = self.pos[s];
                toks.iter().enumerate().map(move |(j, &t)| (s, p0 + j, t))
            })
            .collect();
        let n = trows.len();
        assert!(
            n <= self.max_rows,
            "{n} tokens in one forward (at most {})",
            self.max_rows
        );
        let ds = &self.dims;
        let (c, d, h, g) = (ds.c, ds.d, ds.h, ds.g);
        let r = ds.r;
        let gd = g * d;
        let p = |off: usize, len: usize| &params[off..off + len];
        let lay = &self.layout;
        let mut mm = Mm {
            params,
            quant: self.quant.as_deref(),
            acts: &mut self.acts,
        };
        for (i, &(_, _, tok)) in trows.iter().enumerate() {
            self.x[i * c..(i + 1) * c].copy_from_slice(p(lay.embed + tok as usize * c, c));
        }
        let x = &mut self.x[..n * c];
        let hb = &mut self.h[..n * c];
        let rstd = &mut self.rstd[..n];
        // (slot, cached positions including this one) per row
        let rows: Vec<(usize, usize)> = trows.iter().map(|&(s, p, _)| (s, p + 1)).collect();
        for (l, li) in lay.layers.iter().enumerate() {
            // attention: x += o_proj(attn(rope(qkv_proj(rmsnorm(x)))))
            let w = li.attn_w(params, ds);
            rmsnorm_forward(hb, rstd, x, w.norm, cfg.norm_eps);
            let tmax = self.cap[l];
            let kv = KvShape {
                h,
                g,
                d,
                tmax,
                window: li.window,
            };
            // one row in a team: the q/k/v product and the attention as one team loop
            let fused = n == 1
                && kernels::par::in_team()
                && attention_one_row(
                    &w,
                    hb,
                    (trows[0].0, trows[0].1),
                    kv,
                    (&mut self.k[l], &mut self.v[l]),
                    (&mut self.qkv, &mut self.o, &mut self.scores),
                    &self.rope,
                    (params, mm.quant, &mut self.task_acts),
                );
            if !fused {
                let qkv = &mut self.qkv[..n * r];
                mm.linear(qkv, hb, w.wqkv, n, c, r, false);
                if let Some(b) = w.bqkv {
                    add_bias(qkv, b);
                }
                if let (Some(wn), Some(qa)) = (w.qk_norm, self.qk.as_mut()) {
                    qk_norm_forward(qkv, n, ds, wn, qa);
                }
                for (i, &(s, pos, _)) in trows.iter().enumerate() {
                    let row = &mut qkv[i * r..(i + 1) * r];
                    rope_apply_at(row, 0, h + g, pos, &self.rope);
                    // head-major (see KvShape): each key/value head's entries contiguous
                    for gi in 0..g {
                        let at = ((s * g + gi) * tmax + pos % tmax) * d;
                        let kr = (h + gi) * d;
                        self.k[l].write(at, &row[kr..kr + d]);
                        self.v[l].write(at, &row[kr + gd..kr + gd + d]);
                    }
                }
                decode_attention(
                    &mut self.o,
                    &mut self.scores,
                    &self.qkv[..n * r],
                    self.k[l].view(),
                    self.v[l].view(),
                    &rows,
                    kv,
                );
            }
            mm.linear(x, &self.o[..n * h * d], w.wo, n, h * d, c, true);
            // FFN: x += ffn(rmsnorm(x))
            let w = li.ffn_w(params, ds);
            rmsnorm_forward(hb, rstd, x, w.norm, cfg.norm_eps);
            match &w.kind {
                FfnWKind::Dense(m) => {
                    mm.swiglu(x, hb, m.w_gu, m.w_down, ds.f, &mut self.gu, &mut self.a);
                }
                FfnWKind::Moe(m) => {
                    let (e, k, f) = (ds.e, ds.k, ds.fe);
                    let r_logits = &mut self.r_logits[..n * e];
                    linear_rows(r_logits, hb, m.router, n, c, e, false);
                    router::router_forward(
                        &mut self.r_scores[..n * e],
                        &mut self.r_idx[..n * k],
                        &mut self.r_w[..n * k],
                        r_logits,
                        m.bias,
                        &ds.route(),
                    );
                    if n == 1
                        && kernels::par::in_team()
                        && experts_one_row(
                            x,
                            hb,
                            m,
                            ds,
                            (&self.r_idx[..k], &self.r_w[..k]),
                            (&mut self.gu, &mut self.a, &mut self.y),
                            (params, mm.quant, &mut self.task_acts),
                            l % 2 == 1,
                        )
                    {
                        continue;
                    }
                    match (m.shared, m.shared_gate) {
                        (Some((sg, sd)), None) => {
                            mm.swiglu(x, hb, sg, sd, ds.fs, &mut self.gu, &mut self.a);
                        }
                        (Some((sg, sd)), Some(gw)) => {
                            // x += sigmoid(h . w_gate) * shared(h) (Qwen2-MoE)
                            let y = &mut self.y[..n * c];
                            y.fill(0.0);
                            mm.swiglu(y, hb, sg, sd, ds.fs, &mut self.gu, &mut self.a);
                            for ((xr, yr), hr) in x.chunks_mut(c).zip(y.chunks(c)).zip(hb.chunks(c))
                            {
                                let z: f32 = hr.iter().zip(gw).map(|(a, b)| a * b).sum();
                                let g = 1.0 / (1.0 + (-z).exp());
                                xr.iter_mut().zip(yr).for_each(|(x, y)| *x += g * y);
                            }
                        }
                        _ => {}
                    }
                    // each expert runs once on the rows routed to it
                    for j in 0..e {
                        let rows: Vec<(usize, f32)> = (0..n * k)
                            .filter(|&q| self.r_idx[q] as usize == j)
                            .map(|q| (q / k, self.r_w[q]))
                            .collect();
                        if rows.is_empty() {
                            continue;
                        }
                        let mr = rows.len();
                        for (q, &(i, _)) in rows.iter().enumerate() {
                            self.hx[q * c..(q + 1) * c].copy_from_slice(&hb[i * c..(i + 1) * c]);
                        }
                        let y = &mut self.y[..mr * c];
                        y.fill(0.0);
                        mm.swiglu(
                            y,
                            &self.hx[..mr * c],
                            &m.w_gu[j * 2 * f * c..(j + 1) * 2 * f * c],
                            &m.w_down[j * c * f..(j + 1) * c * f],
                            f,
                            &mut self.gu,
                            &mut self.a,
                        );
                        for (q, &(i, w)) in rows.iter().enumerate() {
                            for (xx, yy) in x[i * c..(i + 1) * c].iter_mut().zip(&y[q * c..]) {
                                *xx += w * yy;
                            }
                        }
                    }
                }
            }
        }
        // the head over the rows whose logits are wanted (each input's last, or all)
        let nl = if all {
            n
        } else {
            let mut end = 0;
            for (i, &(_, toks)) in inputs.iter().enumerate() {
                end += toks.len();
                x.copy_within((end - 1) * c..end * c, i * c);
            }
            inputs.len()
        };
        let (x, hb, rstd) = (&x[..nl * c], &mut hb[..nl * c], &mut rstd[..nl]);
        rmsnorm_forward(hb, rstd, x, p(lay.norm, c), cfg.norm_eps);
        let v = cfg.vocab_size;
        mm.linear(
            &mut self.logits[..nl * v],
            hb,
            p(lay.lm_head, v * c),
            nl,
            c,
            v,
            false,
        );
        for &(s, toks) in inputs {
            self.pos[s] += toks.len();
        }
        nl * v
    }
}

/// The attention of one decode row in a team (before its output projection), as one team
/// loop of two tasks, each for half the key/value heads and their query heads: its rows of
/// the q/k/v product, their rotation, its heads' cache entries and their attention. Against
/// a loop for the q/k/v product, the rotations and cache writes on the calling thread, then
/// a loop for the attention, one hand-off fewer per layer and the rotations and writes in
/// parallel: the student's decode 13,699 against 13,189 and 13,114 against 12,704 tokens/s
/// (medians of 21 and 25 alternating rounds, Intel host). Every value is computed as the
/// general path computes it (the same fixed-order dots, rotations and attention of each
/// head over its cache entries), so the bits are the same. `at` is the row's (slot,
/// position). False (nothing done) with quantized q/k/v weights, a q/k/v bias or q/k norms,
/// or a single key/value head.
#[allow(clippy::too_many_arguments)]
fn attention_one_row(
    w: &AttnW,
    h_in: &[f32],
    (slot, pos): (usize, usize),
    s: KvShape,
    (kc, vc): (&mut KvBuf, &mut KvBuf),
    (qkv, o, scores): (&mut [f32], &mut [f32], &mut [f32]),
    rope: &RopeTable,
    (params, quant, task_acts): (&[f32], Option<&QuantWeights>, &mut Vec<QActs>),
) -> bool {
    let (h, g, d, tmax) = (s.h, s.g, s.d, s.tmax);
    // (f32 q/k/v weights only: with Q8_0 ones the student decoded 5% slower this way, 15,778
    // against 16,580 tokens/s in 21 alternating rounds)
    let quantized = quant.is_some_and(|q| q.find(params, w.wqkv).is_some());
    if quantized || w.bqkv.is_some() || w.qk_norm.is_some() || g < 2 || h % g != 0 {
        return false;
    }
    let (c, hpg) = (h_in.len(), h / g);
    debug_assert_eq!((h + 2 * g) * d * c, w.wqkv.len());
    // key/value heads gs[t]..gs[t + 1] for task t, the caller's (the first) the larger half
    let gs = [0, g.div_ceil(2), g];
    // each task's cache entries: its heads' runs of the slot (head-major, see KvShape)
    let cuts = gs.map(|gi| (slot * g + gi) * tmax * d);
    fn parts(b: &mut KvBuf, [c0, c1, c2]: [usize; 3]) -> [KvMut<'_>; 2] {
        let (_, rest) = b.whole_mut().split_at(c0);
        let (p0, rest) = rest.split_at(c1 - c0);
        let (p1, _) = rest.split_at(c2 - c1);
        [p0, p1]
    }
    let (mut ks, mut vs) = (parts(kc, cuts), parts(vc, cuts));
    if task_acts.len() < 2 {
        task_acts.resize_with(2, QActs::new);
    }
    let (kr, vr) = (Raw::of(&mut ks[..]), Raw::of(&mut vs[..]));
    let (qkv, o, sc) = (Raw::of(qkv), Raw::of(o), Raw::of(scores));
    let acts = Raw::of(&mut task_acts[..2]);
    let run = |t: usize| {
        let (g0, g1) = (gs[t], gs[t + 1]);
        let (h0, h1) = (g0 * hpg, g1 * hpg);
        // SAFETY: task t alone uses its activations, its cache ranges, its heads' columns of
        // the q/k/v row (q, k and v, disjoint from the other task's), and their outputs and
        // scores.
        let (acts, kt, vt, q, k, v, out, sct) = unsafe {
            (
                acts.at(t),
                kr.at(t),
                vr.at(t),
                qkv.range_mut(h0 * d..h1 * d),
                qkv.range_mut((h + g0) * d..(h + g1) * d),
                qkv.range_mut((h + g + g0) * d..(h + g + g1) * d),
                o.range_mut(h0 * d..h1 * d),
                sc.range_mut(h0 * tmax..h1 * tmax),
            )
        };
        let mut mm = Mm {
            params,
            quant,
            acts,
        };
        let rows = |r0: usize, r1: usize| &w.wqkv[r0 * d * c..r1 * d * c];
        mm.linear(q, h_in, rows(h0, h1), 1, c, (h1 - h0) * d, false);
        mm.linear(k, h_in, rows(h + g0, h + g1), 1, c, (g1 - g0) * d, false);
        mm.linear(
            v,
            h_in,
            rows(h + g + g0, h + g + g1),
            1,
            c,
            (g1 - g0) * d,
            false,
        );
        rope_apply_at(q, 0, h1 - h0, pos, rope);
        rope_apply_at(k, 0, g1 - g0, pos, rope);
        for j in 0..g1 - g0 {
            let at = (j * tmax + pos % tmax) * d;
            kt.write(at, &k[j * d..(j + 1) * d]);
            vt.write(at, &v[j * d..(j + 1) * d]);
        }
        // this task's heads as a cache of their own (slot 0 of g1 - g0 heads)
        let sub = KvShape {
            h: h1 - h0,
            g: g1 - g0,
            ..s
        };
        decode_attention(out, sct, q, kt.view(), vt.view(), &[(0, pos + 1)], sub);
    };
    if !kernels::par::team_for_each(2, &run) {
        (0..2).for_each(run);
    }
    true
}

/// The MoE FFN of one decode row in a team: the shared expert (ungated) and the row's routed
/// experts are independent, so each expert's gate/up product, SwiGLU and down product run
/// as one task of a single team loop (one hand-off for a layer's experts, the SwiGLUs in
/// parallel; against a loop for the gate/up products and one for the down products,
/// student decoding +0.4 to +28%, median +5.6%, in 6 alternating rounds). The sums are the
/// general path's: the shared output added to `x` first, then each routed output, in expert
/// order, times its weight; each matrix multiplied in f32 or through its quantized copy, as
/// the general path multiplies it (each task quantizes its own inputs). False (nothing done)
/// for a gated shared expert or a single expert.
///
/// The caller claims the first task, so it runs the shared expert and the helper a routed
/// one; with `flip` (the odd layers) the other way round. Each core then keeps half the
/// shared experts in its cache and streams half the routed ones, instead of the caller's
/// cache holding them all beside its share of the attention weights (the student's decode
/// on the Intel host: 12,928 against 12,703 and 12,866 against 12,568 tokens/s, medians of
/// 21 and 25 alternating rounds).
#[allow(clippy::too_many_arguments)]
fn experts_one_row(
    x: &mut [f32],
    h: &[f32],
    m: &MoeW,
    ds: &Dims,
    (idx, wts): (&[u32], &[f32]),
    (gu, a, y): (&mut [f32], &mut [f32], &mut [f32]),
    (params, quant, task_acts): (&[f32], Option<&QuantWeights>, &mut Vec<QActs>),
    flip: bool,
) -> bool {
    let (c, f) = (ds.c, ds.fe);
    let mut routed: Vec<(usize, f32)> = idx
        .iter()
        .map(|&j| j as usize)
        .zip(wts.iter().copied())
        .collect();
    routed.sort_by_key(|r| r.0);
    // (gate/up, down, hidden width) of the shared expert, then of the routed ones
    let mats: Vec<(&[f32], &[f32], usize)> = m
        .shared
        .map(|(sg, sd)| (sg, sd, ds.fs))
        .into_iter()
        .chain(routed.iter().map(|&(j, _)| {
            (
                &m.w_gu[j * 2 * f * c..(j + 1) * 2 * f * c],
                &m.w_down[j * c * f..(j + 1) * c * f],
                f,
            )
        }))
        .collect();
    let need: usize = mats.iter().map(|t| 2 * t.2).sum();
    if m.shared_gate.is_some() || mats.len() < 2 || need > gu.len() || routed.len() * c > y.len() {
        return false;
    }
    if task_acts.len() < mats.len() {
        task_acts.resize_with(mats.len(), QActs::new);
    }
    let y = &mut y[..routed.len() * c];
    y.fill(0.0);
    // expert t's scratch (gate/up, activation) and output: the shared expert adds into x,
    // each routed one writes its own row of y
    let mut parts: Vec<Raw<f32>> = Vec::with_capacity(3 * mats.len());
    let (mut gu, mut a) = (gu, a);
    let mut outs = y.chunks_mut(c);
    for (t, &(_, _, fi)) in mats.iter().enumerate() {
        let (g, rest) = gu.split_at_mut(2 * fi);
        gu = rest;
        let (ai, rest) = a.split_at_mut(fi);
        a = rest;
        let o: &mut [f32] = if t == 0 && m.shared.is_some() {
            &mut x[..]
        } else {
            outs.next().expect("a row of y per routed expert")
        };
        parts.extend([Raw::of(g), Raw::of(ai), Raw::of(o)]);
    }
    let acts = Raw::of(&mut task_acts[..mats.len()]);
    let run = |t: usize| {
        let t = if flip { (t + 1) % mats.len() } else { t };
        let (wg, wd, fi) = mats[t];
        // SAFETY: task t alone uses its three disjoint slices and its activations (made
        // above from disjoint borrows that outlive the loop).
        let (g, ai, o, acts) = unsafe {
            (
                parts[3 * t].get(),
                parts[3 * t + 1].get(),
                parts[3 * t + 2].get(),
                acts.at(t),
            )
        };
        // each matrix f32 or quantized, as the general path multiplies it
        Mm {
            params,
            quant,
            acts,
        }
        .swiglu(o, h, wg, wd, fi, g, ai);
    };
    if !kernels::par::team_for_each(mats.len(), &run) {
        (0..mats.len()).for_each(run);
    }
    for (yr, &(_, w)) in y.chunks(c).zip(&routed) {
        for (xx, yy) in x.iter_mut().zip(yr) {
            *xx += w * yy;
        }
    }
    true
}

/// A mutable slice handed to the tasks of a team loop.
struct Raw<T>(*mut T, usize);

// SAFETY: each task dereferences only the parts it owns (see the loops that make them).
unsafe impl<T: Send> Sync for Raw<T> {}

impl<T> Raw<T> {
    fn of(s: &mut [T]) -> Raw<T> {
        Raw(s.as_mut_ptr(), s.len())
    }

    /// SAFETY: no other reference to the slice exists while the result lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }

    /// Elements `r`. SAFETY: no other reference to them exists while the result lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range_mut(&self, r: std::ops::Range<usize>) -> &mut [T] {
        assert!(r.start <= r.end && r.end <= self.1, "{r:?} of {}", self.1);
        unsafe { std::slice::from_raw_parts_mut(self.0.add(r.start), r.end - r.start) }
    }

    /// Element `i`. SAFETY: no other reference to it exists while the result lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn at(&self, i: usize) -> &mut T {
        assert!(i < self.1, "element {i} of {}", self.1);
        unsafe { &mut *self.0.add(i) }
    }
}

/// The decoder's matmuls: by a matrix's quantized copy when there is one, else f32.
struct Mm<'a> {
    params: &'a [f32],
    quant: Option<&'a QuantWeights>,
    acts: &'a mut QActs,
}

impl Mm<'_> {
    /// `out (N,O) [+]= x (N,I) @ w (O,I)^T`, `w` a view into the parameters.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        out: &mut [f32],
        x: &[f32],
        w: &[f32],
        n: usize,
        i: usize,
        o: usize,
        accumulate: bool,
    ) {
        match self.quant.and_then(|q| q.find(self.params, w)) {
            Some((m, row0)) => {
                self.acts.quantize(x, i);
                qlinear_rows(out, self.acts, m, row0, o, accumulate);
            }
            None => linear_rows(out, x, w, n, i, o, accumulate),
        }
    }

    /// `x (M,C) += SwiGLU(h (M,C))` through `w_gu (2F,C)` and `w_down (C,F)`.
    #[allow(clippy::too_many_arguments)]
    fn swiglu(
        &mut self,
        x: &mut [f32],
        h: &[f32],
        w_gu: &[f32],
        w_down: &[f32],
        f: usize,
        gu: &mut [f32],
        a: &mut [f32],
    ) {
        let c = w_down.len() / f;
        let m = h.len() / c;
        self.linear(&mut gu[..m * 2 * f], h, w_gu, m, c, 2 * f, false);
        swiglu_forward(&mut a[..m * f], &gu[..m * 2 * f], f);
        self.linear(x, &a[..m * f], w_down, m, f, c, true);
    }
}

/// KV-cache decoder for one sequence.
pub struct Decoder {
    inner: BatchDecoder,
}

impl Decoder {
    pub fn new(cfg: &ModelConfig) -> Decoder {
        Decoder {
            inner: BatchDecoder::new(cfg, 1),
        }
    }

    /// See [`BatchDecoder::force_team`].
    pub fn force_team(&mut self, team: Option<bool>) {
        self.inner.force_team(team);
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.inner.len(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room left before max_seq_len.
    pub fn remaining(&self) -> usize {
        self.inner.remaining(0)
    }

    /// Empties the cache.
    pub fn reset(&mut self) {
        self.inner.reset(0);
    }

    /// See [`BatchDecoder::set_kv_type`].
    pub fn set_kv_type(&mut self, t: KvType) {
        self.inner.set_kv_type(t);
    }

    /// See [`BatchDecoder::cache_bytes`].
    pub fn cache_bytes(&self) -> usize {
        self.inner.cache_bytes()
    }

    /// See [`BatchDecoder::set_quant`].
    pub fn set_quant(&mut self, q: Option<Arc<QuantWeights>>) {
        self.inner.set_quant(q);
    }

    /// Feeds `token` at the next position and returns the logits (V) for the one after it.
    /// Panics when the cache is full (check [`Decoder::remaining`]).
    pub fn step(&mut self, params: &[f32], token: u32) -> &[f32] {
        self.inner.step(params, &[(0, token)])
    }

    /// Feeds `tokens` like [`Decoder::feed`] and returns the logits after every one of them
    /// (len(tokens), V).
    pub fn logits_all(&mut self, params: &[f32], tokens: &[u32]) -> Vec<f32> {
        let m = self.inner.max_rows();
        let mut out = Vec::with_capacity(tokens.len() * self.inner.cfg.vocab_size);
        for chunk in tokens.chunks(m) {
            out.extend_from_slice(self.inner.forward(params, &[(0, chunk)], true));
        }
        out
    }

    /// Feeds `tokens` (a prompt) in batched forwards of up to [`BatchDecoder::max_rows`] rows
    /// and returns the logits (V) after the last one: the same bits as stepping through them.
    /// Panics when `tokens` is empty or does not fit (check [`Decoder::remaining`]).
    pub fn feed(&mut self, params: &[f32], tokens: &[u32]) -> &[f32] {
        assert!(!tokens.is_empty(), "nothing to feed");
        let m = self.inner.max_rows();
        let last = (tokens.len() - 1) / m * m;
        for chunk in tokens[..last].chunks(m) {
            self.inner.forward(params, &[(0, chunk)], false);
        }
        self.inner.forward(params, &[(0, &tokens[last..])], false)
    }
}

#[cfg(test)]
mod tests {
    use super::TeamChoice;

    /// Drives the choice with forward times where the team costs `ratio` times one thread
    /// (plus jitter and a drift along the sequence, as attention grows): after its first
    /// trial it runs the faster way except for trial bursts, which grow rarer while the way
    /// holds, and a wrong switch now and then (a trial burst just after the drift's reset
    /// looks cheap), undone EVERY forwards later; it follows a change of host at the next
    /// trial; and a wrong first decision (a trial burst slowed by the host) is undone EVERY
    /// forwards later.
    #[test]
    fn team_choice_follows_the_faster_way() {
        let (b, e, emax) = (TeamChoice::BURST, TeamChoice::EVERY, TeamChoice::EVERY_MAX);
        let mut i = 0u64;
        // forwards of which team ones cost `team_cost`, the first `slow` team ones 3x more
        let mut run = |c: &mut TeamChoice, team_cost: f64, n: usize, mut slow: usize| {
            let mut team_runs = 0;
            for _ in 0..n {
                let team = c.pick();
                team_runs += team as usize;
                i += 1;
                let jitter = if i.is_multiple_of(13) { 3.0 } else { 1.0 };
                let base = 50e-6 * (1.0 + (i % 256) as f64 / 256.0) * jitter;
                let noise = if team && slow > 0 {
                    slow -= 1;
                    3.0
                } else {
                    1.0
                };
                c.record(team, if team { base * team_cost * noise } else { base });
            }
            team_runs
        };
        let mut c = TeamChoice::default();
        run(&mut c, 0.7, 2 * b, 0);
        assert!(c.team && c.decided());
        let (n, t0) = (20 * emax, c.trials);
        let team = run(&mut c, 0.7, n, 0);
        let trials = c.trials - t0;
        assert!(team >= n - n / 50, "team faster: {team} of {n} forwards");
        assert!(trials <= 40, "{trials} trials in {n} forwards");
        // the host changes: the team now costs 1.25x; the next trial drops it
        run(&mut c, 1.25, emax + b, 0);
        assert!(!c.team);
        let t0 = c.trials;
        let team = run(&mut c, 1.25, n, 0);
        assert!(
            team <= n / 50,
            "alone faster: {team} of {n} forwards with the team"
        );
        assert!(c.trials - t0 <= 40, "{} trials", c.trials - t0);
        // a slowed first trial burst decides wrongly; the next trial, EVERY later, fixes it
        let mut c = TeamChoice::default();
        run(&mut c, 0.7, 2 * b, b);
        assert!(!c.team && c.decided(), "the slowed trial kept one thread");
        run(&mut c, 0.7, e + b, 0);
        assert!(c.team, "the next trial takes the team");
    }
}
