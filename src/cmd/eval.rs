//! `moelab eval`: a run's validation loss on a data dir, or its accuracy on held-out
//! reasoning problems (`--task`), passkey retrieval, or perplexity on a text file computed
//! as llama.cpp's `llama-perplexity` does.

use crate::runs::{load_reasoner, run_tokenizer_path, task_bar};
use anyhow::{bail, Context, Result};
use clap::Args;
use data::tasks::{self, Split};
use model::{Layout, Model};
use std::path::{Path, PathBuf};
use train::dataset::Dataset;
use train::eval::evaluate;
use train::load_run;

/// `--help` examples.
pub const EXAMPLES: &str = "Examples:\n  moelab eval --run runs/shk --data data/shk\n  moelab eval --run runs/student --task all --n 400\n  moelab eval --run runs/pk4k --task passkey --context 512,1024,2048,4096 --heatmap pk4k.svg\n  moelab eval --run runs/smollm2 --task perplexity --text valid.txt --context 512 --quant f32";

#[derive(Args)]
pub struct EvalArgs {
    /// Run dir or checkpoint dir.
    #[arg(long)]
    run: PathBuf,
    /// Data dir (its validation split is evaluated).
    #[arg(long, required_unless_present = "task", conflicts_with = "task")]
    data: Option<PathBuf>,
    /// Reasoning tasks (add, mul, expr, sort, comma-separated or all): exact-match accuracy
    /// of greedy answers on held-out problems. `passkey`: retrieval of a number hidden in
    /// filler text, by context length (--context) and depth (--depths). `perplexity`: of a
    /// text file (--text), as llama.cpp's llama-perplexity computes it.
    #[arg(long)]
    task: Option<String>,
    /// --task perplexity: the text file.
    #[arg(long)]
    text: Option<PathBuf>,
    /// --task perplexity and the reasoning tasks: matrices to multiply by: auto (an imported GGUF model's own
    /// quantized types, Q4_K/Q6_K included; else f32), f32, q8_0, q5_0, q4_1 or q4_0.
    #[arg(long, default_value = "auto")]
    quant: String,
    /// --task perplexity: element type of the KV cache: f32, or f16 / bf16 (half the memory; keys and values
    /// rounded when cached, attention computed in f32).
    #[arg(long = "kv-cache", default_value = "f32", value_parser = crate::runs::parse_kv)]
    kv_cache: model::decode::KvType,
    /// --data: at most N batches (default: the whole split). --task: N problems (default
    /// 400); passkey: N keys per (context, depth) cell (default 10).
    #[arg(long)]
    n: Option<u64>,
    /// --task passkey: context lengths in tokens, comma-separated (lengths past the model's
    /// max_seq_len are evaluated as they are). --task perplexity: the first is the chunk
    /// length.
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096")]
    context: Vec<usize>,
    /// --task passkey: needle depths in percent of the filler before it, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,10,20,30,40,50,60,70,80,90,100"
    )]
    depths: Vec<f64>,
    /// --task passkey: also draw the accuracy grid as an SVG heatmap to this file.
    #[arg(long)]
    heatmap: Option<PathBuf>,
    /// --heatmap: its title (default: the run's path).
    #[arg(long)]
    title: Option<String>,
    /// --task: which held-out split: `test` (report) or `dev` (tune). Every problem belongs
    /// to one split by a hash of its prompt; training data comes from `train`.
    #[arg(long, default_value = "test", value_parser = crate::runs::parse_split)]
    split: data::tasks::Split,
    /// --task: seed of the problems drawn from the split.
    #[arg(long, default_value_t = infer::tasks::EVAL_SEED)]
    seed: u64,
    /// --task: sequences decoded together (passkey: rows per forward pass, at most 65,536
    /// tokens).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// --task: one difficulty for every problem (add: digits, mul: 1-4, expr: depth, sort:
    /// length); default: each task's range.
    #[arg(long)]
    difficulty: Option<u32>,
    /// --task: print the first N answers with their reasoning.
    #[arg(long, default_value_t = 0)]
    show: usize,
}

pub fn run(a: EvalArgs) -> Result<()> {
    // the options of the decoding paths, refused where nothing would use them
    let perplexity = a.task.as_deref() == Some("perplexity");
    if !perplexity && a.kv_cache != model::decode::KvType::F32 {
        bail!("--kv-cache applies to --task perplexity (passkey and --data score with the training forward; the reasoning tasks decode with an f32 cache)");
    }
    if a.quant != "auto" && (a.task.is_none() || a.task.as_deref() == Some("passkey")) {
        bail!("--quant applies to --task perplexity and the reasoning tasks (passkey and --data score with the training forward, in f32)");
    }
    if a.task.as_deref() == Some("passkey") {
        return eval_passkey(&a);
    }
    if a.task.as_deref() == Some("perplexity") {
        return eval_perplexity(&a);
    }
    if let Some(t) = &a.task {
        let n = a.n.unwrap_or(400) as usize;
        if !(1..=1_000_000).contains(&n) {
            bail!("--n {n}: problems per task must be between 1 and 1000000");
        }
        return eval_task(
            &a.run,
            t,
            &a.quant,
            n,
            a.seed,
            a.difficulty,
            a.split,
            a.batch,
            a.show,
        );
    }
    let data = a.data.expect("clap requires --data without --task");
    let lr = load_run(&a.run)?;
    let (b, t) = (lr.cfg.train.batch_size, lr.cfg.train.seq_len);
    let ds = Dataset::open(&data, lr.cfg.model.vocab_size, t)?;
    // another dataset's tokenizer maps the same ids to other text: its loss and bits per
    // byte would be meaningless numbers (issue 11)
    let run_tok = run_tokenizer_path(&a.run, &lr.checkpoint)?;
    let run_json =
        std::fs::read(&run_tok).with_context(|| format!("cannot read {}", run_tok.display()))?;
    if data::sha256_hex(&run_json) != ds.tokenizer_sha256 {
        bail!(
            "{}: its tokenizer.json is not the one {} was trained with ({}); evaluate on data prepared with the run's tokenizer",
            data.display(),
            a.run.display(),
            run_tok.display()
        );
    }
    let mut m = Model::with_params(&lr.cfg.model, Layout::new(&lr.cfg.model), lr.params, b, t);
    let e = evaluate(&mut m, &ds.val, a.n.unwrap_or(0));
    let meta = ds.meta.as_ref().expect("a data dir has meta.json");
    println!(
        "checkpoint     {} (step {})",
        lr.checkpoint.display(),
        lr.state.step
    );
    println!(
        "val loss       {:.4} nats/token over {} tokens",
        e.loss, e.tokens
    );
    println!("perplexity     {:.2}", e.loss.exp());
    if meta.kind == "corpus" {
        let bytes_per_token = meta.val_bytes as f64 / meta.val_tokens as f64;
        let bpb = e.loss / std::f64::consts::LN_2 / bytes_per_token;
        println!("bits per byte  {bpb:.4}  ({bytes_per_token:.3} bytes/token)");
    }
    Ok(())
}

/// Perplexity of a text as llama.cpp's `llama-perplexity` computes it: the text's tokens in
/// chunks of `--context` (the last partial chunk dropped; a one-token start prefix, such as
/// moelab's <|end|> or an imported model's BOS, replaces each chunk's first token), every
/// chunk on an empty cache, and each token of a chunk's second half scored given all before
/// it in the chunk. Prints `PPL = x +/- e` (e from the variance of the token NLLs).
fn eval_perplexity(a: &EvalArgs) -> Result<()> {
    let path = a
        .text
        .as_ref()
        .context("--task perplexity needs --text FILE")?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--text {}: cannot read it as UTF-8 text", path.display()))?;
    let ctx = a.context[0];
    if ctx < 4 {
        bail!("--context {ctx}: too short a chunk");
    }
    let r = load_reasoner(&a.run, &a.quant)?;
    if ctx > r.cfg.max_seq_len {
        bail!(
            "--context {ctx} exceeds the model's context of {} tokens",
            r.cfg.max_seq_len
        );
    }
    let toks = r.tok.encode(&text);
    let mut chunks = toks.len() / ctx;
    if let Some(n) = a.n {
        chunks = chunks.min(n as usize);
    }
    if chunks == 0 {
        bail!(
            "--text {}: {} tokens, fewer than one chunk of {ctx}",
            path.display(),
            toks.len()
        );
    }
    let start = match r.chat.prefix() {
        [t] => Some(*t),
        _ => None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()?;
    let (bar, mut tick) = task_bar("perplexity", chunks);
    let t0 = std::time::Instant::now();
    let (nll, nll2, count) = pool.install(|| {
        let mut dec = model::decode::Decoder::new(&r.cfg);
        dec.set_quant(r.quant.clone());
        dec.set_kv_type(a.kv_cache);
        let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
        let first = ctx / 2;
        for c in 0..chunks {
            let orig = &toks[c * ctx..(c + 1) * ctx];
            let mut chunk = orig.to_vec();
            if let Some(s) = start {
                chunk[0] = s;
            }
            dec.reset();
            let logits = dec.logits_all(&r.params, &chunk);
            let v = r.cfg.vocab_size;
            for j in first..ctx - 1 {
                let row = &logits[j * v..(j + 1) * v];
                let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                let lp = row[orig[j + 1] as usize] as f64 - m - z.ln();
                nll -= lp;
                nll2 += lp * lp;
                count += 1;
            }
            tick(c + 1, (c + 1) * ctx);
        }
        (nll, nll2, count)
    });
    bar.finish_and_clear();
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let err = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    println!(
        "{}: {} ({}), {chunks} chunks of {ctx} tokens, {count} tokens scored ({:.1} s)",
        path.display(),
        a.run.display(),
        crate::runs::describe_quant(r.quant.as_deref()),
        t0.elapsed().as_secs_f64()
    );
    println!("PPL = {ppl:.4} +/- {err:.5}");
    Ok(())
}

/// `moelab eval --run RUN --task NAMES [--split dev|test] [--quant ...]`.
#[allow(clippy::too_many_arguments)]
fn eval_task(
    run: &Path,
    task_spec: &str,
    quant: &str,
    n: usize,
    seed: u64,
    difficulty: Option<u32>,
    split: Split,
    slots: usize,
    show: usize,
) -> Result<()> {
    let task_list = tasks::parse_list(task_spec).map_err(anyhow::Error::msg)?;
    if split == Split::Train {
        bail!("--split train is training data; evaluate on dev (tuning) or test (reporting)");
    }
    if n == 0 {
        bail!("--n must be at least 1");
    }
    let r = load_reasoner(run, quant)?;
    let (bar, mut tick) = task_bar("eval", n);
    let e =
        infer::tasks::evaluate_tasks(&r, &task_list, n, seed, difficulty, split, slots, &mut tick);
    bar.finish_and_clear();
    println!(
        "{} (step {}), {n} problems of the {} split (seed {seed}), greedy",
        r.checkpoint.display(),
        r.step,
        split.name()
    );
    println!("active matmul params per token: {}\n", r.active_params());
    for a in e.attempts.iter().take(show) {
        let mark = if a.verified { "correct" } else { "wrong" };
        // a format without reasoning markers (an imported model's) has no think block
        if r.chat.think_ids().is_some() {
            println!(
                "[{mark}] {}\n<think>\n{}\n</think>\n{}\n",
                a.prompt, a.reasoning, a.answer
            );
        } else {
            println!("[{mark}] {}\n{}\n", a.prompt, a.answer);
        }
    }
    print!("{}", e.score.table());
    println!(
        "\ndecode: {:.0} tokens/s ({slots} sequences per batch)",
        e.tokens_per_s
    );
    Ok(())
}

/// `moelab eval --run RUN --task passkey [--context ...] [--depths ...] [--heatmap F.svg]`.
fn eval_passkey(a: &EvalArgs) -> Result<()> {
    if a.split == Split::Train {
        bail!("--split train is training data; evaluate on dev (tuning) or test (reporting)");
    }
    let n = a.n.unwrap_or(10) as usize;
    if n == 0 || a.context.is_empty() || a.depths.is_empty() {
        bail!("--n, --context and --depths need at least one value each");
    }
    if a.context.contains(&0) {
        bail!("--context: every length must be at least 1 token");
    }
    if let Some(d) = a.depths.iter().find(|d| !(0.0..=100.0).contains(*d)) {
        bail!("--depths {d}: depths are percentages, 0 to 100");
    }
    if let Some(p) = &a.heatmap {
        if p.extension().and_then(|e| e.to_str()) != Some("svg") {
            bail!("--heatmap {}: expected a .svg file", p.display());
        }
    }
    let r = load_reasoner(&a.run, "auto")?;
    let end = r.tok.special("<|end|>").unwrap_or(0);
    let longest = *a.context.iter().max().expect("non-empty");
    let spec = infer::passkey::Spec {
        contexts: a.context.clone(),
        depths: a.depths.iter().map(|d| d / 100.0).collect(),
        n,
        seed: a.seed,
        split: a.split,
        batch: a.batch.min((65_536 / longest).max(1)),
    };
    let rows = n * spec.contexts.len() * spec.depths.len();
    let (bar, mut tick) = task_bar("passkey", rows);
    let g = infer::passkey::evaluate(&r.cfg, &r.params, &r.tok, end, &spec, &mut tick)
        .map_err(anyhow::Error::msg);
    bar.finish_and_clear();
    let g = g?;
    println!(
        "{} (step {}), passkey retrieval: {n} keys of the {} split per cell (seed {}), greedy",
        r.checkpoint.display(),
        r.step,
        a.split.name(),
        a.seed
    );
    let trained = r.cfg.max_seq_len;
    let scaling = match &r.cfg.rope_scaling {
        Some(s) => format!(", RoPE scaling {s:?}"),
        None => String::new(),
    };
    println!("model max_seq_len {trained}{scaling}\n");
    print!("{}", g.table());
    println!("\nforward: {:.0} tokens/s", g.tokens_per_s);
    if let Some(p) = &a.heatmap {
        let title = a
            .title
            .clone()
            .unwrap_or_else(|| format!("passkey retrieval: {}", a.run.display()));
        let svg = heatmap(&g, &title)?;
        data::write_atomic(p, svg.as_bytes())?;
        println!("heatmap: {}", p.display());
    }
    Ok(())
}

/// The needle-in-a-haystack heatmap: context length across, depth down, each cell coloured
/// from red (0%) through yellow to green (100%) and labelled with its accuracy.
fn heatmap(g: &infer::passkey::Grid, title: &str) -> Result<String> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let (nc, nd) = (g.contexts.len(), g.depths.len());
    let (cw, ch) = (90i32, 30i32);
    let (left, top) = (80i32, 50i32);
    let w = (left + cw * nc as i32 + 20) as u32;
    let h = (top + ch * nd as i32 + 60) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let font = ("sans-serif", 14).into_font();
        let text = |s: &str, x: i32, y: i32, pos: Pos| {
            Text::new(s.to_string(), (x, y), font.clone().color(&BLACK).pos(pos))
        };
        let centre = Pos::new(HPos::Center, VPos::Center);
        root.draw(&Text::new(
            title.to_string(),
            (w as i32 / 2, 18),
            ("sans-serif", 16).into_font().color(&BLACK).pos(centre),
        ))?;
        for d in 0..nd {
            let y = top + ch * d as i32;
            let label = format!("{:.0}%", g.depths[d] * 100.0);
            root.draw(&text(
                &label,
                left - 8,
                y + ch / 2,
                Pos::new(HPos::Right, VPos::Center),
            ))?;
            for c in 0..nc {
                let x = left + cw * c as i32;
                let cell = g.cell(d, c);
                let acc = cell.correct as f64 / cell.n as f64;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cw, y + ch)],
                    ramp(acc).filled(),
                ))?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cw, y + ch)],
                    WHITE.stroke_width(1),
                ))?;
                root.draw(&text(
                    &format!("{:.0}", acc * 100.0),
                    x + cw / 2,
                    y + ch / 2,
                    centre,
                ))?;
            }
        }
        let bottom = top + ch * nd as i32;
        for (c, ctx) in g.contexts.iter().enumerate() {
            let x = left + cw * c as i32 + cw / 2;
            root.draw(&text(&ctx.to_string(), x, bottom + 14, centre))?;
        }
        root.draw(&text(
            "context length (tokens)",
            left + cw * nc as i32 / 2,
            bottom + 40,
            centre,
        ))?;
        root.draw(&text(
            "depth",
            8,
            top - 14,
            Pos::new(HPos::Left, VPos::Center),
        ))?;
        root.present()?;
    }
    Ok(svg)
}

/// Red at 0, yellow at 0.5, green at 1.
fn ramp(x: f64) -> plotters::style::RGBColor {
    let x = x.clamp(0.0, 1.0);
    let (r, g) = if x < 0.5 {
        (230.0, 80.0 + 2.0 * x * 140.0)
    } else {
        (
            230.0 - (x - 0.5) * 2.0 * 170.0,
            220.0 - (x - 0.5) * 2.0 * 40.0,
        )
    };
    plotters::style::RGBColor(r as u8, g as u8, 90)
}
