//! Issue 13 end to end through the CLI: an imported model is fine-tuned with
//! `train --init` (and replayed by `verify`), a dense model is upcycled to a
//! Mixture-of-Experts that computes what it computed, and the real SmolLM2 GGUF fine-tunes.

mod common;

use common::{moelab, s, text, tmpdir};
use model::decode::Decoder;
use std::path::{Path, PathBuf};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/import")
        .join(name)
}

fn ok(args: &[&str]) -> String {
    let o = moelab(args);
    assert!(o.status.success(), "moelab {args:?} failed:\n{}", text(&o));
    text(&o)
}

fn err(args: &[&str]) -> String {
    let o = moelab(args);
    assert!(
        !o.status.success(),
        "moelab {args:?} should fail:\n{}",
        text(&o)
    );
    text(&o)
}

/// A small corpus of words the tiny tokenizers know.
fn corpus(d: &Path) -> PathBuf {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "experts",
    ];
    let mut t = String::new();
    for i in 0..600 {
        for j in 0..10 {
            t += words[(i * 7 + j * 3 + i / 5) % words.len()];
            t += " ";
        }
        t += "\n";
    }
    let p = d.join("corpus.txt");
    std::fs::write(&p, t).unwrap();
    p
}

/// Logits after feeding `prompt` to the run at `run`.
fn logits(run: &Path, prompt: &[u32]) -> Vec<f32> {
    let lr = train::load_run(run).unwrap();
    let mut d = Decoder::new(&lr.cfg.model);
    let mut out = vec![];
    for &t in prompt {
        out = d.step(&lr.params, t).to_vec();
    }
    out
}

/// The tiny ChatML Llama imported into `d/llama` with a context of 160 tokens.
fn import_llama(d: &Path) -> PathBuf {
    let run = d.join("llama");
    ok(&[
        "import",
        s(&golden("llama")),
        "--out",
        s(&run),
        "--context",
        "160",
    ]);
    run
}

/// The run's config.toml with a small [train] section (one short row per step).
fn small_config(run: &Path, to: &Path, steps: u64) -> PathBuf {
    let c = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let c = c
        .replace("batch_size = 16", "batch_size = 2")
        .replace("seq_len = 64", "seq_len = 32")
        .replace("seq_len = 128", "seq_len = 32")
        .replace("steps = 1000", &format!("steps = {steps}"))
        .replace("warmup_steps = 100", "warmup_steps = 1")
        .replace("eval_batches = 20", "eval_batches = 1");
    std::fs::write(to, c).unwrap();
    to.to_path_buf()
}

#[test]
fn an_imported_model_fine_tunes_with_init_and_verify_replays_it() {
    let d = tmpdir("open-weights", "init");
    let run = d.join("llama");
    ok(&["import", s(&golden("llama")), "--out", s(&run)]);
    let data = d.join("data");
    let out = ok(&[
        "prepare",
        "--corpus",
        s(&corpus(&d)),
        "--tokenizer",
        s(&run),
        "--out",
        s(&data),
    ]);
    assert!(out.contains("vocab 320"), "{out}");
    let ft = d.join("ft");
    ok(&[
        "train",
        "--init",
        s(&run),
        "--data",
        s(&data),
        "--out",
        s(&ft),
        "--steps",
        "3",
    ]);
    // the imported model's chat format goes with it; the manifest names the start
    assert_eq!(
        std::fs::read(run.join("chat.json")).unwrap(),
        std::fs::read(ft.join("chat.json")).unwrap()
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ft.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["init"]["weights_hash"], common::hash(&run).as_str());
    let v = ok(&["verify", s(&ft)]);
    assert!(
        v.contains("verified: 3 steps reproduce the run bit for bit"),
        "{v}"
    );
    assert!(v.contains("starting from"), "{v}");

    // data encoded by another tokenizer, a config of another shape: refused by name
    let other = d.join("other-data");
    ok(&[
        "prepare",
        "--corpus",
        s(&corpus(&d)),
        "--vocab-size",
        "300",
        "--out",
        s(&other),
    ]);
    let e = err(&[
        "train",
        "--init",
        s(&run),
        "--data",
        s(&other),
        "--out",
        s(&d.join("x")),
    ]);
    assert!(e.contains("another tokenizer"), "{e}");
    let e = err(&[
        "train",
        "--init",
        s(&run),
        "--data",
        s(&data),
        "--config",
        "tiny",
        "--out",
        s(&d.join("y")),
    ]);
    assert!(
        e.contains("another shape") && e.contains("embed.weight"),
        "{e}"
    );
    assert!(!d.join("x").exists() && !d.join("y").exists());
}

#[test]
fn an_imported_model_evaluates_tasks_and_writes_traces_in_its_own_template() {
    let d = tmpdir("open-weights", "tasks");
    let run = import_llama(&d);
    // eval --task poses the problems through the model's ChatML template (the tiny random
    // model answers nothing right, but every problem is posed and scored)
    let out = ok(&[
        "eval",
        "--run",
        s(&run),
        "--task",
        "add",
        "--n",
        "6",
        "--split",
        "dev",
    ]);
    let all = out
        .lines()
        .find(|l| l.starts_with("all "))
        .unwrap_or_else(|| panic!("no total row:\n{out}"));
    assert!(all.split_whitespace().any(|w| w == "6"), "n = 6: {all}");
    // distill generate: the imported model as a teacher writes (unverified) traces
    let traces = d.join("traces.jsonl");
    ok(&[
        "distill",
        "generate",
        "--teacher",
        s(&run),
        "--task",
        "add",
        "--n",
        "3",
        "--k",
        "2",
        "--temperature",
        "1.0",
        "--out",
        s(&traces),
    ]);
    let lines = std::fs::read_to_string(&traces).unwrap();
    assert_eq!(lines.lines().count(), 6, "{lines}");
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["prompt"].as_str().unwrap().starts_with("What is"), "{l}");
        assert_eq!(v["verified"], false, "{l}");
    }
}

#[test]
fn an_imported_student_learns_answers_in_its_own_template() {
    let d = tmpdir("open-weights", "distill");
    let run = import_llama(&d);
    // answer-only examples outside the task suite (kept whatever their split)
    let colors = ["red", "blue", "green", "gold"];
    let line = |i: usize, reasoning: &str| {
        serde_json::json!({
            "prompt": format!("Name color {i}."),
            "reasoning": reasoning,
            "answer": colors[i % 4],
            "verified": true,
            "teacher": s(&run),
        })
        .to_string()
    };
    let traces = d.join("traces.jsonl");
    let all: Vec<String> = (0..48).map(|i| line(i, "")).collect();
    std::fs::write(&traces, all.join("\n") + "\n").unwrap();
    let cfg = small_config(&run, &d.join("student.toml"), 3);
    let c = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, c.replace("seq_len = 32", "seq_len = 96")).unwrap();
    let student = d.join("student");
    let args = |traces: &Path, out: &Path| {
        vec![
            "distill".to_string(),
            "train".into(),
            "--config".into(),
            s(&cfg).into(),
            "--init".into(),
            s(&run).into(),
            "--traces".into(),
            s(traces).into(),
            "--out".into(),
            s(out).into(),
        ]
    };
    let a = args(&traces, &student);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // the student keeps the imported chat format, and its weights moved
    assert_eq!(
        std::fs::read(run.join("chat.json")).unwrap(),
        std::fs::read(student.join("chat.json")).unwrap()
    );
    assert_ne!(common::hash(&run), common::hash(&student));
    // reasoning traces need reasoning markers, which this template lacks
    let with_reasoning = d.join("reasoning.jsonl");
    let all: Vec<String> = (0..48).map(|i| line(i, "it is a color")).collect();
    std::fs::write(&with_reasoning, all.join("\n") + "\n").unwrap();
    let a = args(&with_reasoning, &d.join("student2"));
    let e = err(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("no reasoning markers"), "{e}");
    assert!(!d.join("student2").exists(), "nothing written");
}

#[test]
fn an_upcycled_model_computes_what_the_dense_one_did_then_trains() {
    let d = tmpdir("open-weights", "upcycle");
    let dense = d.join("dense");
    ok(&["import", s(&golden("llama")), "--out", s(&dense)]);
    let prompt = [1u32, 85, 91, 85, 268, 79, 201, 59, 81, 87];
    let want = logits(&dense, &prompt);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (name, shared) in [("moe", "0"), ("moe-shared", "1")] {
        let moe = d.join(name);
        let out = ok(&[
            "upcycle",
            s(&dense),
            "--experts",
            "4",
            "--top-k",
            "2",
            "--shared",
            shared,
            "--out",
            s(&moe),
        ]);
        assert!(out.contains("4 experts (top 2"), "{out}");
        let cfg = std::fs::read_to_string(moe.join("config.toml")).unwrap();
        assert!(
            cfg.contains("n_experts = 4") && cfg.contains("top_k = 2"),
            "{cfg}"
        );
        let got = logits(&moe, &prompt);
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "{name}: step-0 logits differ by {diff} (scale {scale})"
        );
    }
    // and it trains like any run
    let data = d.join("data");
    ok(&[
        "prepare",
        "--corpus",
        s(&corpus(&d)),
        "--tokenizer",
        s(&dense),
        "--out",
        s(&data),
    ]);
    let moe = d.join("moe");
    let cfg = small_config(&moe, &d.join("moe.toml"), 4);
    let ft = d.join("moe-ft");
    ok(&[
        "train",
        "--init",
        s(&moe),
        "--config",
        s(&cfg),
        "--data",
        s(&data),
        "--out",
        s(&ft),
    ]);
    assert_ne!(common::hash(&ft), common::hash(&moe));
    // and exports: an upcycled Llama is a Mixtral, with the imported chat template
    let hf = d.join("moe-ft-hf");
    let out = ok(&[
        "export",
        s(&ft),
        "--format",
        "hf",
        "--dtype",
        "bf16",
        "--out",
        s(&hf),
    ]);
    assert!(out.contains("a mixtral model"), "{out}");
    let tc = std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap();
    assert!(tc.contains("<|im_start|>"), "{tc}");
    // and to GGUF, which imports back to the same weights
    let g = d.join("moe-ft.gguf");
    let out = ok(&["export", s(&ft), "--format", "gguf", "--out", s(&g)]);
    assert!(out.contains("llama-architecture GGUF"), "{out}");
    let back = d.join("moe-ft-back");
    ok(&["import", s(&g), "--out", s(&back)]);
    assert_eq!(common::hash(&back), common::hash(&ft));
    let e = err(&[
        "export",
        s(&ft),
        "--format",
        "gguf",
        "--dtype",
        "bf16",
        "--out",
        s(&d.join("g2")),
    ]);
    assert!(e.contains("f32 or f16"), "{e}");
    // refusals: an MoE model is not upcycled again; top-k above the experts
    let e = err(&[
        "upcycle",
        s(&moe),
        "--experts",
        "4",
        "--top-k",
        "2",
        "--out",
        s(&d.join("z")),
    ]);
    assert!(e.contains("already a Mixture-of-Experts"), "{e}");
    let e = err(&[
        "upcycle",
        s(&dense),
        "--experts",
        "2",
        "--top-k",
        "3",
        "--out",
        s(&d.join("z")),
    ]);
    assert!(e.contains("top-k"), "{e}");
    assert!(!d.join("z").exists());
}

#[test]
fn smollm2_from_its_gguf_fine_tunes_a_few_steps() {
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "{} is missing: run scripts/fetch-smollm2.sh (scripts/test.sh does)",
        gguf.display()
    );
    let d = tmpdir("open-weights", "smollm2");
    let run = d.join("smol");
    ok(&["import", s(&gguf), "--out", s(&run), "--context", "256"]);
    let data = d.join("data");
    ok(&[
        "prepare",
        "--corpus",
        s(&corpus(&d)),
        "--tokenizer",
        s(&run),
        "--out",
        s(&data),
    ]);
    let cfg = small_config(&run, &d.join("smol.toml"), 2);
    let ft = d.join("ft");
    let out = ok(&[
        "train",
        "--init",
        s(&run),
        "--config",
        s(&cfg),
        "--data",
        s(&data),
        "--out",
        s(&ft),
    ]);
    assert!(out.contains("done"), "{out}");
    let metrics = std::fs::read_to_string(ft.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    // a trained model starts far below a random one's ln(49152) = 10.8 on plain English
    let loss = first["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss < 8.0, "step 1 loss {loss}");
    assert!(ft.join("chat.json").exists());
}

/// A copy of `bytes` with the ggml type of tensor `name` (its header entry) set to `ty`, or
/// its name replaced by `rename` (same length).
fn patch_gguf(bytes: &[u8], name: &str, ty: Option<u32>, rename: Option<&str>) -> Vec<u8> {
    patch_gguf_dims(bytes, name, ty, rename, None)
}

/// [`patch_gguf`], also setting the tensor's dims to `dims` (as many as it has).
fn patch_gguf_dims(
    bytes: &[u8],
    name: &str,
    ty: Option<u32>,
    rename: Option<&str>,
    dims: Option<&[u64]>,
) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend(name.as_bytes());
    let at = b
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .expect("tensor entry");
    let end = at + key.len();
    if let Some(r) = rename {
        assert_eq!(r.len(), name.len());
        b[at + 8..end].copy_from_slice(r.as_bytes());
    }
    let nd = u32::from_le_bytes(b[end..end + 4].try_into().unwrap()) as usize;
    if let Some(t) = ty {
        let p = end + 4 + 8 * nd;
        b[p..p + 4].copy_from_slice(&t.to_le_bytes());
    }
    if let Some(d) = dims {
        assert_eq!(d.len(), nd);
        for (i, v) in d.iter().enumerate() {
            let p = end + 4 + 8 * i;
            b[p..p + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    b
}

#[test]
fn bad_gguf_files_are_refused_in_one_line_and_nothing_is_written() {
    let d = tmpdir("open-weights", "bad-gguf");
    let good = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/export-gguf/dense.gguf"),
    )
    .unwrap();
    let cases: [(&str, Vec<u8>, &str); 7] = [
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        // corrupt dimensions (these panicked: a division by zero undoing the q rows' RoPE
        // order, K-quant rows of no whole block)
        (
            "zero-dim",
            patch_gguf_dims(&good, "blk.0.attn_q.weight", None, None, Some(&[32, 0])),
            "zero dimension",
        ),
        (
            "short-q",
            patch_gguf_dims(&good, "blk.0.attn_q.weight", None, None, Some(&[16, 1])),
            "q_proj",
        ),
        (
            "k-quant-rows",
            patch_gguf(&good, "blk.0.ffn_gate.weight", Some(12), None),
            "not whole 256-element",
        ),
        ("header-only", good[..40].to_vec(), "truncated"),
        (
            "unknown-type",
            patch_gguf(&good, "blk.0.attn_q.weight", Some(99), None),
            "blk.0.attn_q.weight",
        ),
        (
            "llama3-rope",
            patch_gguf(&good, "token_embd.weight", None, Some("rope_freqs.weight")),
            "rope_freqs.weight",
        ),
    ];
    for (name, bytes, want) in cases {
        let f = d.join(format!("{name}.gguf"));
        std::fs::write(&f, bytes).unwrap();
        let out = d.join(name);
        let e = err(&["import", s(&f), "--out", s(&out)]);
        let errs: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errs.len(), 1, "{name}: one error line: {e}");
        assert!(errs[0].contains(want), "{name}: {e}");
        assert!(!out.exists(), "{name}: nothing written");
    }
}

/// Issue 14 through the CLI: a GGUF model runs on its own quantized weights by default
/// (`import` records them), `bench decode` times prefill and decode on the file, `sample`
/// answers with them, and `eval --task perplexity` scores a text quantized and in f32.
#[test]
fn smollm2_runs_on_its_quantized_weights() {
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "{} is missing: run scripts/fetch-smollm2.sh",
        gguf.display()
    );
    let d = tmpdir("open-weights", "smollm2-quant");
    let run = d.join("smol");
    ok(&["import", s(&gguf), "--out", s(&run), "--context", "256"]);
    let import: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("import.json")).unwrap()).unwrap();
    assert_eq!(import["quant"]["layers.0.attn.wqkv.weight"], "q4_1");
    assert_eq!(import["quant"]["lm_head.weight"], "q8_0");
    let j = ok(&[
        "bench",
        "decode",
        "--run",
        s(&gguf),
        "--prompt-tokens",
        "64",
        "--gen-tokens",
        "8",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(j.lines().last().unwrap()).unwrap();
    assert!(j["weights"].as_str().unwrap().contains("q4_1 x 120"), "{j}");
    assert!(j["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(j["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    let out = ok(&[
        "sample",
        "--run",
        s(&run),
        "--prompt",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "3",
    ]);
    assert!(out.contains("Paris"), "{out}");
    let text = d.join("text.txt");
    std::fs::write(
        &text,
        "The cat sat on the mat and looked at the door. The dog came in from the garden, \
         shook the rain from its coat and lay down by the fire. Outside, the wind went on \
         blowing through the trees, and the children watched the clouds roll over the hills \
         until their mother called them in for supper. "
            .repeat(4),
    )
    .unwrap();
    let ppl = |quant: &str| -> f64 {
        let out = ok(&[
            "eval",
            "--run",
            s(&run),
            "--task",
            "perplexity",
            "--text",
            s(&text),
            "--context",
            "128",
            "--quant",
            quant,
        ]);
        let line = out.lines().find(|l| l.starts_with("PPL = ")).expect(&out);
        line[6..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (q, f) = (ppl("auto"), ppl("f32"));
    // repeated text: low perplexity, and the 4-bit weights within 10% of their f32 forward
    assert!(q < 20.0 && f < 20.0, "quantized {q}, f32 {f}");
    assert!((q / f - 1.0).abs() < 0.1, "quantized {q} vs f32 {f}");
    // every matrix quantized in memory to Q5_0 (a kernel of its own; its accuracy is the
    // kernel tests' and the tiny model's logits test's), the head included: 1.96 here.
    // (Exported with `--quant q5_0`, embedding included, llama.cpp's llama-perplexity gives
    // 1.92 on this text and moelab 1.91: 5-bit blocks of this Q4_1 model's weights cost
    // more than the Q8_0 head the file keeps.)
    let q5 = ppl("q5_0");
    assert!(q5 < 2.5, "q5_0 {q5} vs f32 {f}");
    let e = err(&["sample", "--run", s(&run), "--quant", "q5_k"]);
    assert!(
        e.contains("--quant q5_k: expected auto, f32, q8_0, q5_0, q4_1 or q4_0"),
        "{e}"
    );
}

/// K-quants through the CLI: a GGUF file whose matrices are Q4_K and Q6_K imports with their
/// bytes kept beside the run (`quant.safetensors`), and `bench decode` and `sample` run on
/// them by default; `--quant q4_k` on a run is refused (moelab cannot make K-quants).
#[test]
fn a_k_quant_gguf_runs_on_its_own_blocks() {
    use interop::gguf::write;
    use rand::{Rng, SeedableRng};
    let d = tmpdir("open-weights", "k-quant");
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(20);
    let tok = tokenizer::Tokenizer::train_with([text.as_str()].into_iter(), 300, true).unwrap();
    let cfg = model::Config::from_toml(&format!(
        "[model]\nvocab_size = {}\nd_model = 256\nn_layers = 1\nn_heads = 4\nn_kv_heads = 2\nmax_seq_len = 64\nffn_hidden = 256\nn_experts = 0\ntie_embeddings = false\ninit_std = 0.02\n[train]\nseq_len = 32\n",
        tok.vocab_size()
    ))
    .unwrap()
    .model;
    let params = model::Model::new(&cfg, 1, 1, 5).params;
    let f = d.join("k.gguf");
    let (meta, mut ts) =
        write::export_parts(&cfg, &params, &tok, None, interop::gguf::quant::F32, &f).unwrap();
    // Q4_K / Q6_K blocks of random bytes with small scales (f16 2^-12 and 2^-16)
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for t in ts.iter_mut() {
        let q6 = t.name.ends_with("ffn_down.weight") || t.name == "output.weight";
        if !(q6
            || [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
            ]
            .iter()
            .any(|p| t.name.ends_with(&format!("{p}.weight"))))
        {
            continue;
        }
        let n = t.dims.iter().product::<u64>() as usize / 256;
        let (ty, bb, at): (u32, usize, &[usize]) = if q6 {
            (14, 210, &[208])
        } else {
            (12, 144, &[0, 2])
        };
        let mut b: Vec<u8> = (0..n * bb).map(|_| rng.gen()).collect();
        for blk in b.chunks_exact_mut(bb) {
            for &a in at {
                let h: u16 = if q6 { 0x0400 } else { 0x0c00 };
                blk[a..a + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        t.ggml_type = ty;
        t.data = b;
    }
    std::fs::write(&f, write::encode(&meta, &ts)).unwrap();
    let run = d.join("run");
    ok(&["import", s(&f), "--out", s(&run)]);
    assert!(run.join("quant.safetensors").exists());
    let out = ok(&[
        "bench",
        "decode",
        "--run",
        s(&run),
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
    ]);
    // q/k/v (fused) and gate/up (fused) Q4_K, wo Q4_K, down and the head Q6_K
    assert!(
        out.contains("q6_k x 2 + q4_k x 3") || out.contains("q4_k x 3 + q6_k x 2"),
        "{out}"
    );
    let out = ok(&[
        "sample",
        "--run",
        s(&run),
        "--prompt",
        "the quick",
        "--max-tokens",
        "4",
    ]);
    assert!(!out.trim().is_empty());
    let e = err(&[
        "sample",
        "--run",
        s(&run),
        "--prompt",
        "the",
        "--quant",
        "q4_k",
    ]);
    assert!(e.contains("--quant auto"), "{e}");
}
