//! KV-cache decoding gives the same logits as recomputing the full sequence, at every
//! position, for a dense model and both MoE variants (tolerance: 1e-4 of the largest logit
//! magnitude; the two paths differ only in float32 summation order).

use model::decode::{Decoder, KvType};
use model::{io, Config, Layout, Model};
use std::path::PathBuf;

/// `f` on a pool of `threads` threads.
fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

fn check(cfg: &Config, params: Vec<f32>, name: &str) {
    let t = cfg.model.max_seq_len;
    let v = cfg.model.vocab_size;
    let tokens: Vec<u32> = (0..t).map(|i| ((i * 31 + 7) % v) as u32).collect();
    let mut full = Model::with_params(&cfg.model, Layout::new(&cfg.model), params.clone(), 1, t);
    full.forward(&tokens, &vec![kernels::IGNORE_INDEX; t]);
    let want = full.logits().to_vec();
    let mut dec = Decoder::new(&cfg.model);
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let mut worst = 0.0f32;
    for (i, &tok) in tokens.iter().enumerate() {
        let got = dec.step(&params, tok);
        for (a, b) in got.iter().zip(&want[i * v..(i + 1) * v]) {
            worst = worst.max((a - b).abs() / scale);
        }
    }
    println!("[{name}] KV-cache vs full recompute: worst normalised error {worst:.2e} over {t} positions");
    assert!(
        worst <= 1e-4,
        "[{name}] decode differs from full forward: {worst:.2e}"
    );
    assert_eq!(dec.remaining(), 0);
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden");
    for name in ["dense", "moe_softmax", "moe_sigmoid_bias"] {
        let cfg = Config::from_file(&root.join(name).join("config.toml")).unwrap();
        let params = io::load(
            &Layout::new(&cfg.model),
            &root.join(name).join("init.safetensors"),
            false,
        )
        .unwrap();
        check(&cfg, params, name);
    }
    let tiny = Config::from_toml(include_str!("../../../configs/tiny.toml")).unwrap();
    let m = Model::new(&tiny.model, 1, 1, 3);
    check(&tiny, m.params, "tiny");
    // head dim 24 while d_model / n_heads is 16 (issue 12: explicit head_dim)
    let wide = Config::from_toml(
        &include_str!("../../../configs/tiny.toml")
            .replace("n_kv_heads = 2", "n_kv_heads = 2\nhead_dim = 24"),
    )
    .unwrap();
    assert_eq!(wide.model.head_dim(), 24);
    let m = Model::new(&wide.model, 1, 1, 4);
    check(&wide, m.params, "tiny, head_dim 24");
    // q/k norms (issue 12), with norm weights away from 1 so they matter
    for qk in ["head", "projection"] {
        let cfg = Config::from_toml(&include_str!("../../../configs/tiny.toml").replace(
            "n_kv_heads = 2",
            &format!("n_kv_heads = 2\nqk_norm = \"{qk}\""),
        ))
        .unwrap();
        let mut m = Model::new(&cfg.model, 1, 1, 6);
        for ts in m.layout.tensors.clone() {
            if ts.name.contains("_norm.weight") {
                for (i, p) in m.params[ts.offset..ts.offset + ts.len]
                    .iter_mut()
                    .enumerate()
                {
                    *p = 0.5 + (i % 7) as f32 * 0.2;
                }
            }
        }
        check(&cfg, m.params, &format!("tiny, qk_norm {qk}"));
    }
    // q/k/v biases and a gated shared expert of its own width (Qwen2-MoE), biases nonzero
    let cfg = Config::from_toml(&include_str!("../../../configs/tiny.toml").replace(
        "n_shared_experts = 1",
        "n_shared_experts = 1\nshared_expert_hidden = 40\nshared_expert_gate = true\nqkv_bias = true",
    ))
    .unwrap();
    let mut m = Model::new(&cfg.model, 1, 1, 8);
    for ts in m.layout.tensors.clone() {
        if ts.name.ends_with("bqkv") {
            for (i, p) in m.params[ts.offset..ts.offset + ts.len]
                .iter_mut()
                .enumerate()
            {
                *p = ((i * 37) % 11) as f32 * 0.05 - 0.25;
            }
        }
    }
    check(&cfg, m.params, "tiny, qkv bias + gated shared expert");
    // DeepSeek-V3 routing (sigmoid + bias, 2 groups of 4, best group only, scaled) in a
    // model whose MoE blocks are chosen by moe_every and dense_layers
    let cfg = Config::from_toml(
        &include_str!("../../../configs/tiny.toml")
            .replace("n_layers = 2 ", "n_layers = 4 ")
            .replace(
                "first_dense_layers = 1",
                "moe_every = 2\ndense_layers = [3]",
            )
            .replace(
                "n_experts = 4 ",
                "n_experts = 8\nn_group = 2\ntopk_group = 1\nrouted_scaling_factor = 2.5 ",
            )
            .replace("router_score = \"softmax\"", "router_score = \"sigmoid\"")
            .replace("balance = \"aux_loss\"", "balance = \"bias\""),
    )
    .unwrap();
    let moe: Vec<bool> = (0..4).map(|l| cfg.model.is_moe_layer(l)).collect();
    assert_eq!(moe, [false, true, false, false]);
    let mut m = Model::new(&cfg.model, 1, 1, 9);
    for ts in m.layout.tensors.clone() {
        if ts.name.ends_with("router.bias") {
            for (i, p) in m.params[ts.offset..ts.offset + ts.len]
                .iter_mut()
                .enumerate()
            {
                *p = (i % 3) as f32 * 0.1;
            }
        }
    }
    check(
        &cfg,
        m.params,
        "tiny, grouped scaled routing, moe_every + dense_layers",
    );
}

/// A slot's logits do not depend on which other slots share its steps: three sequences fed
/// in staggered, overlapping steps give exactly the logits of three one-slot decoders.
#[test]
fn batched_decode_equals_per_sequence() {
    let tiny = Config::from_toml(include_str!("../../../configs/tiny.toml")).unwrap();
    let cfg = &tiny.model;
    let params = Model::new(cfg, 1, 1, 5).params;
    let v = cfg.vocab_size;
    let seqs: Vec<Vec<u32>> = (0..3)
        .map(|s| {
            (0..20)
                .map(|i| ((i * 17 + s * 101 + 3) % v) as u32)
                .collect()
        })
        .collect();
    let mut want: Vec<Vec<f32>> = vec![];
    for s in &seqs {
        let mut d = Decoder::new(cfg);
        let mut out = vec![];
        for &t in s {
            out.extend_from_slice(d.step(&params, t));
        }
        want.push(out);
    }
    let mut dec = model::decode::BatchDecoder::new(cfg, 4);
    let mut fed = [0usize; 3];
    let mut worst = 0.0f32;
    for step in 0..40 {
        // slot s joins at step 3s and skips every (s+2)th step; slot 3 stays unused
        let inputs: Vec<(usize, u32)> = (0..3)
            .filter(|&s| step >= 3 * s && step % (s + 2) != 1 && fed[s] < 20)
            .map(|s| (s, seqs[s][fed[s]]))
            .collect();
        if inputs.is_empty() {
            continue;
        }
        let got = dec.step(&params, &inputs).to_vec();
        for (i, &(s, _)) in inputs.iter().enumerate() {
            let w = &want[s][fed[s] * v..(fed[s] + 1) * v];
            for (a, b) in got[i * v..(i + 1) * v].iter().zip(w) {
                worst = worst.max((a - b).abs());
            }
            fed[s] += 1;
        }
    }
    assert_eq!(fed, [20, 20, 20]);
    println!("batched vs per-sequence decode: worst abs difference {worst:.2e}");
    // every row is computed with fixed-order dot products of its own (matmul::linear_rows),
    // so sharing a step with other sequences changes no bit
    assert_eq!(worst, 0.0, "batched decode differs: {worst:.2e}");
}

/// Long caches: past `kernels::attention::DECODE_CHUNK` positions a step splits the cache
/// into chunks merged by log-sum-exp (flash-decoding), and a sliding window keeps a ring
/// buffer of its entries; both still give the full forward's logits at every position, and
/// the same bits on 1 and 2 threads, and with every step in a team (its attention and
/// experts as team tasks, the flash-decoding chunks inside a task past the chunk).
#[test]
fn long_and_windowed_caches_equal_full_recompute() {
    let chunk = kernels::attention::DECODE_CHUNK;
    let tiny = include_str!("../../../configs/tiny.toml");
    let long = tiny
        .replace(
            "max_seq_len = 64 ",
            &format!("max_seq_len = {} ", 2 * chunk + 37),
        )
        .replace("seq_len = 64", "seq_len = 32");
    let mut last = vec![];
    for (name, text) in [
        ("tiny, 2.1 chunks", long.clone()),
        (
            "tiny, window 300 in block 1",
            long.replace(
                "n_kv_heads = 2",
                "n_kv_heads = 2\nsliding_window = 300\nfull_attention_layers = [0]",
            ),
        ),
    ] {
        let cfg = Config::from_toml(&text).unwrap();
        let m = Model::new(&cfg.model, 1, 1, 5);
        check(&cfg, m.params.clone(), name);
        let run = |threads: usize, team: Option<bool>| {
            on_threads(threads, || {
                let mut dec = Decoder::new(&cfg.model);
                dec.force_team(team);
                let mut last = vec![];
                for i in 0..cfg.model.max_seq_len {
                    last = dec.step(&m.params, (i * 13 % 500) as u32).to_vec();
                }
                last
            })
        };
        let one = run(1, None);
        assert_eq!(one, run(2, None), "[{name}] thread count changed the bits");
        assert_eq!(
            one,
            run(2, Some(true)),
            "[{name}] team steps changed the bits"
        );
        last.push(one);
    }
    assert_ne!(
        last[0], last[1],
        "the window changes the last position's logits"
    );
    // RoPE scaling: the training forward (tiled kernel at this length) and the decoder, whose
    // scaled logits the transformers fixtures check (interop's import_hf), agree
    let scaled = long.replace(
        "n_kv_heads = 2",
        "n_kv_heads = 2\nrope_scaling = { type = \"yarn\", factor = 4.0, original_max_seq_len = 128 }",
    );
    let cfg = Config::from_toml(&scaled).unwrap();
    assert!(cfg.model.rope_scaling.is_some(), "the TOML sets YaRN");
    let m = Model::new(&cfg.model, 1, 1, 5);
    check(&cfg, m.params.clone(), "tiny, 2.1 chunks, YaRN x4 from 128");
    let mut dec = Decoder::new(&cfg.model);
    let mut yarn = vec![];
    for i in 0..cfg.model.max_seq_len {
        yarn = dec.step(&m.params, (i * 13 % 500) as u32).to_vec();
    }
    assert_ne!(yarn, last[0], "YaRN changes the last position's logits");
}

/// Prefill: a prompt fed as batched forwards (`Decoder::feed`, `BatchDecoder::forward`) gives
/// exactly the bits of feeding it one token per step, for a plain cache, a cache long enough
/// for flash-decoding and a sliding-window ring buffer; and prompt chunks sharing a forward
/// with other slots' decode rows change none of their bits either. All of it holds with
/// f16 and bf16 caches too.
#[test]
fn prefill_equals_token_by_token() {
    for kv in [KvType::F32, KvType::F16, KvType::Bf16] {
        prefill_equals_token_by_token_with(kv);
    }
}

fn prefill_equals_token_by_token_with(kv: KvType) {
    let chunk = kernels::attention::DECODE_CHUNK;
    let tiny = include_str!("../../../configs/tiny.toml");
    let long = tiny
        .replace(
            "max_seq_len = 64 ",
            &format!("max_seq_len = {} ", chunk + 90),
        )
        .replace("seq_len = 64", "seq_len = 32");
    let windowed = long.replace(
        "n_kv_heads = 2",
        "n_kv_heads = 2\nsliding_window = 40\nfull_attention_layers = [0]",
    );
    let dense = tiny
        .replace("n_experts = 4", "n_experts = 1")
        .replace("top_k = 2 ", "top_k = 1 ");
    for (name, text) in [
        ("tiny", tiny.to_string()),
        ("tiny, long", long),
        ("tiny, window 40", windowed),
        ("tiny, dense", dense),
    ] {
        let cfg = Config::from_toml(&text).unwrap().model;
        let params = Model::new(&cfg, 1, 1, 9).params;
        let v = cfg.vocab_size;
        let t = cfg.max_seq_len;
        let toks: Vec<u32> = (0..t - 3).map(|i| ((i * 29 + 11) % v) as u32).collect();
        let name = format!("{name}, {} cache", kv.name());
        let mut one = Decoder::new(&cfg);
        one.set_kv_type(kv);
        let stepped: Vec<Vec<f32>> = toks
            .iter()
            .map(|&x| one.step(&params, x).to_vec())
            .collect();
        // the whole prompt at once (several chunks), then one more token
        let mut d = Decoder::new(&cfg);
        d.set_kv_type(kv);
        assert_eq!(
            d.feed(&params, &toks[..t - 4]),
            &stepped[t - 5][..],
            "[{name}] feed"
        );
        assert_eq!(
            d.step(&params, toks[t - 4]),
            &stepped[t - 4][..],
            "[{name}] step after feed"
        );
        // every row's logits of one forward equal the stepped ones
        let mut b = model::decode::BatchDecoder::new(&cfg, 2);
        b.set_kv_type(kv);
        let all = b.forward(&params, &[(1, &toks[..30])], true).to_vec();
        for i in 0..30 {
            assert_eq!(
                &all[i * v..(i + 1) * v],
                &stepped[i][..],
                "[{name}] row {i}"
            );
        }
        // slot 0 prefills in chunks of 7 while slot 1 decodes one token per forward
        let mut fed = [0usize, 30];
        while fed[0] + 7 <= 56 {
            let a = &toks[fed[0]..fed[0] + 7];
            let c = &toks[fed[1]..fed[1] + 1];
            let got = b.forward(&params, &[(0, a), (1, c)], false).to_vec();
            fed[0] += 7;
            fed[1] += 1;
            assert_eq!(
                &got[..v],
                &stepped[fed[0] - 1][..],
                "[{name}] chunk at {}",
                fed[0]
            );
            assert_eq!(
                &got[v..],
                &stepped[fed[1] - 1][..],
                "[{name}] decode at {}",
                fed[1]
            );
        }
        if name.contains("long") || name.contains("window") {
            // past the flash-decoding chunk and around the ring buffer
            assert!(t - 4 > chunk);
        }
    }
}

/// Quantized decoding (every type): the same bits for 1, 2 and 4 threads, for a prompt fed
/// in one forward or token by token (single-row steps run their experts as team tasks once
/// the decoder tries the team), and alone or batched with another sequence; the logits stay
/// near the f32 decoder's.
#[test]
fn quantized_decode_is_deterministic_and_near_f32() {
    use kernels::quant::QType;
    use model::quant::QuantWeights;
    use std::sync::Arc;
    let cfg = Config::from_toml(include_str!("../../../configs/tiny.toml"))
        .unwrap()
        .model;
    let params = Model::new(&cfg, 1, 1, 11).params;
    let v = cfg.vocab_size;
    let toks: Vec<u32> = (0..40).map(|i| ((i * 37 + 5) % v) as u32).collect();
    let mut f32_dec = Decoder::new(&cfg);
    let want = f32_dec.feed(&params, &toks).to_vec();
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    for ty in QType::ALL {
        let q = Arc::new(QuantWeights::uniform(&cfg, &params, ty));
        // every multiplied matrix of the tiny model has whole blocks
        assert!(q.names().any(|(n, _)| n == "lm_head.weight"));
        assert!(q.names().any(|(n, _)| n.ends_with("experts.w_down")));
        let run = |threads: usize, batched: bool| {
            on_threads(threads, || {
                let mut d = Decoder::new(&cfg);
                d.set_quant(Some(q.clone()));
                // two threads: every single-row step in a team
                d.force_team((threads == 2).then_some(true));
                if batched {
                    d.feed(&params, &toks).to_vec()
                } else {
                    let mut last = vec![];
                    for &t in &toks {
                        last = d.step(&params, t).to_vec();
                    }
                    last
                }
            })
        };
        let one = run(1, true);
        assert_eq!(one, run(2, true), "{ty:?}: 2 threads");
        assert_eq!(one, run(4, false), "{ty:?}: 4 threads, token by token");
        // two threads token by token: every step with the team's helper thread
        assert_eq!(one, run(2, false), "{ty:?}: 2 threads, token by token");
        // beside another sequence in a batch
        let mut b = model::decode::BatchDecoder::new(&cfg, 2);
        b.set_quant(Some(q.clone()));
        b.forward(&params, &[(1, &toks[..7])], false);
        let got = b.forward(&params, &[(0, &toks[..]), (1, &toks[7..9])], false)[..v].to_vec();
        assert_eq!(one, got, "{ty:?}: batched");
        let worst = one
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        println!("{ty:?}: worst logit error {worst:.3} of the largest logit");
        let tol = if ty == QType::Q8_0 { 0.02 } else { 0.25 };
        assert!(worst < tol, "{ty:?}: quantized logits off by {worst}");
    }
}

/// f16 / bf16 KV caches: half the bytes of the f32 cache, the same bits for 1, 2 and 4
/// threads (also past the flash-decoding chunk, with 30 single-row steps there: the decoder
/// tries its steps with a team helper from the ninth on), and logits near the f32 cache's.
#[test]
fn half_precision_kv_cache_is_deterministic_and_near_f32() {
    let chunk = kernels::attention::DECODE_CHUNK;
    let text = include_str!("../../../configs/tiny.toml")
        .replace(
            "max_seq_len = 64 ",
            &format!("max_seq_len = {} ", chunk + 60),
        )
        .replace("seq_len = 64", "seq_len = 32");
    let cfg = Config::from_toml(&text).unwrap().model;
    let params = Model::new(&cfg, 1, 1, 13).params;
    let v = cfg.vocab_size;
    let toks: Vec<u32> = (0..chunk + 50).map(|i| ((i * 41 + 3) % v) as u32).collect();
    let run = |kv: KvType, threads: usize| {
        on_threads(threads, || {
            let mut d = Decoder::new(&cfg);
            d.set_kv_type(kv);
            let bytes = d.cache_bytes();
            let mut out = d.feed(&params, &toks[..chunk + 20]).to_vec();
            for &t in &toks[chunk + 20..] {
                out.extend_from_slice(d.step(&params, t));
            }
            (out, bytes)
        })
    };
    let (want, f32_bytes) = run(KvType::F32, 2);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    for kv in [KvType::F16, KvType::Bf16] {
        let (one, bytes) = run(kv, 1);
        assert_eq!(bytes * 2, f32_bytes, "{kv:?}: half the bytes");
        assert_eq!(one, run(kv, 2).0, "{kv:?}: 2 threads");
        assert_eq!(one, run(kv, 4).0, "{kv:?}: 4 threads");
        assert_ne!(one, want, "{kv:?}: rounding the cache changes some bits");
        let worst = one
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        println!(
            "{kv:?} cache: worst logit error {worst:.2e} of the largest logit over {} positions",
            want.len() / v
        );
        let tol = if kv == KvType::F16 { 2e-3 } else { 2e-2 };
        assert!(worst < tol, "{kv:?}: logits off by {worst}");
    }
}

/// The student's shape (one routed expert beside a shared one, four key/value heads):
/// single-row steps in a team run the experts' products as the tasks of one loop
/// (`experts_one_row`; the tiny config's two routed experts go the same way in the other
/// tests) and the attention as two tasks of two heads each (`attention_one_row`; the tiny
/// config's two key/value heads of two query heads each in the other tests). Stepwise
/// logits on 2 threads, every step in a team, equal one thread's and the batched forward's
/// (the general path), bit for bit.
#[test]
fn expert_products_as_team_tasks_keep_the_bits() {
    let cfg = Config::from_toml(include_str!("../../../configs/student.toml"))
        .unwrap()
        .model;
    assert_eq!((cfg.top_k, cfg.n_shared_experts), (1, 1));
    let params = Model::new(&cfg, 1, 1, 7).params;
    let toks: Vec<u32> = (0..60)
        .map(|i| ((i * 31 + 7) % cfg.vocab_size) as u32)
        .collect();
    let run = |threads: usize, batched: bool| {
        on_threads(threads, || {
            let mut d = Decoder::new(&cfg);
            d.force_team((threads == 2).then_some(true));
            if batched {
                d.logits_all(&params, &toks)
            } else {
                toks.iter()
                    .flat_map(|&t| d.step(&params, t).to_vec())
                    .collect::<Vec<f32>>()
            }
        })
    };
    let want = run(1, true);
    assert_eq!(run(1, false), want, "one thread, stepwise");
    assert_eq!(
        run(2, false),
        want,
        "two threads, stepwise (experts as team tasks)"
    );
    assert_eq!(run(2, true), want, "two threads, batched");
}
