//! ggml tensor types and their dequantization to f32, block by block as ggml's reference
//! `dequantize_row_*` functions do (ggml-quants.c): the formats are bit layouts, so the
//! scalar code here is the specification; `tests/gguf_quant.rs` checks every type against
//! the `gguf` Python package's dequantization of the same blocks.

use half::{bf16, f16};

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q5_0: u32 = 6;
pub const Q8_0: u32 = 8;
pub const Q4_K: u32 = 12;
pub const Q6_K: u32 = 14;
pub const BF16: u32 = 30;

const QK: usize = 32;
const QK_K: usize = 256;

/// ggml's name of a type (also for types moelab does not read, for the error).
pub fn type_name(t: u32) -> String {
    let n = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        _ => return format!("type {t}"),
    };
    n.to_string()
}

/// (elements per block, bytes per block) of the types moelab reads.
fn block(t: u32) -> Option<(usize, usize)> {
    Some(match t {
        F32 => (1, 4),
        F16 | BF16 => (1, 2),
        Q4_0 => (QK, 18),
        Q4_1 => (QK, 20),
        Q5_0 => (QK, 22),
        Q8_0 => (QK, 34),
        Q4_K => (QK_K, 144),
        Q6_K => (QK_K, 210),
        _ => return None,
    })
}

/// Bytes of `n` elements of type `t`; an error names an unsupported type or a count that
/// is not a whole number of blocks.
pub fn byte_size(t: u32, n: u64, name: &str) -> Result<u64, String> {
    let (be, bb) = block(t).ok_or_else(|| {
        format!(
            "tensor {name} has type {}; moelab reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K",
            type_name(t)
        )
    })?;
    if !n.is_multiple_of(be as u64) {
        return Err(format!(
            "tensor {name}: {n} elements is not a whole number of {}-element {} blocks",
            be,
            type_name(t)
        ));
    }
    (n / be as u64)
        .checked_mul(bb as u64)
        .ok_or_else(|| format!("tensor {name}: size overflows"))
}

/// The byte size of a tensor of type `t` and ggml dims `dims` (`dims[0]` the row length),
/// checking what ggml requires of them: no zero dimension, rows of whole blocks, and an
/// element count that fits.
pub fn tensor_bytes(t: u32, dims: &[u64], name: &str) -> Result<u64, String> {
    if dims.contains(&0) {
        return Err(format!("tensor {name} has a zero dimension ({dims:?})"));
    }
    let n = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= isize::MAX as u64 / 4)
        .ok_or_else(|| format!("tensor {name}: dimensions {dims:?} are too large"))?;
    let size = byte_size(t, n, name)?;
    let be = block(t).map_or(1, |b| b.0) as u64;
    // (no dims: a scalar, one element)
    let row = dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(be) {
        return Err(format!(
            "tensor {name}: rows of {row} elements are not whole {be}-element {} blocks",
            type_name(t)
        ));
    }
    Ok(size)
}

fn h(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// `n` elements of type `t` from `bytes` (exactly [`byte_size`] long).
pub fn dequantize(t: u32, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let size = byte_size(t, n as u64, "tensor")? as usize;
    if bytes.len() != size {
        return Err(format!(
            "{} bytes for {n} elements, expected {size}",
            bytes.len()
        ));
    }
    let mut y = vec![0f32; n];
    match t {
        F32 => {
            for (o, c) in y.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
        }
        F16 => {
            for (o, c) in y.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = h(c);
            }
        }
        BF16 => {
            for (o, c) in y.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        // the block formats are the kernels' (inference runs on the same decoding)
        _ => {
            let ty = kernels::quant::QType::from_ggml(t).expect("byte_size refused it");
            kernels::quant::dequantize_row(ty, bytes, &mut y);
        }
    }
    Ok(y)
}

/// Quantizes `x` (a whole number of 32-element blocks) to Q8_0, Q4_0 or Q4_1 as ggml's
/// reference `quantize_row_*_ref` does (gguf-py's too: `tests/gguf_quant.rs` checks the
/// bytes); the block codecs are `kernels::quant`'s, which inference runs on.
pub fn quantize(t: u32, x: &[f32]) -> Result<Vec<u8>, String> {
    let ty = kernels::quant::QType::from_ggml(t)
        .filter(|q| q.quantizable())
        .ok_or_else(|| {
            format!(
                "moelab quantizes to Q8_0, Q4_0, Q4_1 and Q5_0, not {}",
                type_name(t)
            )
        })?;
    if !x.len().is_multiple_of(QK) {
        return Err(format!(
            "{} values is not a whole number of 32-value blocks",
            x.len()
        ));
    }
    let mut out = Vec::with_capacity(x.len() / QK * ty.block_bytes());
    kernels::quant::quantize_row(ty, x, &mut out);
    Ok(out)
}
