//! Token shards: `train.bin` / `val.bin`. A 32-byte header, then u32 little-endian ids.
//!
//! Header: magic `MOELABTK` (8 bytes), format version u32, vocab size u32, token count u64,
//! 8 reserved zero bytes. Reading checks all of it against the file's length.

use crate::{io_err, write_atomic, Error, Result};
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"MOELABTK";
pub const VERSION: u32 = 1;
pub const HEADER: usize = 32;

/// Writes `tokens` as a shard, atomically.
pub fn write(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    let mut buf = Vec::with_capacity(HEADER + 4 * tokens.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(vocab_size as u32).to_le_bytes());
    buf.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    buf.extend_from_slice(&[0u8; 8]);
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    write_atomic(path, &buf)
}

/// A shard's tokens and vocab size.
pub struct Shard {
    pub vocab_size: usize,
    pub tokens: Vec<u32>,
}

/// Reads and validates a shard.
pub fn read(path: &Path) -> Result<Shard> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    parse(path, &bytes)
}

/// Validates the bytes of a shard read from `path` (named in errors).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Shard> {
    let bad = |msg: String| Error::Shard {
        path: path.into(),
        msg: format!("{msg}; re-run `moelab prepare` to rebuild the data dir"),
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(bad("not a moelab token shard (bad header)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(bad(format!(
            "shard format version {version}, this moelab reads version {VERSION}"
        )));
    }
    let vocab_size = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let n = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    // (checked: a corrupt count of 2^62 wrapped to a size of zero tokens and was accepted)
    if n.checked_mul(4).and_then(|b| b.checked_add(HEADER)) != Some(bytes.len()) {
        return Err(bad(format!(
            "header says {n} tokens but the file holds {} bytes of tokens (truncated?)",
            bytes.len() - HEADER
        )));
    }
    let tokens: Vec<u32> = bytes[HEADER..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if let Some(bad_tok) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(bad(format!(
            "token id {bad_tok} is outside the vocab of {vocab_size}"
        )));
    }
    Ok(Shard { vocab_size, tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header whose token count is corrupt is refused, including counts whose byte size
    /// wraps around (2^62 tokens of 4 bytes: a size of zero, accepted before as an empty
    /// shard).
    #[test]
    fn corrupt_token_counts_are_refused() {
        let mut b = MAGIC.to_vec();
        b.extend(VERSION.to_le_bytes());
        b.extend(64u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend([0u8; 8]);
        b.extend([1u8, 0, 0, 0, 2, 0, 0, 0]);
        let p = Path::new("train.bin");
        assert_eq!(parse(p, &b).unwrap().tokens, vec![1, 2]);
        for n in [3u64, 1 << 62, u64::MAX] {
            let mut c = b.clone();
            c[16..24].copy_from_slice(&n.to_le_bytes());
            let e = parse(p, &c).err().expect("refused").to_string();
            assert!(e.contains("header says"), "{n}: {e}");
        }
    }
}
