//! AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
//! Fine-Tuning"). Mirrors PEFT `tuners/adalora` (`SVDLinear`, `RankAllocator`,
//! `AdaLoraModel.forward`'s orthogonal regulariser).
//!
//! SVD-form update: `dW = B (A ⊙ E) · s / (ranknum + 1e-5)` with `A (r, in)`, `B (out, r)`,
//! singular values `E (r, 1)`, `s = lora_alpha` (or r when alpha is 0) and `ranknum` the rank the
//! layer was created with (`init_r`). Init: E = 0 (identity), A, B ~ N(0, 0.02^2);
//! `init_lora_weights = false`: all N(0, 1). Saved as `lora_A`, `lora_B`, `lora_E` (no
//! `.weight`). Training (petal-train): the loss gains `orth_reg_weight` times the mean of
//! `||A A^T - I||_F` and `||B^T B - I||_F` over the layers, and after every optimizer step the
//! `RankAllocator` below tracks each triplet's importance (EMAs of `|p · grad|` and of its
//! deviation) and zeroes the least important singular values down to the scheduled budget
//! (cubic from `init_r` to `target_r` per layer between `tinit` and `total_step - tfinal`,
//! every `deltaT` steps). The final masks are written as `rank_pattern` (a list of kept flags
//! per `<module>.lora_E`) and the tensors are saved cut to the kept ranks, as PEFT does; loading
//! rebuilds the cut layers with the original `ranknum`.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, NewAdapter, SharedOption,
    WeightUpdate,
};
use crate::config::{
    probability, spec, unsupported, AdapterConfig, InitWeights, RankValue, Spec,
};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use crate::methods::lora::dropout;
use crate::methods::normal;
use crate::Result;
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub struct AdaLora;

crate::method_options! {
    /// AdaLoRA's options (PEFT `AdaLoraConfig`).
    pub struct AdaLoraOptions {
        /// PEFT's LoRA rank field (AdaLoRA sizes its layers by init_r)
        pub r: usize = 8,
        /// Scale numerator (0: init_r)
        pub alpha as "lora_alpha": f64 = 8.0,
        /// Dropout on the adapter's input
        pub dropout as "lora_dropout": f64 = 0.0,
        /// true: E starts at zero (identity); false: all random
        pub init as "init_lora_weights": InitWeights = InitWeights::Flag(true),
        /// Bias handling (only "none")
        pub bias: String = "none".into(),
        /// Weights stored (in, out) (not supported)
        pub fan_in_fan_out: bool = false,
        /// The kept ranks per `<module>.lora_E` (written at save)
        pub rank_pattern: BTreeMap<String, RankValue> = BTreeMap::new(),
        /// Rank each layer starts with
        pub init_r: usize = 12,
        /// Rank each layer ends with on average
        pub target_r: usize = 8,
        /// Steps before ranks are pruned
        pub tinit: usize = 0,
        /// Final steps with the ranks fixed
        pub tfinal: usize = 0,
        /// Prune every deltaT steps in between
        pub delta_t as "deltaT": usize = 1,
        /// EMA factor of the importance
        pub beta1: f64 = 0.85,
        /// EMA factor of the importance's uncertainty
        pub beta2: f64 = 0.85,
        /// Weight of the orthogonality regulariser
        pub orth_reg_weight: f64 = 0.5,
        /// Length of the run the schedule is laid over
        pub total_step: Option<usize> = None,
    }
}

#[derive(Debug)]
pub struct AdaLoraLayer {
    pub a: Var, // (r, in)
    pub b: Var, // (out, r)
    pub e: Var, // (r, 1)
    scaling: f64,
    ranknum: f64,
    dropout: f64,
}

impl AdapterMethod for AdaLora {
    fn peft_type(&self) -> &'static str {
        "ADALORA"
    }

    fn options(&self) -> Spec {
        spec::<AdaLoraOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: AdaLoraOptions = cfg.options()?;
        probability("lora_dropout", o.dropout)?;
        if o.fan_in_fan_out {
            return Err(unsupported("fan_in_fan_out", true));
        }
        if o.bias != "none" {
            return Err(unsupported("bias", format!("{:?}", o.bias)));
        }
        if let InitWeights::Named(n) = &o.init {
            return Err(unsupported("init_lora_weights", format!("{n:?}")));
        }
        Ok(())
    }

    fn shared_key(&self, o: SharedOption) -> Option<&'static str> {
        Some(match o {
            SharedOption::Rank => "init_r",
            SharedOption::Alpha => "lora_alpha",
            SharedOption::Dropout => "lora_dropout",
        })
    }

    fn set_size(&self, opts: &mut Map<String, Value>, r: usize, alpha: f64) {
        opts.insert("r".into(), r.into());
        opts.insert("init_r".into(), r.into());
        opts.insert("target_r".into(), (r / 2).max(1).into());
        opts.insert("lora_alpha".into(), alpha.into());
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("target-r", "target_r"),
            Flag::new("tinit", "tinit"),
            Flag::new("tfinal", "tfinal"),
            Flag::new("delta-t", "deltaT"),
            Flag::new("orth-reg-weight", "orth_reg_weight"),
        ]
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        // petal's training defaults: rank 8 pruned to two thirds, over the run's own length
        let steps = new.max_steps;
        if !new.given("init_r") {
            cfg.set("init_r", 8)?;
        }
        let o: AdaLoraOptions = cfg.options()?;
        cfg.set("r", o.init_r)?;
        for (key, value) in [
            ("target_r", (2 * o.init_r / 3).max(1)),
            ("tinit", steps / 10),
            ("tfinal", steps / 5),
        ] {
            if !new.given(key) {
                cfg.set(key, value)?;
            }
        }
        cfg.set("total_step", steps)
    }

    fn set_init_nonzero(&self, opts: &mut Map<String, Value>) {
        opts.insert("init_lora_weights".into(), false.into());
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: AdaLoraOptions = cfg.options()?;
        let init_r = o.init_r;
        // a saved adapter is cut to the ranks its mask keeps; the scale keeps the original rank
        let kept = match o.rank_pattern.get(&format!("{path}.lora_E")) {
            Some(RankValue::Mask(m)) => m.iter().filter(|&&k| k).count(),
            _ => init_r,
        };
        let (inp, out) = (base.in_features, base.out_features);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let nonzero = o.init == InitWeights::Flag(false);
        let std = if nonzero { 1.0 } else { 0.02 };
        let mat = |rows: usize, cols: usize, g: &mut rand::rngs::StdRng| -> Result<Tensor> {
            if rows * cols == 0 {
                return Ok(Tensor::zeros((rows, cols), DType::F32, dev)?);
            }
            normal((rows, cols), std, g, dev)
        };
        let a = mat(kept, inp, &mut g)?;
        let e = if nonzero {
            mat(kept, 1, &mut g)?
        } else {
            Tensor::zeros((kept, 1), DType::F32, dev)?
        };
        let b = mat(out, kept, &mut g)?;
        let alpha = o.alpha;
        Ok(Box::new(AdaLoraLayer {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            e: Var::from_tensor(&e)?,
            scaling: if alpha > 0.0 { alpha } else { init_r as f64 },
            ranknum: init_r as f64,
            dropout: o.dropout,
        }))
    }
}

impl AdaLoraLayer {
    fn rank(&self) -> usize {
        self.e.as_tensor().dims()[0]
    }

    fn factor(&self) -> f64 {
        self.scaling / (self.ranknum + 1e-5)
    }

    /// A ⊙ E (r, in).
    fn scaled_a(&self) -> Result<Tensor> {
        Ok(self.a.as_tensor().broadcast_mul(self.e.as_tensor())?)
    }
}

impl AdapterLayer for AdaLoraLayer {
    fn forward(&self, x: &Tensor, y: Tensor, train: bool) -> Result<Tensor> {
        if self.rank() == 0 {
            return Ok(y);
        }
        let mut x2 = crate::methods::oft::flat_input(x)?;
        if train && self.dropout > 0.0 {
            x2 = dropout(&x2, self.dropout)?;
        }
        let h = (x2.matmul(&self.scaled_a()?.t()?)? * self.factor())?;
        let d = h.matmul(&self.b.as_tensor().t()?)?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let out = self.b.as_tensor().dim(0)?;
        let inp = self.a.as_tensor().dim(1)?;
        if self.rank() == 0 {
            return Ok(WeightUpdate::Add(Tensor::zeros(
                (out, inp),
                DType::F32,
                self.a.as_tensor().device(),
            )?));
        }
        Ok(WeightUpdate::Add(
            (self.b.as_tensor().matmul(&self.scaled_a()?)? * self.factor())?,
        ))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "lora_A",
                var: &self.a,
            },
            NamedTensor {
                name: "lora_B",
                var: &self.b,
            },
            NamedTensor {
                name: "lora_E",
                var: &self.e,
            },
        ]
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("ADALORA", 3, 6.0, crate::testing::toy_targets());
    c.set("total_step", 10).unwrap();
    c
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, cfg: &AdapterConfig| cfg.options::<AdaLoraOptions>().unwrap().init_r
        * (inp + out + 1)
);

/// PEFT's `RankAllocator` and the model-level `update_and_allocate`, over adapter `name`:
/// importance EMAs per parameter entry, triplet scores, and the masks of the kept ranks.
#[derive(Debug)]
pub struct RankAllocator {
    name: String,
    beta1: f64,
    beta2: f64,
    tinit: usize,
    tfinal: usize,
    delta_t: usize,
    total_step: usize,
    init_bgt: usize,
    target_bgt: usize,
    layers: Vec<Tracked>,
    /// The masks PEFT writes as `rank_pattern` (None until the first masking step).
    masks: Option<Vec<Vec<bool>>>,
}

#[derive(Debug)]
struct Tracked {
    path: String,
    /// EMA of |p grad| and of its deviation, for A, B and E, as host vectors.
    ipt: [Vec<f32>; 3],
    unc: [Vec<f32>; 3],
}

/// The AdaLoRA layers of adapter `name`, with their module paths.
fn layers<'a>(model: &'a dyn crate::Adaptable, name: &str) -> Vec<(String, &'a AdaLoraLayer)> {
    model
        .linears()
        .into_iter()
        .filter_map(|l| {
            let a = l.layer(name)?.as_any()?.downcast_ref::<AdaLoraLayer>()?;
            Some((l.path().to_string(), a))
        })
        .collect()
}

/// `orth_reg_weight` times the mean over all A and B of `||A A^T - I||_F`, `||B^T B - I||_F`
/// (PEFT adds it to every forward's loss); None when the adapter is not AdaLoRA or w is 0.
pub fn orth_regulariser(
    model: &dyn crate::Adaptable,
    name: &str,
    cfg: &AdapterConfig,
) -> Result<Option<Tensor>> {
    let w = cfg.options::<AdaLoraOptions>()?.orth_reg_weight;
    let ls = layers(model, name);
    if ls.is_empty() || w == 0.0 {
        return Ok(None);
    }
    let mut total: Option<Tensor> = None;
    let mut n = 0usize;
    for (_, l) in ls.iter().filter(|(_, l)| l.rank() > 0) {
        let a = l.a.as_tensor();
        let b = l.b.as_tensor();
        for cov in [a.matmul(&a.t()?)?, b.t()?.matmul(b)?] {
            let eye = Tensor::eye(cov.dim(0)?, DType::F32, cov.device())?;
            let f = (cov - eye)?.sqr()?.sum_all()?.sqrt()?;
            total = Some(match total {
                Some(t) => (t + f)?,
                None => f,
            });
            n += 1;
        }
    }
    Ok(total.map(|t| t * (w / n.max(1) as f64)).transpose()?)
}

impl RankAllocator {
    /// An allocator when adapter `name` is AdaLoRA (`total_step` is required, as in PEFT).
    pub fn new(
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Self>> {
        let ls = layers(model, name);
        if ls.is_empty() {
            return Ok(None);
        }
        let o: AdaLoraOptions = cfg.options()?;
        let total_step = o.total_step.filter(|&t| t > 0).ok_or_else(|| {
            crate::Error::config(
                "adapter config",
                "total_step",
                "AdaLoRA needs the total number of steps",
            )
        })?;
        let (tinit, tfinal) = (o.tinit, o.tfinal);
        if tinit + tfinal >= total_step {
            return Err(crate::Error::config(
                "adapter config",
                "tinit / tfinal",
                format!("tinit ({tinit}) + tfinal ({tfinal}) must leave steps of total_step ({total_step}) to allocate in"),
            ));
        }
        let init_bgt = ls.iter().map(|(_, l)| l.rank()).sum();
        let mut layers = Vec::new();
        for (path, l) in &ls {
            let sizes = [l.a.as_tensor(), l.b.as_tensor(), l.e.as_tensor()].map(|t| t.elem_count());
            layers.push(Tracked {
                path: path.clone(),
                ipt: sizes.map(|n| vec![0f32; n]),
                unc: sizes.map(|n| vec![0f32; n]),
            });
        }
        Ok(Some(RankAllocator {
            name: name.to_string(),
            beta1: o.beta1,
            beta2: o.beta2,
            tinit,
            tfinal,
            delta_t: o.delta_t.max(1),
            total_step,
            init_bgt,
            target_bgt: o.target_r * ls.len(),
            layers,
            masks: None,
        }))
    }

    /// PEFT's `budget_schedule`: (budget, whether to mask at this step).
    pub fn budget(&self, step: usize) -> (usize, bool) {
        if step <= self.tinit {
            (self.init_bgt, false)
        } else if step > self.total_step - self.tfinal {
            (self.target_bgt, true)
        } else {
            let span = (self.total_step - self.tfinal - self.tinit) as f64;
            let mul = 1.0 - (step - self.tinit) as f64 / span;
            let b = (self.init_bgt as f64 - self.target_bgt as f64) * mul.powi(3)
                + self.target_bgt as f64;
            (b as usize, step % self.delta_t == 0)
        }
    }

    /// After the optimizer step of `step` (0-based), with the step's (clipped) gradients:
    /// PEFT's `AdaLoraModel.update_and_allocate(step)`.
    pub fn update(
        &mut self,
        model: &dyn crate::Adaptable,
        step: usize,
        grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        let edge = self.total_step - self.tfinal;
        if step < edge {
            self.update_importance(model, grad_of)?;
            let (budget, mask) = self.budget(step);
            if mask {
                self.mask_to_budget(model, budget)?;
            }
        } else if step == edge {
            let (budget, _) = self.budget(step);
            self.mask_to_budget(model, budget)?;
            for t in &mut self.layers {
                t.ipt
                    .iter_mut()
                    .chain(t.unc.iter_mut())
                    .for_each(|v| v.fill(0.0));
            }
        } else {
            self.apply_masks(model)?;
        }
        Ok(())
    }

    fn update_importance(
        &mut self,
        model: &dyn crate::Adaptable,
        grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        let ls = layers(model, &self.name);
        for (t, (_, l)) in self.layers.iter_mut().zip(ls) {
            for (k, var) in [&l.a, &l.b, &l.e].into_iter().enumerate() {
                let Some(g) = grad_of(var) else { continue };
                let p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
                for i in 0..p.len() {
                    let ipt = (p[i] * g[i]).abs();
                    t.ipt[k][i] = b1 * t.ipt[k][i] + (1.0 - b1) * ipt;
                    t.unc[k][i] = b2 * t.unc[k][i] + (1.0 - b2) * (ipt - t.ipt[k][i]).abs();
                }
            }
        }
        Ok(())
    }

    /// Triplet scores per layer: score(E_i) + mean over row i of A + mean over column i of B.
    fn scores(&self, model: &dyn crate::Adaptable) -> Result<Vec<Vec<f32>>> {
        let ls = layers(model, &self.name);
        let mut out = Vec::new();
        for (t, (_, l)) in self.layers.iter().zip(ls) {
            let r = l.rank();
            let (inp, outf) = (l.a.as_tensor().dim(1)?, l.b.as_tensor().dim(0)?);
            let s = |k: usize, i: usize| t.ipt[k][i] * t.unc[k][i];
            let v = (0..r)
                .map(|i| {
                    let a = (0..inp).map(|j| s(0, i * inp + j)).sum::<f32>() / inp as f32;
                    let b = (0..outf).map(|j| s(1, j * r + i)).sum::<f32>() / outf as f32;
                    s(2, i) + (a + b)
                })
                .collect();
            out.push(v);
        }
        Ok(out)
    }

    /// Zero the singular values of the `init_bgt - budget` least important triplets.
    fn mask_to_budget(&mut self, model: &dyn crate::Adaptable, budget: usize) -> Result<()> {
        let scores = self.scores(model)?;
        let k = self.init_bgt.saturating_sub(budget);
        let threshold = if k == 0 {
            f32::NEG_INFINITY
        } else {
            let mut all: Vec<f32> = scores.iter().flatten().copied().collect();
            all.sort_by(f32::total_cmp);
            all[k - 1] // torch.kthvalue: the k-th smallest
        };
        self.masks = Some(
            scores
                .iter()
                .map(|v| v.iter().map(|&s| s > threshold).collect())
                .collect(),
        );
        self.apply_masks(model)
    }

    fn apply_masks(&self, model: &dyn crate::Adaptable) -> Result<()> {
        let Some(masks) = &self.masks else {
            return Ok(());
        };
        for ((_, l), m) in layers(model, &self.name).into_iter().zip(masks) {
            let keep: Vec<f32> = m.iter().map(|&k| k as u8 as f32).collect();
            let keep = Tensor::from_vec(keep, (m.len(), 1), l.e.as_tensor().device())?;
            l.e.set(&l.e.as_tensor().mul(&keep)?)?;
        }
        Ok(())
    }

    /// The masks as PEFT's `rank_pattern` (`<module>.lora_E` -> kept flags), if any were made.
    pub fn rank_pattern(&self) -> Option<std::collections::BTreeMap<String, RankValue>> {
        let masks = self.masks.as_ref()?;
        Some(
            self.layers
                .iter()
                .zip(masks)
                .map(|(t, m)| (format!("{}.lora_E", t.path), RankValue::Mask(m.clone())))
                .collect(),
        )
    }

    /// Cut saved tensors (`<module>.lora_A/B/E`) to the kept ranks, as PEFT saves them.
    pub fn cut(&self, tensors: &mut std::collections::HashMap<String, Tensor>) -> Result<()> {
        let Some(masks) = &self.masks else {
            return Ok(());
        };
        for (t, m) in self.layers.iter().zip(masks) {
            let idx: Vec<u32> = (0..m.len() as u32).filter(|&i| m[i as usize]).collect();
            for (suffix, dim) in [("lora_A", 0), ("lora_E", 0), ("lora_B", 1)] {
                let key = format!("{}.{suffix}", t.path);
                if let Some(x) = tensors.get(&key) {
                    let cut = if idx.is_empty() {
                        let mut dims = x.dims().to_vec();
                        dims[dim] = 0;
                        Tensor::zeros(dims, x.dtype(), x.device())?
                    } else {
                        x.index_select(&Tensor::new(idx.as_slice(), x.device())?, dim)?
                    };
                    tensors.insert(key, cut);
                }
            }
        }
        Ok(())
    }

    /// Allocator state for a checkpoint (keys `adalora.<i>.<what>`), so a resumed run goes on
    /// exactly.
    pub fn state(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let dev = candle_core::Device::Cpu;
        let mut s = std::collections::HashMap::new();
        for (i, t) in self.layers.iter().enumerate() {
            for k in 0..3 {
                s.insert(
                    format!("adalora.{i}.ipt{k}"),
                    Tensor::new(t.ipt[k].as_slice(), &dev)?,
                );
                s.insert(
                    format!("adalora.{i}.unc{k}"),
                    Tensor::new(t.unc[k].as_slice(), &dev)?,
                );
            }
            if let Some(m) = self.masks.as_ref().map(|m| &m[i]) {
                let v: Vec<f32> = m.iter().map(|&k| k as u8 as f32).collect();
                s.insert(
                    format!("adalora.{i}.mask"),
                    Tensor::new(v.as_slice(), &dev)?,
                );
            }
        }
        Ok(s)
    }

    pub fn load_state(&mut self, s: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let mut masks = Vec::new();
        for (i, t) in self.layers.iter_mut().enumerate() {
            for k in 0..3 {
                for (what, dst) in [("ipt", &mut t.ipt[k]), ("unc", &mut t.unc[k])] {
                    let key = format!("adalora.{i}.{what}{k}");
                    let v = s
                        .get(&key)
                        .ok_or_else(|| crate::Error::msg(format!("checkpoint lacks `{key}`")))?
                        .to_vec1::<f32>()?;
                    *dst = v;
                }
            }
            if let Some(m) = s.get(&format!("adalora.{i}.mask")) {
                masks.push(m.to_vec1::<f32>()?.iter().map(|&v| v > 0.5).collect());
            }
        }
        self.masks = (masks.len() == self.layers.len()).then_some(masks);
        Ok(())
    }
}
