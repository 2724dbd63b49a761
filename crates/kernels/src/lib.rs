//! moelab's CPU compute kernels: every layer of the MoE transformer as a pair of free
//! functions, `foo_forward` / `foo_backward`, in the style of llm.c.
//!
//! What this crate is: plain functions over `&[f32]` / `&mut [f32]` slices with explicit
//! shapes. What it is not: a tensor library, an autograd engine, or anything that knows about
//! models, configs or files.
//!
//! Shape letters, used in every shape comment of this crate and of `model`:
//! B batch, T time (sequence), N = B*T rows (tokens), C channels (model width),
//! H query heads, G key/value heads (grouped-query attention), D head dim,
//! E routed experts, K top-k, F FFN/expert hidden width, V vocabulary.
//!
//! Determinism contract: every function gives bit-identical results for any rayon thread
//! count. Work is split across threads only along dimensions that are not summed over; sums
//! over tokens (weight gradients) are computed per output element in a fixed order.
//!
//! Gradient convention: `*_backward` functions ACCUMULATE (`+=`) into parameter gradients,
//! so gradient accumulation over micro-batches needs no extra buffers. Input gradients are
//! overwritten unless a function's doc says it accumulates.

pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod dispatch;
pub mod dropout;
pub mod embedding;
pub mod flash;
#[cfg(target_arch = "x86_64")]
mod flash_bf16;
pub mod loss;
pub mod matmul;
pub mod muon;
pub mod par;
pub mod peak;
pub mod quant;
pub mod rmsnorm;
pub mod rope;
pub mod router;
pub mod swiglu;
pub mod vmath;

/// Target id that contributes nothing to the loss (masked position).
pub const IGNORE_INDEX: u32 = u32::MAX;
