//! FedIns (Feng et al., ICCV 2023, "Towards Instance-adaptive Inference for Federated
//! Learning"; official code chunmeifeng/FedIns): a pool of SSF entries, each instance served by
//! the mean of the entries whose keys best match it. Per targeted linear, the pool holds
//! `pool_size` scales and shifts (P, out); one key per entry (P, d) is shared by all layers.
//! An instance's query is the frozen model's feature of it (the first token's last hidden
//! state, an extra pass over the model without adapters: the model computes it when an
//! adapter asks, [`crate::AdaptableLinear::wants_query`]); its `top_k` entries by cosine
//! similarity of query and key are averaged uniformly into its SSF,
//! `y' = mean_k γ_k ⊙ y + mean_k β_k`. The choice is hard, so the task loss trains the chosen
//! entries and only the surrogate `key_weight · (1 - Σ_k cos(q, key_k) / B)` (summed over the
//! k chosen keys, averaged over the batch, as the official code) trains the keys: the trainer
//! adds it to each micro-batch's loss ([`FedInsTraining`]). The official code weighs the task
//! loss by `1 - key_weight`; petal leaves it at 1 (the same as a learning rate 1/(1 - λ) times
//! larger with the surrogate weight λ/(1 - λ)). Federated, every tensor (pool and keys) is
//! averaged over the clients (`python/flower`). With `pool_heads` (the default, as the official
//! code) the classifier head of `modules_to_save` is a pool too: a head per entry, each row
//! served by the mean of its chosen heads ([`FedInsHead`]). `mix = "batch"` averages the
//! choices over the batch as the official code does (`get_top_ssf`, `forward_head`: every row
//! of a batch gets the same SSF and head); petal's default, `instance`, is the paper's per-row
//! rule (the same at batch size 1). Encoder classifiers only (`--task-type seq-cls`), where a
//! query exists; cannot be merged (the scale depends on the instance). Saved as
//! `<module>.fedins_scale`, `<module>.fedins_shift`, `classifier.fedins_head_weight` /
//! `fedins_head_bias` and `base_model.fedins_keys`, `peft_type: "FEDINS"` (petal's own).

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, NewAdapter, WeightUpdate,
};
use crate::config::{finite, spec, AdapterConfig, InitWeights, Spec};
use crate::methods::ssf::{init_rows, paper_std};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var, D};
use rand::SeedableRng;
use std::sync::Mutex;

pub struct FedIns;

const KEYS: &str = "fedins_keys";

crate::method_options! {
    /// FedIns's options (petal's own method).
    pub struct FedInsOptions {
        /// SSF entries in the pool
        pub pool_size: usize = 25,
        /// Entries averaged for each instance (the best-matching keys)
        pub top_k: usize = 3,
        /// Weight of the key-matching surrogate loss
        pub key_weight: f64 = 0.1,
        /// Init of each entry: paper (γ ~ N(1, init_std), β ~ N(0, init_std)) | true (exactly
        /// γ = 1, β = 0) | false (std 0.5, a testing switch)
        pub init_weights: InitWeights = InitWeights::Named("paper".into()),
        /// Standard deviation of the paper's init (also of the keys)
        pub init_std: f64 = 0.02,
        /// Width of the queries and keys: the model's hidden size (set by petal train)
        pub query_dim: usize = 0,
        /// A classifier head per entry, chosen and averaged as the SSF entries (the official
        /// code's head pool), in place of the one trained head of `modules_to_save`
        pub pool_heads: bool = true,
        /// Over what the chosen entries are averaged: instance (each row its own k entries, the
        /// paper) | batch (every row the mean over the batch's choices, the official code)
        pub mix: String = "instance".into(),
    }
}

/// Each row's weights over the pool (b, P): 1/k on its `k` chosen entries, or with `batch` the
/// mean of those over the rows (the same for every row).
fn mix_weights(sim: &Tensor, k: usize, batch: bool) -> Result<Tensor> {
    let w = (choose(sim, k)? / k as f64)?;
    if !batch {
        return Ok(w);
    }
    Ok(w.mean_keepdim(0)?.broadcast_as(w.shape())?.contiguous()?)
}

impl AdapterMethod for FedIns {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn peft_type(&self) -> &'static str {
        "FEDINS"
    }

    fn options(&self) -> Spec {
        spec::<FedInsOptions>()
    }

    fn default_targets(&self) -> Option<&'static str> {
        Some(crate::target::ALL_LINEAR) // SSF after every linear, as the paper
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        cfg.set("query_dim", new.shape.hidden)?;
        Ok(())
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: FedInsOptions = cfg.options()?;
        let bad = |k: &str, m: String| Err(Error::config("adapter config", k, m));
        if o.pool_size == 0 {
            return bad(
                "pool_size",
                "is 0: the pool needs at least one entry".into(),
            );
        }
        if o.top_k == 0 || o.top_k > o.pool_size {
            return bad(
                "top_k",
                format!(
                    "is {}: it must be in 1..={} (pool_size)",
                    o.top_k, o.pool_size
                ),
            );
        }
        if o.mix != "instance" && o.mix != "batch" {
            return bad(
                "mix",
                format!("is {:?}: it must be instance or batch", o.mix),
            );
        }
        finite("key_weight", o.key_weight, Some(0.0))?;
        finite("init_std", o.init_std, Some(0.0))?;
        paper_std(&o.init_weights, o.init_std).map(drop)
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        Ok(2 * (cfg.options::<FedInsOptions>()?.pool_size as u64) * dims.out as u64)
    }

    fn shared_values(&self, cfg: &AdapterConfig, _dims: &ModuleDims) -> Result<u64> {
        let o: FedInsOptions = cfg.options()?;
        Ok((o.pool_size as u64) * o.query_dim as u64)
    }

    fn training(
        &self,
        _model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Box<dyn crate::TrainingHook>>> {
        let o: FedInsOptions = cfg.options()?;
        Ok(Some(Box::new(FedInsTraining {
            name: name.to_string(),
            key_weight: o.key_weight,
        })))
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: FedInsOptions = cfg.options()?;
        if o.query_dim == 0 {
            return Err(Error::config(
                "adapter config",
                "query_dim",
                "is 0: set it to the model's hidden size (petal train does)",
            ));
        }
        let dev = base.weight.device();
        let std = paper_std(&o.init_weights, o.init_std)?;
        let (scale, shift) = init_rows(std, o.pool_size, base.out_features, seed, dev)?;
        Ok(Box::new(FedInsLayer {
            scale: Var::from_tensor(&scale)?,
            shift: Var::from_tensor(&shift)?,
            pick: Pick::new(&o, base, seed)?,
            last_query: Mutex::new(None),
        }))
    }

    fn module_copy(
        &self,
        cfg: &AdapterConfig,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Option<Box<dyn AdapterLayer>>> {
        let o: FedInsOptions = cfg.options()?;
        if !o.pool_heads || base.embedding {
            return Ok(None);
        }
        // every entry starts as the model's head (a new classifier's random init, or the
        // file's); the entries part as different instances choose them
        let p = o.pool_size;
        let w = base.weight.to_dtype(DType::F32)?.unsqueeze(0)?;
        let weight = w.repeat((p, 1, 1))?;
        let bias = match base.bias {
            Some(b) => b.to_dtype(DType::F32)?.unsqueeze(0)?.repeat((p, 1))?,
            None => Tensor::zeros((p, base.out_features), DType::F32, base.weight.device())?,
        };
        Ok(Some(Box::new(FedInsHead {
            weight: Var::from_tensor(&weight)?,
            bias: Var::from_tensor(&bias)?,
            pick: Pick::new(&o, base, seed)?,
        })))
    }
}

/// What picks each row's entries: the shared keys, `top_k`, and how the choices mix.
#[derive(Debug)]
struct Pick {
    keys: Var, // (P, d), shared by every layer of the adapter
    top_k: usize,
    batch: bool,
}

impl Pick {
    fn new(o: &FedInsOptions, base: &BaseLinear, seed: u64) -> Result<Self> {
        if o.query_dim == 0 {
            return Err(Error::config(
                "adapter config",
                "query_dim",
                "is 0: set it to the model's hidden size (petal train does)",
            ));
        }
        let dev = base.weight.device();
        let keys = base.shared.get_or_init(KEYS, || {
            let mut g = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6b65_7973);
            crate::methods::normal(
                (o.pool_size, o.query_dim),
                o.init_std.max(1e-3),
                &mut g,
                dev,
            )
        })?;
        Ok(Pick {
            keys,
            top_k: o.top_k,
            batch: o.mix == "batch",
        })
    }

    /// The query of `ctx` for a batch of `b` rows and each row's weights over the pool (b, P).
    fn weights(&self, ctx: &crate::Ctx, b: usize) -> Result<(Tensor, Tensor)> {
        let q = ctx.query().ok_or_else(|| {
            Error::Unsupported(
                "FedIns matches each instance's query from the frozen model: it runs on \
                 encoder classifiers (--task-type seq-cls) only"
                    .into(),
            )
        })?;
        if q.dim(0)? != b {
            return Err(Error::Unsupported(format!(
                "FedIns: {} queries for a batch of {b} rows (mixed-adapter batches are not \
                 supported)",
                q.dim(0)?
            )));
        }
        let sim = similarity(q, &self.keys.as_tensor().detach())?;
        Ok((q.clone(), mix_weights(&sim, self.top_k, self.batch)?))
    }
}

/// `x / max(|x|, 1e-12)` over the last axis (torch's `F.normalize`).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

/// Cosine similarity of each row's query and each key: (b, P), with gradient to the keys.
fn similarity(query: &Tensor, keys: &Tensor) -> Result<Tensor> {
    let q = unit_rows(&query.detach().to_dtype(DType::F32)?)?;
    Ok(q.matmul(&unit_rows(keys)?.t()?)?)
}

/// Each row's chosen entries from its similarities `sim` (b, P): 1 at its `k` most similar keys
/// (ties: the lower index), 0 elsewhere. No gradient: the choice is hard.
fn choose(sim: &Tensor, k: usize) -> Result<Tensor> {
    let rows: Vec<Vec<f32>> = sim.detach().to_vec2()?;
    let p = sim.dim(1)?;
    let mut out = vec![0f32; rows.len() * p];
    for (i, r) in rows.iter().enumerate() {
        let mut idx: Vec<usize> = (0..p).collect();
        idx.sort_by(|&a, &b| r[b].total_cmp(&r[a]).then(a.cmp(&b)));
        for &j in &idx[..k.min(p)] {
            out[i * p + j] = 1.0;
        }
    }
    Ok(Tensor::from_vec(out, (rows.len(), p), sim.device())?)
}

#[derive(Debug)]
struct FedInsLayer {
    scale: Var, // (P, out)
    shift: Var, // (P, out)
    pick: Pick,
    /// The query of the last training forward (b, d): the surrogate loss's input.
    last_query: Mutex<Option<Tensor>>,
}

impl AdapterLayer for FedInsLayer {
    fn forward(&self, _x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let b = y.dim(0)?;
        // each row's mean of its k entries: (b, P) weights 1/k times the pool
        let (q, w) = self.pick.weights(ctx, b)?;
        if ctx.is_train() {
            *self.last_query.lock().expect("FedIns query") = Some(q.detach());
        }
        let out = *y.dims().last().unwrap_or(&0);
        let scale = w.matmul(self.scale.as_tensor())?.reshape((b, 1, out))?;
        let shift = w.matmul(self.shift.as_tensor())?.reshape((b, 1, out))?;
        let dims = y.dims().to_vec();
        let dt = y.dtype();
        let y3 = y.to_dtype(DType::F32)?.reshape((b, (), out))?;
        Ok(y3
            .broadcast_mul(&scale)?
            .broadcast_add(&shift)?
            .reshape(dims)?
            .to_dtype(dt)?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Err(Error::Unsupported(
            "FedIns picks each instance's scale and shift from its pool by the instance's \
             query: the update depends on the input and cannot be merged (serve it unmerged)"
                .into(),
        ))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "fedins_scale",
                var: &self.scale,
            },
            NamedTensor {
                name: "fedins_shift",
                var: &self.shift,
            },
        ]
    }

    fn shared_trained(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: KEYS,
            var: &self.pick.keys,
        }]
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn wants_query(&self) -> bool {
        true
    }
}

/// The head pool (`pool_heads`): on the classifier, in place of its one trained copy, each row
/// gets the mean of its chosen entries' heads, `y = x mean_k(W_k)^T + mean_k(b_k)`.
#[derive(Debug)]
struct FedInsHead {
    weight: Var, // (P, classes, hidden)
    bias: Var,   // (P, classes)
    pick: Pick,
}

impl AdapterLayer for FedInsHead {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (_, w) = self.pick.weights(ctx, b)?;
        let (p, c, h) = self.weight.as_tensor().dims3()?;
        let wm = w
            .matmul(&self.weight.as_tensor().reshape((p, c * h))?)?
            .reshape((b, c, h))?;
        let bm = w.matmul(self.bias.as_tensor())?.reshape((b, 1, c))?;
        let x3 = x.to_dtype(DType::F32)?.reshape((b, (), h))?;
        let out = x3.matmul(&wm.transpose(1, 2)?)?.broadcast_add(&bm)?;
        Ok(out.reshape(y.shape())?.to_dtype(y.dtype())?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Err(Error::Unsupported(
            "FedIns picks each instance's classifier head from its pool by the instance's \
             query: it cannot be merged (serve it unmerged)"
                .into(),
        ))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "fedins_head_weight",
                var: &self.weight,
            },
            NamedTensor {
                name: "fedins_head_bias",
                var: &self.bias,
            },
        ]
    }

    fn shared_trained(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: KEYS,
            var: &self.pick.keys,
        }]
    }

    fn wants_query(&self) -> bool {
        true
    }
}

/// The trainer's view of FedIns: the key-matching surrogate in every micro-batch's loss.
pub struct FedInsTraining {
    name: String,
    key_weight: f64,
}

impl crate::TrainingHook for FedInsTraining {
    fn regulariser(&self, model: &dyn crate::Adaptable) -> Result<Option<Tensor>> {
        surrogate(model, &self.name, self.key_weight)
    }
}

/// `w (1 - Σ_b Σ_k cos(q_b, key_{b,k}) / B)` over the last training forward's queries and
/// their chosen keys (gradient to the keys only); None before any such forward or when `w` is 0.
pub fn surrogate(model: &dyn crate::Adaptable, name: &str, w: f64) -> Result<Option<Tensor>> {
    let layer = model
        .linears()
        .into_iter()
        .filter_map(|l| l.layer(name))
        .filter_map(|a| a.as_any().and_then(|a| a.downcast_ref::<FedInsLayer>()))
        .next();
    let Some(layer) = layer.filter(|_| w > 0.0) else {
        return Ok(None);
    };
    let Some(q) = layer.last_query.lock().expect("FedIns query").take() else {
        return Ok(None);
    };
    let cos = similarity(&q, layer.pick.keys.as_tensor())?;
    let chosen = choose(&cos, layer.pick.top_k)?;
    let b = q.dim(0)? as f64;
    let reduced = (cos * chosen)?.sum_all()?;
    Ok(Some(((reduced * (-w / b))? + w)?))
}

#[cfg(test)]
#[path = "fedins_tests.rs"]
mod tests;
