//! Passkey retrieval: a random number hidden at a chosen depth in filler text, asked for at
//! the end (Mohtashami & Jaggi's test, used by the YaRN paper to show that an extended model
//! uses its whole context).
//!
//! A document is built from token pieces, never by re-tokenizing the joined text, so its
//! length in tokens is exact and the same pieces serve training (`moelab prepare --passkey`)
//! and evaluation (`moelab eval --task passkey`):
//!
//! ```text
//! INTRO  FILLER × a  NEEDLE(key)  FILLER × b  QUESTION  " key"  ".\n"  <|end|>
//! ```
//!
//! `depth` is the share of the filler before the needle (0: right after the intro, 1: right
//! before the question). Keys are held out by construction: a key's split is a hash of the key
//! ([`key_split`]), so no test key is ever trained on, whatever the seed.

use crate::tasks::Split;
use rand::Rng;
use tokenizer::Tokenizer;

pub const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n";
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n";
pub const QUESTION: &str = "What is the pass key? The pass key is";

/// Keys are five-digit numbers.
pub const KEYS: std::ops::RangeInclusive<u32> = 10_000..=99_999;

/// The sentence that hides `key`.
pub fn needle(key: u32) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key.\n")
}

/// The split `key` belongs to (80% train, 10% dev, 10% test), by the hash [`Split::of`] gives
/// its text.
pub fn key_split(key: u32) -> Split {
    Split::of(&format!("pass key {key}"))
}

/// A key of `split`, drawn uniformly.
pub fn draw_key(rng: &mut impl Rng, split: Split) -> u32 {
    loop {
        let k = rng.gen_range(KEYS);
        if key_split(k) == split {
            return k;
        }
    }
}

/// One passkey document as tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// Everything up to and including the question.
    pub prompt: Vec<u32>,
    /// The answer a greedy model must continue with: `" 12345"`.
    pub answer: Vec<u32>,
    /// What ends a training document: `".\n"` and the end-of-text id.
    pub tail: Vec<u32>,
    /// Filler pieces before and after the needle.
    pub before: usize,
    pub after: usize,
}

impl Doc {
    /// Prompt, answer and tail: a training document.
    pub fn tokens(&self) -> Vec<u32> {
        [&self.prompt[..], &self.answer, &self.tail].concat()
    }
}

/// The fixed pieces of a passkey document, tokenized once.
pub struct Pieces<'a> {
    tok: &'a Tokenizer,
    intro: Vec<u32>,
    filler: Vec<u32>,
    question: Vec<u32>,
    tail: Vec<u32>,
}

impl<'a> Pieces<'a> {
    /// `end`: the id that ends a document (`<|end|>` for moelab's tokenizers).
    pub fn new(tok: &'a Tokenizer, end: u32) -> Pieces<'a> {
        let mut tail = tok.encode(".\n");
        tail.push(end);
        Pieces {
            intro: tok.encode(INTRO),
            filler: tok.encode(FILLER),
            question: tok.encode(QUESTION),
            tail,
            tok,
        }
    }

    /// Tokens of one filler piece (the granularity of lengths and depths).
    pub fn filler_len(&self) -> usize {
        self.filler.len()
    }

    /// Prompt + answer tokens of a document with `fillers` filler pieces (keys all tokenize
    /// to the same length when digits are split; otherwise this is for `key`).
    fn len_with(&self, fillers: usize, key: u32) -> usize {
        self.intro.len()
            + fillers * self.filler.len()
            + self.tok.encode(&needle(key)).len()
            + self.question.len()
            + self.tok.encode(&format!(" {key}")).len()
    }

    /// The document hiding `key` at `depth` (0..=1) whose prompt and answer take at most
    /// `context` tokens (as many filler pieces as fit). None when not even one piece of
    /// filler fits.
    pub fn build(&self, key: u32, depth: f64, context: usize) -> Option<Doc> {
        let fixed = self.len_with(0, key);
        if context < fixed + self.filler.len() {
            return None;
        }
        let fillers = (context - fixed) / self.filler.len();
        let before = ((depth.clamp(0.0, 1.0) * fillers as f64).round() as usize).min(fillers);
        let after = fillers - before;
        let mut prompt = Vec::with_capacity(context);
        prompt.extend_from_slice(&self.intro);
        for _ in 0..before {
            prompt.extend_from_slice(&self.filler);
        }
        prompt.extend(self.tok.encode(&needle(key)));
        for _ in 0..after {
            prompt.extend_from_slice(&self.filler);
        }
        prompt.extend_from_slice(&self.question);
        Some(Doc {
            prompt,
            answer: self.tok.encode(&format!(" {key}")),
            tail: self.tail.clone(),
            before,
            after,
        })
    }

    /// The shortest context a document can have (one filler piece).
    pub fn min_context(&self) -> usize {
        self.len_with(1, *KEYS.start())
    }
}

/// `n` training documents of `split`'s keys that fit a row of `row` positions (at most
/// `row + 1` tokens, tail included): prompt-and-answer lengths uniform from
/// [`Pieces::min_context`] up, depths uniform in 0..=1.
pub fn generate(
    pieces: &Pieces,
    n: usize,
    row: usize,
    split: Split,
    rng: &mut impl Rng,
) -> Vec<Doc> {
    let lo = pieces.min_context();
    let hi = (row + 1).saturating_sub(pieces.tail.len()).max(lo);
    (0..n)
        .map(|_| {
            let key = draw_key(rng, split);
            let len = rng.gen_range(lo..=hi);
            let depth: f64 = rng.gen_range(0.0..=1.0);
            pieces.build(key, depth, len).expect("len >= min_context")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn tok() -> Tokenizer {
        let texts = (0..50).map(|i| {
            format!(
                "{INTRO}{FILLER}{}{FILLER}{QUESTION} {}.\n",
                needle(10_000 + i * 1789),
                10_000 + i * 1789
            )
        });
        Tokenizer::train_with(texts, 400, true).unwrap()
    }

    #[test]
    fn documents_fit_their_context_and_place_the_needle_at_its_depth() {
        let t = tok();
        let end = t.special("<|end|>").unwrap();
        let p = Pieces::new(&t, end);
        for (context, depth) in [(200, 0.0), (200, 1.0), (513, 0.5), (4096, 0.25)] {
            let d = p.build(54_321, depth, context).unwrap();
            let len = d.prompt.len() + d.answer.len();
            assert!(
                len <= context && len + p.filler_len() > context,
                "{len} vs {context}"
            );
            let text = t.decode(&d.prompt);
            assert!(
                text.starts_with(INTRO) && text.ends_with(QUESTION),
                "{text}"
            );
            // the share of the filler text before the needle is the depth
            let at = text.find(&needle(54_321)).unwrap() - INTRO.len();
            let filler = text.len() - INTRO.len() - needle(54_321).len() - QUESTION.len();
            assert_eq!(at % FILLER.len(), 0);
            let fillers = filler / FILLER.len();
            assert_eq!(
                (d.before, d.after),
                (at / FILLER.len(), fillers - at / FILLER.len())
            );
            let share = at as f64 / filler as f64;
            assert!(
                (share - depth).abs() <= 0.5 / fillers as f64 + 1e-9,
                "{share} for {depth}"
            );
            assert_eq!(t.decode(&d.answer), " 54321");
            assert_eq!(*d.tail.last().unwrap(), end);
        }
        assert!(p.build(54_321, 0.5, p.min_context() - 1).is_none());
        assert!(p.build(54_321, 0.5, p.min_context()).is_some());
    }

    #[test]
    fn keys_of_a_split_never_appear_in_another() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for split in Split::ALL {
            for _ in 0..200 {
                assert_eq!(key_split(draw_key(&mut rng, split)), split);
            }
        }
        let test = KEYS.filter(|&k| key_split(k) == Split::Test).count() as f64;
        assert!((test / KEYS.count() as f64 - 0.1).abs() < 0.01);
    }

    #[test]
    fn generated_documents_vary_in_length_and_depth() {
        let t = tok();
        let p = Pieces::new(&t, t.special("<|end|>").unwrap());
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let docs = generate(&p, 64, 600, Split::Train, &mut rng);
        let lens: Vec<usize> = docs.iter().map(|d| d.tokens().len()).collect();
        assert!(lens.iter().all(|&l| l <= 601));
        assert!(lens.iter().min().unwrap() + 200 < *lens.iter().max().unwrap());
        assert!(docs.iter().any(|d| d.before == 0) || docs.iter().any(|d| d.before > d.after));
        assert!(docs.iter().any(|d| d.after > d.before));
    }
}
