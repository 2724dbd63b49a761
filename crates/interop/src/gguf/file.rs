//! The GGUF container (versions 2 and 3): header, metadata key/values, tensor infos, and
//! the tensor data after them, aligned to `general.alignment` (default 32).
//!
//! Every length and offset is checked against the file before it is used: a truncated or
//! corrupt file is an error naming what is wrong, never a panic or a huge allocation.

use crate::{ferr, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 4] = b"GGUF";

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(x) => Some(x),
            Value::I64(x) if x >= 0 => Some(x as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(x) => Some(x),
            Value::U64(x) => Some(x as f64),
            Value::I64(x) => Some(x as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// A tensor's entry: ggml dims (`dims[0]` is the row length) and where its data is.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A GGUF file read into memory.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub meta: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
    data_at: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() - self.at < n {
            return Err(ferr(
                self.path,
                format!(
                    "truncated GGUF: {what} at byte {} runs past the end",
                    self.at
                ),
            ));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| ferr(self.path, format!("{what}: bad length")))?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| ferr(self.path, format!("{what}: not UTF-8")))
    }
    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.take(1, what)?[0] as u64),
            1 => Value::I64(self.take(1, what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(self.u32(what)? as i32 as i64),
            6 => Value::F64(f32::from_le_bytes(self.take(4, what)?.try_into().unwrap()) as f64),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 if depth == 0 => {
                let ety = self.u32(what)?;
                let n = self.u64(what)?;
                // every element takes at least one byte: a count past the file is corrupt
                if n > (self.b.len() - self.at) as u64 {
                    return Err(ferr(
                        self.path,
                        format!("truncated GGUF: {what} claims {n} elements"),
                    ));
                }
                // (reserved for at most what the rest of the file could hold at 8 bytes an
                // element: a corrupt count cannot ask for a huge allocation up front)
                let room = (self.b.len() - self.at) / 8;
                let mut v = Vec::with_capacity((n as usize).min(room));
                for _ in 0..n {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_le_bytes(self.take(8, what)?.try_into().unwrap())),
            t => {
                return Err(ferr(
                    self.path,
                    format!("{what}: unknown metadata value type {t}"),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let bytes = std::fs::read(path).map_err(|e| ferr(path, format!("cannot read ({e})")))?;
        GgufFile::parse(path, bytes)
    }

    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<GgufFile> {
        let mut r = Reader {
            b: &bytes,
            at: 0,
            path,
        };
        if r.take(4, "magic")? != MAGIC {
            return Err(ferr(path, "not a GGUF file (no GGUF magic)"));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(ferr(
                path,
                format!("GGUF version {version}; moelab reads versions 2 and 3"),
            ));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key, 0)?;
            meta.insert(key, v);
        }
        let mut tensors = vec![];
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let nd = r.u32(&name)?;
            if nd > 4 {
                return Err(ferr(path, format!("{name}: {nd} dims (at most 4)")));
            }
            let dims = (0..nd).map(|_| r.u64(&name)).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32(&name)?;
            let offset = r.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = meta
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(ferr(
                path,
                format!("general.alignment {align} is not a power of two"),
            ));
        }
        let data_at = r.at.div_ceil(align) * align;
        let f = GgufFile {
            path: path.into(),
            version,
            meta,
            tensors,
            bytes,
            data_at,
        };
        for t in &f.tensors {
            let size = super::quant::tensor_bytes(t.ggml_type, &t.dims, &t.name)
                .map_err(|m| ferr(path, m))?;
            let end = (f.data_at as u64)
                .checked_add(t.offset)
                .and_then(|x| x.checked_add(size));
            if end.is_none_or(|e| e > f.bytes.len() as u64) {
                return Err(ferr(
                    path,
                    format!(
                        "truncated GGUF: tensor {} ends past the end of the file",
                        t.name
                    ),
                ));
            }
        }
        Ok(f)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (checked in [`GgufFile::parse`]).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let size = super::quant::byte_size(t.ggml_type, t.n_elements(), &t.name).expect("checked");
        let at = self.data_at + t.offset as usize;
        &self.bytes[at..at + size as usize]
    }

    /// A tensor dequantized to f32, row-major (rows of `dims[0]`).
    pub fn f32(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(t) = self.tensor(name) else {
            return Ok(None);
        };
        super::quant::dequantize(t.ggml_type, self.data(t), t.n_elements() as usize)
            .map(Some)
            .map_err(|m| ferr(&self.path, format!("{name}: {m}")))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    /// sha256 of the whole file.
    pub fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(&self.bytes))
    }
}
