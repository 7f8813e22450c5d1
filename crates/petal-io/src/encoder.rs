//! A `--model` argument for sequence classification: a BERT encoder (HF folder or hub id) and
//! its tokenizer.

use crate::hub::{resolve, ModelSource};
use crate::Weights;
use candle_core::Device;
use petal_core::{Error, Result};
use petal_data::Tokenizer;
use petal_models::{Bert, BertConfig};

pub struct LoadedEncoder {
    pub model: Bert,
    pub tokenizer: Tokenizer,
    /// The `[SEP]` token, after which a pair's second text starts (token type 1).
    pub sep_id: u32,
    pub pad_id: u32,
}

/// The encoder of `spec` with a classifier of `num_labels` classes (the file's own head, or a
/// new one drawn from `seed`: see [`Bert::load`]), in f32 with `precision`'s kernels.
pub fn load_encoder(
    spec: &str,
    num_labels: Option<usize>,
    seed: u64,
    precision: petal_models::Precision,
    device: &Device,
) -> Result<LoadedEncoder> {
    let dir = encoder_dir(spec)?;
    let cfg = encoder_config(&dir)?;
    let w = Weights::from_hf_folder(&dir)?;
    let (tokenizer, sep_id, pad_id) = tokenizer_in(&dir)?;
    let model = Bert::load(cfg, &w, num_labels, seed, precision.kernels, device)?;
    Ok(LoadedEncoder {
        model,
        tokenizer,
        sep_id,
        pad_id,
    })
}

/// The tokenizer of encoder `spec` alone (to read data before the head's size is known).
/// The folder's config is read first, so a decoder's is refused as `load_encoder` refuses it.
pub fn encoder_tokenizer(spec: &str) -> Result<Tokenizer> {
    let dir = encoder_dir(spec)?;
    encoder_config(&dir)?;
    Ok(tokenizer_in(&dir)?.0)
}

/// The folder's BERT config (another architecture refused naming `model_type`).
fn encoder_config(dir: &std::path::Path) -> Result<BertConfig> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    BertConfig::from_hf_json(&text, &cfg_path.display().to_string())
}

/// The folder of encoder `spec`; a GGUF file (a decoder) is refused.
fn encoder_dir(spec: &str) -> Result<std::path::PathBuf> {
    match resolve(spec)? {
        ModelSource::HfFolder(d) => Ok(d),
        ModelSource::Gguf(p) => Err(Error::msg(format!(
            "{}: a GGUF file holds a decoder; sequence classification needs a BERT encoder \
             folder",
            p.display()
        ))),
    }
}

/// The folder's tokenizer with its `[SEP]` and `[PAD]` ids.
fn tokenizer_in(dir: &std::path::Path) -> Result<(Tokenizer, u32, u32)> {
    let tokenizer = Tokenizer::from_hf_folder(dir).map_err(|e| Error::msg(e.to_string()))?;
    let id = |t: &str| {
        tokenizer.inner.token_to_id(t).ok_or_else(|| {
            Error::msg(format!(
                "{}: the tokenizer has no `{t}` token",
                dir.join("tokenizer.json").display()
            ))
        })
    };
    let (sep, pad) = (id("[SEP]")?, id("[PAD]")?);
    Ok((tokenizer, sep, pad))
}
