//! Checkpoints: `RUN_DIR/checkpoints/step-NNNNNNN/{model.safetensors, optim.safetensors,
//! state.json}` and `RUN_DIR/latest` naming the newest complete one.
//!
//! Crash safety: a checkpoint is written into a temp dir, every file fsync'd, the dir renamed
//! into place, and only then is `latest` replaced (temp file + rename). A crash at any point
//! leaves the previous checkpoint and `latest` intact; a failed write (a full disk) removes
//! its temp dir and leaves everything saved before untouched. `state.json` carries the sha256
//! of both weight files and a checksum of its own content, all checked on load; resuming
//! falls back to the newest checkpoint that passes ([`latest_good`]).

use crate::{fault, io_err, Error, Result};
use model::{io, Model, ModelConfig, Optimizer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// 2: state.json carries a checksum of itself, the loss EMA and the skipped steps.
pub const FORMAT_VERSION: u32 = 3;

/// The format written when no field of version 3 (`opt_step`) is present: such a checkpoint
/// stays readable by the moelab versions before it.
const FORMAT_VERSION_2: u32 = 2;

/// Everything besides tensors that resuming needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub format_version: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Index of the next training micro-batch (the loader's whole state).
    pub next_batch: u64,
    pub tokens_seen: u64,
    pub seed: u64,
    pub weights_hash: String,
    /// sha256 of `model.safetensors` and `optim.safetensors`.
    pub files: BTreeMap<String, String>,
    /// The model shape these weights belong to.
    pub model: ModelConfig,
    /// Exponential moving average of the training loss (loss-spike detection).
    #[serde(default)]
    pub loss_ema: Option<f32>,
    /// Steps whose update is skipped on replay (anomalies that were rolled back).
    #[serde(default)]
    pub skip_steps: Vec<u64>,
    /// The optimizer's own update count (AdamW's bias correction) when it is behind `step`:
    /// a skipped update (a non-finite or spiking step) advances `step` and not the
    /// optimizer. None: equal to `step`. NOTE: resuming set it to `step`, so a run resumed
    /// after a skip diverged from the uninterrupted run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opt_step: Option<u64>,
    /// sha256 of this JSON with `checksum` empty.
    #[serde(default)]
    pub checksum: String,
}

impl State {
    fn content_hash(&self) -> String {
        let mut s = self.clone();
        s.checksum.clear();
        data::sha256_hex(
            serde_json::to_string(&s)
                .expect("state serialises")
                .as_bytes(),
        )
    }
}

fn ckpt_name(step: u64) -> String {
    format!("step-{step:07}")
}

fn fsync_dir(dir: &Path) -> Result<()> {
    Ok(data::sync_dir(dir)?)
}

/// Writes a checkpoint for `state.step` and points `latest` at it; keeps the newest `keep`.
/// Without `opt` the checkpoint holds weights only (an imported model: it is read for
/// inference and as `train --init`'s start, never resumed, so it has no optimizer state).
pub fn save(
    run: &Path,
    model: &Model,
    opt: Option<&Optimizer>,
    state: &State,
    keep: usize,
) -> Result<PathBuf> {
    let root = run.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(io_err(&root))?;
    let name = ckpt_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = write_files(&tmp, model, opt, state) {
        // e.g. a full disk: drop the partial checkpoint, keep every earlier one
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let step = state.step;
    let dst = root.join(&name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(io_err(&dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    fsync_dir(&root)?;
    fault::point("ckpt-renamed", step, &dst)?;
    data::write_atomic(&run.join("latest"), format!("{name}\n").as_bytes())?;
    fsync_dir(run)?; // the rename of `latest` is durable before older checkpoints are pruned
    fault::point("ckpt-latest", step, &dst)?;
    prune(&root, keep, &name)?;
    Ok(dst)
}

/// The checkpoint's files in `tmp`, each fsync'd (state.json last: it vouches for the others).
fn write_files(tmp: &Path, model: &Model, opt: Option<&Optimizer>, state: &State) -> Result<()> {
    let step = state.step;
    fault::point("enospc-model", step, tmp)?;
    io::save(&model.layout, &model.params, &tmp.join("model.safetensors"))?;
    fault::point("ckpt-model", step, tmp)?;
    let mut files = vec!["model.safetensors"];
    if let Some(opt) = opt {
        io::save_prefixed(
            &model.layout,
            &[("m.", &opt.m), ("v.", &opt.v)],
            &tmp.join("optim.safetensors"),
        )?;
        files.push("optim.safetensors");
    }
    fault::point("enospc-state", step, tmp)?;
    let mut st = state.clone();
    st.opt_step = opt.map(|o| o.step).filter(|&s| s != state.step);
    for f in files {
        let p = tmp.join(f);
        // NOTE: a failed fsync is never retried (after one, the kernel may have dropped the
        // dirty pages and a second fsync "succeeds"): the checkpoint is abandoned instead.
        fault::point("eio-fsync", step, &p)?;
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&p))?;
        st.files.insert(
            f.into(),
            data::sha256_hex(&std::fs::read(&p).map_err(io_err(&p))?),
        );
    }
    // a run resumed from an older format moves on; version 3 only when its field is there
    // (an older moelab would drop `opt_step` and find the checksum wrong: it refuses the
    // version instead)
    st.format_version = if st.opt_step.is_some() {
        FORMAT_VERSION
    } else {
        FORMAT_VERSION_2
    };
    st.checksum = st.content_hash();
    let json = serde_json::to_string_pretty(&st).expect("state serialises");
    data::write_atomic(&tmp.join("state.json"), json.as_bytes())?;
    fault::point("ckpt-state", step, tmp)?;
    fsync_dir(tmp)
}

/// Removes all but the newest `keep` checkpoints (never `current`).
fn prune(root: &Path, keep: usize, current: &str) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(io_err(root))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    let n = names.len();
    for old in names.into_iter().take(n.saturating_sub(keep)) {
        if old != current {
            let p = root.join(&old);
            std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// Reads and verifies `state.json` of a checkpoint dir.
pub fn read_state(dir: &Path) -> Result<State> {
    let p = dir.join("state.json");
    let bad = |msg: String| Error::Checkpoint {
        path: dir.into(),
        msg,
    };
    let text =
        std::fs::read_to_string(&p).map_err(|e| bad(format!("cannot read state.json ({e})")))?;
    let st: State =
        serde_json::from_str(&text).map_err(|e| bad(format!("malformed state.json ({e})")))?;
    // format 1 (before state.json carried its own checksum) is still read
    if !(1..=FORMAT_VERSION).contains(&st.format_version) {
        return Err(bad(format!(
            "format version {}, this moelab reads 1 to {FORMAT_VERSION}",
            st.format_version
        )));
    }
    if st.format_version >= 2 && st.checksum != st.content_hash() {
        return Err(bad("state.json is corrupted (checksum mismatch)".into()));
    }
    Ok(st)
}

/// Checks a checkpoint without loading it: state.json and the sha256 of every file.
pub fn check(dir: &Path) -> Result<State> {
    let st = read_state(dir)?;
    for (f, want) in &st.files {
        let p = dir.join(f);
        let bytes = std::fs::read(&p).map_err(|e| Error::Checkpoint {
            path: dir.into(),
            msg: format!("{f}: {e}"),
        })?;
        if &data::sha256_hex(&bytes) != want {
            return Err(Error::Checkpoint {
                path: dir.into(),
                msg: format!("{f} is corrupted (sha256 mismatch)"),
            });
        }
    }
    Ok(st)
}

/// Removes the temp dirs of interrupted checkpoint writes (`.tmp-step-N-PID`) other than this
/// process's own. Only for the holder of the run's lock ([`crate::lock::RunLock`]): no other
/// process writes checkpoints then.
///
/// NOTE: readers (`sample`, `eval`, `serve`, `export`) used to remove the temp dirs whose PID
/// was not alive. A PID says nothing across PID namespaces or hosts (a login node looking at
/// a cluster job's run dir, the host looking into a container's): they removed a live
/// trainer's checkpoint mid-write and stopped its run. They only skip temp dirs now.
pub fn remove_stale_temp(run: &Path) {
    let root = run.join("checkpoints");
    let Ok(rd) = std::fs::read_dir(&root) else {
        return;
    };
    let own = format!("-{}", std::process::id());
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(".tmp-") && !n.ends_with(&own) {
            let _ = std::fs::remove_dir_all(root.join(n));
        }
    }
}

/// The newest checkpoint of a run that passes [`check`]: the one `latest` names, or, when
/// that one is damaged (a truncated or corrupted file), the newest older one that is intact.
/// Also returns a note on each damaged checkpoint passed over. Temp dirs of checkpoint writes
/// (finished or not) are skipped, never removed here (see [`remove_stale_temp`]).
pub fn latest_good(run: &Path) -> Result<Option<(PathBuf, Vec<String>)>> {
    let root = run.join("checkpoints");
    let mut names: Vec<String> = match std::fs::read_dir(&root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect(),
        Err(_) => return Ok(None),
    };
    names.retain(|n| n.starts_with("step-"));
    names.sort();
    names.reverse();
    // `latest` first: a newer dir it does not name yet was never completed
    let named = std::fs::read_to_string(run.join("latest")).ok();
    if let Some(n) = named.as_deref().map(str::trim) {
        if let Some(i) = names.iter().position(|x| x == n) {
            names.drain(..i);
        }
    }
    let mut notes = vec![];
    for n in names {
        let dir = root.join(&n);
        match check(&dir) {
            Ok(_) => return Ok(Some((dir, notes))),
            Err(e) => notes.push(format!("{e}; falling back to an older checkpoint")),
        }
    }
    if notes.is_empty() {
        Ok(None)
    } else {
        Err(Error::Checkpoint {
            path: root,
            msg: format!("no intact checkpoint ({})", notes.join("; ")),
        })
    }
}

/// Loads a checkpoint into `model` and `opt` after checking that it belongs to this model
/// shape and that its files are intact.
pub fn load(dir: &Path, model: &mut Model, opt: &mut Optimizer) -> Result<State> {
    let st = read_state(dir)?;
    let bad = |msg: String| Error::Checkpoint {
        path: dir.into(),
        msg,
    };
    if st.model != model.cfg {
        return Err(bad(format!("was written for a different model shape ({}); use the run's own config.toml or a new --out", describe_diff(&st.model, &model.cfg))));
    }
    check(dir)?;
    model.params = io::load(&model.layout, &dir.join("model.safetensors"), true)?;
    let mut mv = io::load_prefixed(
        &model.layout,
        &dir.join("optim.safetensors"),
        &["m.", "v."],
        true,
    )?;
    opt.v = mv.pop().expect("two buffers");
    opt.m = mv.pop().expect("two buffers");
    opt.step = st.opt_step.unwrap_or(st.step);
    Ok(st)
}

/// "model.d_model: 256 in the checkpoint, 128 in the config" for the first differing field.
pub fn describe_diff(a: &ModelConfig, b: &ModelConfig) -> String {
    describe_section_diff("model", a, b, "the checkpoint")
}

/// The first field of config section `section` that differs: "train.lr: 0.003 in
/// {`where_a`}, 0.001 in the config".
pub fn describe_section_diff<T: serde::Serialize>(
    section: &str,
    a: &T,
    b: &T,
    where_a: &str,
) -> String {
    let (ta, tb) = (toml::Value::try_from(a).ok(), toml::Value::try_from(b).ok());
    if let (Some(toml::Value::Table(ta)), Some(toml::Value::Table(tb))) = (ta, tb) {
        for (k, va) in &ta {
            if tb.get(k) != Some(va) {
                let vb = tb.get(k).map_or("missing".to_string(), |v| v.to_string());
                return format!("{section}.{k}: {va} in {where_a}, {vb} in the config");
            }
        }
    }
    format!("{section} sections differ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readers skip temp dirs of checkpoint writes and never remove them (a PID that is not
    /// alive here may be a live trainer in another PID namespace or on another host); the
    /// lock holder removes every one but its own.
    #[test]
    fn only_the_lock_holder_removes_temp_dirs() {
        let run = std::env::temp_dir().join(format!("moelab-ckpt-temp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let root = run.join("checkpoints");
        let other = root.join(".tmp-step-0000002-999999999");
        let own = root.join(format!(".tmp-step-0000003-{}", std::process::id()));
        for d in [&other, &own] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("state.json"), b"{}").unwrap();
        }
        assert!(latest_good(&run).unwrap().is_none());
        assert!(
            other.exists() && own.exists(),
            "a reader removed a temp dir"
        );
        remove_stale_temp(&run);
        assert!(!other.exists(), "a dead writer's temp dir is left");
        assert!(own.exists(), "this process's own write was removed");
        let _ = std::fs::remove_dir_all(&run);
    }
}
