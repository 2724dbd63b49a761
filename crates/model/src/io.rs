//! Weight files: safetensors with a format version in the metadata, and the weights hash
//! (sha256 of every tensor's raw little-endian bytes, tensors in name order; independent of
//! the file's header bytes).

use crate::error::{Error, Result};
use crate::params::Layout;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Value of the `format` metadata key in every weights file moelab writes.
pub const FORMAT: &str = "moelab-weights";
/// Version of the weights file format; bumped on any incompatible change.
pub const FORMAT_VERSION: &str = "1";

fn le_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// sha256 over the tensors of `buf` (laid out by `layout`) in name order, as hex.
pub fn weights_hash(layout: &Layout, buf: &[f32]) -> String {
    let mut order: Vec<_> = layout.tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    for t in order {
        h.update(le_bytes(&buf[t.offset..t.offset + t.len]));
    }
    hex::encode(h.finalize())
}

/// Writes `buf` as safetensors at `path`, atomically (temp file + rename).
pub fn save(layout: &Layout, buf: &[f32], path: &Path) -> Result<()> {
    save_prefixed(layout, &[("", buf)], path)
}

/// Writes several buffers laid out by `layout` into one file, buffer i's tensors named
/// `prefix_i + name` (e.g. the optimizer's `m.` and `v.` moments), atomically.
pub fn save_prefixed(layout: &Layout, bufs: &[(&str, &[f32])], path: &Path) -> Result<()> {
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    for (prefix, buf) in bufs {
        assert_eq!(
            buf.len(),
            layout.total,
            "buffer {prefix} does not match the layout"
        );
        for t in &layout.tensors {
            bytes.push((
                format!("{prefix}{}", t.name),
                t.shape.clone(),
                le_bytes(&buf[t.offset..t.offset + t.len]),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("shape matches bytes"),
            )
        })
        .collect();
    let meta: HashMap<String, String> = [
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), FORMAT_VERSION.to_string()),
    ]
    .into();
    let data = safetensors::serialize(views, &Some(meta)).map_err(|e| Error::Weights {
        path: path.into(),
        msg: e.to_string(),
    })?;
    write_atomic(path, &canonical_header(data))
}

/// Rewrites a safetensors file's JSON header with its keys sorted. The `safetensors` crate
/// writes `__metadata__` in a `HashMap`'s per-instance random order, so two saves of the
/// same weights differed in bytes (and in the file sha256 that `state.json` records) while
/// their tensors were equal. Sorting changes neither the header's length nor any offset.
fn canonical_header(data: Vec<u8>) -> Vec<u8> {
    let n = u64::from_le_bytes(data[..8].try_into().expect("8-byte length")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&data[8..8 + n]).expect("safetensors wrote a JSON header");
    // serde_json's map is a BTreeMap (no preserve_order feature), so this sorts every key.
    let mut h = serde_json::to_vec(&header).expect("a JSON value serializes");
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + h.len() + data.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&data[8 + n..]);
    out
}

/// Writes `data` to `path` via a temp file in the same directory, fsync, rename. On failure
/// (a short write on a full disk, a failed fsync) `path` is untouched and the temp file is
/// removed.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written =
        std::fs::File::create(&tmp).and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Loads tensors named as in `layout` from a safetensors file into a new buffer. Every
/// tensor of the layout must be present with its exact shape; extra tensors are refused.
/// `require_version` checks moelab's format metadata (off for files written by the PyTorch
/// reference, which have no such metadata).
pub fn load(layout: &Layout, path: &Path, require_version: bool) -> Result<Vec<f32>> {
    Ok(load_prefixed(layout, path, &[""], require_version)?.remove(0))
}

/// Loads the buffers written by [`save_prefixed`] with the given prefixes.
pub fn load_prefixed(
    layout: &Layout,
    path: &Path,
    prefixes: &[&str],
    require_version: bool,
) -> Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    let werr = |msg: String| Error::Weights {
        path: path.into(),
        msg,
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        werr(format!(
            "not a valid safetensors file ({e}); was it truncated?"
        ))
    })?;
    if require_version {
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| werr(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        match (
            meta.get("format").map(String::as_str),
            meta.get("version").map(String::as_str),
        ) {
            (Some(FORMAT), Some(FORMAT_VERSION)) => {}
            (Some(FORMAT), Some(v)) => {
                return Err(werr(format!(
                    "format version {v}, this moelab reads version {FORMAT_VERSION}"
                )))
            }
            _ => {
                return Err(werr(
                    "not a moelab weights file (no format metadata)".into(),
                ))
            }
        }
    }
    let mut out = vec![];
    for prefix in prefixes {
        let mut buf = vec![0.0f32; layout.total];
        for t in &layout.tensors {
            let name = format!("{prefix}{}", t.name);
            let view = st.tensor(&name).map_err(|_| {
                werr(format!(
                    "missing tensor {name} (was it written for another config?)"
                ))
            })?;
            if view.dtype() != Dtype::F32 || view.shape() != t.shape.as_slice() {
                return Err(werr(format!(
                    "tensor {name} is {:?} {:?}, this config expects F32 {:?}",
                    view.dtype(),
                    view.shape(),
                    t.shape
                )));
            }
            for (dst, src) in buf[t.offset..t.offset + t.len]
                .iter_mut()
                .zip(view.data().chunks_exact(4))
            {
                *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
            }
        }
        out.push(buf);
    }
    if st.len() != layout.tensors.len() * prefixes.len() {
        let known = |n: &str| {
            prefixes.iter().any(|p| {
                n.strip_prefix(p)
                    .is_some_and(|rest| layout.get(rest).is_some())
            })
        };
        let extra: Vec<_> = st
            .names()
            .into_iter()
            .filter(|n| !known(n))
            .take(3)
            .cloned()
            .collect();
        return Err(werr(format!(
            "has tensors this config does not, e.g. {extra:?} (was it written for another config?)"
        )));
    }
    Ok(out)
}
