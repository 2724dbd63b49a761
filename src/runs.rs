//! Helpers the commands share (not a command): loading a run as a [`Reasoner`], finding a
//! run's or a data dir's tokenizer, the `--split` parser, and the progress bar of task
//! generation. Commands import this module, never each other.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use infer::chat::{ChatFormat, ChatSpec};
use infer::tasks::Reasoner;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokenizer::Tokenizer;
use train::load_run;
use train::manifest::InitRecord;
use train::trainer::Init;

/// A run dir (its latest checkpoint) or a checkpoint dir, with its tokenizer, ready to
/// generate; `quant` as [`quant_weights`]' flag (`auto`: an imported file's own types).
pub fn load_reasoner(path: &Path, quant: &str) -> Result<Reasoner> {
    let run = load_run(path)?;
    let tok = run_tokenizer(path, &run.checkpoint, run.cfg.model.vocab_size)?;
    let chat = Arc::new(run_chat_format(path, &run.checkpoint, tok.clone())?);
    let source = source_quant(path, &run.checkpoint)?;
    let quant = quant_weights(&run.cfg.model, &run.params, &source, quant)?;
    Ok(Reasoner {
        cfg: run.cfg.model,
        params: run.params,
        quant,
        tok,
        chat,
        checkpoint: run.checkpoint,
        step: run.state.step,
    })
}

/// The chat format of the run at `path` (checkpoint `ckpt`) with its tokenizer `tok`.
pub fn run_chat_format(path: &Path, ckpt: &Path, tok: Tokenizer) -> Result<ChatFormat> {
    let tok_path = run_tokenizer_path(path, ckpt)?;
    let run_dir = tok_path.parent().unwrap_or(Path::new("."));
    ChatFormat::load(run_dir, Arc::new(tok)).map_err(anyhow::Error::msg)
}

/// The quantized types an imported run's source held its matrices in, with its K-quant
/// matrices' bytes (`import.json`, `quant.safetensors`; empty for other runs).
pub fn source_quant(run: &Path, ckpt: &Path) -> Result<interop::run::SourceQuant> {
    match run_tokenizer_path(run, ckpt) {
        Ok(p) => Ok(interop::run::SourceQuant::read(
            p.parent().unwrap_or(Path::new(".")),
        )?),
        Err(_) => Ok(Default::default()),
    }
}

/// `--quant`: the matrices inference multiplies by. `auto`: the source's quantized types
/// (`source`, by tensor name, K-quants on the file's bytes; none: f32); `f32`; or one of
/// q8_0, q5_0, q4_1, q4_0 for every matrix.
pub fn quant_weights(
    cfg: &model::ModelConfig,
    params: &[f32],
    source: &interop::run::SourceQuant,
    flag: &str,
) -> Result<Option<Arc<model::quant::QuantWeights>>> {
    use kernels::quant::QType;
    use model::quant::QuantWeights;
    let q = match flag {
        "f32" => None,
        "auto" if source.types.is_empty() => None,
        "auto" => Some(QuantWeights::with_bytes(
            cfg,
            params,
            |n| source.types.get(n).and_then(|t| QType::parse(t)),
            &source.bytes,
        )),
        t => match QType::parse(t).filter(|q| q.quantizable()) {
            Some(ty) => Some(QuantWeights::uniform(cfg, params, ty)),
            None => bail!("--quant {t}: expected auto, f32, q8_0, q5_0, q4_1 or q4_0 (q4_k and q6_k run only where an imported GGUF file has them: --quant auto)"),
        },
    };
    Ok(q.map(Arc::new))
}

/// `--kv-cache`: f32, f16 or bf16.
pub fn parse_kv(s: &str) -> std::result::Result<model::decode::KvType, String> {
    model::decode::KvType::parse(s).ok_or_else(|| format!("{s:?}: expected f32, f16 or bf16"))
}

/// "f32", or the quantized matrices by type, e.g. "q4_1 x 210 + q8_0 x 1".
pub fn describe_quant(q: Option<&model::quant::QuantWeights>) -> String {
    match q {
        None => "f32".into(),
        Some(q) => {
            let parts: Vec<String> = q
                .summary()
                .iter()
                .map(|(t, n, _)| format!("{t} x {n}"))
                .collect();
            format!("{} matrices, the rest f32", parts.join(" + "))
        }
    }
}

/// Whether `p` is a file starting with GGUF's magic.
pub fn is_gguf(p: &Path) -> bool {
    use std::io::Read;
    let mut m = [0u8; 4];
    p.is_file()
        && std::fs::File::open(p)
            .and_then(|mut f| f.read_exact(&mut m))
            .is_ok()
        && &m == interop::gguf::file::MAGIC
}

/// What `train --init` starts from.
pub struct InitSource {
    pub init: Init,
    pub model: model::ModelConfig,
    pub tok: Tokenizer,
    /// An imported model's chat format (the new run keeps it).
    pub chat: Option<ChatSpec>,
}

/// Initial weights for `train --init` from a run or checkpoint dir, a Hugging Face model
/// dir or a GGUF file (imported in memory), with the model shape, tokenizer and chat format
/// they belong to.
pub fn load_init(path: &Path) -> Result<InitSource> {
    let abs = std::fs::canonicalize(path)
        .with_context(|| format!("--init {}: no such file or dir", path.display()))?;
    let is_hf = path.join("config.json").exists() && !path.join("config.toml").exists();
    let (cfg, params, tok, source_sha256, chat) = if is_hf || is_gguf(path) {
        let imp = if is_hf {
            interop::hf::import_dir(path, None)?
        } else {
            interop::gguf::import_file(path, None)?
        };
        let tok = Tokenizer::from_bytes(path, &imp.tokenizer_json)?;
        (imp.config, imp.params, tok, imp.source.sha256, imp.chat)
    } else {
        let run = load_run(path)?;
        let tok = run_tokenizer(path, &run.checkpoint, run.cfg.model.vocab_size)?;
        let dir = run_tokenizer_path(path, &run.checkpoint)?;
        let import = dir.with_file_name(interop::run::IMPORT_FILE);
        let sha = std::fs::read(&import)
            .ok()
            .and_then(|b| serde_json::from_slice::<interop::run::Source>(&b).ok())
            .map(|s| s.sha256)
            .unwrap_or_default();
        let chat = std::fs::read(dir.with_file_name(infer::chat::CHAT_FILE))
            .ok()
            .map(|b| serde_json::from_slice::<ChatSpec>(&b))
            .transpose()
            .context("the --init run's chat.json")?;
        (run.cfg.model, run.params, tok, sha, chat)
    };
    let hash = model::io::weights_hash(&model::Layout::new(&cfg), &params);
    // an imported model's chat format goes with its weights
    let files = match &chat {
        Some(c) => vec![(
            infer::chat::CHAT_FILE.to_string(),
            serde_json::to_string_pretty(c)?.into_bytes(),
        )],
        None => vec![],
    };
    let init = Init {
        params,
        record: InitRecord {
            path: abs.display().to_string(),
            weights_hash: hash,
            source_sha256,
        },
        files,
    };
    Ok(InitSource {
        init,
        model: cfg,
        tok,
        chat,
    })
}

/// Refuses a config whose model lays out other tensors than the initial weights'.
pub fn check_init_fits(
    init: &Init,
    init_model: &model::ModelConfig,
    model: &model::ModelConfig,
) -> Result<()> {
    let shapes = |c: &model::ModelConfig| -> Vec<(String, Vec<usize>)> {
        model::Layout::new(c)
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect()
    };
    let (a, b) = (shapes(init_model), shapes(model));
    if a != b {
        let what = match a.iter().zip(&b).find(|(x, y)| x != y) {
            Some((x, y)) => format!(
                "{} {:?} in the initial model, {} {:?} in the config",
                x.0, x.1, y.0, y.1
            ),
            None => format!(
                "{} tensors in the initial model, {} in the config",
                a.len(),
                b.len()
            ),
        };
        bail!(
            "--init {}: the config's model has another shape ({what}); leave out --config to train the initial model's own shape",
            init.record.path,
        );
    }
    Ok(())
}

/// Refuses data encoded with another tokenizer than the initial model's.
pub fn check_data_tokenizer(data: &Path, tok: &Tokenizer) -> Result<()> {
    let p = data.join("tokenizer.json");
    let theirs = Tokenizer::from_file(&p)?;
    if theirs.to_json()? != tok.to_json()? {
        bail!(
            "{} was prepared with another tokenizer than the initial model's; prepare it with `moelab prepare --corpus ... --tokenizer` and the --init run",
            data.display()
        );
    }
    Ok(())
}

/// The tokenizer of a run (checkpoint `ckpt`) whose model has `vocab` embedding rows.
pub fn run_tokenizer(run: &Path, ckpt: &Path, vocab: usize) -> Result<Tokenizer> {
    let path = run_tokenizer_path(run, ckpt)?;
    let tok = Tokenizer::from_file(&path)?;
    // a token id past the embedding would stop generation mid-reply with an assertion
    if tok.vocab_size() > vocab {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary is {}",
            path.display(),
            tok.vocab_size(),
            vocab
        );
    }
    Ok(tok)
}

/// The tokenizer.json of a run dir, or of the run a checkpoint dir belongs to.
pub fn run_tokenizer_path(run: &Path, ckpt: &Path) -> Result<PathBuf> {
    let candidates = [
        run.join("tokenizer.json"),
        ckpt.join("../../tokenizer.json"),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "{}: no tokenizer.json next to the checkpoint",
                run.display()
            )
        })
}

/// A tokenizer.json path from a file, or a run or data dir holding one.
pub fn tokenizer_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("tokenizer.json")
    } else {
        p.to_path_buf()
    }
}

/// `--split dev|test` (train is training data, never evaluated on).
pub fn parse_split(s: &str) -> std::result::Result<data::tasks::Split, String> {
    match data::tasks::Split::from_name(s) {
        Some(x) if x != data::tasks::Split::Train => Ok(x),
        _ => Err("expected dev or test".into()),
    }
}

/// A progress bar over `n` generated sequences, labelled `label`, and the callback that
/// advances it (finished sequences, generated tokens) for `infer::tasks`.
pub fn task_bar(label: &str, n: usize) -> (ProgressBar, impl FnMut(usize, usize)) {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label:>10} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .expect("template")
        .progress_chars("=> "),
    );
    let (b, start) = (bar.clone(), Instant::now());
    let tick = move |done: usize, tokens: usize| {
        b.set_position(done as u64);
        b.set_message(format!(
            "{:.0} tok/s",
            tokens as f64 / start.elapsed().as_secs_f64()
        ));
    };
    (bar, tick)
}

/// Where keys and usage live unless `--keys-db` / `--db` says otherwise (serve and keys).
pub const KEYS_DB: &str = "moelab-keys.db";
