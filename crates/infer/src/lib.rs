//! moelab inference: token sampling (temperature, top-k, top-p) from seeded generators, and
//! generation over the model's KV-cache decoder.
//!
//! Not here: HTTP (the server crate), tokenization (the tokenizer crate).

pub mod sampling;

pub use sampling::{Sampler, SamplingParams};
