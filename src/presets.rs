//! Config presets compiled into the binary, so `--config small-moe` works from anywhere; a
//! path to a TOML file always wins over a preset of the same name.

use anyhow::{Context, Result};
use model::Config;
use std::path::Path;

pub const PRESETS: &[(&str, &str)] = &[
    ("tiny", include_str!("../configs/tiny.toml")),
    ("small-dense", include_str!("../configs/small-dense.toml")),
    ("small-moe", include_str!("../configs/small-moe.toml")),
    ("shakespeare", include_str!("../configs/shakespeare.toml")),
    ("teacher", include_str!("../configs/teacher.toml")),
    ("student", include_str!("../configs/student.toml")),
    ("passkey-128", include_str!("../configs/passkey-128.toml")),
    ("passkey-512", include_str!("../configs/passkey-512.toml")),
    (
        "passkey-4096-yarn",
        include_str!("../configs/passkey-4096-yarn.toml"),
    ),
];

/// Loads `spec` as a TOML file if it exists and is no directory (a pipe such as `<(...)` will
/// do), else as a preset name. A directory is never a config: a run written with `--out
/// teacher` does not hide the `teacher` preset.
pub fn load_config(spec: &str) -> Result<Config> {
    let path = Path::new(spec);
    if path.exists() && !path.is_dir() {
        return Config::from_file(path).with_context(|| format!("loading config {spec}"));
    }
    match PRESETS.iter().find(|(n, _)| *n == spec) {
        Some((_, text)) => Ok(Config::from_toml(text)?),
        None if path.is_dir() => {
            let run = path.join("config.toml");
            let hint = if run.is_file() {
                format!(" (this run keeps its config in {})", run.display())
            } else {
                String::new()
            };
            anyhow::bail!("{spec:?} is a directory, not a config file{hint}")
        }
        None => {
            let names: Vec<_> = PRESETS.iter().map(|(n, _)| *n).collect();
            anyhow::bail!(
                "no config file {spec:?} and no preset of that name (presets: {})",
                names.join(", ")
            )
        }
    }
}

/// A config file or preset with the command line's overrides, validated.
pub fn resolve_config(spec: &str, steps: Option<u64>, seed: Option<u64>) -> Result<Config> {
    let mut cfg = load_config(spec)?;
    if let Some(s) = steps {
        cfg.train.steps = s;
    }
    if let Some(s) = seed {
        cfg.train.seed = s;
    }
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 11: the teacher and student presets were never parsed by a test):
    /// the built-in presets are exactly the files in configs/, byte for byte, and each one
    /// loads by name and validates.
    #[test]
    fn every_preset_is_its_file_in_configs_and_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.strip_suffix(".toml").map(String::from)
            })
            .collect();
        files.sort();
        let mut names: Vec<String> = PRESETS.iter().map(|(n, _)| n.to_string()).collect();
        names.sort();
        assert_eq!(names, files, "built-in presets vs configs/*.toml");
        for (name, text) in PRESETS {
            let file = dir.join(format!("{name}.toml"));
            assert_eq!(*text, std::fs::read_to_string(&file).unwrap(), "{name}");
            let cfg = load_config(name).unwrap_or_else(|e| panic!("preset {name}: {e:#}"));
            cfg.validate().unwrap();
            assert_eq!(cfg.to_toml(), Config::from_file(&file).unwrap().to_toml());
        }
    }
}
