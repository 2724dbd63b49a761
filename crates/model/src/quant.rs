//! Quantized copies of a model's matrices for inference ([`kernels::quant`]): the decoder
//! multiplies by them instead of the f32 matrices they were made from. Which matrices:
//! the attention projections, the dense, expert and shared-expert FFN matrices and the
//! output head; routers, gates, norms and the embedding table (looked up, not multiplied;
//! unless tied to the head) stay f32, as llama.cpp keeps them.

use crate::config::ModelConfig;
use crate::params::Layout;
use kernels::quant::{quantize_into, QMatrix, QType, QView, WeightBuf, QK};
use std::collections::BTreeMap;

/// One quantized matrix: its tensor name, shape and bytes in the buffer.
struct Entry {
    name: String,
    ty: QType,
    rows: usize,
    cols: usize,
    start: usize,
}

/// Whether `bytes` are blocks of K-quant `ty` that dequantize to exactly `w` (`cols`
/// columns), checked row by row.
fn file_blocks(ty: QType, bytes: Option<&Vec<u8>>, w: &[f32], cols: usize) -> bool {
    let Some(b) = bytes else { return false };
    if !cols.is_multiple_of(ty.block_values()) || b.len() != QMatrix::size(ty, w.len() / cols, cols)
    {
        return false;
    }
    let mut row = vec![0f32; cols];
    b.chunks_exact(ty.row_bytes(cols))
        .zip(w.chunks_exact(cols))
        .all(|(b, w)| {
            kernels::quant::dequantize_row(ty, b, &mut row);
            row.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits())
        })
}

/// Quantized matrices by their offset in the parameter buffer they were made from, all in
/// one [`WeightBuf`] (huge pages: decoding streams every byte of it per token).
pub struct QuantWeights {
    mats: BTreeMap<usize, Entry>,
    buf: WeightBuf,
    total: usize,
}

impl QuantWeights {
    /// Quantizes each matrix the decoder multiplies by to `pick(tensor name)` (None: keeps
    /// it f32). A matrix whose rows are not whole blocks of 32 stays f32; a K-quant, which
    /// moelab cannot make, runs as Q8_0 (see [`QuantWeights::with_bytes`]).
    pub fn new(
        cfg: &ModelConfig,
        params: &[f32],
        pick: impl Fn(&str) -> Option<QType>,
    ) -> QuantWeights {
        QuantWeights::with_bytes(cfg, params, pick, &BTreeMap::new())
    }

    /// As [`QuantWeights::new`], a matrix picked as a K-quant taking its blocks from
    /// `bytes` (by tensor name: a GGUF file's bytes, as an import keeps them) when they are
    /// that matrix's weights (they dequantize to exactly `params`' values); otherwise it
    /// runs as Q8_0.
    pub fn with_bytes(
        cfg: &ModelConfig,
        params: &[f32],
        pick: impl Fn(&str) -> Option<QType>,
        bytes: &BTreeMap<String, Vec<u8>>,
    ) -> QuantWeights {
        let lay = Layout::new(cfg);
        assert_eq!(
            params.len(),
            lay.total,
            "parameter buffer does not match the config"
        );
        let mut mats = BTreeMap::new();
        let mut size = 0;
        for t in &lay.tensors {
            let head = t.offset == lay.lm_head;
            let name = if head {
                "lm_head.weight"
            } else {
                t.name.as_str()
            };
            let multiplied = head
                || [
                    ".attn.wqkv.weight",
                    ".attn.wo.weight",
                    ".w_gate_up.weight",
                    ".w_down.weight",
                    ".experts.w_gate_up",
                    ".experts.w_down",
                ]
                .iter()
                .any(|s| t.name.ends_with(s));
            let cols = *t.shape.last().unwrap_or(&0);
            if !multiplied || t.shape.len() < 2 || cols == 0 || !cols.is_multiple_of(QK) {
                continue;
            }
            if let Some(mut ty) = pick(name) {
                let rows = t.len / cols;
                let w = &params[t.offset..t.offset + t.len];
                if !ty.quantizable() && !file_blocks(ty, bytes.get(name), w, cols) {
                    ty = QType::Q8_0;
                }
                mats.insert(
                    t.offset,
                    Entry {
                        name: name.to_string(),
                        ty,
                        rows,
                        cols,
                        start: size,
                    },
                );
                size += QMatrix::size(ty, rows, cols);
            }
        }
        let mut buf = WeightBuf::new(size);
        for (&off, e) in &mats {
            let len = QMatrix::size(e.ty, e.rows, e.cols);
            let w = &params[off..off + e.rows * e.cols];
            let out = &mut buf[e.start..e.start + len];
            match bytes.get(&e.name) {
                Some(b) if !e.ty.quantizable() => out.copy_from_slice(b),
                _ => quantize_into(e.ty, w, e.rows, e.cols, out),
            }
        }
        QuantWeights {
            mats,
            buf,
            total: lay.total,
        }
    }

    /// Every eligible matrix as `ty`.
    pub fn uniform(cfg: &ModelConfig, params: &[f32], ty: QType) -> QuantWeights {
        QuantWeights::new(cfg, params, |_| Some(ty))
    }

    /// The quantized matrix holding the f32 weight rows `w` (a subslice of `params`) and the
    /// index of their first row, when `w` is whole rows of one.
    pub fn find(&self, params: &[f32], w: &[f32]) -> Option<(QView<'_>, usize)> {
        assert_eq!(
            params.len(),
            self.total,
            "quantized weights of another model"
        );
        let base = params.as_ptr() as usize;
        let at = (w.as_ptr() as usize).checked_sub(base)? / std::mem::size_of::<f32>();
        let (&off, e) = self.mats.range(..=at).next_back()?;
        let (rel, cols) = (at - off, e.cols);
        let view = QView {
            ty: e.ty,
            rows: e.rows,
            cols,
            data: &self.buf[e.start..e.start + QMatrix::size(e.ty, e.rows, cols)],
        };
        (rel.is_multiple_of(cols) && w.len().is_multiple_of(cols) && rel + w.len() <= e.rows * cols)
            .then_some((view, rel / cols))
    }

    /// Bytes of the quantized matrices.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Matrices quantized, by type: (type name, count, values).
    pub fn summary(&self) -> Vec<(&'static str, usize, usize)> {
        let mut out: Vec<(&'static str, usize, usize)> = vec![];
        for m in self.mats.values() {
            match out.iter_mut().find(|e| e.0 == m.ty.name()) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += m.rows * m.cols;
                }
                None => out.push((m.ty.name(), 1, m.rows * m.cols)),
            }
        }
        out
    }

    /// The tensor names quantized, with their type.
    pub fn names(&self) -> impl Iterator<Item = (&str, QType)> {
        self.mats.values().map(|e| (e.name.as_str(), e.ty))
    }
}
