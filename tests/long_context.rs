//! Long context through the real binary: passkey data (`prepare --passkey`), training on
//! packed whole documents, `eval --task passkey` with its table and heatmap, context
//! extension (`train --init RUN --config` with a longer seq_len and YaRN) and bad input.

mod common;

use common::{moelab as run, s, text};
use std::path::{Path, PathBuf};

const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/configs/passkey-tiny.toml"
);

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "moelab {args:?} failed:\n{}",
        text(&out)
    );
    text(&out)
}

fn fails(args: &[&str], want: &str) {
    let out = run(args);
    assert!(!out.status.success(), "moelab {args:?} should fail");
    let t = text(&out);
    assert!(
        t.contains(want),
        "moelab {args:?}: {t:?} does not mention {want:?}"
    );
}

fn prepare(d: &Path, name: &str, context: usize, tokenizer: Option<&Path>) -> PathBuf {
    let out = d.join(name);
    let ctx = context.to_string();
    let mut args = vec!["prepare", "--passkey", "--context", &ctx, "--n", "200"];
    args.extend(["--out", s(&out)]);
    if let Some(t) = tokenizer {
        args.extend(["--tokenizer", s(t)]);
    }
    let o = ok(&args);
    assert!(o.contains("200 train / 64 val passkey documents"), "{o}");
    out
}

#[test]
fn passkey_prepare_train_extend_and_evaluate() {
    let d = common::tmpdir("long", "passkey");
    let data = prepare(&d, "d128", 128, None);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["kind"], "documents");
    assert_eq!(meta["passkey"]["context"], 128);

    let base = d.join("base");
    let o = ok(&[
        "train",
        "--config",
        TINY,
        "--data",
        s(&data),
        "--out",
        s(&base),
    ]);
    assert!(!o.contains("left out"), "every document fits a row: {o}");

    // the grid: every (depth, context) cell, each context's total with its interval
    let svg = d.join("base.svg");
    let o = ok(&[
        "eval",
        "--run",
        s(&base),
        "--task",
        "passkey",
        "--context",
        "128,256",
        "--depths",
        "0,50,100",
        "--n",
        "3",
        "--heatmap",
        s(&svg),
    ]);
    for want in [
        "3 keys of the test split per cell",
        "model max_seq_len 128",
        "   depth     128     256",
        "     50%",
        "context    128: ",
        "/9 retrieved",
        "context    256: ",
    ] {
        assert!(o.contains(want), "{want:?} missing from:\n{o}");
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("context length (tokens)"));
    assert_eq!(
        svg.matches("<rect").count(),
        1 + 2 * 6,
        "background + 6 cells, fill and border"
    );

    // context extension: the same weights, a longer seq_len and YaRN, data of the run's
    // tokenizer at the new length
    let long = prepare(&d, "d256", 256, Some(&base));
    let cfg = std::fs::read_to_string(TINY).unwrap().replace(
        "max_seq_len = 128",
        "max_seq_len = 256\nrope_scaling = { type = \"yarn\", factor = 2.0, original_max_seq_len = 128 }",
    );
    let cfg = cfg
        .replace("seq_len = 128", "seq_len = 256")
        .replace("steps = 6", "steps = 2");
    let ext_cfg = d.join("ext.toml");
    std::fs::write(&ext_cfg, cfg).unwrap();
    let ext = d.join("ext");
    ok(&[
        "train",
        "--init",
        s(&base),
        "--config",
        s(&ext_cfg),
        "--data",
        s(&long),
        "--out",
        s(&ext),
    ]);
    let o = ok(&[
        "eval",
        "--run",
        s(&ext),
        "--task",
        "passkey",
        "--context",
        "256",
        "--depths",
        "50",
        "--n",
        "2",
    ]);
    assert!(
        o.contains("model max_seq_len 256, RoPE scaling Yarn"),
        "{o}"
    );

    // bad input: one clear line each
    let r = s(&base);
    fails(
        &["eval", "--run", r, "--task", "passkey", "--depths", "150"],
        "percentages, 0 to 100",
    );
    fails(
        &[
            "eval",
            "--run",
            r,
            "--task",
            "passkey",
            "--heatmap",
            "x.png",
        ],
        "expected a .svg",
    );
    fails(
        &["eval", "--run", r, "--task", "passkey", "--context", "20"],
        "too short for a passkey",
    );
    fails(
        &["eval", "--run", r, "--task", "passkey", "--split", "train"],
        "dev or test",
    );
    // options of the decoding paths are refused where nothing would use them
    fails(
        &["eval", "--run", r, "--task", "passkey", "--kv-cache", "f16"],
        "--kv-cache applies to --task perplexity",
    );
    fails(
        &["eval", "--run", r, "--task", "passkey", "--quant", "q8_0"],
        "--quant applies to --task perplexity",
    );
    fails(
        &[
            "prepare",
            "--passkey",
            "--context",
            "16",
            "--out",
            s(&d.join("short")),
        ],
        "too short for a passkey document",
    );
    assert!(
        !d.join("short").exists(),
        "a refused prepare writes nothing"
    );
}
