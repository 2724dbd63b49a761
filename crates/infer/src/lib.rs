//! moelab inference: token sampling (temperature, top-k, top-p) from seeded generators, and
//! batched generation with continuous batching over the model's KV-cache decoder.
//!
//! Not here: HTTP (the server crate), tokenization (the tokenizer crate).

pub mod generate;
pub mod sampling;

pub use generate::{generate, Finish, Generated, Request};
pub use sampling::{Sampler, SamplingParams};
