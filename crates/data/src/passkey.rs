//! Passkey retrieval: a random number hidden at a chosen depth in filler text, asked for at
//! the end (Mohtashami & Jaggi's test, used by the YaRN paper to show that an extended model
//! uses its whole context).
//!
//! A document is built from token pieces, never by re-tokenizing the joined text, so its
//! length in tokens is exact and the same pieces serve training (`moelab prepare --passkey`)
//! and evaluation (`moelab eval --task passkey`):
//!
//! ```text
//! INTRO  sentence × a  NEEDLE(key)  sentence × b  QUESTION  " key"  ".\n"  <|end|>
//! ```
//!
//! The haystack is [`SENTENCES`] drawn at random, not the original's one sentence group
//! repeated: a strictly periodic filler lets a small model find the key by position
//! patterns that alias with RoPE (measured: a model trained that way retrieved at some
//! distances and failed at others in between), where drawn sentences leave only the
//! content to match.
//!
//! `depth` is the share of the haystack's tokens before the needle (0: right after the intro,
//! 1: right before the question). Keys are held out by construction: a key's split is a hash
//! of the key ([`key_split`]), so no test key is ever trained on, whatever the seed.

use crate::tasks::Split;
use rand::Rng;
use tokenizer::Tokenizer;

pub const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n";
/// The haystack's sentences (the original filler's five and more of their kind). Each starts
/// with its space, so pieces join at word boundaries and a document's tokens are what the
/// tokenizer gives its text (what `moelab sample` or `chat` would feed).
pub const SENTENCES: [&str; 12] = [
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
    " The sea is deep.",
    " The night is dark and still.",
    " Birds fly south in winter.",
    " The river runs to the sea.",
    " Snow falls on the hills.",
    " The old road winds through the woods.",
    " A cold wind blows from the north.",
];
pub const QUESTION: &str = "\nWhat is the pass key? The pass key is";

/// Keys are five-digit numbers.
pub const KEYS: std::ops::RangeInclusive<u32> = 10_000..=99_999;

/// The sentence that hides `key`.
pub fn needle(key: u32) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key.")
}

/// Text of every piece, for training a tokenizer that knows them all.
pub fn sample_text(key: u32) -> String {
    format!(
        "{INTRO}{}{}{QUESTION} {key}.\n",
        SENTENCES.concat(),
        needle(key)
    )
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
    /// Haystack tokens before and after the needle.
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
    sentences: Vec<Vec<u32>>,
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
            sentences: SENTENCES.iter().map(|s| tok.encode(s)).collect(),
            question: tok.encode(QUESTION),
            tail,
            tok,
        }
    }

    /// Tokens after the answer in a training document (`".\n"` and the end id).
    pub fn tail_len(&self) -> usize {
        self.tail.len()
    }

    /// Tokens of the longest haystack sentence (the granularity of lengths and depths).
    pub fn sentence_max(&self) -> usize {
        self.sentences.iter().map(Vec::len).max().unwrap_or(1)
    }

    /// The document hiding `key` at `depth` (0..=1) whose prompt and answer take at most
    /// `context` tokens, with as many sentences drawn from `rng` as fit. None when `context`
    /// is below [`Pieces::min_context`].
    pub fn build(&self, key: u32, depth: f64, context: usize, rng: &mut impl Rng) -> Option<Doc> {
        let needle = self.tok.encode(&needle(key));
        let answer = self.tok.encode(&format!(" {key}"));
        let fixed = self.intro.len() + needle.len() + self.question.len() + answer.len();
        if context < fixed + self.sentence_max() {
            return None;
        }
        let budget = context - fixed;
        let mut hay: Vec<&[u32]> = vec![];
        let mut used = 0;
        loop {
            let s = &self.sentences[rng.gen_range(0..self.sentences.len())];
            if used + s.len() > budget {
                break;
            }
            used += s.len();
            hay.push(s);
        }
        // the sentence boundary whose share of the haystack is nearest the depth
        let want = depth.clamp(0.0, 1.0) * used as f64;
        let (mut at, mut before, mut best) = (0, 0, want);
        let mut cum = 0;
        for (i, s) in hay.iter().enumerate() {
            cum += s.len();
            if (cum as f64 - want).abs() < best {
                (at, before, best) = (i + 1, cum, (cum as f64 - want).abs());
            }
        }
        let mut prompt = Vec::with_capacity(context);
        prompt.extend_from_slice(&self.intro);
        hay[..at].iter().for_each(|s| prompt.extend_from_slice(s));
        prompt.extend(needle);
        hay[at..].iter().for_each(|s| prompt.extend_from_slice(s));
        prompt.extend_from_slice(&self.question);
        Some(Doc {
            prompt,
            answer,
            tail: self.tail.clone(),
            before,
            after: used - before,
        })
    }

    /// The shortest context a document can have (room for the longest sentence).
    pub fn min_context(&self) -> usize {
        let key = *KEYS.start();
        self.intro.len()
            + self.tok.encode(&needle(key)).len()
            + self.question.len()
            + self.tok.encode(&format!(" {key}")).len()
            + self.sentence_max()
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
            pieces
                .build(key, depth, len, rng)
                .expect("len >= min_context")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn tok() -> Tokenizer {
        let texts = (0..50).map(|i| sample_text(10_000 + i * 1789));
        Tokenizer::train_with(texts, 400, true).unwrap()
    }

    #[test]
    fn documents_fit_their_context_and_place_the_needle_at_its_depth() {
        let t = tok();
        let end = t.special("<|end|>").unwrap();
        let p = Pieces::new(&t, end);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (context, depth) in [(200, 0.0), (200, 1.0), (513, 0.5), (4096, 0.25)] {
            let d = p.build(54_321, depth, context, &mut rng).unwrap();
            let len = d.prompt.len() + d.answer.len();
            assert!(
                len <= context && len + p.sentence_max() > context,
                "{len} vs {context}"
            );
            let text = t.decode(&d.prompt);
            assert!(
                text.starts_with(INTRO) && text.ends_with(QUESTION),
                "{text}"
            );
            assert_eq!(text.matches("54321").count(), 2);
            // the share of the haystack's tokens before the needle is the depth
            let share = d.before as f64 / (d.before + d.after) as f64;
            let tol = p.sentence_max() as f64 / (d.before + d.after) as f64;
            assert!((share - depth).abs() <= tol, "{share} for {depth}");
            let hay = d.prompt.len() - p.intro.len() - p.question.len();
            assert_eq!(d.before + d.after + t.encode(&needle(54_321)).len(), hay);
            assert_eq!(t.decode(&d.answer), " 54321");
            assert_eq!(*d.tail.last().unwrap(), end);
        }
        // the haystack is drawn: two documents of one key, depth and length differ
        let a = p.build(54_321, 0.5, 600, &mut rng).unwrap();
        let b = p.build(54_321, 0.5, 600, &mut rng).unwrap();
        assert_ne!(a.prompt, b.prompt);
        assert!(p
            .build(54_321, 0.5, p.min_context() - 1, &mut rng)
            .is_none());
        assert!(p.build(54_321, 0.5, p.min_context(), &mut rng).is_some());
    }

    /// The pieces join where the tokenizer splits words: a document's tokens are exactly the
    /// tokenizer's for its text, so a model trained on documents answers the same text typed
    /// into `moelab sample`.
    #[test]
    fn documents_tokenize_as_their_text() {
        let t = tok();
        let p = Pieces::new(&t, t.special("<|end|>").unwrap());
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (context, depth) in [(120, 0.0), (300, 0.3), (700, 1.0)] {
            let d = p.build(70_123, depth, context, &mut rng).unwrap();
            let ids = [&d.prompt[..], &d.answer].concat();
            assert_eq!(t.encode(&t.decode(&ids)), ids, "context {context}");
        }
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
        assert!(docs.iter().any(|d| d.before > 2 * d.after));
        assert!(docs.iter().any(|d| d.after > 2 * d.before));
    }
}
