//! One file per subcommand: its arguments, its help examples and `run`. Commands never
//! import each other (a unit test in main.rs checks); what they share is in the helper
//! modules (`runs`, `progress`, `presets`, `machine`, `comm`) or a library crate.

pub mod bench;
pub mod chat;
pub mod demo;
pub mod distill;
pub mod eval;
pub mod export;
pub mod hash;
pub mod import;
pub mod keys;
pub mod prepare;
pub mod report;
pub mod sample;
pub mod serve;
pub mod train;
pub mod upcycle;
pub mod verify;
