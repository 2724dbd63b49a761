//! `moelab bench train`: training throughput of one config on random tokens.
//! `moelab bench decode`: inference throughput of a run or a GGUF file, prefill and decode,
//! measured as llama.cpp's `llama-bench` does (random tokens; decode from an empty cache).
//!
//! MFU = achieved FLOP/s / peak FLOP/s, with training FLOPs per token from
//! `ModelConfig::train_flops_per_token` (6 per active matmul weight + attention) and the fp32
//! peak taken as threads x 64 FLOP/cycle (two 512-bit FMA pipes: 2 x 16 lanes x 2 FLOPs) x the
//! clock from /proc/cpuinfo, unless `--peak-gflops` says otherwise. MFU is also quoted
//! against the measured FMA peak of the cores in use (`moelab bench peak`).

use crate::machine::{cpu_ghz, nominal_peak_gflops, peak_rss_mib};
use crate::presets::load_config;
use anyhow::Result;
use clap::{Args, Subcommand};
use model::optim::train_step;
use model::{Model, Optimizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Measure this CPU's fp32 FMA peak per core (what MFU is also quoted against).
    #[command(after_help = "Example:\n  moelab bench peak")]
    Peak,
    /// Time full training steps (forward, backward, the config's optimizer) on random tokens.
    #[command(
        after_help = "Examples:\n  moelab bench train --config small-moe\n  RAYON_NUM_THREADS=2 moelab bench train --config configs/small-dense.toml --steps 20 --json"
    )]
    Train(TrainBench),
    /// Under mpirun: the canonical-order gradient reduction vs MPI's own allreduce, for a
    /// config's parameter count.
    #[command(
        after_help = "Example:\n  mpirun -np 2 moelab bench reduce --config small-moe   (needs --features mpi)"
    )]
    Reduce(ReduceBench),
    /// Time inference: a prompt of random tokens in batched forwards (prefill, as
    /// `llama-bench -p`) and single-stream decoding from an empty cache (as `llama-bench -n`).
    #[command(
        after_help = "Examples:\n  moelab bench decode --run runs/student\n  RAYON_NUM_THREADS=2 moelab bench decode --run SmolLM2-135M-Instruct.Q4_1.gguf --prompt-tokens 512 --gen-tokens 128 --json\n  moelab bench decode --run runs/student --prompt-tokens 200 --gen-tokens 0 --prefill stepwise\n  moelab bench decode --run SmolLM2-135M-Instruct.Q4_1.gguf --prompt-tokens 0 --depth 4096 --kv-cache f16"
    )]
    Decode(DecodeBench),
}

#[derive(Args)]
pub struct DecodeBench {
    /// A run dir (its latest checkpoint), a checkpoint dir, a Hugging Face model dir or a
    /// GGUF file (imported in memory).
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    run: Option<std::path::PathBuf>,
    /// Or a config file or preset with random weights (speed does not depend on them).
    #[arg(long)]
    config: Option<String>,
    /// Prompt tokens to prefill (0: skip the prefill test).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode one at a time after a one-token prompt (0: skip the decode test).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Tokens already in the cache when the decode test starts (llama-bench's `-d`):
    /// decoding at long context.
    #[arg(long, default_value_t = 0)]
    depth: usize,
    /// How the prompt goes in: batched (forwards of many rows, what sample, chat and serve
    /// do) or stepwise (one decode step per token, to compare).
    #[arg(long, default_value = "batched", value_parser = ["batched", "stepwise"])]
    prefill: String,
    /// Timed repetitions of each test (the median is reported).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Weights to multiply by: auto (a GGUF file's, or an imported run's, quantized types,
    /// Q4_K/Q6_K included;
    /// otherwise f32), f32, q8_0, q5_0, q4_1 or q4_0.
    #[arg(long, default_value = "auto")]
    quant: String,
    /// Element type of the KV cache: f32, or f16 / bf16 (half the memory; keys and values
    /// rounded when cached, attention computed in f32).
    #[arg(long = "kv-cache", default_value = "f32", value_parser = crate::runs::parse_kv)]
    kv_cache: model::decode::KvType,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ReduceBench {
    /// Config file or preset: the gradient size is its parameter count.
    #[arg(long, default_value = "small-moe")]
    config: String,
    /// Timed repetitions of each reduction.
    #[arg(long, default_value_t = 20)]
    reps: usize,
}

#[derive(Args)]
pub struct TrainBench {
    /// Config file or preset name (tiny, small-dense, small-moe, teacher, student,
    /// passkey-128, passkey-512, passkey-4096-yarn, shakespeare).
    #[arg(long)]
    config: String,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Peak fp32 GFLOP/s for MFU (default: threads x 64 FLOP/cycle x CPU clock).
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also print where the time goes: wall-clock per kernel group over the timed steps.
    #[arg(long)]
    profile: bool,
    /// Sequence length T (overrides train.seq_len; the model's context grows to fit).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Sequences per step B (overrides train.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Attention kernel: auto (by T, as training picks), tiled (online softmax, memory
    /// O(T)) or stored ((T, T) probabilities kept for the backward).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tiled", "stored"])]
    attention: String,
    /// Matmul precision, fp32 or bf16 (overrides train.precision).
    #[arg(long, value_parser = ["fp32", "bf16"])]
    precision: Option<String>,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Train(a) => train(a),
        BenchCmd::Reduce(a) => reduce(a),
        BenchCmd::Decode(a) => decode(a),
        BenchCmd::Peak => {
            let ghz = cpu_ghz();
            let per_core = measured_peak_per_core();
            println!("measured fp32 FMA peak  {per_core:.1} GFLOP/s per core ({:.1} FLOP/cycle at the nominal clock)", per_core / ghz.unwrap_or(f64::NAN));
            if let Some(g) = ghz {
                println!(
                    "nominal peak            {:.1} GFLOP/s per core (64 FLOP/cycle x {g:.2} GHz)",
                    64.0 * g
                );
            }
            let bf16 = (0..3)
                .filter_map(|_| kernels::peak::bf16_gflops())
                .fold(f64::NAN, f64::max);
            if bf16.is_finite() {
                println!(
                    "measured bf16 dot peak  {bf16:.1} GFLOP/s per core ({:.2}x the fp32 FMA: bf16 training {} here)",
                    bf16 / per_core,
                    if kernels::peak::bf16_pays() { "pays" } else { "does not pay" }
                );
            }
            Ok(())
        }
    }
}

/// Best of three runs of the FMA loop on one thread.
fn measured_peak_per_core() -> f64 {
    (0..3)
        .filter_map(|_| kernels::peak::fma_gflops())
        .fold(f64::NAN, f64::max)
}

fn train(a: TrainBench) -> Result<()> {
    let mut cfg = load_config(&a.config)?;
    if let Some(t) = a.seq_len {
        cfg.train.seq_len = t;
        cfg.model.max_seq_len = cfg.model.max_seq_len.max(t);
    }
    if let Some(b) = a.batch_size {
        cfg.train.batch_size = b;
    }
    match a.precision.as_deref() {
        Some("bf16") => cfg.train.precision = model::config::TrainPrecision::Bf16,
        Some(_) => cfg.train.precision = model::config::TrainPrecision::Fp32,
        None => {}
    }
    cfg.validate()?;
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    let threads = rayon::current_num_threads();
    let mut model = Model::new(&cfg.model, b, t, cfg.train.seed);
    model.set_precision(cfg.train.precision.kernels());
    match a.attention.as_str() {
        "tiled" => model.set_flash_attention(true),
        "stored" => model.set_flash_attention(false),
        _ => {}
    }
    let mut opt = Optimizer::new(&model);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
    let v = cfg.model.vocab_size as u32;
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..v)).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..v)).collect();
    for _ in 0..a.warmup {
        train_step(
            &mut model,
            &mut opt,
            &tokens,
            &targets,
            &cfg.train,
            cfg.train.lr,
        );
    }
    if a.profile {
        model.prof.enable();
    }
    let (mut tf, mut tb, mut to) = (0.0, 0.0, 0.0);
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..a.steps {
        // the same work as train_step, timed by phase
        let t0 = Instant::now();
        model.zero_grad();
        loss = model.forward(&tokens, &targets).total;
        let t1 = Instant::now();
        model.backward(1.0);
        let t2 = Instant::now();
        opt.step(&mut model, &cfg.train, cfg.train.lr);
        model.update_balance_bias();
        let t3 = Instant::now();
        tf += (t1 - t0).as_secs_f64();
        tb += (t2 - t1).as_secs_f64();
        to += (t3 - t2).as_secs_f64();
    }
    let secs = start.elapsed().as_secs_f64();
    let tok_s = (a.steps * b * t) as f64 / secs;
    let flops_tok = cfg.model.train_flops_per_token(t);
    let gflops = tok_s * flops_tok / 1e9;
    let peak = a.peak_gflops.or_else(|| nominal_peak_gflops(threads));
    let mfu = peak.map(|p| gflops / p);
    let cores = threads.min(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let measured_peak = cores as f64 * measured_peak_per_core();
    let mem = peak_rss_mib();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "config": a.config, "precision": cfg.train.precision, "optimizer": cfg.train.optimizer, "threads": threads, "batch": b, "seq_len": t, "steps": a.steps,
                "tokens_per_s": tok_s, "gflops": gflops, "mfu": mfu, "peak_gflops": peak,
                "mfu_measured_peak": gflops / measured_peak, "measured_peak_gflops": measured_peak,
                "peak_rss_mib": mem, "loss": loss, "forward_s": tf, "backward_s": tb, "optimizer_s": to,
                "active_matmul_params": cfg.model.active_matmul_params(), "params": model.layout.n_params(),
                "weights_hash": model::io::weights_hash(&model.layout, &model.params),
            })
        );
    } else {
        println!(
            "config {}  precision {:?}  optimizer {}  threads {threads}  B={b} T={t}  params {:.2}M  active/token {:.2}M",
            a.config,
            cfg.train.precision,
            cfg.train.optimizer.name(),
            model.layout.n_params() as f64 / 1e6,
            cfg.model.active_matmul_params() as f64 / 1e6
        );
        println!("tokens/s      {tok_s:.0}");
        println!(
            "GFLOP/s       {gflops:.1}  ({:.1} MFLOP/token)",
            flops_tok / 1e6
        );
        match (mfu, peak) {
            (Some(m), Some(p)) => println!("MFU           {:.1}%  of {p:.0} GFLOP/s fp32 peak (threads x 64 FLOP/cycle x clock)", m * 100.0),
            _ => println!("MFU           unknown (no CPU clock; pass --peak-gflops)"),
        }
        println!("              {:.1}%  of {measured_peak:.0} GFLOP/s measured FMA peak ({cores} cores, `moelab bench peak`)", 100.0 * gflops / measured_peak);
        println!(
            "time split    forward {:.0}%  backward {:.0}%  optimizer {:.0}%",
            100.0 * tf / secs,
            100.0 * tb / secs,
            100.0 * to / secs
        );
        if let Some(m) = mem {
            println!("peak memory   {m:.0} MiB");
        }
        println!(
            "weights hash  {}  (after {} steps)",
            model::io::weights_hash(&model.layout, &model.params),
            a.warmup + a.steps
        );
        if a.profile {
            let mut rows = model.prof.totals.clone();
            let opt = match cfg.train.optimizer {
                model::config::OptimizerKind::Adamw => "optimizer: clip + AdamW",
                model::config::OptimizerKind::Muon => "optimizer: clip + Muon (AdamW for the rest)",
            };
            rows.push((opt, to));
            rows.sort_by(|x, y| y.1.total_cmp(&x.1));
            println!("\nwhere the time goes ({} steps, wall clock):", a.steps);
            for (name, t) in rows {
                println!(
                    "  {:>5.1}%  {:>7.1} ms/step  {name}",
                    100.0 * t / secs,
                    1000.0 * t / a.steps as f64
                );
            }
        }
    }
    Ok(())
}

/// Median time of the canonical fold (`train::dist::fold_across`, one micro-batch per
/// process) and of MPI's allreduce over a gradient of the config's size.
fn reduce(a: ReduceBench) -> Result<()> {
    let cfg = load_config(&a.config)?;
    let n = model::Layout::new(&cfg.model).total;
    let group = crate::comm::world()?;
    let single = train::dist::Single;
    let comm: &dyn train::dist::Comm = group.as_deref().unwrap_or(&single);
    let (rank, size) = (comm.rank(), comm.size());
    let grad: Vec<f32> = (0..n)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 * 1e-3)
        .collect();
    let held = if rank == 0 {
        vec![]
    } else {
        vec![grad.clone()]
    };
    let mut acc = grad.clone();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut canonical = vec![];
    let mut mpi_sum = vec![];
    for _ in 0..a.reps {
        acc.copy_from_slice(&grad);
        let t = std::time::Instant::now();
        train::dist::fold_across(comm, &mut acc, &held);
        canonical.push(t.elapsed().as_secs_f64());
        acc.copy_from_slice(&grad);
        let t = std::time::Instant::now();
        comm.all_reduce_sum(&mut acc);
        mpi_sum.push(t.elapsed().as_secs_f64());
    }
    if rank == 0 {
        let (c, m) = (median(canonical), median(mpi_sum));
        println!(
            "{size} processes, {n} parameters ({:.1} MB of fp32 gradient), median of {} reps:",
            n as f64 * 4e-6,
            a.reps
        );
        println!(
            "  canonical-order fold (chain + broadcast)  {:>8.2} ms",
            c * 1e3
        );
        println!(
            "  MPI allreduce (sum)                       {:>8.2} ms",
            m * 1e3
        );
        println!(
            "  canonical / allreduce                     {:>8.2}x",
            c / m
        );
    }
    Ok(())
}

/// A model's config, fp32 parameters and source quantization (see
/// [`crate::runs::quant_weights`]) from a run or checkpoint dir, a Hugging Face model dir or
/// a GGUF file, with a context of at least `context` tokens.
type Loaded = (model::ModelConfig, Vec<f32>, interop::run::SourceQuant);

fn load_model(path: &std::path::Path, context: usize) -> Result<Loaded> {
    let is_hf = path.join("config.json").exists() && !path.join("config.toml").exists();
    let (mut cfg, params, quant) = if is_hf {
        let imp = interop::hf::import_dir(path, Some(context))?;
        (imp.config, imp.params, Default::default())
    } else if crate::runs::is_gguf(path) {
        let imp = interop::gguf::import_file(path, Some(context))?;
        let q = interop::run::SourceQuant {
            types: imp.source.quant,
            bytes: imp.quant_bytes,
        };
        (imp.config, imp.params, q)
    } else {
        let lr = train::load_run(path)?;
        let quant = crate::runs::source_quant(path, &lr.checkpoint)?;
        (lr.cfg.model, lr.params, quant)
    };
    if cfg.max_seq_len < context {
        // positions past the trained context decode (the cache only grows); the numbers
        // measure speed, not quality
        cfg.max_seq_len = context;
    }
    Ok((cfg, params, quant))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn decode(a: DecodeBench) -> Result<()> {
    if a.prompt_tokens == 0 && a.gen_tokens == 0 {
        anyhow::bail!("nothing to time: --prompt-tokens and --gen-tokens are both 0");
    }
    // decode on a worker of a pool, as the serving engine does: parallel regions started
    // from a worker avoid a cross-thread wake-up each
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()?;
    pool.install(|| decode_on_pool(a))
}

fn decode_on_pool(a: DecodeBench) -> Result<()> {
    use model::decode::Decoder;
    let reps = a.reps.max(1);
    let t0 = Instant::now();
    let context = a.prompt_tokens.max(a.depth + a.gen_tokens + 1);
    let (cfg, params, source) = match (&a.run, &a.config) {
        (Some(run), _) => load_model(run, context)?,
        (None, Some(c)) => {
            let mut cfg = load_config(c)?.model;
            cfg.max_seq_len = cfg.max_seq_len.max(context);
            let params = Model::new(&cfg, 1, 1, 0).params;
            (cfg, params, Default::default())
        }
        (None, None) => anyhow::bail!("give --run or --config"),
    };
    let what = match (&a.run, &a.config) {
        (Some(r), _) => r.display().to_string(),
        (None, c) => format!("{} (random weights)", c.as_deref().unwrap_or("")),
    };
    let quant = crate::runs::quant_weights(&cfg, &params, &source, &a.quant)?;
    let load_s = t0.elapsed().as_secs_f64();
    let weights = crate::runs::describe_quant(quant.as_deref());
    let v = cfg.vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let prompt: Vec<u32> = (0..a.prompt_tokens.max(a.depth))
        .map(|_| rng.gen_range(0..v))
        .collect();
    let mut dec = Decoder::new(&cfg);
    dec.set_quant(quant);
    dec.set_kv_type(a.kv_cache);
    let stepwise = a.prefill == "stepwise";
    let prefill = |dec: &mut Decoder, toks: &[u32]| {
        dec.reset();
        if stepwise {
            for &t in toks {
                dec.step(&params, t);
            }
        } else {
            dec.feed(&params, toks);
        }
    };
    // warm-up (pages the weights in, spins up the thread pool), as llama-bench does
    prefill(&mut dec, &[1, 2]);
    let mut pp = vec![];
    for _ in 0..if a.prompt_tokens > 0 { reps } else { 0 } {
        let t = Instant::now();
        prefill(&mut dec, &prompt[..a.prompt_tokens]);
        pp.push(a.prompt_tokens as f64 / t.elapsed().as_secs_f64());
    }
    let mut tg = vec![];
    for _ in 0..if a.gen_tokens > 0 { reps } else { 0 } {
        dec.reset();
        if a.depth > 0 {
            dec.feed(&params, &prompt[..a.depth]);
        }
        let t = Instant::now();
        let mut tok = 1 % v;
        for _ in 0..a.gen_tokens {
            let logits = dec.step(&params, tok);
            tok = (0..logits.len())
                .max_by(|&i, &j| logits[i].total_cmp(&logits[j]))
                .unwrap_or(0) as u32;
        }
        tg.push(a.gen_tokens as f64 / t.elapsed().as_secs_f64());
    }
    let (pp, tg) = (median(pp), median(tg));
    let threads = rayon::current_num_threads();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": what,
                "threads": threads,
                "prompt_tokens": a.prompt_tokens,
                "gen_tokens": a.gen_tokens,
                "depth": a.depth,
                "kv_cache": a.kv_cache.name(),
                "prefill": a.prefill,
                "reps": reps,
                "weights": weights,
                "load_s": load_s,
                "prefill_tokens_per_s": if pp.is_nan() { None } else { Some(pp) },
                "decode_tokens_per_s": if tg.is_nan() { None } else { Some(tg) },
                "peak_rss_mib": peak_rss_mib(),
            })
        );
    } else {
        println!(
            "{what}: {} parameters ({weights}), {} threads, loaded in {load_s:.2} s",
            params.len(),
            threads
        );
        if !pp.is_nan() {
            println!(
                "prefill ({}) pp{}: {pp:.1} tokens/s ({:.1} ms to the first token)",
                a.prefill,
                a.prompt_tokens,
                1e3 * a.prompt_tokens as f64 / pp
            );
        }
        if !tg.is_nan() {
            let at = if a.depth > 0 {
                format!(" @ d{}", a.depth)
            } else {
                String::new()
            };
            println!(
                "decode tg{}{at}: {tg:.1} tokens/s ({} KV cache)",
                a.gen_tokens,
                a.kv_cache.name()
            );
        }
    }
    Ok(())
}
