//! Tensors of a Hugging Face model dir: one `model.safetensors` or the shards a
//! `model.safetensors.index.json` names, in float32, float16 or bfloat16, read as f32.
//!
//! Every shard is read and its header checked up front, so a missing or truncated shard is
//! an error before anything is written; tensors are converted on request.

use crate::error::{Error, Result};
use safetensors::tensor::Metadata;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Where the data section starts (8 + header length).
    data_at: usize,
    meta: Metadata,
}

/// The tensors of a model dir, by name.
pub struct SafetensorsDir {
    shards: Vec<Shard>,
    /// Tensor name -> shard index.
    index: BTreeMap<String, usize>,
}

fn werr(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights {
        path: path.into(),
        msg: msg.into(),
    }
}

impl SafetensorsDir {
    /// Opens `dir`'s weights: the shards of `model.safetensors.index.json`, else
    /// `model.safetensors`.
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index_path.exists() {
            let bytes = std::fs::read(&index_path).map_err(|source| Error::Io {
                path: index_path.clone(),
                source,
            })?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| werr(&index_path, format!("not JSON ({e})")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| werr(&index_path, "has no weight_map"))?;
            let mut files: Vec<String> = map
                .values()
                .map(|f| f.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| werr(&index_path, "weight_map values must be file names"))?;
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains("..") {
                    return Err(werr(
                        &index_path,
                        format!("shard name {f:?} leaves the dir"),
                    ));
                }
                if !dir.join(f).exists() {
                    return Err(werr(
                        &index_path,
                        format!(
                            "shard {f} is listed in the index but missing from {}",
                            dir.display()
                        ),
                    ));
                }
            }
            files
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".into()]
        } else {
            return Err(werr(
                dir,
                "has neither model.safetensors nor model.safetensors.index.json",
            ));
        };
        let mut shards = vec![];
        let mut index = BTreeMap::new();
        for f in files {
            let path = dir.join(&f);
            let bytes = std::fs::read(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes)
                .map_err(|e| werr(&path, format!("not a safetensors file or truncated ({e})")))?;
            let data_at = 8 + n;
            for (name, info) in meta.tensors() {
                if data_at + info.data_offsets.1 > bytes.len() {
                    return Err(werr(&path, format!("truncated: {name} ends past the file")));
                }
                if index.insert(name.clone(), shards.len()).is_some() {
                    return Err(werr(&path, format!("{name} is in two shards")));
                }
            }
            shards.push(Shard {
                path,
                bytes,
                data_at,
                meta,
            });
        }
        Ok(SafetensorsDir { shards, index })
    }

    /// Names of every tensor.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let s = &self.shards[*self.index.get(name)?];
        s.meta.info(name).map(|i| i.shape.clone())
    }

    /// Tensor `name` as f32 values (row-major); None when absent, an error for a dtype
    /// moelab does not read.
    pub fn get_f32(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let s = &self.shards[i];
        let info = s.meta.info(name).expect("indexed");
        let b = &s.bytes[s.data_at + info.data_offsets.0..s.data_at + info.data_offsets.1];
        let v = match info.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            d => {
                return Err(werr(
                    &s.path,
                    format!("{name} is {d:?}; moelab reads F32, F16 and BF16"),
                ))
            }
        };
        Ok(Some(v))
    }

    /// sha256 of every shard file, by file name (for the import record).
    pub fn file_hashes(&self) -> BTreeMap<String, String> {
        use sha2::{Digest, Sha256};
        self.shards
            .iter()
            .map(|s| {
                let name = s.path.file_name().unwrap().to_string_lossy().into_owned();
                (name, hex::encode(Sha256::digest(&s.bytes)))
            })
            .collect()
    }
}
