//! Passkey retrieval accuracy by context length and needle depth (`moelab eval --task
//! passkey`): the long-context check of the YaRN paper.
//!
//! Each document ([`data::passkey`]) is scored by one batched forward pass: the prompt and
//! the answer's tokens but its last go in, and the answer counts as retrieved when the
//! argmax at every answer position is the answer's next token, which is exactly what greedy
//! decoding would produce. One forward per batch of rows instead of a decode step per token
//! keeps a 4,096-token evaluation grid to a few minutes.

use crate::tasks::wilson;
use data::loader::IGNORE_INDEX;
use data::passkey::{draw_key, Pieces};
use data::tasks::Split;
use model::{Layout, Model, ModelConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizer::Tokenizer;

/// Counts of one (context, depth) cell.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub context: usize,
    pub depth: f64,
    pub n: usize,
    pub correct: usize,
}

/// Accuracy over a grid of context lengths and depths.
#[derive(Clone, Debug)]
pub struct Grid {
    pub contexts: Vec<usize>,
    pub depths: Vec<f64>,
    /// Row-major: `cells[d * contexts.len() + c]`.
    pub cells: Vec<Cell>,
    /// Tokens through the model per second of wall clock.
    pub tokens_per_s: f64,
}

impl Grid {
    pub fn cell(&self, d: usize, c: usize) -> &Cell {
        &self.cells[d * self.contexts.len() + c]
    }

    /// (correct, n) over every depth at context `c`.
    pub fn by_context(&self, c: usize) -> (usize, usize) {
        (0..self.depths.len())
            .map(|d| self.cell(d, c))
            .fold((0, 0), |(k, n), x| (k + x.correct, n + x.n))
    }

    /// The table `moelab eval --task passkey` prints: accuracy per depth (rows) and context
    /// (columns), then each context's total with its 95% Wilson interval.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = write!(s, "{:>8}", "depth");
        for c in &self.contexts {
            let _ = write!(s, " {c:>7}");
        }
        s.push('\n');
        for (d, depth) in self.depths.iter().enumerate() {
            let _ = write!(s, "{:>7.0}%", depth * 100.0);
            for c in 0..self.contexts.len() {
                let x = self.cell(d, c);
                let _ = write!(s, " {:>6.0}%", 100.0 * x.correct as f64 / x.n as f64);
            }
            s.push('\n');
        }
        let _ = write!(s, "{:>8}", "all");
        for c in 0..self.contexts.len() {
            let (k, n) = self.by_context(c);
            let _ = write!(s, " {:>6.1}%", 100.0 * k as f64 / n as f64);
        }
        s.push_str("\n\n");
        for (c, ctx) in self.contexts.iter().enumerate() {
            let (k, n) = self.by_context(c);
            let (lo, hi) = wilson(k, n);
            let _ = writeln!(
                s,
                "context {ctx:>6}: {k}/{n} retrieved, {:.1}% (95% CI {:.1}-{:.1}%)",
                100.0 * k as f64 / n as f64,
                100.0 * lo,
                100.0 * hi
            );
        }
        s
    }
}

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct Spec {
    pub contexts: Vec<usize>,
    pub depths: Vec<f64>,
    /// Keys per cell.
    pub n: usize,
    pub seed: u64,
    pub split: Split,
    /// Rows per forward pass.
    pub batch: usize,
}

/// Evaluates the model `cfg`/`params` (moelab tokenizer `tok`, documents ended by `end`) on
/// `spec`'s grid. Contexts past the model's `max_seq_len` are evaluated as they are (a
/// model without RoPE scaling is expected to fail there). `tick(rows done, tokens)` reports
/// progress.
pub fn evaluate(
    cfg: &ModelConfig,
    params: &[f32],
    tok: &Tokenizer,
    end: u32,
    spec: &Spec,
    tick: &mut dyn FnMut(usize, usize),
) -> Result<Grid, String> {
    let pieces = Pieces::new(tok, end);
    // an imported model's BOS (none for moelab's tokenizers) starts every document
    let prefix = tok.text_prefix();
    let least = pieces.min_context() + prefix.len();
    if let Some(&c) = spec.contexts.iter().find(|&&c| c < least) {
        return Err(format!(
            "--context {c} is too short for a passkey document (at least {least} tokens with this tokenizer)"
        ));
    }
    let start = std::time::Instant::now();
    let (mut rows_done, mut tokens) = (0usize, 0usize);
    let mut cells = vec![];
    for (ci, &context) in spec.contexts.iter().enumerate() {
        // one document per (depth, trial); keys from their own stream per cell
        let mut docs = vec![];
        for (di, &depth) in spec.depths.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
            rng.set_stream(((context as u64) << 16) | di as u64);
            for _ in 0..spec.n {
                let key = draw_key(&mut rng, spec.split);
                let mut d = pieces
                    .build(key, depth, context - prefix.len(), &mut rng)
                    .expect("context checked");
                d.prompt.splice(0..0, prefix.iter().copied());
                docs.push((di, d));
            }
        }
        let t = docs
            .iter()
            .map(|(_, d)| d.prompt.len() + d.answer.len() - 1)
            .max()
            .expect("at least one document");
        let mut c = cfg.clone();
        c.max_seq_len = c.max_seq_len.max(t);
        let b = spec.batch.clamp(1, docs.len());
        let mut m = Model::with_params(&c, Layout::new(&c), params.to_vec(), b, t);
        let mut correct = vec![0usize; spec.depths.len()];
        for chunk in docs.chunks(b) {
            let pairs: Vec<(&[u32], &[u32])> = chunk
                .iter()
                .map(|(_, d)| (&d.prompt[..], &d.answer[..]))
                .collect();
            for ((di, d), ok) in chunk.iter().zip(retrieved(&mut m, end, &pairs)) {
                correct[*di] += ok as usize;
                tokens += d.prompt.len() + d.answer.len() - 1;
            }
            rows_done += chunk.len();
            tick(rows_done, tokens);
        }
        for (di, &depth) in spec.depths.iter().enumerate() {
            cells.push((
                di,
                ci,
                Cell {
                    context,
                    depth,
                    n: spec.n,
                    correct: correct[di],
                },
            ));
        }
    }
    cells.sort_by_key(|(d, c, _)| (*d, *c));
    Ok(Grid {
        contexts: spec.contexts.clone(),
        depths: spec.depths.clone(),
        cells: cells.into_iter().map(|x| x.2).collect(),
        tokens_per_s: tokens as f64 / start.elapsed().as_secs_f64(),
    })
}

/// Whether greedy decoding continues each `(prompt, answer)` with `answer`, by one forward
/// pass per batch of `m`'s rows (at most B pairs, each prompt + answer at most T + 1
/// tokens; short rows are padded with `pad` after their end, which causal attention never
/// sees).
pub fn retrieved(m: &mut Model, pad: u32, pairs: &[(&[u32], &[u32])]) -> Vec<bool> {
    let (b, t) = m.batch_shape();
    assert!(pairs.len() <= b, "{} pairs for {b} rows", pairs.len());
    let mut x = vec![pad; b * t];
    let mut y = vec![IGNORE_INDEX; b * t];
    for (r, (prompt, answer)) in pairs.iter().enumerate() {
        assert!(!prompt.is_empty() && !answer.is_empty());
        assert!(
            prompt.len() + answer.len() - 1 <= t,
            "a row holds {t} tokens"
        );
        let inputs = prompt.iter().chain(&answer[..answer.len() - 1]);
        for (slot, &id) in x[r * t..(r + 1) * t].iter_mut().zip(inputs) {
            *slot = id;
        }
        let p = r * t + prompt.len() - 1;
        y[p..p + answer.len()].copy_from_slice(answer);
    }
    m.forward(&x, &y);
    let v = m.logits().len() / (b * t);
    let logits = m.logits();
    pairs
        .iter()
        .enumerate()
        .map(|(r, (prompt, answer))| {
            let p = r * t + prompt.len() - 1;
            answer.iter().enumerate().all(|(j, &want)| {
                let at = (p + j) * v;
                argmax(&logits[at..at + v]) == want as usize
            })
        })
        .collect()
}

/// Index of the largest value (the first of equal ones): greedy decoding's choice.
fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched check agrees with greedy decoding through the KV cache: a random model's
    /// own greedy continuation of a prompt counts as retrieved, one changed token does not.
    #[test]
    fn retrieved_agrees_with_greedy_decoding() {
        let mut cfg = model::Config::from_toml(include_str!("../../../configs/tiny.toml"))
            .unwrap()
            .model;
        cfg.max_seq_len = 40;
        let lay = Layout::new(&cfg);
        let mut params = vec![0.0; lay.total];
        lay.init(&mut params, 3);
        let v = cfg.vocab_size as u32;
        let greedy = |prompt: &[u32], k: usize| -> Vec<u32> {
            let mut d = model::decode::Decoder::new(&cfg);
            let mut logits = vec![];
            for &id in prompt {
                logits = d.step(&params, id).to_vec();
            }
            let mut out = vec![];
            for _ in 0..k {
                let next = argmax(&logits) as u32;
                out.push(next);
                logits = d.step(&params, next).to_vec();
            }
            out
        };
        let prompts: Vec<Vec<u32>> = (0..3u32)
            .map(|i| (0..20 + 7 * i).map(|j| (j * 31 + i * 7) % v).collect())
            .collect();
        let answers: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(p, 5)).collect();
        let mut m = Model::with_params(&cfg, lay.clone(), params.clone(), 4, 40);
        let pairs: Vec<(&[u32], &[u32])> = prompts
            .iter()
            .zip(&answers)
            .map(|(p, a)| (&p[..], &a[..]))
            .collect();
        assert_eq!(retrieved(&mut m, 0, &pairs), vec![true; 3]);
        for j in [0, 4] {
            let mut wrong = answers[1].clone();
            wrong[j] = (wrong[j] + 1) % v;
            let pairs = [(&prompts[1][..], &wrong[..]), pairs[2]];
            assert_eq!(retrieved(&mut m, 0, &pairs), vec![false, true], "token {j}");
        }
    }

    #[test]
    fn table_lists_every_cell_and_each_contexts_interval() {
        let g = Grid {
            contexts: vec![256, 512],
            depths: vec![0.0, 1.0],
            cells: vec![
                Cell {
                    context: 256,
                    depth: 0.0,
                    n: 4,
                    correct: 4,
                },
                Cell {
                    context: 512,
                    depth: 0.0,
                    n: 4,
                    correct: 1,
                },
                Cell {
                    context: 256,
                    depth: 1.0,
                    n: 4,
                    correct: 3,
                },
                Cell {
                    context: 512,
                    depth: 1.0,
                    n: 4,
                    correct: 0,
                },
            ],
            tokens_per_s: 1.0,
        };
        assert_eq!(g.by_context(0), (7, 8));
        assert_eq!(g.by_context(1), (1, 8));
        let t = g.table();
        assert!(t.contains("      0%    100%     25%"), "{t}");
        assert!(t.contains("context    256: 7/8 retrieved, 87.5%"), "{t}");
    }
}
