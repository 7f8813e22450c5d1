//! The BERT encoder (BERT, all-MiniLM-L6-v2) with a sequence-classification head, as
//! transformers' `BertForSequenceClassification`: word, learned position and token-type
//! embeddings and a LayerNorm; post-norm layers (bidirectional attention over the unpadded
//! keys, exact GELU); the pooler (dense + tanh on the first token) and a linear classifier.
//! Module paths are that class's (`bert.encoder.layer.0.attention.self.query`, `classifier`)
//! whether the file holds a `BertModel` (MiniLM: no `bert.` prefix, no classifier) or the
//! classification model, so PEFT adapters apply either way. Every projection is an
//! `AdaptableLinear`; dropout is off (the frozen base's dropout in training is not modelled).

use crate::config::{count, num};
use crate::weights::WeightSource;
use candle_core::{DType, Device, Tensor, D};
use petal_core::adapter::InputShape;
use petal_core::{Adaptable, AdaptableLinear, Ctx, Error, InputAdapter, Result};
use petal_ops::Kernels;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// Classes of a head saved with the model (`id2label` / `num_labels`), if any.
    pub num_labels: Option<usize>,
}

impl BertConfig {
    /// From HF `config.json`; a decoder's config (or any other encoder's) is refused naming
    /// `model_type`.
    pub fn from_hf_json(text: &str, file: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::config(file, "(json)", format!("not valid JSON: {e}")))?;
        let mt = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if mt != "bert" {
            return Err(Error::config(
                file,
                "model_type",
                format!(
                    "`{mt}` is not an encoder petal reads: sequence classification needs a \
                     BERT encoder (model_type `bert`, e.g. all-MiniLM-L6-v2)"
                ),
            ));
        }
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(Error::config(
                file,
                "hidden_act",
                format!("`{act}` is not supported (gelu)"),
            ));
        }
        let heads = count(&v, "num_attention_heads", file)?;
        let hidden = count(&v, "hidden_size", file)?;
        if hidden % heads != 0 {
            return Err(Error::config(
                file,
                "num_attention_heads",
                format!("{heads} does not divide hidden_size {hidden}"),
            ));
        }
        let labels = v
            .get("id2label")
            .and_then(Value::as_object)
            .map(|m| m.len())
            .or_else(|| {
                v.get("num_labels")
                    .and_then(Value::as_u64)
                    .map(|n| n as usize)
            });
        let cfg = BertConfig {
            vocab_size: count(&v, "vocab_size", file)?,
            hidden_size: hidden,
            num_hidden_layers: count(&v, "num_hidden_layers", file)?,
            num_attention_heads: heads,
            intermediate_size: count(&v, "intermediate_size", file)?,
            max_position_embeddings: count(&v, "max_position_embeddings", file)?,
            type_vocab_size: count(&v, "type_vocab_size", file)?,
            layer_norm_eps: num(&v, "layer_norm_eps", file).unwrap_or(1e-12),
            num_labels: labels,
        };
        for (k, n, max) in [
            ("vocab_size", cfg.vocab_size, 1 << 24),
            ("hidden_size", cfg.hidden_size, 1 << 16),
            ("num_hidden_layers", cfg.num_hidden_layers, 1 << 10),
            ("intermediate_size", cfg.intermediate_size, 1 << 18),
            (
                "max_position_embeddings",
                cfg.max_position_embeddings,
                1 << 16,
            ),
            ("type_vocab_size", cfg.type_vocab_size, 1 << 10),
        ] {
            if n > max {
                return Err(Error::config(
                    file,
                    k,
                    format!("{n} is out of range: at most {max}"),
                ));
            }
        }
        if !(cfg.layer_norm_eps.is_finite() && cfg.layer_norm_eps > 0.0) {
            return Err(Error::config(
                file,
                "layer_norm_eps",
                "must be finite and > 0",
            ));
        }
        Ok(cfg)
    }
}

/// A LayerNorm: weight and bias (h).
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug)]
struct Layer {
    query: AdaptableLinear,
    key: AdaptableLinear,
    value: AdaptableLinear,
    attn_out: AdaptableLinear,
    attn_ln: LayerNorm,
    intermediate: AdaptableLinear,
    out: AdaptableLinear,
    out_ln: LayerNorm,
}

#[derive(Debug)]
pub struct Bert {
    pub cfg: BertConfig,
    word: AdaptableLinear,
    position: Tensor,
    token_type: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    pooler: AdaptableLinear,
    classifier: AdaptableLinear,
    device: Device,
    kernels: Kernels,
    /// A token-level input adapter (PASTA): shifts of chosen tokens entering each layer.
    input: Option<(String, Box<dyn InputAdapter>)>,
}

/// Tensor `name` of a `BertForSequenceClassification` path, read under that name or, from a
/// `BertModel` file, without the `bert.` prefix.
fn get(w: &dyn WeightSource, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
    match name.strip_prefix("bert.") {
        Some(bare) if !w.contains(name) && w.contains(bare) => {
            w.get(bare, Some(shape), DType::F32, dev)
        }
        _ => w.get(name, Some(shape), DType::F32, dev),
    }
}

fn linear(
    w: &dyn WeightSource,
    path: &str,
    out: usize,
    inp: usize,
    dev: &Device,
) -> Result<AdaptableLinear> {
    Ok(AdaptableLinear::new(
        path,
        get(w, &format!("{path}.weight"), &[out, inp], dev)?,
        Some(get(w, &format!("{path}.bias"), &[out], dev)?),
    ))
}

fn layer_norm(w: &dyn WeightSource, path: &str, h: usize, dev: &Device) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: get(w, &format!("{path}.weight"), &[h], dev)?,
        bias: get(w, &format!("{path}.bias"), &[h], dev)?,
    })
}

/// Token types of a sequence as BERT's tokenizers make them: 0 up to and including the first
/// `[SEP]`, 1 after it (a pair's second text and its `[SEP]`).
pub fn segments(ids: &[u32], sep: u32) -> Vec<u32> {
    let first = ids
        .iter()
        .position(|&t| t == sep)
        .map_or(ids.len(), |i| i + 1);
    (0..ids.len()).map(|i| u32::from(i >= first)).collect()
}

/// N(0, std²) values of `shape`, drawn from `seed`.
fn normal(shape: &[usize], std: f32, seed: u64, dev: &Device) -> Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = Normal::new(0f32, std).map_err(|e| Error::msg(e.to_string()))?;
    let v: Vec<f32> = (0..shape.iter().product())
        .map(|_| n.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

impl Bert {
    /// The encoder of `w` with a classifier of `num_labels` classes: the file's own head when it
    /// has one (its class count must agree), else a new one drawn as transformers initialises
    /// it (weight N(0, 0.02²), bias 0) from `seed`.
    pub fn load(
        cfg: BertConfig,
        w: &dyn WeightSource,
        num_labels: Option<usize>,
        seed: u64,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let word = get(
            w,
            "bert.embeddings.word_embeddings.weight",
            &[cfg.vocab_size, h],
            device,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("bert.encoder.layer.{i}");
            let lin = |name: &str, o, inp| linear(w, &format!("{p}.{name}"), o, inp, device);
            layers.push(Layer {
                query: lin("attention.self.query", h, h)?,
                key: lin("attention.self.key", h, h)?,
                value: lin("attention.self.value", h, h)?,
                attn_out: lin("attention.output.dense", h, h)?,
                attn_ln: layer_norm(w, &format!("{p}.attention.output.LayerNorm"), h, device)?,
                intermediate: lin("intermediate.dense", inter, h)?,
                out: lin("output.dense", h, inter)?,
                out_ln: layer_norm(w, &format!("{p}.output.LayerNorm"), h, device)?,
            });
        }
        let saved = w.contains("classifier.weight");
        let classes = match (saved, num_labels) {
            (true, n) => {
                let c = w
                    .get("classifier.weight", None, DType::F32, device)?
                    .dim(0)?;
                if let Some(n) = n.filter(|&n| n != c) {
                    return Err(Error::msg(format!(
                        "the model's classifier has {c} classes but the data has {n} labels"
                    )));
                }
                c
            }
            (false, Some(n)) => n,
            (false, None) => cfg.num_labels.unwrap_or(2),
        };
        let classifier = if saved {
            linear(w, "classifier", classes, h, device)?
        } else {
            AdaptableLinear::new(
                "classifier",
                normal(&[classes, h], 0.02, seed, device)?,
                Some(Tensor::zeros(classes, DType::F32, device)?),
            )
        };
        Ok(Bert {
            word: AdaptableLinear::embedding("bert.embeddings.word_embeddings", word),
            position: get(
                w,
                "bert.embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, h],
                device,
            )?,
            token_type: get(
                w,
                "bert.embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, h],
                device,
            )?,
            emb_ln: layer_norm(w, "bert.embeddings.LayerNorm", h, device)?,
            layers,
            pooler: linear(w, "bert.pooler.dense", h, h, device)?,
            classifier,
            cfg,
            device: device.clone(),
            kernels,
            input: None,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Classes of the head.
    pub fn num_labels(&self) -> usize {
        self.classifier.out_features()
    }

    /// Last hidden states (b, t, hidden) for ids, token types (b, t) u32 and the attention
    /// mask (b, t) f32 (1 = a token, 0 = padding).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        types: &Tensor,
        mask: &Tensor,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let ctx = &self.query_ctx(ids, types, mask, ctx)?;
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::msg(format!(
                "a sequence of {t} tokens is longer than the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let h = self.cfg.hidden_size;
        let pos = self.position.narrow(0, 0, t)?.unsqueeze(0)?;
        let ty = self
            .token_type
            .index_select(&types.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let x = self.word.forward(ids, ctx)?.broadcast_add(&pos)?.add(&ty)?;
        let mut x = self.norm(&x, &self.emb_ln)?;
        // padded keys get -inf before the softmax: (b, 1, 1, t)
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e30)?.reshape((b, 1, 1, t))?;
        let input = (!ctx.is_frozen())
            .then(|| self.input.as_ref().map(|(_, a)| a.as_ref()))
            .flatten();
        let slots = input.map(|a| a.token_slots(ids, 0)).transpose()?.flatten();
        for (i, l) in self.layers.iter().enumerate() {
            if let (Some(a), Some(s)) = (input, slots.as_ref()) {
                if let Some(shift) = a.layer_shift(i, s)? {
                    x = (x + shift.reshape((b, t, h))?)?;
                }
            }
            x = self.layer(l, &x, &bias, ctx)?;
        }
        Ok(x)
    }

    /// `ctx` with each row's query where an active adapter reads one (FedIns): the frozen
    /// model's feature of the row, its first token's last hidden state from a pass without
    /// adapters (the official code's frozen query model).
    fn query_ctx(&self, ids: &Tensor, types: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<Ctx> {
        let ctx = ctx.with_kernels(self.kernels);
        if ctx.query().is_some()
            || ctx.is_frozen()
            || !self.linears().iter().any(|l| l.wants_query())
        {
            return Ok(ctx);
        }
        let frozen = self.hidden_states(ids, types, mask, &ctx.frozen())?;
        Ok(ctx.with_query(frozen.narrow(1, 0, 1)?.squeeze(1)?.detach()))
    }

    /// Class logits (b, classes) f32: the pooler on the first token, then the classifier.
    pub fn logits(&self, ids: &Tensor, types: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let ctx = &self.query_ctx(ids, types, mask, ctx)?;
        let x = self.hidden_states(ids, types, mask, ctx)?;
        let pooled = self.pooled(&x, ctx)?;
        self.classifier.forward(&pooled, ctx)
    }

    /// The pooler's output (b, hidden): tanh of the dense layer on the first token.
    pub fn pooled(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self
            .pooler
            .forward(&first, &ctx.with_kernels(self.kernels))?
            .tanh()?)
    }

    fn layer(&self, l: &Layer, x: &Tensor, bias: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let nh = self.cfg.num_attention_heads;
        let d = h / nh;
        let heads = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, nh, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(l.query.forward(x, ctx)?)?;
        let k = heads(l.key.forward(x, ctx)?)?;
        let v = heads(l.value.forward(x, ctx)?)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(bias)?;
        let p = petal_ops::softmax_last_dim(self.kernels, &scores)?;
        let o = p
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h))?;
        let a = self.norm(&(l.attn_out.forward(&o, ctx)? + x)?, &l.attn_ln)?;
        let i = l.intermediate.forward(&a, ctx)?.gelu_erf()?;
        self.norm(&(l.out.forward(&i, ctx)? + &a)?, &l.out_ln)
    }

    /// LayerNorm over the last axis.
    fn norm(&self, x: &Tensor, n: &LayerNorm) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.cfg.layer_norm_eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(&n.weight)?.broadcast_add(&n.bias)?)
    }
}

impl Adaptable for Bert {
    fn linears(&self) -> Vec<&AdaptableLinear> {
        let mut v = Vec::with_capacity(self.layers.len() * 6 + 3);
        for l in &self.layers {
            v.extend([
                &l.query,
                &l.key,
                &l.value,
                &l.attn_out,
                &l.intermediate,
                &l.out,
            ]);
        }
        v.extend([&self.pooler, &self.classifier, &self.word]);
        v
    }

    fn linears_mut(&mut self) -> Vec<&mut AdaptableLinear> {
        let mut v = Vec::with_capacity(self.layers.len() * 6 + 3);
        for l in &mut self.layers {
            v.extend([
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attn_out,
                &mut l.intermediate,
                &mut l.out,
            ]);
        }
        v.extend([&mut self.pooler, &mut self.classifier, &mut self.word]);
        v
    }

    /// PEFT's `all-linear` leaves the classification head out.
    fn output_head(&self) -> Option<&str> {
        Some("classifier")
    }

    fn input_shape(&self) -> Option<InputShape> {
        let (h, nh) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        Some(InputShape {
            hidden: h,
            layers: self.cfg.num_hidden_layers,
            kv_heads: nh,
            head_dim: h / nh,
        })
    }

    fn input_adapter(&self) -> Option<(&str, &dyn InputAdapter)> {
        self.input.as_ref().map(|(n, a)| (n.as_str(), a.as_ref()))
    }

    /// Token-level adapters only (PASTA): virtual tokens and key/value prefixes (prompt and
    /// prefix tuning) are not wired into the encoder yet, and are refused.
    fn set_input_adapter(&mut self, name: &str, adapter: Box<dyn InputAdapter>) -> Result<()> {
        if adapter.num_virtual_tokens() > 0 {
            return Err(Error::Unsupported(
                "prompt and prefix tuning on BERT encoders (virtual tokens) are not supported \
                 yet; PASTA and the linear methods are"
                    .into(),
            ));
        }
        if let Some((old, _)) = &self.input {
            return Err(Error::msg(format!(
                "the model already has input adapter `{old}`"
            )));
        }
        self.input = Some((name.to_string(), adapter));
        Ok(())
    }

    fn base_param_count(&self) -> usize {
        let lin: usize = self
            .linears()
            .iter()
            .map(|l| l.weight().elem_count() + l.bias().map_or(0, |b| b.elem_count()))
            .sum();
        let norms = (2 * self.layers.len() + 1) * 2 * self.cfg.hidden_size;
        lin + self.position.elem_count() + self.token_type.elem_count() + norms
    }
}
