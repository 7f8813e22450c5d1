//! Autoregressive generation: one prefill over the prompt, then one cached step per token.

use crate::sampling::{apply_repetition_penalty, sample, SamplingParams};
use candle_core::{DType, Tensor};
use petal_core::{Error, Result};
use petal_data::Tokenizer;
use petal_models::Llama;
use rand::SeedableRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
}

fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let t = logits.dim(1)?;
    Ok(logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}

/// Generate from `prompt` token ids; `on_text` receives each newly decoded piece (streaming).
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    prompt: &[u32],
    p: &SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generated> {
    if prompt.is_empty() {
        return Err(Error::msg("empty prompt"));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let mut cache = model.new_cache();
    let dev = model.device();
    let ids = Tensor::new(prompt, dev)?.unsqueeze(0)?;
    let mut logits = last_logits(&model.forward(&ids, Some(&mut cache), false)?)?;
    let mut seen: Vec<u32> = prompt.to_vec();
    let mut out: Vec<u32> = Vec::new();
    let mut text = String::new();
    let ctx = model.cfg.max_position_embeddings;
    let dec = |ids: &[u32]| tok.decode(ids, true).map_err(|e| Error::msg(e.to_string()));
    let stop = loop {
        if out.len() >= p.max_new_tokens {
            break StopReason::MaxTokens;
        }
        apply_repetition_penalty(&mut logits, &seen, p.repetition_penalty);
        let next = sample(&logits, p, &mut rng);
        if Some(next) == tok.eos_id {
            break StopReason::Eos;
        }
        out.push(next);
        seen.push(next);
        let full = dec(&out)?;
        // Emit only complete characters (a byte-level token can end mid-character).
        if full.len() > text.len() && !full.ends_with('\u{FFFD}') {
            on_text(&full[text.len()..]);
            text = full;
        }
        if let Some(pos) = p.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(pos);
            break StopReason::StopString;
        }
        if cache.len() + 1 > ctx {
            break StopReason::ContextFull;
        }
        let step = Tensor::new(&[next], dev)?.unsqueeze(0)?;
        logits = last_logits(&model.forward(&step, Some(&mut cache), false)?)?;
    };
    if stop != StopReason::StopString {
        text = dec(&out)?;
    }
    Ok(Generated {
        ids: out,
        text,
        stop,
    })
}
