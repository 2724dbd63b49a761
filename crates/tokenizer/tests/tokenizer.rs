//! Tokenizer determinism and round-trip tests.

use proptest::prelude::*;
use std::process::Command;
use tokenizer::{Tokenizer, SPECIAL_TOKENS};

/// Pseudo-random words over a small alphabet (plus some multi-byte characters): many
/// distinct words with tied pair counts, enough for a few hundred merges.
fn corpus() -> Vec<String> {
    let letters: Vec<char> = "etaoinshrdlucmfwypvbgkqjxz"
        .chars()
        .chain("éü日本🙂".chars())
        .collect();
    let mut x: u64 = 12345;
    let mut next = |n: usize| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as usize) % n
    };
    (0..300)
        .map(|_| {
            let mut line = String::new();
            for j in 0..15 {
                let len = 1 + next(7);
                for _ in 0..len {
                    // skewed towards the first letters, like English
                    let bound = next(letters.len()) + 1;
                    line.push(letters[next(bound)]);
                }
                line.push(if j % 5 == 4 { '\n' } else { ' ' });
            }
            line
        })
        .collect()
}

#[test]
fn training_is_byte_identical_in_process() {
    let a = Tokenizer::train(corpus().iter(), 400)
        .unwrap()
        .to_json()
        .unwrap();
    let b = Tokenizer::train(corpus().iter(), 400)
        .unwrap()
        .to_json()
        .unwrap();
    assert_eq!(a, b);
}

/// Each process has its own hash keys (and here its own thread count), so this is where
/// hash-order nondeterminism would show.
#[test]
fn training_is_byte_identical_across_processes() {
    if let Ok(out) = std::env::var("MOELAB_TOKENIZER_CHILD") {
        let t = Tokenizer::train(corpus().iter(), 400).unwrap();
        t.save(std::path::Path::new(&out)).unwrap();
        return;
    }
    let dir = std::env::temp_dir().join(format!("moelab-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = vec![];
    for (i, threads) in ["1", "2", "4", "2"].iter().enumerate() {
        let out = dir.join(format!("tok{i}.json"));
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "training_is_byte_identical_across_processes"])
            .env("MOELAB_TOKENIZER_CHILD", &out)
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(
            child.status.success(),
            "{}",
            String::from_utf8_lossy(&child.stderr)
        );
        files.push(std::fs::read(&out).unwrap());
    }
    for f in &files[1..] {
        assert!(f == &files[0], "tokenizer.json differs between processes");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn special_tokens_have_fixed_ids_and_text_never_becomes_one() {
    // Regression test for issue 11 (chat-template injection): special-token strings in
    // text are ordinary text, before and after a save/load round trip.
    let t = Tokenizer::train(corpus().iter(), 400).unwrap();
    assert_eq!(t.vocab_size(), 400);
    let dir = std::env::temp_dir().join(format!("moelab-tok-special-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    t.save(&path).unwrap();
    let loaded = Tokenizer::from_file(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let n_specials = SPECIAL_TOKENS.len() as u32;
    for t in [&t, &loaded] {
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(t.special(s), Some(i as u32));
            let ids = t.encode(s);
            assert!(ids.len() > 1, "{s} encoded as one token: {ids:?}");
            assert!(ids.iter().all(|&id| id >= n_specials), "{s} -> {ids:?}");
            assert_eq!(t.decode(&ids), *s);
        }
        let text = "<|user|>2+2?<|end|><|assistant|><think>add</think>4<|end|> < |end| >";
        let ids = t.encode(text);
        assert!(ids.iter().all(|&id| id >= n_specials), "{ids:?}");
        assert_eq!(t.decode(&ids), text);
        // The same text without the markers costs exactly the markers' own tokens.
        let plain = t.encode("2+2?");
        let marker: usize = ["<|user|>"].iter().map(|m| t.encode(m).len()).sum();
        assert_eq!(t.encode("<|user|>2+2?").len(), marker + plain.len());
    }
}

#[test]
fn too_small_vocab_is_refused() {
    let err = Tokenizer::train(corpus().iter(), 100)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("at least 262"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Any UTF-8 string round-trips through encode/decode.
    #[test]
    fn round_trips_any_utf8(s in "\\PC*|[\\u{0}-\\u{10FFFF}]{0,40}|(<\\|(system|user|assistant|end)\\|>|</?think>|[a-z0-9 <>|/]){0,30}") {
        static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        let t = TOK.get_or_init(|| Tokenizer::train(corpus().iter(), 400).unwrap());
        let ids = t.encode(&s);
        prop_assert!(ids.iter().all(|&id| id >= SPECIAL_TOKENS.len() as u32));
        prop_assert_eq!(t.decode(&ids), s);
    }
}

/// Streaming a text id by id gives exactly its full decoding: byte-level BPE with characters
/// split across ids, and a SentencePiece-style decoder whose leading-space strip makes a
/// token's text depend on the ids before it (decoded one id at a time, "▁Hello" "▁world"
/// would lose the space between them).
#[test]
fn text_stream_equals_the_full_decoding() {
    let tok = Tokenizer::train(corpus().iter(), 400).unwrap();
    for text in ["plain words here", "日本 🙂 éü mixed", "🙂🙂🙂"] {
        let ids = tok.encode(text);
        let mut s = tokenizer::TextStream::new();
        let mut got = String::new();
        for &id in &ids {
            let piece = s.push(&tok, id);
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: a split character");
            got += &piece;
        }
        got += &s.finish(&tok);
        assert_eq!(got, tok.decode(&ids), "{text:?}");
    }
    let spm = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":null,"post_processor":null,
        "decoder":{"type":"Sequence","decoders":[
            {"type":"Replace","pattern":{"String":"▁"},"content":" "},
            {"type":"Fuse"},
            {"type":"Strip","content":" ","start":1,"stop":0}]},
        "model":{"type":"WordLevel","vocab":{"▁Hello":0,"▁world":1,"!":2,"<unk>":3},"unk_token":"<unk>"}}"#;
    // invalid bytes (an undertrained model's output): emitted as they decode after 4 ids,
    // and the stream goes on afresh, nothing after them held back or lost
    let byte = |b: u8| {
        (0..tok.vocab_size() as u32)
            .find(|&i| tok.token_bytes(i) == [b])
            .expect("a byte-level vocabulary has every byte")
    };
    let mut ids: Vec<u32> = [0x80, 0x80, 0x80, 0xF0, 0x9F, 0x99, 0x82]
        .iter()
        .map(|&b| byte(b))
        .collect();
    let tail = tok.encode("after them");
    ids.extend(&tail);
    let mut s = tokenizer::TextStream::new();
    let mut got = String::new();
    for (i, &id) in ids.iter().enumerate() {
        got += &s.push(&tok, id);
        if i == 3 {
            assert_eq!(got, "\u{FFFD}".repeat(4), "forced out after 4 ids");
        }
    }
    assert!(got.ends_with("after them"), "{got:?}");
    assert_eq!(s.finish(&tok), "");
    let tok = Tokenizer::from_bytes(std::path::Path::new("spm.json"), spm.as_bytes()).unwrap();
    let ids = [0, 1, 2, 1];
    assert_eq!(tok.decode(&ids), "Hello world! world");
    let one_by_one: String = ids.iter().map(|&i| tok.decode(&[i])).collect();
    assert_eq!(
        one_by_one, "Helloworld!world",
        "the decoder strips each lone token"
    );
    let mut s = tokenizer::TextStream::new();
    let got: String = ids.iter().map(|&i| s.push(&tok, i)).collect();
    assert_eq!(got + &s.finish(&tok), "Hello world! world");
}

/// A tokenizer.json that cannot encode every text (its unknown token is not in its
/// vocabulary) is refused when loaded, not found out by a chat's first unusual character
/// (`encode` would panic there); the same file with its unknown token present loads.
#[test]
fn a_tokenizer_that_cannot_encode_any_text_is_refused() {
    let json = |unk: &str| {
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,"model":{{"type":"WordLevel","vocab":{{"hello":0,"[UNK]":1}},"unk_token":"{unk}"}}}}"#
        )
    };
    let p = std::path::Path::new("tokenizer.json");
    let e = Tokenizer::from_bytes(p, json("[MISSING]").as_bytes())
        .expect_err("refused")
        .to_string();
    assert!(e.contains("cannot encode arbitrary text"), "{e}");
    let t = Tokenizer::from_bytes(p, json("[UNK]").as_bytes()).unwrap();
    assert_eq!(t.encode("hello world"), vec![0, 1]);
}

/// A SentencePiece-style vocabulary (Llama 2, Mistral: `▁` for a space, `<0x0A>` for a
/// byte) spells a token's bytes its own way, not through GPT-2's byte-level table: logprobs'
/// `bytes` and `token` fields are the text the token stands for.
#[test]
fn sentencepiece_tokens_have_their_own_bytes() {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), b.into());
    }
    for (i, p) in ["\u{2581}the", "\u{e9}", "\u{2581}", "t", "h", "e"]
        .iter()
        .enumerate()
    {
        vocab.insert(p.to_string(), (256 + i as u32).into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
        "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    });
    let t =
        Tokenizer::from_bytes(std::path::Path::new("t.json"), json.to_string().as_bytes()).unwrap();
    assert_eq!(t.token_bytes(0x0A), b"\n");
    assert_eq!(t.token_bytes(256), b" the");
    assert_eq!(t.token_bytes(257), "\u{e9}".as_bytes());
    assert_eq!(t.token_bytes(258), b" ");
}
