//! The Llama-architecture decoder (Llama 2/3, SmolLM/SmolLM2, Qwen2, Mistral): GQA, RoPE
//! (rotate-half, llama3 scaling), RMSNorm, SwiGLU, tied or untied head. Every projection is an
//! `AdaptableLinear` built by `linear()`; this file knows nothing of adapter methods.
//! Written with differentiable ops only (see petal-ops) so every adapter gets gradients.

use crate::config::LlamaConfig;
use crate::dtype::{act_dtype, resid_dtype, Precision};
use crate::weights::WeightSource;
use candle_core::{DType, Device, Tensor};
use petal_core::adapter::InputShape;
use petal_core::{Adaptable, AdaptableLinear, AdaptableNorm, Ctx, InputAdapter, Result};
use petal_ops::{residual_add, rms_norm, swiglu, Kernels};

mod attention;
mod bias_export;
mod decode;
mod input;
pub(crate) mod kv_cache;
mod layerwise;
mod rope_tables;

pub use kv_cache::KvCache;
use rope_tables::RopeTables;

/// The one norm factory: an RMSNorm weight (h) under HF path `path`.
fn norm(
    w: &dyn WeightSource,
    path: &str,
    h: usize,
    dt: DType,
    dev: &Device,
) -> Result<AdaptableNorm> {
    Ok(AdaptableNorm::new(
        path,
        w.get(&format!("{path}.weight"), Some(&[h]), dt, dev)?,
    ))
}

/// The one linear factory: weight (out, in) and optional bias from `w`, under HF path `path`.
fn linear(
    w: &dyn WeightSource,
    path: &str,
    out: usize,
    inp: usize,
    bias: bool,
    p: Precision,
    dev: &Device,
) -> Result<AdaptableLinear> {
    let (weight, quant) = crate::weights::frozen(w, &format!("{path}.weight"), [out, inp], p, dev)?;
    // present biases load whatever the config says (Llama's attention_bias also covers o_proj,
    // mlp_bias the MLP; a BitFit merge may add them)
    let b = if bias || w.contains(&format!("{path}.bias")) {
        Some(w.get(
            &format!("{path}.bias"),
            Some(&[out]),
            act_dtype(p, dev),
            dev,
        )?)
    } else {
        None
    };
    let lin = AdaptableLinear::new(path, weight, b);
    Ok(match quant {
        Some(f) => lin.quantized(f),
        None => lin,
    })
}

#[derive(Debug)]
struct Attention {
    q: AdaptableLinear,
    k: AdaptableLinear,
    v: AdaptableLinear,
    o: AdaptableLinear,
}

#[derive(Debug)]
struct Mlp {
    gate: AdaptableLinear,
    up: AdaptableLinear,
    down: AdaptableLinear,
}

#[derive(Debug)]
struct Layer {
    attn: Attention,
    mlp: Mlp,
    ln1: AdaptableNorm,
    ln2: AdaptableNorm,
}

/// What every decoder layer takes from the input side: the hidden states entering layer 0,
/// prefix keys/values (prefix tuning) and how many leading keys are a prefix (not rotated).
pub(crate) struct Stage {
    pub x: Tensor,
    pub kv_prefix: Option<Tensor>,
    pub rope_from: usize,
    /// Positions the pass stands for at least (a cache's span, with the prefix and virtual
    /// tokens): which RoPE tables it takes
    pub rope_span: usize,
    /// Token-level shifts (PASTA): each position's slot, one-hot (b t, slots).
    pub slots: Option<Tensor>,
}

#[derive(Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    embed: AdaptableLinear, // the token table (vocab, hidden), adaptable (LoRA on embeddings)
    layers: Vec<Layer>,
    norm: AdaptableNorm,
    lm_head: AdaptableLinear,
    rope: RopeTables,
    dtype: DType,
    /// activations' dtype (`act_dtype`)
    act: DType,
    /// the residual stream's dtype (`resid_dtype`)
    resid: DType,
    device: Device,
    /// An input-side adapter (prompt tuning): embeddings put in front of every sequence.
    input: Option<(String, Box<dyn InputAdapter>)>,
    /// The kernels of its ops, chosen at load; every pass hands them to the adapters too.
    kernels: Kernels,
}

impl Llama {
    pub fn load(
        cfg: LlamaConfig,
        w: &dyn WeightSource,
        precision: impl Into<Precision>,
        device: &Device,
    ) -> Result<Self> {
        let precision = precision.into();
        let dtype = precision.weights;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let act = act_dtype(precision, device);
        let resid = resid_dtype(act, device);
        let (nq, nkv, inter) = (
            cfg.num_attention_heads * d,
            cfg.num_key_value_heads * d,
            cfg.intermediate_size,
        );
        // QLoRA's and GPTQ's quantizers leave the token embedding and the head as they are
        let outer = match precision.quantize {
            Some(q) if !q.covers_embeddings() => Precision {
                quantize: None,
                ..precision
            },
            _ => precision,
        };
        let (embed, embed_quant) = crate::weights::frozen(
            w,
            "model.embed_tokens.weight",
            [cfg.vocab_size, h],
            outer,
            device,
        )?;
        let quantized = |l: AdaptableLinear| match embed_quant {
            Some(f) => l.quantized(f),
            None => l,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            let lin = |name: &str, o, inp, b| {
                linear(w, &format!("{p}.{name}"), o, inp, b, precision, device)
            };
            layers.push(Layer {
                attn: Attention {
                    q: lin("self_attn.q_proj", nq, h, bias)?,
                    k: lin("self_attn.k_proj", nkv, h, bias)?,
                    v: lin("self_attn.v_proj", nkv, h, bias)?,
                    o: lin("self_attn.o_proj", h, nq, false)?,
                },
                mlp: Mlp {
                    gate: lin("mlp.gate_proj", inter, h, false)?,
                    up: lin("mlp.up_proj", inter, h, false)?,
                    down: lin("mlp.down_proj", h, inter, false)?,
                },
                ln1: norm(w, &format!("{p}.input_layernorm"), h, act, device)?,
                ln2: norm(w, &format!("{p}.post_attention_layernorm"), h, act, device)?,
            });
        }
        let norm = norm(w, "model.norm", h, act, device)?;
        let lm_head = if cfg.tie_word_embeddings || !w.contains("lm_head.weight") {
            quantized(AdaptableLinear::new("lm_head", embed.clone(), None))
        } else {
            linear(w, "lm_head", cfg.vocab_size, h, false, outer, device)?
        };
        let rope = RopeTables::new(&cfg, device)?;
        Ok(Llama {
            cfg,
            embed: quantized(AdaptableLinear::embedding("model.embed_tokens", embed)),
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            act,
            resid,
            device: device.clone(),
            input: None,
            kernels: precision.kernels,
        })
    }

    /// LongRoPE's pretraining context: a pass over more positions than this takes the long
    /// factors. `None` for every other scaling (one set of tables).
    pub fn rope_switch(&self) -> Option<usize> {
        self.rope.switch()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The dtype activations are stored in (`act_dtype`).
    pub fn act_dtype(&self) -> DType {
        self.act
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The token embedding's table as stored (raw blocks when quantized; see `embed_rows`).
    pub fn embed_weight(&self) -> &Tensor {
        self.embed.weight()
    }
    /// Rows `ids` of the frozen token embedding, dequantized where it is quantized.
    pub fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.base_rows(ids)
    }
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Logits (b, t, vocab) in f32 for input ids (b, t). With a cache, positions continue from
    /// what it holds and it is extended.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>, ctx: &Ctx) -> Result<Tensor> {
        let ctx = &self.pass(ctx);
        let hidden = self.hidden_states(ids, cache, ctx)?;
        Ok(self.lm_head.forward(&hidden, ctx)?.to_dtype(DType::F32)?)
    }

    /// The output head's weight when no adapter acts on the head in a pass with `ctx` (so a
    /// fused head + loss kernel may use it directly).
    pub fn plain_head(&self, ctx: &Ctx) -> Option<(&Tensor, Option<petal_ops::quant::QFormat>)> {
        Some((self.lm_head.plain_weight(ctx)?, self.lm_head.quant()))
    }

    /// Logits (.., vocab) of hidden states (.., hidden), through the (adaptable) head.
    pub fn head(&self, h: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.lm_head.forward(h, &self.pass(ctx))
    }

    /// Positions an input-side adapter puts in front of each sequence (0 without one).
    pub fn num_virtual_tokens(&self) -> usize {
        self.input
            .as_ref()
            .filter(|(_, a)| a.produces_positions())
            .map(|(_, a)| a.num_virtual_tokens())
            .unwrap_or(0)
    }

    /// Whether a pass may go on from a cache another pass filled (not with PASTA's occurrence
    /// slots, which count the special tokens from the start of the sequence).
    pub fn continues_a_cache(&self) -> bool {
        self.input
            .as_ref()
            .is_none_or(|(_, a)| a.continues_a_cache())
    }

    /// Positions an input-side adapter puts in a sequence's cache before its first token:
    /// virtual tokens (prompt tuning, P-tuning) and prefix keys (prefix tuning).
    pub fn virtual_positions(&self) -> usize {
        self.num_virtual_tokens() + self.input.as_ref().map_or(0, |(_, a)| a.prefix_len())
    }

    /// Final hidden states (b, t, hidden), after the last norm. With an input-side adapter the
    /// first positions are its virtual tokens (prepended at the start of a sequence only).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let ctx = &self.pass(ctx);
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let mut stage = self.input_stage(ids, offset, ctx)?;
        if let Some(span) = cache.as_ref().map(|c| c.span).filter(|s| *s > 0) {
            stage.rope_span = span + stage.rope_from + self.num_virtual_tokens();
        }
        let mut x = stage.x.clone();
        for i in 0..self.layers.len() {
            let kv = cache.as_deref_mut().map(|c| &mut c.kv[i]);
            x = self.layer_forward(i, &x, &stage, kv, ctx)?;
        }
        self.final_norm(&x)
    }

    /// The kernels this model's ops take (chosen at load).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// `ctx` with this model's kernels: what every entry point hands down, so an adapter's ops
    /// take the kernels the model was loaded with.
    pub(crate) fn pass(&self, ctx: &Ctx) -> Ctx {
        ctx.with_kernels(self.kernels)
    }

    /// The final RMSNorm over the last layer's output.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.rms(x, &self.norm)
    }

    /// RMSNorm of the residual stream `x` into the activations' dtype (a trainable f32 norm,
    /// LN tuning, returns f32 and is rounded here).
    fn rms(&self, x: &Tensor, n: &AdaptableNorm) -> Result<Tensor> {
        let mut h = rms_norm(self.kernels, x, &n.weight()?, self.cfg.rms_norm_eps)?;
        if let Some(shift) = n.shift() {
            // SSF after the norm: β in f32, added in h's dtype
            h = h.broadcast_add(&shift.to_dtype(h.dtype())?)?;
        }
        Ok(if h.dtype() == self.act {
            h
        } else {
            h.to_dtype(self.act)?
        })
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layer `i` (attention and MLP blocks with their residuals) on `x`.
    pub(crate) fn layer_forward(
        &self,
        i: usize,
        x: &Tensor,
        stage: &Stage,
        kv: Option<&mut Option<kv_cache::Slot>>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let layer = &self.layers[i];
        let shifted = self.token_shift(i, x, stage.slots.as_ref())?;
        let x = shifted.as_ref().unwrap_or(x);
        let prefix = stage
            .kv_prefix
            .as_ref()
            .map(|p| self.layer_prefix(p, i, x.dim(0)?))
            .transpose()?;
        let h = self.rms(x, &layer.ln1)?;
        let a = self.attention(&layer.attn, &h, stage, kv, prefix, ctx)?;
        let x = residual_add(self.kernels, x, &a)?;
        self.mlp_block(layer, &x, ctx)
    }

    /// The MLP block of `layer` with its residual: x + down(swiglu(self.kernels, gate(h), up(h))), h the
    /// second norm of x.
    fn mlp_block(&self, layer: &Layer, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let h = self.rms(x, &layer.ln2)?;
        let m = &layer.mlp;
        let g = m.gate.forward(&h, ctx)?;
        let u = m.up.forward(&h, ctx)?;
        Ok(residual_add(
            self.kernels,
            x,
            &m.down.forward(&swiglu(self.kernels, &g, &u)?, ctx)?,
        )?)
    }

    /// Every base tensor under its HF name (merged weights included), for export.
    pub fn named_base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed.dense_weight()?,
        )];
        for (i, l) in self.layers.iter().enumerate() {
            v.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                l.ln1.base().clone(),
            ));
            v.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                l.ln2.base().clone(),
            ));
        }
        for lin in self.linears() {
            if lin.is_embedding() || (lin.path() == "lm_head" && self.cfg.tie_word_embeddings) {
                continue;
            }
            v.push((format!("{}.weight", lin.path()), lin.dense_weight()?));
            if let Some(b) = lin.bias() {
                v.push((format!("{}.bias", lin.path()), b.clone()));
            }
        }
        v.push(("model.norm.weight".to_string(), self.norm.base().clone()));
        Ok(v)
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Ties are broken by a merge into the head: report whether it is still tied.
    pub fn head_is_tied(&self) -> bool {
        self.cfg.tie_word_embeddings && self.lm_head.weight().id() == self.embed.weight().id()
    }
}

impl Adaptable for Llama {
    fn linears(&self) -> Vec<&AdaptableLinear> {
        let mut v = Vec::with_capacity(self.layers.len() * 7 + 1);
        for l in &self.layers {
            v.extend([
                &l.attn.q,
                &l.attn.k,
                &l.attn.v,
                &l.attn.o,
                &l.mlp.gate,
                &l.mlp.up,
                &l.mlp.down,
            ]);
        }
        v.push(&self.lm_head);
        v.push(&self.embed);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut AdaptableLinear> {
        let mut v = Vec::with_capacity(self.layers.len() * 7 + 1);
        for l in &mut self.layers {
            let (a, m) = (&mut l.attn, &mut l.mlp);
            v.extend([
                &mut a.q,
                &mut a.k,
                &mut a.v,
                &mut a.o,
                &mut m.gate,
                &mut m.up,
                &mut m.down,
            ]);
        }
        v.push(&mut self.lm_head);
        v.push(&mut self.embed);
        v
    }

    fn norms(&self) -> Vec<&AdaptableNorm> {
        let mut v: Vec<&AdaptableNorm> =
            self.layers.iter().flat_map(|l| [&l.ln1, &l.ln2]).collect();
        v.push(&self.norm);
        v
    }

    fn norms_mut(&mut self) -> Vec<&mut AdaptableNorm> {
        let mut v: Vec<&mut AdaptableNorm> = self
            .layers
            .iter_mut()
            .flat_map(|l| [&mut l.ln1, &mut l.ln2])
            .collect();
        v.push(&mut self.norm);
        v
    }

    fn norm_consumers(&self, norm: &str) -> Vec<String> {
        self.linears_reading(norm)
    }

    fn input_shape(&self) -> Option<InputShape> {
        Some(InputShape {
            hidden: self.cfg.hidden_size,
            layers: self.cfg.num_hidden_layers,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
        })
    }

    fn input_adapter(&self) -> Option<(&str, &dyn InputAdapter)> {
        self.input.as_ref().map(|(n, a)| (n.as_str(), a.as_ref()))
    }

    fn set_input_adapter(&mut self, name: &str, adapter: Box<dyn InputAdapter>) -> Result<()> {
        if let Some((old, _)) = &self.input {
            return Err(petal_core::Error::msg(format!(
                "the model already has input adapter `{old}`"
            )));
        }
        self.input = Some((name.to_string(), adapter));
        Ok(())
    }

    fn base_param_count(&self) -> usize {
        let mut n = self.norm.base().elem_count();
        for l in &self.layers {
            n += l.ln1.base().elem_count() + l.ln2.base().elem_count();
        }
        for lin in self.linears() {
            if lin.path() == "lm_head" && self.cfg.tie_word_embeddings {
                continue;
            }
            n += lin.in_features() * lin.out_features()
                + lin.bias().map(|b| b.elem_count()).unwrap_or(0);
        }
        n
    }
}

/// A randomly initialised model (normal(0, 0.02) weights, unit norms), for benchmarks.
pub fn random_weights(
    cfg: &LlamaConfig,
    seed: u64,
) -> Result<std::collections::HashMap<String, Tensor>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.02).map_err(|e| petal_core::Error::msg(e.to_string()))?;
    let mut m = std::collections::HashMap::new();
    let mut put = |name: String, shape: &[usize], norm: bool| -> Result<()> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if norm {
            vec![1.0; n]
        } else {
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        m.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        Ok(())
    };
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let (nq, nkv, inter) = (
        cfg.num_attention_heads * d,
        cfg.num_key_value_heads * d,
        cfg.intermediate_size,
    );
    put(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, h],
        false,
    )?;
    put("model.norm.weight".into(), &[h], true)?;
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[cfg.vocab_size, h], false)?;
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("self_attn.q_proj", [nq, h]),
            ("self_attn.k_proj", [nkv, h]),
            ("self_attn.v_proj", [nkv, h]),
            ("self_attn.o_proj", [h, nq]),
            ("mlp.gate_proj", [inter, h]),
            ("mlp.up_proj", [inter, h]),
            ("mlp.down_proj", [h, inter]),
        ] {
            put(format!("{p}.{n}.weight"), &s, false)?;
        }
        if cfg.attention_bias {
            for (n, o) in [("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)] {
                put(format!("{p}.self_attn.{n}.bias"), &[o], false)?;
            }
        }
        put(format!("{p}.input_layernorm.weight"), &[h], true)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h], true)?;
    }
    Ok(m)
}
