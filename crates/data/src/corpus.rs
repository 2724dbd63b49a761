//! Reading a corpus: files and folders of `.txt`, and `.jsonl` files whose lines carry a
//! `text` field. Folders are walked recursively in sorted order so the corpus (and everything
//! derived from it) does not depend on directory listing order.

use crate::{io_err, sha256_hex, Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One input file with its documents.
#[derive(Debug)]
pub struct Source {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub docs: Vec<String>,
}

/// What meta.json records about an input.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct InputRecord {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()).map_err(io_err(dir)))
        .collect::<Result<_>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("txt" | "jsonl")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads every input path (file or folder) into sources, in the given order (folders
/// sorted). Errors name the file and what to do.
pub fn read(paths: &[PathBuf]) -> Result<Vec<Source>> {
    if paths.is_empty() {
        return Err(Error::Other(
            "no corpus given: pass --corpus PATH (a .txt/.jsonl file or a folder)".into(),
        ));
    }
    let mut files = vec![];
    for p in paths {
        if !p.exists() {
            return Err(Error::Input {
                path: p.clone(),
                msg: "does not exist".into(),
            });
        }
        if p.is_dir() {
            let before = files.len();
            walk(p, &mut files)?;
            if files.len() == before {
                return Err(Error::Input {
                    path: p.clone(),
                    msg: "has no .txt or .jsonl files".into(),
                });
            }
        } else {
            files.push(p.clone());
        }
    }
    let sources: Vec<Source> = files.iter().map(|f| read_file(f)).collect::<Result<_>>()?;
    // NOTE: a text given twice (the same file, or a copy) could land in train and in
    // validation, which would then not be held out
    let mut seen = std::collections::HashMap::new();
    for s in sources.iter().filter(|s| s.bytes > 0) {
        if let Some(first) = seen.insert(s.sha256.as_str(), &s.path) {
            return Err(Error::Input {
                path: s.path.clone(),
                msg: format!(
                    "has the same contents as {} (given twice, or a copy); pass each text once, or validation would repeat training text",
                    first.display()
                ),
            });
        }
    }
    Ok(sources)
}

fn read_file(path: &Path) -> Result<Source> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let bad = |msg: String| Error::Input {
        path: path.into(),
        msg,
    };
    if bytes.contains(&0) {
        return Err(bad(
            "looks binary (contains NUL bytes); pass text files only".into(),
        ));
    }
    let text = String::from_utf8(bytes.clone()).map_err(|e| {
        bad(format!(
            "is not valid UTF-8 (first bad byte at offset {}); convert it to UTF-8 first",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let docs = if path.extension().and_then(|e| e.to_str()) == Some("jsonl") {
        let mut docs = vec![];
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                bad(format!(
                    "line {}: not JSON ({})",
                    i + 1,
                    crate::excerpt(&e.to_string(), 200)
                ))
            })?;
            match v.get("text").and_then(|t| t.as_str()) {
                Some(t) => docs.push(t.to_string()),
                None => return Err(bad(format!("line {}: no string field \"text\"", i + 1))),
            }
        }
        docs
    } else {
        vec![text]
    };
    let docs: Vec<String> = docs.into_iter().filter(|d| !d.trim().is_empty()).collect();
    if docs.is_empty() {
        return Err(bad("is empty".into()));
    }
    Ok(Source {
        path: path.into(),
        sha256: sha256_hex(&bytes),
        bytes: bytes.len() as u64,
        docs,
    })
}
