//! E2VPT-style prompts (Han et al., ICCV 2023, "E2VPT: An Effective and Efficient Approach for
//! Visual Prompt Tuning"; official code ChengHan111/E2VPT, `vit_changeVK.py`), transcribed for
//! language models: input prompt tokens in front of every sequence together with per-layer
//! key-value slots, and the paper's pruning of the input prompts followed by rewinding.
//!
//! Key-value slots: per layer P (n_kv, kv_heads, head_dim), one tensor for keys and values
//! (`share_kv`, the official SHARE_PARAM_KV) or one each, put in front of the layer's keys and
//! values after the projections, with no projection or reparameterisation; queries are not
//! extended. In an LM this is PEFT's prefix mechanism: the slots stand for n_kv cached
//! positions (unrotated keys), and the prompts and tokens take positions from n_kv. Input
//! prompts: n_p embeddings prepended to the token embeddings; their positions carry no loss.
//!
//! Pruning (at `prune_step`): each prompt token's importance is the mean over the steps so far
//! of |∂L/∂m_i| for a gate m_i on the token, `|Σ_d e_id g_id|` (XPrompt / Michel et al.'s head
//! importance, the paper's mask-gradient score); the `token_prune` share of least important
//! tokens goes, then each kept token loses the `segment_prune` share of its `segments` pieces
//! (feature d in piece d mod segments, as the official mask) of least importance, zeroed.
//! Rewinding: the surviving prompts and the key-value slots go back
//! to their initial values and train again with a fresh optimizer for the rest of the run. The
//! saved adapter holds the kept tokens only (`num_virtual_tokens` = the kept count,
//! `prune_step` = 0: nothing left to prune) and `pruning.json` beside it.
//!
//! petal's own adapter: `peft_type: "KV_PROMPT"`, tensors `prompt_embeddings` (n_p, hidden)
//! and `kv_embeddings` (layers, 1 or 2, n_kv, kv_heads head_dim), saved at the top level like
//! the prompt methods' tensors.

use crate::adapter::{
    AdapterMethod, InputAdapter, InputShape, NamedTensor, NewAdapter, TrainingHook,
};
use crate::config::{spec, AdapterConfig, Spec};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::sync::{Arc, RwLock};

pub const PROMPT: &str = "prompt_embeddings";
pub const KV: &str = "kv_embeddings";

pub struct KvPrompt;

crate::method_options! {
    /// E2VPT-style prompts' options.
    pub struct KvPromptOptions {
        /// Input prompt tokens in front of every sequence
        pub num_virtual_tokens: usize = 10,
        /// Key-value slots in front of every layer's keys and values
        pub num_kv_tokens: usize = 10,
        /// One tensor for a layer's keys and values (the official SHARE_PARAM_KV)
        pub share_kv: bool = true,
        /// The step after which the input prompts are pruned and rewound (0: no pruning;
        /// `petal train` default: half the run)
        pub prune_step: Option<usize> = None,
        /// Share of the prompt tokens pruned
        pub token_prune: f64 = 0.5,
        /// Pieces a kept prompt token is cut into for segment-wise pruning (dividing the
        /// hidden size)
        pub segments: usize = 16,
        /// Share of the kept tokens' pieces pruned
        pub segment_prune: f64 = 0.25,
        /// After pruning, train again from the initial values (true) or from the trained ones
        pub rewind: bool = true,
        /// The model's layers, hidden size and key/value width (recorded)
        pub num_layers: Option<usize> = None,
        pub token_dim: Option<usize> = None,
        pub kv_dim: Option<usize> = None,
    }
}

impl AdapterMethod for KvPrompt {
    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("prune_step", "0")])
    }

    fn peft_type(&self) -> &'static str {
        "KV_PROMPT"
    }

    fn options(&self) -> Spec {
        spec::<KvPromptOptions>()
    }

    fn default_targets(&self) -> Option<&'static str> {
        None
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        if !new.given("prune_step") {
            cfg.set("prune_step", new.max_steps / 2)?;
        }
        cfg.set("num_layers", new.shape.layers)?;
        cfg.set("token_dim", new.shape.hidden)?;
        cfg.set("kv_dim", new.shape.kv_heads * new.shape.head_dim)?;
        cfg.target_modules = None;
        Ok(())
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: KvPromptOptions = cfg.options()?;
        let bad = |k: &str, m: String| Err(Error::config("adapter config", k, m));
        if o.num_virtual_tokens == 0 {
            return bad("num_virtual_tokens", "0 is out of range: >= 1".into());
        }
        if o.num_kv_tokens == 0 {
            return bad("num_kv_tokens", "0 is out of range: >= 1".into());
        }
        crate::config::probability("token_prune", o.token_prune)?;
        crate::config::probability("segment_prune", o.segment_prune)?;
        if o.segments == 0 {
            return bad("segments", "0 is out of range: segments >= 1".into());
        }
        Ok(())
    }

    fn input_values(&self, cfg: &AdapterConfig, shape: &InputShape) -> Result<u64> {
        let o: KvPromptOptions = cfg.options()?;
        let kv = shape.kv_heads * shape.head_dim;
        let sides: u64 = if o.share_kv { 1 } else { 2 };
        let prompts = (o.num_virtual_tokens as u64).saturating_mul(shape.hidden as u64);
        let slots = (shape.layers as u64 * sides)
            .saturating_mul(o.num_kv_tokens as u64)
            .saturating_mul(kv as u64);
        // the trained tensors and their initial copies (for rewinding)
        Ok(prompts.saturating_add(slots).saturating_mul(2))
    }

    fn build_input(
        &self,
        cfg: &AdapterConfig,
        shape: &InputShape,
        seed: u64,
        dev: &Device,
    ) -> Result<Option<Box<dyn InputAdapter>>> {
        let o: KvPromptOptions = cfg.options()?;
        let kv = shape.kv_heads * shape.head_dim;
        crate::methods::check_recorded(&[
            ("num_layers", o.num_layers, shape.layers),
            ("token_dim", o.token_dim, shape.hidden),
            ("kv_dim", o.kv_dim, kv),
        ])?;
        if shape.hidden % o.segments != 0 {
            return Err(Error::config(
                "adapter config",
                "segments",
                format!(
                    "{} does not divide the hidden size {}",
                    o.segments, shape.hidden
                ),
            ));
        }
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        // input prompts: xavier-uniform over (n_p, hidden) as the official visual prompts'
        // U(±sqrt(6 / (fan_in + fan_out))); slots: kaiming-uniform, U(±sqrt(6 / (n_kv d)))
        let (n, h) = (o.num_virtual_tokens, shape.hidden);
        let prompts = uniform(&[n, h], (6.0 / (2 * h) as f64).sqrt(), &mut g, dev)?;
        let sides = if o.share_kv { 1 } else { 2 };
        let bound = (6.0 / (o.num_kv_tokens * shape.head_dim) as f64).sqrt();
        let slots = uniform(
            &[shape.layers, sides, o.num_kv_tokens, kv],
            bound,
            &mut g,
            dev,
        )?;
        Ok(Some(Box::new(KvPrompts::new(
            &prompts, &slots, o.segments,
        )?)))
    }

    fn training(
        &self,
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Box<dyn TrainingHook>>> {
        let o: KvPromptOptions = cfg.options()?;
        let Some(step) = o.prune_step.filter(|&s| s > 0) else {
            return Ok(None);
        };
        let prompts = prompts_of(model, name)?;
        let n = prompts.prompts.as_tensor().dim(0)?;
        Ok(Some(Box::new(Pruning {
            state: prompts.state.clone(),
            prompts: prompts.prompts.clone(),
            slots: prompts.slots.clone(),
            initial: (prompts.initial.0.clone(), prompts.initial.1.clone()),
            step,
            o,
            token_score: vec![0.0; n],
            segment_score: vec![vec![0.0; prompts.segments]; n],
            seen: 0,
            report: None,
        })))
    }
}

/// Per prompt token, the sums of `x` (n, hidden) over each of its `segments` pieces, piece k
/// holding the features d with d mod segments = k (the official layout: the piece mask is
/// repeated along the hidden axis): (n, segments).
pub fn piece_sums(x: &Tensor, segments: usize) -> Result<Tensor> {
    let (n, h) = x.dims2()?;
    Ok(x.reshape((n, h / segments, segments))?.sum(1)?)
}

/// Values U(±bound) of `shape`.
fn uniform(shape: &[usize], bound: f64, g: &mut impl Rng, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| g.gen_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// The kept prompt tokens and the segment mask (n_p, hidden) of a pruned prompt.
#[derive(Debug, Clone)]
struct Kept {
    tokens: Vec<u32>,
    mask: Option<Tensor>,
}

#[derive(Debug)]
pub struct KvPrompts {
    prompts: Var, // (n_p, hidden)
    slots: Var,   // (layers, 1 or 2, n_kv, kv)
    initial: (Tensor, Tensor),
    segments: usize,
    state: Arc<RwLock<Kept>>,
}

impl KvPrompts {
    fn new(prompts: &Tensor, slots: &Tensor, segments: usize) -> Result<Self> {
        let n = prompts.dim(0)?;
        Ok(KvPrompts {
            prompts: Var::from_tensor(prompts)?,
            slots: Var::from_tensor(slots)?,
            initial: (prompts.copy()?, slots.copy()?),
            segments,
            state: Arc::new(RwLock::new(Kept {
                tokens: (0..n as u32).collect(),
                mask: None,
            })),
        })
    }

    fn kept(&self) -> Result<Kept> {
        Ok(self
            .state
            .read()
            .map_err(|_| Error::msg("prompt state lock"))?
            .clone())
    }
}

/// The prompts of adapter `name` (an error when it has none).
fn prompts_of<'a>(model: &'a dyn crate::Adaptable, name: &str) -> Result<&'a KvPrompts> {
    model
        .input_adapter()
        .filter(|(n, _)| *n == name)
        .and_then(|(_, a)| a.as_any())
        .and_then(|a| a.downcast_ref::<KvPrompts>())
        .ok_or_else(|| Error::msg(format!("adapter `{name}` has no E2VPT-style prompts")))
}

impl InputAdapter for KvPrompts {
    fn embeddings(&self) -> Result<Option<Tensor>> {
        let k = self.kept()?;
        let mut p = self.prompts.as_tensor().clone();
        if let Some(m) = &k.mask {
            p = p.mul(m)?;
        }
        let n = p.dim(0)?;
        if k.tokens.len() < n {
            let idx = Tensor::new(k.tokens.as_slice(), p.device())?;
            p = p.index_select(&idx, 0)?;
        }
        Ok(Some(p))
    }

    /// (n_kv, 2 layers kv): per row, layer 0 key, layer 0 value, layer 1 key, …
    fn key_values(&self) -> Result<Option<Tensor>> {
        let s = self.slots.as_tensor(); // (L, sides, n, kv)
        let (l, sides, n, kv) = s.dims4()?;
        let kv2 = match sides {
            1 => Tensor::cat(&[s, s], 1)?,
            _ => s.clone(),
        };
        Ok(Some(
            kv2.permute((2, 0, 1, 3))?
                .contiguous()?
                .reshape((n, l * 2 * kv))?,
        ))
    }

    fn num_virtual_tokens(&self) -> usize {
        self.state.read().map(|k| k.tokens.len()).unwrap_or(0)
    }

    fn prefix_len(&self) -> usize {
        self.slots.as_tensor().dims().get(2).copied().unwrap_or(0)
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: PROMPT,
                var: &self.prompts,
            },
            NamedTensor {
                name: KV,
                var: &self.slots,
            },
        ]
    }

    fn set_prefix(&self, t: &Tensor) -> Result<()> {
        crate::methods::set_var(&self.prompts, PROMPT, t)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

#[path = "kv_prompt_pruning.rs"]
mod pruning;
use pruning::Pruning;

#[cfg(test)]
#[path = "kv_prompt_tests.rs"]
mod tests;
