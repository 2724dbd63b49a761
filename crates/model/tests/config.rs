//! A config that cannot work is refused with an error naming the field.

use model::Config;

const TINY: &str = include_str!("../../../configs/tiny.toml");

fn refused(edit: impl Fn(&str) -> String, field: &str) {
    let text = edit(TINY);
    let err = Config::from_toml(&text)
        .expect_err(&format!("config should be refused ({field})"))
        .to_string();
    println!("{err}");
    assert!(err.contains(field), "error {err:?} does not name {field}");
}

fn set<'a>(key: &'a str, val: &str) -> impl Fn(&str) -> String + 'a {
    let val = val.to_string();
    move |t: &str| {
        t.lines()
            .map(|l| {
                if l.split('=').next().map(str::trim) == Some(key) {
                    format!("{key} = {val}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Every TOML file in configs/ (the presets) and tests/configs/ parses and validates.
/// Regression (issue 11): this listed three of the five presets; teacher and student were
/// never parsed.
#[test]
fn every_config_file_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut n = 0;
    for dir in ["configs", "tests/configs"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Config::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                println!("valid: {}", p.display());
                n += 1;
            }
        }
    }
    assert!(n >= 6, "only {n} config files found");
}

fn preset(name: &str) -> Config {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../configs/{name}.toml"));
    Config::from_file(&p).unwrap()
}

/// What the presets' header comments claim about their shapes.
#[test]
fn preset_comments_hold() {
    // small-dense: "the same active parameters per token as small-moe (FFN width 1024 =
    // small-moe's 2 routed + 2 shared experts of 256)"
    let (dense, moe) = (preset("small-dense").model, preset("small-moe").model);
    let moe_ffn = moe.top_k * moe.expert_hidden + moe.shared_hidden();
    assert_eq!((dense.ffn_hidden, moe_ffn), (1024, 1024));
    assert_eq!((dense.d_model, dense.n_layers), (moe.d_model, moe.n_layers));
    // student: "under a quarter of the teacher's active parameters (854k vs 3.51M active
    // matmul params per token)"
    let (student, teacher) = (preset("student").model, preset("teacher").model);
    let (s, t) = (
        student.active_matmul_params(),
        teacher.active_matmul_params(),
    );
    println!("student {s}, teacher {t} active matmul params per token");
    assert!(
        4 * s < t,
        "student {s} is not under a quarter of teacher {t}"
    );
    assert_eq!((s + 500) / 1000, 854, "student {s}");
    assert_eq!((t + 5000) / 10000, 351, "teacher {t}");
    assert_eq!(
        student.vocab_size, teacher.vocab_size,
        "distillation needs one tokenizer"
    );
}

#[test]
fn heads_not_dividing_width() {
    refused(set("n_heads", "5"), "n_heads");
}

#[test]
fn kv_heads_not_dividing_heads() {
    refused(set("n_kv_heads", "3"), "n_kv_heads");
}

#[test]
fn top_k_above_experts() {
    refused(set("top_k", "5"), "top_k");
}

#[test]
fn zero_sizes() {
    for f in [
        "vocab_size",
        "d_model",
        "n_layers",
        "max_seq_len",
        "expert_hidden",
        "batch_size",
        "seq_len",
    ] {
        refused(set(f, "0"), f);
    }
}

#[test]
fn seq_len_beyond_model() {
    refused(set("seq_len", "65"), "seq_len");
}

#[test]
fn unknown_field() {
    refused(
        |t| t.replace("[train]", "n_expertz = 3\n[train]"),
        "n_expertz",
    );
}

#[test]
fn bad_enum_values() {
    refused(
        set("router_score", "\"relu\""),
        "model.router_score: unknown variant",
    );
    refused(
        set("balance", "\"magic\""),
        "model.balance: unknown variant",
    );
    refused(
        |t| t.replace("[train]", "[train]\non_anomaly = \"ignore\""),
        "train.on_anomaly: unknown variant",
    );
    refused(
        |t| t.replace("[train]", "[train]\noptimizer = \"lion\""),
        "train.optimizer: unknown variant",
    );
}

#[test]
fn muon_settings() {
    let muon = |extra: &'static str| {
        move |t: &str| {
            t.replace(
                "[train]",
                &format!("[train]\noptimizer = \"muon\"\n{extra}"),
            )
        }
    };
    refused(muon("muon_lr = 0"), "train.muon_lr");
    refused(muon("muon_lr = nan"), "train.muon_lr");
    refused(muon("muon_momentum = 1.0"), "train.muon_momentum");
    refused(muon("muon_ns_steps = 0"), "train.muon_ns_steps");
    let text = muon("muon_lr = 0.05")(include_str!("../../../configs/tiny.toml"));
    let cfg = Config::from_toml(&text).unwrap();
    assert_eq!(cfg.train.optimizer, model::config::OptimizerKind::Muon);
    assert_eq!((cfg.train.muon_lr, cfg.train.muon_momentum), (0.05, 0.95));
    // the serialised config keeps them, and an AdamW config stays as it was
    let again = Config::from_toml(&cfg.to_toml()).unwrap();
    assert_eq!(again.train, cfg.train);
    let plain = Config::from_toml(include_str!("../../../configs/tiny.toml")).unwrap();
    assert!(!plain.to_toml().contains("muon") && !plain.to_toml().contains("optimizer"));
}

#[test]
fn head_dim_must_be_even() {
    refused(
        |t| t.replace("n_kv_heads = 2", "n_kv_heads = 2\nhead_dim = 7"),
        "model.head_dim",
    );
    // with an explicit head dim, n_heads need not divide d_model
    let text = include_str!("../../../configs/tiny.toml")
        .replace("n_heads = 4 ", "n_heads = 6 ")
        .replace("n_kv_heads = 2", "n_kv_heads = 2\nhead_dim = 16");
    let cfg = Config::from_toml(&text).unwrap();
    assert_eq!((cfg.model.n_heads, cfg.model.head_dim()), (6, 16));
    refused(|_| text.replace("\nhead_dim = 16", ""), "model.n_heads");
}

#[test]
fn shared_expert_options_need_shared_experts() {
    let none = |extra: &'static str| {
        move |t: &str| {
            t.replace(
                "n_shared_experts = 1",
                &format!("n_shared_experts = 0\n{extra}"),
            )
        }
    };
    refused(
        none("shared_expert_gate = true"),
        "model.shared_expert_gate",
    );
    refused(
        none("shared_expert_hidden = 40"),
        "model.shared_expert_hidden",
    );
    refused(
        |t| {
            t.replace(
                "n_shared_experts = 1",
                "n_shared_experts = 1\nshared_expert_hidden = 0",
            )
        },
        "model.shared_expert_hidden",
    );
}

#[test]
fn moe_block_selection() {
    let cfg = |extra: &str| {
        Config::from_toml(
            &include_str!("../../../configs/tiny.toml")
                .replace("n_layers = 2 ", "n_layers = 5 ")
                .replace("first_dense_layers = 1", extra),
        )
        .unwrap()
        .model
    };
    let moe = |m: &model::ModelConfig| {
        (0..m.n_layers)
            .map(|l| m.is_moe_layer(l))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        moe(&cfg("moe_every = 2")),
        [false, true, false, true, false]
    );
    assert_eq!(
        moe(&cfg("dense_layers = [0, 3]")),
        [false, true, true, false, true]
    );
    refused(
        |t| t.replace("first_dense_layers = 1", "moe_every = 0"),
        "model.moe_every",
    );
    refused(
        |t| t.replace("first_dense_layers = 1", "dense_layers = [2]"),
        "model.dense_layers",
    );
}

#[test]
fn expert_groups_and_scaling() {
    let set_moe = |extra: &'static str| {
        move |t: &str| t.replace("n_experts = 4 ", &format!("{extra}\nn_experts = 4 "))
    };
    refused(set_moe("n_group = 3"), "model.n_group");
    refused(set_moe("n_group = 2\ntopk_group = 3"), "model.topk_group");
    refused(set_moe("n_group = 4\ntopk_group = 1"), "model.top_k"); // 1 group of 1 expert < top_k 2
    refused(
        set_moe("routed_scaling_factor = 0.0"),
        "model.routed_scaling_factor",
    );
    refused(
        |t| t.replace("n_experts = 4 ", "n_experts = 257 "),
        "model.n_experts",
    );
    let ok = Config::from_toml(
        &include_str!("../../../configs/tiny.toml").replace("n_experts = 4 ", "n_experts = 256 "),
    );
    assert!(ok.is_ok(), "256 experts: {ok:?}");
}

#[test]
fn wrong_type() {
    refused(set("d_model", "\"wide\""), "model.d_model: invalid type");
}

#[test]
fn rope_scaling_reads_from_toml_and_round_trips() {
    let text = "[model]\nvocab_size = 64\nd_model = 32\nn_layers = 1\nn_heads = 4\nn_kv_heads = 4\nmax_seq_len = 256\nffn_hidden = 64\n[model.rope_scaling]\ntype = \"yarn\"\nfactor = 4.0\noriginal_max_seq_len = 64\n[train]\nseq_len = 256\n";
    let cfg = model::Config::from_toml(text).unwrap();
    match &cfg.model.rope_scaling {
        Some(model::config::RopeScaling::Yarn {
            factor,
            original_max_seq_len,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        }) => {
            assert_eq!((*factor, *original_max_seq_len), (4.0, 64));
            assert_eq!(
                (*beta_fast, *beta_slow, *attention_factor, *truncate),
                (32.0, 1.0, None, true)
            );
        }
        other => panic!("{other:?}"),
    }
    let back = model::Config::from_toml(&cfg.to_toml()).unwrap();
    assert_eq!(back, cfg);
    // the default attention factor, 0.1 ln 4 + 1, scales cos and sin
    let t = cfg.model.rope_table(2);
    assert!((t.cos[0] as f64 - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-6);
    let bad = text.replace("factor = 4.0", "factor = 0.0");
    let e = model::Config::from_toml(&bad).unwrap_err().to_string();
    assert!(e.contains("rope_scaling"), "{e}");
    let bad = text.replace("\"yarn\"", "\"dynamic\"");
    assert!(model::Config::from_toml(&bad).is_err());
}

#[test]
fn sliding_windows_validate_and_round_trip_through_hugging_face_configs() {
    let base = include_str!("../../../configs/tiny.toml");
    let with =
        |extra: &str| base.replace("max_seq_len = 64 ", &format!("{extra}\nmax_seq_len = 64 "));
    // tiny: a dense block then MoE with a shared expert (exported as Qwen2-MoE)
    let cfg = model::Config::from_toml(&with("sliding_window = 16\nfull_attention_layers = [1]"))
        .unwrap();
    assert_eq!((cfg.model.window(0), cfg.model.window(1)), (16, 0));
    assert_eq!(model::Config::from_toml(&cfg.to_toml()).unwrap(), cfg);
    let (_, json) = model::hf::to_hf(&cfg.model).unwrap();
    assert_eq!(
        json["layer_types"],
        serde_json::json!(["sliding_attention", "full_attention"])
    );
    let back = model::hf::config_from_hf(&json).unwrap().config;
    assert_eq!(
        (back.sliding_window, back.full_attention_layers),
        (16, vec![1])
    );
    // without layer_types, transformers 5 windows Qwen2-MoE's even blocks below
    // max_window_layers
    let mut json = json;
    json.as_object_mut().unwrap().remove("layer_types");
    json["num_hidden_layers"] = 5.into();
    json["max_window_layers"] = 4.into();
    json["mlp_only_layers"] = serde_json::json!([]);
    let back = model::hf::config_from_hf(&json).unwrap().config;
    assert_eq!(back.full_attention_layers, vec![1, 3, 4]);
    json["use_sliding_window"] = false.into();
    assert_eq!(
        model::hf::config_from_hf(&json)
            .unwrap()
            .config
            .sliding_window,
        0
    );
    // a dense Llama has no window to export
    let dense = "[model]\nvocab_size = 64\nd_model = 32\nn_layers = 1\nn_heads = 4\nn_kv_heads = 4\nmax_seq_len = 64\nffn_hidden = 64\nsliding_window = 8\n[train]\nseq_len = 64\n";
    let e = model::hf::to_hf(&model::Config::from_toml(dense).unwrap().model).unwrap_err();
    assert!(e.to_string().contains("sliding_window"), "{e}");
    // a list of full blocks needs a window, and blocks that exist
    let e = model::Config::from_toml(&with("full_attention_layers = [0]")).unwrap_err();
    assert!(e.to_string().contains("model.full_attention_layers"), "{e}");
    let e = model::Config::from_toml(&with("sliding_window = 8\nfull_attention_layers = [2]"))
        .unwrap_err();
    assert!(e.to_string().contains("block 2 does not exist"), "{e}");
}

/// Infinite values are valid TOML (`inf`) and a config.json's 1e39 rounds to an infinite f32:
/// refused as the field's error, not a panic once the run dir exists (`init_std`) or a run
/// that trains to NaN (the others).
#[test]
fn infinite_floats() {
    for (section, field) in [
        ("[model]", "init_std"),
        ("[model]", "norm_eps"),
        ("[model]", "rope_theta"),
        ("[train]", "eps"),
        ("[train]", "weight_decay"),
        ("[train]", "grad_clip"),
    ] {
        let name = format!("{}.{field}", &section[1..section.len() - 1]);
        for v in ["inf", "-inf", "nan"] {
            refused(
                |t| {
                    let kept: Vec<&str> = t
                        .lines()
                        .filter(|l| l.split('=').next().map(str::trim) != Some(field))
                        .collect();
                    kept.join("\n")
                        .replace(section, &format!("{section}\n{field} = {v}"))
                },
                &name,
            );
        }
    }
}

/// Sizes past any real model (a mistyped width, a GGUF's corrupt block count) are refused
/// naming the field, not an allocation that aborts once the run dir exists.
#[test]
fn sizes_beyond_any_model() {
    refused(set("d_model", "1000000000"), "model.d_model");
    refused(set("n_layers", "2147483648"), "model.n_layers");
    refused(set("vocab_size", "4294967000"), "model.vocab_size");
    // each size allowed, together too large
    refused(
        |t| set("n_layers", "4096")(&set("d_model", "65536")(t)),
        "parameters",
    );
}
