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
        Q4_0 => {
            for (y, b) in y.chunks_exact_mut(QK).zip(bytes.chunks_exact(18)) {
                let d = h(&b[0..2]);
                let qs = &b[2..18];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        Q4_1 => {
            for (y, b) in y.chunks_exact_mut(QK).zip(bytes.chunks_exact(20)) {
                let (d, m) = (h(&b[0..2]), h(&b[2..4]));
                let qs = &b[4..20];
                for j in 0..16 {
                    y[j] = (qs[j] & 0x0F) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        Q5_0 => {
            for (y, b) in y.chunks_exact_mut(QK).zip(bytes.chunks_exact(22)) {
                let d = h(&b[0..2]);
                let qh = u32::from_le_bytes(b[2..6].try_into().unwrap());
                let qs = &b[6..22];
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    y[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
                }
            }
        }
        Q8_0 => {
            for (y, b) in y.chunks_exact_mut(QK).zip(bytes.chunks_exact(34)) {
                let d = h(&b[0..2]);
                for j in 0..QK {
                    y[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        Q4_K => {
            for (y, b) in y.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(144)) {
                let (d, dmin) = (h(&b[0..2]), h(&b[2..4]));
                let scales = &b[4..16];
                let mut q = &b[16..144];
                let mut out = y.iter_mut();
                for is in (0..8).step_by(2) {
                    let (sc1, m1) = scale_min_k4(is, scales);
                    let (sc2, m2) = scale_min_k4(is + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    for &x in &q[..32] {
                        *out.next().unwrap() = d1 * (x & 0xF) as f32 - m1;
                    }
                    for &x in &q[..32] {
                        *out.next().unwrap() = d2 * (x >> 4) as f32 - m2;
                    }
                    q = &q[32..];
                }
            }
        }
        Q6_K => {
            for (y, b) in y.chunks_exact_mut(QK_K).zip(bytes.chunks_exact(210)) {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = h(&b[208..210]);
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    let y = &mut y[128 * n..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| d * (sc[is + k] as i8) as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
        }
        _ => unreachable!("byte_size refused it"),
    }
    Ok(y)
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Quantizes `x` (a whole number of 32-element blocks) to Q8_0, Q4_0 or Q4_1 as ggml's
/// reference `quantize_row_*_ref` does (gguf-py's too: `tests/gguf_quant.rs` checks the
/// bytes); the block codecs are `kernels::quant`'s, which inference runs on.
pub fn quantize(t: u32, x: &[f32]) -> Result<Vec<u8>, String> {
    let ty = kernels::quant::QType::from_ggml(t).ok_or_else(|| {
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
