//! Chat examples (supervised fine-tuning data and distillation traces): the JSONL record, the
//! token rendering of the chat format, and packing into loss-masked training rows.
//!
//! Chat format (DESIGN.md): `<|user|>` prompt `<|assistant|>` `<think>` reasoning `</think>`
//! answer `<|end|>`. Each piece is encoded on its own, so the prompt tokens a model sees at
//! inference are exactly those it was trained on. The loss covers the assistant's tokens
//! only (from `<think>` to `<|end|>`); prompts are context.
//!
//! Rows: examples are packed whole, in order, into rows of `seq_len + 1` tokens; a row is
//! closed when the next example does not fit, and its tail is padding (`<|end|>` inputs with
//! ignored targets). Training batches draw rows in a seeded order that depends only on
//! (seed, batch index), like the pretraining [`crate::loader::Loader`].

use crate::loader::IGNORE_INDEX;
use crate::{io_err, Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizer::Tokenizer;

/// One chat example: a line of `train.jsonl`/`val.jsonl` in a task data dir, or of a
/// `traces.jsonl` written by `moelab distill generate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    #[serde(default)]
    pub reasoning: String,
    pub answer: String,
    /// Whether the answer passed the task's verifier (ground-truth data: always true).
    #[serde(default = "yes")]
    pub verified: bool,
    /// Who wrote it: a teacher run dir, or "ground-truth".
    #[serde(default)]
    pub teacher: String,
    #[serde(default)]
    pub task: String,
    #[serde(default)]
    pub difficulty: u32,
}

fn yes() -> bool {
    true
}

/// Lines skipped as malformed: (1-based line number, why).
pub type Malformed = Vec<(usize, String)>;

/// Examples of a JSONL file, and the lines that were skipped as malformed. Blank lines are
/// ignored.
pub fn read_jsonl(path: &Path) -> Result<(Vec<Example>, Malformed)> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    Ok(parse_jsonl(&bytes))
}

/// Examples of the bytes of a JSONL file, and the lines skipped as malformed.
pub fn parse_jsonl(bytes: &[u8]) -> (Vec<Example>, Malformed) {
    let (mut ok, mut bad) = (vec![], vec![]);
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let Ok(line) = std::str::from_utf8(line) else {
            bad.push((i + 1, "not valid UTF-8".to_string()));
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Example>(line) {
            Ok(e) => ok.push(e),
            Err(e) => bad.push((i + 1, crate::excerpt(&e.to_string(), 200))),
        }
    }
    (ok, bad)
}

/// Writes examples as JSONL, atomically.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    let mut s = String::new();
    for e in examples {
        s.push_str(&serde_json::to_string(e).expect("examples serialise"));
        s.push('\n');
    }
    crate::write_atomic(path, s.as_bytes())
}

/// The ids of the chat special tokens.
#[derive(Clone, Copy, Debug)]
pub struct ChatIds {
    pub system: u32,
    pub user: u32,
    pub assistant: u32,
    pub end: u32,
    pub think: u32,
    pub end_think: u32,
}

impl ChatIds {
    pub fn of(tok: &Tokenizer) -> ChatIds {
        let id = |s| {
            tok.special(s)
                .expect("moelab tokenizers have the chat tokens")
        };
        ChatIds {
            system: id("<|system|>"),
            user: id("<|user|>"),
            assistant: id("<|assistant|>"),
            end: id("<|end|>"),
            think: id("<think>"),
            end_think: id("</think>"),
        }
    }
}

/// The prompt part of a chat: `<|user|>` prompt `<|assistant|>` (what generation starts from).
pub fn prompt_ids(tok: &Tokenizer, prompt: &str) -> Vec<u32> {
    let ids = ChatIds::of(tok);
    let mut v = vec![ids.user];
    v.extend(tok.encode(prompt));
    v.push(ids.assistant);
    v
}

/// A whole example as tokens, and the index of its first assistant token (`<think>`). An
/// empty `reasoning` gives an empty think block (answer-only data).
pub fn render(tok: &Tokenizer, ex: &Example) -> (Vec<u32>, usize) {
    let ids = ChatIds::of(tok);
    let mut v = prompt_ids(tok, &ex.prompt);
    let start = v.len();
    v.push(ids.think);
    v.extend(tok.encode(&ex.reasoning));
    v.push(ids.end_think);
    v.extend(tok.encode(&ex.answer));
    v.push(ids.end);
    (v, start)
}

/// An assistant turn split at the chat tokens: (reasoning, answer, finished). `finished` is
/// false when generation stopped before `<|end|>`.
pub fn parse_assistant(tok: &Tokenizer, ids: &[u32]) -> (String, String, bool) {
    let c = ChatIds::of(tok);
    let end = ids.iter().position(|&t| t == c.end);
    let body = &ids[..end.unwrap_or(ids.len())];
    let body = body.strip_prefix(&[c.think]).unwrap_or(body);
    let (r, a) = match body.iter().position(|&t| t == c.end_think) {
        Some(i) => (&body[..i], &body[i + 1..]),
        None => (body, &[][..]),
    };
    (tok.decode(r), tok.decode(a), end.is_some())
}

/// Loss-masked rows of `t + 1` tokens: `x` = row[..t], `y` = row[1..] with IGNORE_INDEX on
/// non-assistant and padding positions.
pub struct Packed {
    pub t: usize,
    pub x: Vec<u32>,
    pub y: Vec<u32>,
    /// Examples longer than a row, left out.
    pub too_long: usize,
    /// Assistant (loss-bearing) tokens over all rows.
    pub targets: usize,
}

impl Packed {
    pub fn rows(&self) -> usize {
        self.x.len() / self.t
    }

    /// Packs rendered examples (tokens, first assistant index) into rows of `t` positions.
    pub fn new(examples: &[(Vec<u32>, usize)], t: usize, pad: u32) -> Packed {
        let mut p = Packed {
            t,
            x: vec![],
            y: vec![],
            too_long: 0,
            targets: 0,
        };
        let mut row: Vec<(u32, u32)> = Vec::with_capacity(t); // (input, target)
        let flush = |row: &mut Vec<(u32, u32)>, p: &mut Packed| {
            if row.is_empty() {
                return;
            }
            row.resize(t, (pad, IGNORE_INDEX));
            p.x.extend(row.iter().map(|r| r.0));
            p.y.extend(row.iter().map(|r| r.1));
            row.clear();
        };
        for (ids, start) in examples {
            // an example of n tokens takes n - 1 positions (its last token is only a target)
            let need = ids.len() - 1;
            if need > t {
                p.too_long += 1;
                continue;
            }
            if row.len() + need > t {
                flush(&mut row, &mut p);
            }
            for i in 0..need {
                let target = if i + 1 >= *start {
                    p.targets += 1;
                    ids[i + 1]
                } else {
                    IGNORE_INDEX
                };
                row.push((ids[i], target));
            }
        }
        flush(&mut row, &mut p);
        p
    }
}

/// Training batches over packed rows: batch k holds rows k*B .. k*B+B of an endless stream
/// that visits every row once per epoch, in an order shuffled by (seed, epoch).
pub struct ChatLoader<'a> {
    packed: &'a Packed,
    b: usize,
    seed: u64,
}

impl<'a> ChatLoader<'a> {
    pub fn new(packed: &'a Packed, b: usize, seed: u64) -> Result<Self> {
        if packed.rows() == 0 {
            return Err(Error::Other(
                "no training examples fit in a row of seq_len tokens".into(),
            ));
        }
        Ok(ChatLoader { packed, b, seed })
    }

    fn order(&self, epoch: u64) -> Vec<u32> {
        let mut o: Vec<u32> = (0..self.packed.rows() as u32).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch);
        o.shuffle(&mut rng);
        o
    }

    pub fn batch(&self, k: u64, x: &mut [u32], y: &mut [u32]) {
        let (n, t) = (self.packed.rows() as u64, self.packed.t);
        let mut cached: Option<(u64, Vec<u32>)> = None;
        for i in 0..self.b {
            let g = k * self.b as u64 + i as u64;
            let epoch = g / n;
            if cached.as_ref().is_none_or(|c| c.0 != epoch) {
                cached = Some((epoch, self.order(epoch)));
            }
            let r = cached.as_ref().unwrap().1[(g % n) as usize] as usize;
            x[i * t..(i + 1) * t].copy_from_slice(&self.packed.x[r * t..(r + 1) * t]);
            y[i * t..(i + 1) * t].copy_from_slice(&self.packed.y[r * t..(r + 1) * t]);
        }
    }

    /// Number of evaluation batches covering every row once.
    pub fn eval_batches(&self) -> usize {
        self.packed.rows().div_ceil(self.b)
    }

    /// Evaluation batch `i`: rows in order, missing rows fully ignored.
    pub fn eval_batch(&self, i: usize, x: &mut [u32], y: &mut [u32]) {
        let t = self.packed.t;
        x.fill(0);
        y.fill(IGNORE_INDEX);
        for r in 0..self.b {
            let row = i * self.b + r;
            if row >= self.packed.rows() {
                break;
            }
            x[r * t..(r + 1) * t].copy_from_slice(&self.packed.x[row * t..(row + 1) * t]);
            y[r * t..(r + 1) * t].copy_from_slice(&self.packed.y[row * t..(row + 1) * t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_masks_prompts_and_padding() {
        // two examples of 5 tokens (assistant from index 2) and one of 9 in rows of 8
        let ex = vec![
            (vec![1, 10, 2, 11, 3], 2),
            (vec![1, 20, 2, 21, 3], 2),
            (vec![1, 30, 31, 32, 2, 33, 34, 35, 3], 4),
        ];
        let p = Packed::new(&ex, 8, 3);
        assert_eq!(p.rows(), 2);
        assert_eq!(p.x[..8], [1, 10, 2, 11, 1, 20, 2, 21]);
        let i = IGNORE_INDEX;
        assert_eq!(p.y[..8], [i, 2, 11, 3, i, 2, 21, 3]);
        assert_eq!(p.x[8..], [1, 30, 31, 32, 2, 33, 34, 35]);
        assert_eq!(p.y[8..], [i, i, i, 2, 33, 34, 35, 3]);
        assert_eq!((p.too_long, p.targets), (0, 11));
        let long = Packed::new(&[(vec![1; 12], 2)], 8, 3);
        assert_eq!((long.rows(), long.too_long), (0, 1));
    }

    #[test]
    fn malformed_lines_are_skipped_and_counted() {
        let path = std::env::temp_dir().join(format!("moelab-chat-{}.jsonl", std::process::id()));
        let good = r#"{"prompt":"What is 1 + 2?","reasoning":"r","answer":"3"}"#;
        let mut bytes = format!("{good}\n\n{{\"prompt\": 3\n").into_bytes();
        bytes.extend_from_slice(b"{\"prompt\":\"\xff\",\"answer\":\"1\"}\n");
        bytes.extend_from_slice(good.as_bytes());
        std::fs::write(&path, bytes).unwrap();
        let (ok, bad) = read_jsonl(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(ok.len(), 2);
        assert!(ok[0].verified, "verified defaults to true");
        let lines: Vec<usize> = bad.iter().map(|b| b.0).collect();
        assert_eq!(lines, [3, 4]);
        assert_eq!(bad[1].1, "not valid UTF-8");
    }

    #[test]
    fn batches_visit_every_row_once_per_epoch() {
        let ex: Vec<(Vec<u32>, usize)> = (0..10).map(|i| (vec![i, i, i, i, i], 1)).collect();
        let p = Packed::new(&ex, 4, 0);
        let l = ChatLoader::new(&p, 3, 5).unwrap();
        let (mut x, mut y) = (vec![0; 12], vec![0; 12]);
        let mut seen = vec![];
        for k in 0..10 {
            l.batch(k, &mut x, &mut y);
            seen.extend(x.chunks(4).map(|r| r[0]));
        }
        for epoch in seen.chunks(10).take(3) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, (0..10).collect::<Vec<u32>>());
        }
        let (mut x2, mut y2) = (vec![0; 12], vec![0; 12]);
        l.batch(4, &mut x, &mut y);
        l.batch(4, &mut x2, &mut y2);
        assert_eq!((x, y), (x2, y2));
    }
}
