//! Config presets compiled into the binary, so `--config small-moe` works from anywhere; a
//! path to a TOML file always wins over a preset of the same name.

use anyhow::{Context, Result};
use model::Config;
use std::path::Path;

pub const PRESETS: &[(&str, &str)] = &[
    ("tiny", include_str!("../configs/tiny.toml")),
    ("small-dense", include_str!("../configs/small-dense.toml")),
    ("small-moe", include_str!("../configs/small-moe.toml")),
    ("teacher", include_str!("../configs/teacher.toml")),
    ("student", include_str!("../configs/student.toml")),
];

/// Loads `spec` as a TOML file if it exists, else as a preset name.
pub fn load_config(spec: &str) -> Result<Config> {
    let path = Path::new(spec);
    if path.exists() {
        return Config::from_file(path).with_context(|| format!("loading config {spec}"));
    }
    match PRESETS.iter().find(|(n, _)| *n == spec) {
        Some((_, text)) => Ok(Config::from_toml(text)?),
        None => {
            let names: Vec<_> = PRESETS.iter().map(|(n, _)| *n).collect();
            anyhow::bail!(
                "no config file {spec:?} and no preset of that name (presets: {})",
                names.join(", ")
            )
        }
    }
}
