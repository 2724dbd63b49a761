//! moelab inference: token sampling (temperature, top-k, top-p) from seeded generators,
//! continuous batching over the model's KV-cache decoder (offline [`generate`] and the online
//! [`Engine`]), and the chat template with its streaming reasoning parser.
//!
//! Not here: HTTP (the server crate), tokenizer training (the tokenizer crate).

pub mod batch;
pub mod chat;
pub mod engine;
pub mod generate;
pub mod passkey;
pub mod sampling;
pub mod tasks;
pub mod template;

pub use batch::{Event, Finish, Seq, TokenLogprobs};
pub use engine::{Alive, Engine, EngineConfig, Sink, Stats, SubmitError};
pub use generate::{generate, Generated, Request};
pub use sampling::{Sampler, SamplingParams};
