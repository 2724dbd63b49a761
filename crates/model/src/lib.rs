//! The moelab model: a Mixture-of-Experts decoder-only transformer on CPU.
//!
//! - [`config`](mod@config): `Config` (TOML, validated, presets in `configs/`)
//! - [`params`]: the parameter layout, one contiguous buffer with named views, seeded init
//! - [`model`]: forward / backward over a micro-batch (the list of blocks), expert-load
//!   statistics; `block`: a block's attention, dense FFN and MoE as forward/backward pairs
//! - [`moe`]: routed experts: dropless dispatch, per-expert SwiGLU, combine
//! - [`optim`]: AdamW state and global-norm clipping over the layout
//! - [`io`]: safetensors weights files and the weights hash
//!
//! Not here: data loading, training loops, sampling, terminals (see the crates above this).

pub(crate) mod block;
pub use block::FLASH_MIN_T;
pub mod config;
pub mod decode;
pub mod error;
pub mod hf;
pub mod io;
pub mod model;
pub mod moe;
pub mod optim;
pub mod params;
pub mod profile;
pub mod quant;
pub mod tensors;

pub use config::{
    Balance, Config, ModelConfig, OnAnomaly, QkNorm, RouterScore, Schedule, TrainConfig,
};
pub use error::{Error, Result};
pub use model::{Distill, Losses, Model};
pub use optim::Optimizer;
pub use params::Layout;
