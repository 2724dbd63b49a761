//! `moelab export --format gguf`, checked against llama.cpp: a dense model with tied
//! embeddings (llama), a Mixtral-style MoE (8 routed experts, top-2: llama), small-moe's
//! kind of block (2 shared experts beside the routed ones: bailingmoe), a Qwen2-MoE block
//! (gated shared expert, q/k/v biases, weights not renormalised: qwen2moe) and a Qwen3-MoE
//! one (per-head q/k norm, head_dim 16 of d_model 32 with 4 heads: qwen3moe), and dense
//! llamas with linear, YaRN (an attention factor set) and Llama 3 RoPE scaling (metadata, and
//! a rope_freqs tensor), each with a
//! moelab tokenizer. The exported files are committed (tests/golden/export-gguf, MOELAB_BLESS=1
//! rewrites them) with llama.cpp's greedy continuation of a prompt (<name>.json, by
//! reference/make_gguf_export.py with llama-cpp-python 0.3.36 and an f32 KV cache; its
//! default f16 cache moves these tiny models' logits by ~2e-4 and flips a near tie in the
//! MoE's 8th token): the test re-exports and
//! requires the same bytes, so llama.cpp's tokens hold for today's exporter, then requires
//! moelab's greedy tokens to be llama.cpp's. Every export also imports back unchanged.

mod common;

use common::{config, greedy, ids, logprobs, read_json, tokenizer};
use model::config::RopeScaling;
use std::path::PathBuf;
use tokenizer::Tokenizer;

fn golden(name: &str) -> PathBuf {
    common::golden("export-gguf", name)
}

/// The tiny model of each fixture and the architecture llama.cpp runs it as.
fn fixture(name: &str, vocab: usize) -> (model::ModelConfig, &'static str) {
    match name {
        "dense" => (config(false, 0, vocab), "llama"),
        "moe-routed" => (config(true, 0, vocab), "llama"),
        "moe-shared" => (config(true, 2, vocab), "bailingmoe"),
        "qwen2moe" => {
            let mut c = config(true, 1, vocab);
            c.shared_expert_gate = true;
            c.shared_expert_hidden = Some(24);
            c.renormalize = false;
            c.qkv_bias = true;
            (c, "qwen2moe")
        }
        "qwen3moe" => {
            let mut c = config(true, 0, vocab);
            c.qk_norm = model::config::QkNorm::Head;
            c.head_dim = Some(16);
            (c, "qwen3moe")
        }
        // RoPE scaling (issue 15): positions past the scaled wavelengths of these tiny heads
        "llama-linear" => {
            let mut c = config(false, 0, vocab);
            c.rope_scaling = Some(RopeScaling::Linear { factor: 4.0 });
            (c, "llama")
        }
        "llama-yarn" => {
            let mut c = config(false, 0, vocab);
            c.head_dim = Some(16);
            c.rope_scaling = Some(RopeScaling::Yarn {
                factor: 4.0,
                original_max_seq_len: 16,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: Some(1.25),
                truncate: true,
            });
            (c, "llama")
        }
        "llama3" => {
            let mut c = config(false, 0, vocab);
            c.head_dim = Some(16);
            c.rope_scaling = Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_seq_len: 64,
            });
            (c, "llama")
        }
        _ => unreachable!(),
    }
}

const FIXTURES: [&str; 8] = [
    "dense",
    "moe-routed",
    "moe-shared",
    "qwen2moe",
    "qwen3moe",
    "llama-linear",
    "llama-yarn",
    "llama3",
];

#[test]
fn moelab_models_export_to_gguf_that_llama_cpp_runs_the_same() {
    for name in FIXTURES {
        // the dense model's tokenizer has plain GPT-2 pre-tokenization (moelab prepare's
        // default), the others split digits (SmolLM's)
        let tok = if name == "dense" {
            common::plain_tokenizer()
        } else {
            tokenizer()
        };
        let (cfg, arch) = fixture(name, tok.vocab_size());
        cfg.validate().unwrap();
        let mut params = model::Model::new(&cfg, 1, 1, 7).params;
        // norms, biases and gates start at constants: random ones test their mapping
        let layout = model::Layout::new(&cfg);
        let mut r = 1u64;
        for t in layout
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 1 || t.shape[0] == 1)
        {
            for x in &mut params[t.offset..t.offset + t.len] {
                r = r
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *x += ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4;
            }
        }
        let file = golden(&format!("{name}.gguf"));
        let bytes = interop::gguf::write::export(
            &cfg,
            &params,
            &tok,
            None,
            interop::gguf::quant::F32,
            &file,
        )
        .unwrap();
        if std::env::var_os("MOELAB_BLESS").is_some() {
            std::fs::write(&file, &bytes).unwrap();
            continue; // then reference/make_gguf_export.py writes the expected tokens
        }
        assert!(
            bytes == std::fs::read(&file).unwrap(),
            "{name}: the export differs from {}: if intended, re-bless (MOELAB_BLESS=1) and re-run reference/make_gguf_export.py",
            file.display()
        );
        let f = interop::gguf::file::GgufFile::open(&file).unwrap();
        assert_eq!(
            f.get("general.architecture").and_then(|v| v.as_str()),
            Some(arch),
            "{name}"
        );
        // the import reads back the same model, weights and tokenizer (a tied output
        // matrix that the architecture requires comes back untied, same values)
        let back = interop::gguf::import_file(&file, None).unwrap();
        let mut want = cfg.clone();
        if back.config.tie_embeddings != cfg.tie_embeddings {
            want.tie_embeddings = false;
        }
        // training-only settings are not in a GGUF file
        let b = &back.config;
        want.max_seq_len = b.max_seq_len;
        want.balance = b.balance;
        want.aux_loss_coef = b.aux_loss_coef;
        want.z_loss_coef = b.z_loss_coef;
        want.bias_update_rate = b.bias_update_rate;
        want.init_std = b.init_std;
        want.dropout = b.dropout;
        if cfg.n_experts > 0 {
            want.ffn_hidden = b.ffn_hidden; // unused: every block is MoE
        }
        // YaRN's attention factor and Llama 3's low/high factors come back through f32
        // arithmetic (llama.cpp's attn_factor, fitted divisors): the same frequencies and
        // scale to 1e-6
        if let (Some(a), Some(z)) = (&cfg.rope_scaling, &b.rope_scaling) {
            let d = cfg.head_dim();
            let (fa, sa) = RopeScaling::inv_freq(Some(a), d, cfg.rope_theta);
            let (fz, sz) = RopeScaling::inv_freq(Some(z), d, cfg.rope_theta);
            assert!(
                (sa - sz).abs() < 1e-6,
                "{name}: attention factor {sa} -> {sz}"
            );
            for (x, y) in fa.iter().zip(&fz) {
                assert!((x / y - 1.0).abs() < 1e-6, "{name}: {a:?} -> {z:?}");
            }
            want.rope_scaling = b.rope_scaling.clone();
        }
        assert_eq!(
            back.config, want,
            "{name}: config changed in the round trip"
        );
        let bl = model::Layout::new(&back.config);
        for t in &layout.tensors {
            assert!(
                bl.slice(&back.params, &t.name) == layout.slice(&params, &t.name),
                "{name}: {} changed in the round trip",
                t.name
            );
        }
        let t2 = Tokenizer::from_bytes(&file, &back.tokenizer_json).unwrap();
        for text in [
            "What is 12 + 34?",
            "  the lazy\tdog\n\nhéllo ✓",
            "<|user|>hi",
        ] {
            assert_eq!(t2.encode(text), tok.encode(text), "{name}: {text:?}");
        }
        // llama.cpp's greedy continuation is moelab's
        let exp = read_json(&golden(&format!("{name}.json")));
        let prompt = ids(&exp["prompt_ids"]);
        assert_eq!(
            tok.encode(exp["prompt"].as_str().unwrap()),
            prompt,
            "{name}: llama.cpp's ids"
        );
        // and its next-token distribution after the prompt
        let want_lp: Vec<f64> = exp["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let got_lp = logprobs(&cfg, &params, &prompt);
        assert_eq!(got_lp.len(), want_lp.len());
        let worst = got_lp
            .iter()
            .zip(&want_lp)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(
            worst < 1e-4,
            "{name}: log-probabilities differ from llama.cpp's by {worst}"
        );
        if cfg.rope_scaling.is_some() {
            // the scaling matters: without it the distribution is not llama.cpp's
            let mut plain = cfg.clone();
            plain.rope_scaling = None;
            let off = logprobs(&plain, &params, &prompt)
                .iter()
                .zip(&want_lp)
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max);
            assert!(
                off > 1e-2,
                "{name}: RoPE scaling changes too little ({off})"
            );
        }
        let got = greedy(&cfg, &params, &prompt, ids(&exp["greedy"]).len());
        assert_eq!(
            got,
            ids(&exp["greedy"]),
            "{name}: greedy tokens differ from llama.cpp's"
        );
    }
}

#[test]
fn what_llama_cpp_cannot_express_is_refused() {
    let tok = tokenizer();
    type Edit = fn(&mut model::ModelConfig);
    let cases: [(&str, Edit); 6] = [
        ("Llama 3 RoPE scaling in an MoE", |c| {
            c.rope_scaling = Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_seq_len: 64,
            })
        }),
        ("beta_fast", |c| {
            c.rope_scaling = Some(RopeScaling::Yarn {
                factor: 4.0,
                original_max_seq_len: 16,
                beta_fast: 16.0,
                beta_slow: 1.0,
                attention_factor: None,
                truncate: true,
            })
        }),
        ("whole projection", |c| {
            c.qk_norm = model::config::QkNorm::Projection
        }),
        ("softmax", |c| {
            c.router_score = model::config::RouterScore::Sigmoid
        }),
        ("gated shared expert", |c| {
            c.n_shared_experts = 1;
            c.shared_expert_gate = true;
        }),
        ("mixed", |c| c.first_dense_layers = 1),
    ];
    for (why, edit) in cases {
        let mut cfg = config(true, 0, tok.vocab_size());
        edit(&mut cfg);
        let p = vec![0.0; model::Layout::new(&cfg).total];
        let e = interop::gguf::write::export(
            &cfg,
            &p,
            &tok,
            None,
            interop::gguf::quant::F32,
            "x.gguf".as_ref(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(why), "{why}: {e}");
    }
}

#[test]
fn quantized_exports_import_back_as_their_dequantized_weights() {
    use interop::gguf::quant;
    let tok = tokenizer();
    let cfg = config(true, 0, tok.vocab_size());
    let params = model::Model::new(&cfg, 1, 1, 7).params;
    let layout = model::Layout::new(&cfg);
    for q in [quant::Q8_0, quant::Q4_0, quant::Q4_1, quant::Q5_0] {
        let file = std::env::temp_dir().join(format!("moelab-q-{q}-{}.gguf", std::process::id()));
        let bytes = interop::gguf::write::export(&cfg, &params, &tok, None, q, &file).unwrap();
        std::fs::write(&file, &bytes).unwrap();
        let back = interop::gguf::import_file(&file, None).unwrap();
        std::fs::remove_file(&file).unwrap();
        for t in &layout.tensors {
            let (a, b) = (
                &params[t.offset..t.offset + t.len],
                &back.params[t.offset..t.offset + t.len],
            );
            if t.shape.len() == 1 {
                assert_eq!(a, b, "{}: norms stay f32", t.name);
            } else {
                // every row here is whole blocks: within half a quantization step of its
                // block (and the scale's f16 rounding)
                for (xs, ys) in a.chunks(32).zip(b.chunks(32)) {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // Q4_0's grid is [-8d, 7d] with d = amax/8: values of the other sign
                    // than the largest clamp at 7d, up to a whole step off
                    let tol = match q {
                        quant::Q8_0 => amax / 127.0 * 0.5,
                        quant::Q4_0 => amax / 8.0,
                        // the same grid with 32 levels: [-16d, 15d], d = amax/16
                        quant::Q5_0 => amax / 16.0,
                        _ => 2.0 * amax / 15.0 * 0.5,
                    } + amax * 2e-3;
                    for (x, y) in xs.iter().zip(ys) {
                        let name = quant::type_name(q);
                        assert!((x - y).abs() <= tol, "{} ({name}): {x} -> {y}", t.name);
                    }
                }
            }
        }
    }
}

/// Llama 3's RoPE parameters come back from the divisors a GGUF file holds: Llama 3.1's
/// own (head dim 128, base 500,000: seven frequencies in the blend), one with a single
/// frequency in the blend and one with none; divisors that follow no such rule are refused.
#[test]
fn llama3_rope_parameters_from_gguf_divisors() {
    use interop::gguf::llama3_from_divisors;
    let cases = [
        (128, 500_000.0, 8.0, 1.0, 4.0, 8192),
        (8, 10_000.0, 8.0, 1.0, 4.0, 64),
        (8, 10_000.0, 2.0, 1.0, 1.5, 64),
        (16, 10_000.0, 8.0, 1.0, 4.0, 64),
    ];
    for (d, theta, factor, lo, hi, orig) in cases {
        let s = RopeScaling::Llama3 {
            factor,
            low_freq_factor: lo,
            high_freq_factor: hi,
            original_max_seq_len: orig,
        };
        let (plain, _) = RopeScaling::inv_freq(None, d, theta);
        let (want, _) = RopeScaling::inv_freq(Some(&s), d, theta);
        let div: Vec<f32> = plain
            .iter()
            .zip(&want)
            .map(|(p, w)| (p / w) as f32)
            .collect();
        let got = llama3_from_divisors(&div, d, theta, orig)
            .expect("a Llama 3 rule fits")
            .expect("scaled");
        let (back, _) = RopeScaling::inv_freq(Some(&got), d, theta);
        for (x, y) in want.iter().zip(&back) {
            assert!((x / y - 1.0).abs() < 1e-6, "d {d}: {s:?} -> {got:?}");
        }
        if d == 128 {
            let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = got
            else {
                unreachable!()
            };
            assert!((low_freq_factor - 1.0).abs() < 1e-3 && (high_freq_factor - 4.0).abs() < 1e-3);
        }
    }
    assert_eq!(llama3_from_divisors(&[1.0; 4], 8, 10_000.0, 64), Some(None));
    // not monotone in frequency: no Llama 3 rule
    assert_eq!(
        llama3_from_divisors(&[1.0, 3.0, 1.5, 8.0], 8, 10_000.0, 64),
        None
    );
    assert_eq!(llama3_from_divisors(&[1.0, 0.5], 4, 10_000.0, 64), None);
}

/// A GGUF file's K-quant matrices (Q4_K, Q6_K) run on the file's own blocks: an import keeps
/// their bytes (moelab cannot make them from the f32 weights), in moelab's row order (q/k
/// rows un-permuted, gate and up fused per expert), and writes them beside the run; a fused
/// matrix whose parts mix a K-quant with another type runs as Q8_0. Decoding on the K-quant
/// kernels stays near the f32 forward of the same (dequantized) weights, with the same bits
/// on 1, 2, 3 and 4 threads.
#[test]
fn k_quant_files_run_on_their_own_blocks() {
    use interop::gguf::{quant, write};
    use kernels::quant::QType;
    use rand::{Rng, SeedableRng};
    let tok = tokenizer();
    let mut cfg = config(true, 0, tok.vocab_size());
    // K-quant rows are whole 256-value super-blocks
    cfg.d_model = 256;
    cfg.expert_hidden = 256;
    cfg.n_experts = 4;
    cfg.init_std = 0.02;
    let params = model::Model::new(&cfg, 1, 1, 3).params;
    let file = std::env::temp_dir().join(format!("moelab-kq-{}.gguf", std::process::id()));
    let (meta, mut ts) = write::export_parts(&cfg, &params, &tok, None, quant::F32, &file).unwrap();
    // random blocks whose values are centred and of the init's size (Q4_K: minimums of
    // 7.5 steps of each sub-block's scale)
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut blocks = |ty: QType, n: usize| -> Vec<u8> {
        let bb = ty.block_bytes();
        let mut v: Vec<u8> = (0..n * bb).map(|_| rng.gen()).collect();
        for b in v.chunks_exact_mut(bb) {
            let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
            if ty == QType::Q4_K {
                let d = rng.gen_range(1e-4f32..2e-4);
                b[0..2].copy_from_slice(&f16(d));
                b[2..4].copy_from_slice(&f16(4.0 * d));
                let sc: Vec<u8> = (0..8).map(|_| rng.gen_range(8..=33)).collect();
                let m: Vec<u8> = sc
                    .iter()
                    .map(|&s| (s as f32 * 1.875).round() as u8)
                    .collect();
                // ggml's packing of 8 6-bit scales and minimums into 12 bytes
                for j in 0..4 {
                    b[4 + j] = sc[j] | ((sc[j + 4] >> 4) << 6);
                    b[8 + j] = m[j] | ((m[j + 4] >> 4) << 6);
                    b[12 + j] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
                }
            } else {
                b[208..210].copy_from_slice(&f16(rng.gen_range(1e-5f32..2e-5)));
            }
        }
        v
    };
    let pick = |name: &str| -> Option<QType> {
        let part = name.split('.').nth(2).unwrap_or(name);
        match (name, part) {
            ("output.weight", _) => Some(QType::Q6_K),
            // layer 0's q/k/v all Q4_K; layer 1's v Q6_K beside Q4_K q/k (runs as Q8_0)
            (n, "attn_v") if n.starts_with("blk.1.") => Some(QType::Q6_K),
            (_, "attn_q" | "attn_k" | "attn_v" | "ffn_gate_exps" | "ffn_up_exps") => {
                Some(QType::Q4_K)
            }
            (_, "ffn_down_exps" | "attn_output") => Some(QType::Q6_K),
            _ => None,
        }
    };
    for t in ts.iter_mut() {
        if let Some(ty) = pick(&t.name) {
            assert_eq!(t.dims[0] % 256, 0, "{}", t.name);
            let n: u64 = t.dims.iter().product();
            t.ggml_type = ty.ggml_type();
            t.data = blocks(ty, n as usize / 256);
        }
    }
    std::fs::write(&file, write::encode(&meta, &ts)).unwrap();
    let imp = interop::gguf::import_file(&file, None).unwrap();
    std::fs::remove_file(&file).unwrap();
    let types = &imp.source.quant;
    let want = [
        ("layers.0.attn.wqkv.weight", "q4_k"),
        ("layers.1.attn.wqkv.weight", "q8_0"),
        ("layers.0.attn.wo.weight", "q6_k"),
        ("layers.1.moe.experts.w_gate_up", "q4_k"),
        ("layers.1.moe.experts.w_down", "q6_k"),
        ("lm_head.weight", "q6_k"),
    ];
    for (n, t) in want {
        assert_eq!(types.get(n).map(|s| s.as_str()), Some(t), "{n}: {types:?}");
        assert_eq!(imp.quant_bytes.contains_key(n), t != "q8_0", "{n}");
    }
    // the kept bytes are the file's blocks (they dequantize to the imported weights exactly)
    let q = model::quant::QuantWeights::with_bytes(
        &imp.config,
        &imp.params,
        |n| types.get(n).and_then(|t| QType::parse(t)),
        &imp.quant_bytes,
    );
    let summary = q.summary();
    let count = |t: &str| summary.iter().find(|e| e.0 == t).map_or(0, |e| e.1);
    // q/k/v of layer 0, wo of both layers, gate/up and down of both layers, the head
    assert_eq!(
        (count("q4_k"), count("q6_k"), count("q8_0")),
        (3, 5, 1),
        "{summary:?}"
    );
    let v = imp.config.vocab_size;
    let prompt: Vec<u32> = (0..12).map(|i| ((i * 29 + 7) % v) as u32).collect();
    let mut f32_dec = model::decode::Decoder::new(&imp.config);
    let want = f32_dec.feed(&imp.params, &prompt).to_vec();
    let q = std::sync::Arc::new(q);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut d = model::decode::Decoder::new(&imp.config);
            d.set_quant(Some(q.clone()));
            let mut l = d.feed(&imp.params, &prompt[..8]).to_vec();
            for &t in &prompt[8..] {
                l = d.step(&imp.params, t).to_vec();
            }
            l
        })
    };
    let got = run(1);
    for threads in [2, 3, 4] {
        assert_eq!(got, run(threads), "{threads} threads");
    }
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("K-quant decoding: worst logit error {worst} of the largest {scale}");
    assert!(
        worst < 0.02 * scale,
        "K-quant logits off by {worst} of {scale}"
    );
    // a run dir keeps the bytes; weights that are not the file's (changed) run as Q8_0
    let dir = std::env::temp_dir().join(format!("moelab-kq-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    interop::run::write_run(&dir, &imp).unwrap();
    let sq = interop::run::SourceQuant::read(&dir).unwrap();
    assert_eq!(sq.bytes, imp.quant_bytes);
    assert_eq!(&sq.types, types);
    let mut changed = imp.params.clone();
    let head = model::Layout::new(&imp.config).lm_head;
    changed[head] += 1.0;
    let q2 = model::quant::QuantWeights::with_bytes(
        &imp.config,
        &changed,
        |n| sq.types.get(n).and_then(|t| QType::parse(t)),
        &sq.bytes,
    );
    let s2 = q2.summary();
    let c2 = |t: &str| s2.iter().find(|e| e.0 == t).map_or(0, |e| e.1);
    assert_eq!((c2("q4_k"), c2("q6_k"), c2("q8_0")), (3, 4, 2), "{s2:?}");
    // a damaged bytes file is an error that says what to do
    std::fs::write(dir.join(interop::run::QUANT_FILE), b"not safetensors").unwrap();
    let e = interop::run::SourceQuant::read(&dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("import the model again"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
