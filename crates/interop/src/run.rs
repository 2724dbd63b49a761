//! The run dir an import writes: `config.toml` (the model section; `[train]` at its
//! defaults), `tokenizer.json`, `chat.json` (the model's chat format), `import.json` (what
//! it came from, with the sha256 of every source file) and a step-0 checkpoint holding the
//! weights as the fp32 master copy. Written into a temp dir renamed into place at the end:
//! an import that fails leaves nothing behind.

use crate::{ferr, Result};
use infer::chat::{ChatSpec, CHAT_FILE};
use model::{Config, Model, ModelConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// File in an imported run dir recording the source.
pub const IMPORT_FILE: &str = "import.json";

/// File in an imported run dir holding the source file's bytes of its K-quant matrices
/// ([`Imported::quant_bytes`]; one U8 tensor per matrix, by moelab tensor name).
pub const QUANT_FILE: &str = "quant.safetensors";

/// How an imported run's source held its matrices: types by moelab tensor name (`import.json`'s
/// `quant`) and the K-quant matrices' bytes ([`QUANT_FILE`]).
#[derive(Clone, Debug, Default)]
pub struct SourceQuant {
    pub types: BTreeMap<String, String>,
    pub bytes: BTreeMap<String, Vec<u8>>,
}

impl SourceQuant {
    /// What the run dir `dir` records (empty for a run that was not imported, or one
    /// imported before its K-quant bytes were kept: those matrices run as Q8_0).
    pub fn read(dir: &Path) -> Result<SourceQuant> {
        let Ok(b) = std::fs::read(dir.join(IMPORT_FILE)) else {
            return Ok(SourceQuant::default());
        };
        let types = serde_json::from_slice::<Source>(&b)
            .map(|s| s.quant)
            .unwrap_or_default();
        let path = dir.join(QUANT_FILE);
        let mut bytes = BTreeMap::new();
        if let Ok(b) = std::fs::read(&path) {
            let st = safetensors::SafeTensors::deserialize(&b)
                .map_err(|e| ferr(&path, format!("unreadable ({e}); import the model again")))?;
            for (name, t) in st.tensors() {
                bytes.insert(name, t.data().to_vec());
            }
        }
        Ok(SourceQuant { types, bytes })
    }
}

/// Where imported weights came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Source {
    /// "hf" (a Hugging Face model dir), "gguf" or "upcycle" (a moelab run made sparse).
    pub format: String,
    /// The family (`model_type` / `general.architecture`).
    pub family: String,
    /// The source as given, absolute.
    pub path: String,
    /// sha256 of every file read, by name.
    pub sha256: BTreeMap<String, String>,
    /// The moelab version that imported it.
    pub code_version: String,
    /// The quantized types the source held its matrices in, by moelab tensor name (a GGUF
    /// file's Q8_0 / Q4_0 / Q4_1 matrices): inference runs on them by default, with the
    /// same weights as the file.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quant: BTreeMap<String, String>,
}

/// A model read from another format, ready to become a run dir.
pub struct Imported {
    pub config: ModelConfig,
    pub params: Vec<f32>,
    /// The tokenizer.json bytes.
    pub tokenizer_json: Vec<u8>,
    /// The chat format (None: moelab's own, for a model moelab trained).
    pub chat: Option<ChatSpec>,
    pub source: Source,
    /// The file's bytes of the matrices that run as K-quants (`source.quant`'s q4_k / q6_k),
    /// by moelab tensor name, rows in moelab's order.
    pub quant_bytes: BTreeMap<String, Vec<u8>>,
}

/// Writes `imp` as a run dir at `out`, which must not exist.
pub fn write_run(out: &Path, imp: &Imported) -> Result<()> {
    if out.exists() {
        return Err(ferr(
            out,
            "already exists; choose a new --out (an import never overwrites a run)",
        ));
    }
    let name = out
        .file_name()
        .ok_or_else(|| ferr(out, "not a dir name"))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| ferr(&parent, e.to_string()))?;
    let tmp = parent.join(format!(".{name}.import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // the run dir's files are written through checkpoints and write_atomic (each synced); the
    // moved dir's entry is synced in its parent
    let res = write_into(&tmp, imp).and_then(|_| {
        std::fs::rename(&tmp, out)
            .map_err(|e| ferr(out, format!("cannot move into place ({e})")))?;
        data::sync_dir(&parent).map_err(map_data)
    });
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

fn write_into(dir: &Path, imp: &Imported) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ferr(dir, e.to_string()))?;
    let mut cfg = Config {
        model: imp.config.clone(),
        train: Default::default(),
    };
    // `train --init` reads its own config; this one only has to be valid
    cfg.train.seq_len = cfg.train.seq_len.min(cfg.model.max_seq_len);
    cfg.validate()?;
    let put = |name: &str, bytes: &[u8]| data::write_atomic(&dir.join(name), bytes);
    put("config.toml", cfg.to_toml().as_bytes()).map_err(map_data)?;
    put("tokenizer.json", &imp.tokenizer_json).map_err(map_data)?;
    if let Some(c) = &imp.chat {
        let chat = serde_json::to_string_pretty(c).expect("serialises");
        put(CHAT_FILE, chat.as_bytes()).map_err(map_data)?;
    }
    let src = serde_json::to_string_pretty(&imp.source).expect("serialises");
    put(IMPORT_FILE, src.as_bytes()).map_err(map_data)?;
    if !imp.quant_bytes.is_empty() {
        let views: Vec<(String, safetensors::tensor::TensorView)> = imp
            .quant_bytes
            .iter()
            .map(|(n, b)| {
                let t =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![b.len()], b)
                        .expect("U8 view of its own length");
                (n.clone(), t)
            })
            .collect();
        let bytes = safetensors::serialize(views, &None).expect("U8 tensors serialise");
        put(QUANT_FILE, &bytes).map_err(map_data)?;
    }
    let layout = model::Layout::new(&imp.config);
    assert_eq!(
        layout.total,
        imp.params.len(),
        "params laid out by the config"
    );
    let m = Model::with_params(&imp.config, layout, imp.params.clone(), 1, 1);
    let state = train::checkpoint::State {
        format_version: train::checkpoint::FORMAT_VERSION,
        step: 0,
        next_batch: 0,
        tokens_seen: 0,
        seed: 0,
        weights_hash: model::io::weights_hash(&m.layout, &m.params),
        files: Default::default(),
        model: imp.config.clone(),
        loss_ema: None,
        skip_steps: vec![],
        opt_step: None,
        checksum: String::new(),
    };
    // weights only: an import is never resumed, `train --init` starts fresh moments
    train::checkpoint::save(dir, &m, None, &state, 1)?;
    Ok(())
}

pub(crate) fn map_data(e: data::Error) -> crate::Error {
    crate::Error::Train(train::Error::Data(e))
}
