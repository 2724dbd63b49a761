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

#[test]
fn presets_are_valid() {
    for text in [
        TINY,
        include_str!("../../../configs/small-dense.toml"),
        include_str!("../../../configs/small-moe.toml"),
    ] {
        Config::from_toml(text).unwrap();
    }
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
    refused(set("router_score", "\"relu\""), "router_score");
    refused(set("balance", "\"magic\""), "balance");
}

#[test]
fn wrong_type() {
    refused(set("d_model", "\"wide\""), "d_model");
}
