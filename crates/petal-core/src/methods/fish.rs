//! FISH mask, Fisher-induced sparse unchanging (Sung et al., NeurIPS 2021, "Training Neural
//! Networks with Fixed Sparse Masks"; official code varunnair18/FISH): only the weights with the
//! largest empirical Fisher information are trained.
//!
//! The empirical Fisher of every targeted weight, `F = Σ_n (∂L_n / ∂W)²` over `fisher_samples`
//! sequences, each its own gradient (the official "label-square": the true next tokens, batch
//! size one), is gathered in the first training steps: each module's per-sequence weight
//! gradient `dy_n^T x_n` is captured in backward (W never becomes a variable). Then the global
//! top `K = int(density Σ out in)` over all targeted modules is the mask, fixed from then on, and
//! only those K values train, from zero (the update is `W[mask] += values`, so nothing outside
//! the mask can move, weight decay included). The optimizer starts afresh at the mask. The
//! sparse product never builds a dense dW (`petal_ops::sparse`). Mergeable. petal's own adapter
//! `peft_type: "FISH"`, at the model level (one global mask): `base_model.fish_values` (K, the
//! trained values) and `base_model.fish_indices` (K, int64): positions in the targeted weights laid
//! end to end in module order, each module's `out x in` row-major.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, TrainingHook, WeightUpdate,
};
use crate::config::{spec, AdapterConfig, Spec};
use crate::methods::grad_mask::GradSquares;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const VALUES: &str = "fish_values";
pub const INDICES: &str = "fish_indices";

pub struct Fish;

crate::method_options! {
    /// FISH's options.
    pub struct FishOptions {
        /// Share of the targeted weights trained, in (0, 1] (the paper's 0.005)
        pub density: f64 = 0.005,
        /// Sequences whose per-sequence squared gradients estimate the Fisher (the first steps)
        pub fisher_samples: usize = 128,
        /// How the mask is chosen: fisher, or random (the paper's baseline; same steps, no Fisher)
        pub mask: String = "fisher".into(),
        /// true: the values start at zero (dW = 0); false: a random mask and values (a testing switch)
        pub init_weights: bool = true,
    }
}

fn count(density: f64, numel: usize) -> usize {
    ((density * numel as f64) as usize).max(1)
}

impl AdapterMethod for Fish {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // FISH adds its sparse update to the base output; W is never read
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("fisher_samples", "4")])
    }

    fn peft_type(&self) -> &'static str {
        "FISH"
    }

    fn options(&self) -> Spec {
        spec::<FishOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: FishOptions = cfg.options()?;
        if !(o.density > 0.0 && o.density <= 1.0) {
            return Err(Error::config(
                "adapter config",
                "density",
                format!(
                    "{} is out of range: the density must be in (0, 1]",
                    o.density
                ),
            ));
        }
        if !matches!(o.mask.as_str(), "fisher" | "random") {
            return Err(Error::config(
                "adapter config",
                "mask",
                format!("{:?} is not a mask petal knows: fisher or random", o.mask),
            ));
        }
        if o.fisher_samples == 0 {
            return Err(Error::config(
                "adapter config",
                "fisher_samples",
                "0 is out of range: the Fisher needs at least 1 sequence",
            ));
        }
        Ok(())
    }

    fn layer_values(&self, _cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // the Fisher accumulator while it is estimated
        Ok(dims.full())
    }

    fn shared_values(&self, cfg: &AdapterConfig, dims: &ModuleDims) -> Result<u64> {
        // values and indices, bounded by one full matrix per extent
        let o: FishOptions = cfg.options()?;
        Ok(2 * count(o.density, dims.max_in * dims.max_out) as u64)
    }

    fn training(
        &self,
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Box<dyn TrainingHook>>> {
        let o: FishOptions = cfg.options()?;
        let layers: Vec<&FishLayer> = model
            .linears()
            .into_iter()
            .filter_map(|l| l.layer(name)?.as_any()?.downcast_ref::<FishLayer>())
            .collect();
        let Some(first) = layers.first() else {
            return Ok(None);
        };
        Ok(Some(Box::new(FishTraining {
            layers: layers.iter().map(|l| l.handle()).collect(),
            values: first.values.clone(),
            indices: first.indices.clone(),
            samples: o.fisher_samples,
            chosen_at: None,
            random: (o.mask == "random").then_some(0x5eed ^ o.fisher_samples as u64),
        })))
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: FishOptions = cfg.options()?;
        let (out, inp) = (base.out_features, base.in_features);
        let dev = base.weight.device();
        let sh = base.shared;
        let k = count(o.density, sh.numel);
        let values = sh.get_or_init(VALUES, || Ok(Tensor::zeros(k, DType::F32, dev)?))?;
        let indices = sh.get_or_init(INDICES, || Ok(Tensor::zeros(k, DType::I64, dev)?))?;
        let layer = FishLayer {
            values,
            indices,
            offset: sh.claim(out * inp),
            total: sh.numel,
            out,
            inp,
            range: Mutex::new(None),
            estimating: Arc::new(AtomicBool::new(o.init_weights)),
            grads: Arc::default(),
        };
        if !o.init_weights && layer.offset == 0 {
            // the testing switch: a random global mask and random values, set by the first
            // layer for all (the others find their share at first use)
            let mut g = rand::rngs::StdRng::seed_from_u64(seed);
            let mut pos: Vec<i64> = (0..sh.numel as i64).collect();
            rand::seq::SliceRandom::shuffle(pos.as_mut_slice(), &mut g);
            pos.truncate(k);
            pos.sort_unstable();
            layer.indices.set(&Tensor::from_vec(pos, k, dev)?)?;
            layer
                .values
                .set(&crate::methods::normal((1, k), 0.5, &mut g, dev)?.reshape(k)?)?;
        }
        Ok(Box::new(layer))
    }
}

#[derive(Debug)]
struct FishLayer {
    values: Var,  // shared (K,)
    indices: Var, // shared (K,) int64, global positions, ascending
    /// This module's first position among the targeted weights laid end to end, and their count
    offset: usize,
    total: usize,
    out: usize,
    inp: usize,
    /// This module's share of the mask: (first, end) in the global arrays and its local positions
    range: Mutex<Option<(usize, usize, Tensor)>>,
    /// While the Fisher is estimated (no mask yet)
    estimating: Arc<AtomicBool>,
    grads: Arc<GradSquares>,
}

impl FishLayer {
    fn estimating(&self) -> Result<bool> {
        Ok(self.estimating.load(Ordering::Relaxed))
    }

    /// This module's (first, end, local positions) in the global mask, found once.
    fn share(&self) -> Result<Option<(usize, usize, Tensor)>> {
        if self.estimating()? {
            return Ok(None);
        }
        let mut r = self.range.lock().expect("fish range");
        if r.is_none() {
            let idx = self.indices.as_tensor().to_vec1::<i64>()?;
            let (lo, hi) = (
                self.offset as i64,
                (self.offset + self.out * self.inp) as i64,
            );
            let first = idx.partition_point(|&p| p < lo);
            let end = idx.partition_point(|&p| p < hi);
            let local: Vec<i64> = idx[first..end].iter().map(|p| p - lo).collect();
            let n = local.len();
            *r = Some((
                first,
                end,
                Tensor::from_vec(local, n, self.values.device())?,
            ));
        }
        Ok(r.clone())
    }

    fn handle(&self) -> LayerHandle {
        LayerHandle {
            grads: self.grads.clone(),
            numel: self.out * self.inp,
            estimating: self.estimating.clone(),
        }
    }
}

impl AdapterLayer for FishLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if self.estimating()? {
            if ctx.is_train() {
                return self.grads.capture(x, y, &self.values, true);
            }
            return Ok(y);
        }
        let Some((first, end, pos)) = self.share()? else {
            return Ok(y);
        };
        if first == end {
            return Ok(y);
        }
        let v = self.values.as_tensor().narrow(0, first, end - first)?;
        let s = petal_ops::sparse::sparse_delta(ctx.kernels(), x, &v, &pos, self.out)?;
        let s = s.to_dtype(y.dtype())?;
        Ok((y + s)?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let dev = self.values.device();
        let dw = match self.share()? {
            Some((first, end, pos)) if first < end => {
                let v = self.values.as_tensor().narrow(0, first, end - first)?;
                petal_ops::sparse::dense(&v, &pos, self.out, self.inp)?
            }
            _ => Tensor::zeros((self.out, self.inp), DType::F32, dev)?,
        };
        Ok(WeightUpdate::Add(dw))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        Vec::new()
    }

    fn shared_trained(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: VALUES,
            var: &self.values,
        }]
    }

    fn shared(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: INDICES,
            var: &self.indices,
        }]
    }

    fn check_loaded(&self) -> Result<()> {
        let idx = self.indices.as_tensor().to_vec1::<i64>()?;
        if self.offset == 0 {
            // one check of the shared mask, by the first module
            let total = self.total;
            let ok = idx.windows(2).all(|w| w[0] < w[1])
                && idx.first().is_none_or(|&p| p >= 0)
                && idx.last().is_none_or(|&p| (p as usize) < total);
            if !ok {
                return Err(Error::msg(format!(
                    "`base_model.{INDICES}` must hold ascending, distinct positions in \
                     0..{total} (the targeted weights laid end to end): it does not fit this \
                     model's targeted modules"
                )));
            }
        }
        self.estimating.store(false, Ordering::Relaxed);
        *self.range.lock().expect("fish range") = None;
        Ok(())
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

struct LayerHandle {
    grads: Arc<GradSquares>,
    numel: usize,
    estimating: Arc<AtomicBool>,
}

struct FishTraining {
    layers: Vec<LayerHandle>,
    values: Var,
    indices: Var,
    samples: usize,
    /// The step after which the mask was chosen (the optimizer starts afresh there)
    chosen_at: Option<usize>,
    /// A random mask from this seed instead of the Fisher's
    random: Option<u64>,
}

impl FishTraining {
    /// The global top K of the Fisher over every module, as ascending global positions.
    fn choose(&self) -> Result<()> {
        let k = self.values.elem_count();
        if let Some(seed) = self.random {
            let total: usize = self.layers.iter().map(|l| l.numel).sum();
            let mut g = rand::rngs::StdRng::seed_from_u64(seed);
            let mut keep = rand::seq::index::sample(&mut g, total, k.min(total))
                .into_iter()
                .map(|i| i as i64)
                .collect::<Vec<_>>();
            keep.sort_unstable();
            self.layers
                .iter()
                .try_for_each(|l| l.grads.take_mean().map(drop))?;
            let n = keep.len();
            return Ok(self
                .indices
                .set(&Tensor::from_vec(keep, n, self.indices.device())?)?);
        }
        let mut all: Vec<f32> = Vec::new();
        for l in &self.layers {
            match l.grads.take_mean()? {
                Some(m) => all.extend(m.flatten_all()?.to_vec1::<f32>()?),
                None => all.extend(std::iter::repeat_n(0.0, l.numel)),
            }
        }
        let mut copy = all.clone();
        let k = k.min(copy.len());
        copy.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let t = copy[k - 1];
        drop(copy);
        let above = all.iter().filter(|&&v| v > t).count();
        let mut ties = k - above;
        let mut keep = Vec::with_capacity(k);
        for (i, &v) in all.iter().enumerate() {
            if v > t || (v == t && ties > 0) {
                if v == t {
                    ties -= 1;
                }
                keep.push(i as i64);
            }
        }
        let dev = self.indices.device();
        self.indices.set(&Tensor::from_vec(keep, k, dev)?)?;
        Ok(())
    }
}

impl FishTraining {
    fn estimating(&self) -> bool {
        self.layers
            .first()
            .is_some_and(|l| l.estimating.load(Ordering::Relaxed))
    }

    fn set_estimating(&self, on: bool) {
        self.layers
            .iter()
            .for_each(|l| l.estimating.store(on, Ordering::Relaxed));
    }
}

impl TrainingHook for FishTraining {
    fn single_process_only(&self) -> Option<&'static str> {
        Some("its mask is chosen from squared gradients each process gathers on its own data")
    }
    fn after_step(
        &mut self,
        _model: &dyn crate::Adaptable,
        step: usize,
        _grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        let seen = self.layers.first().map(|l| l.grads.count()).unwrap_or(0);
        if self.estimating() && seen >= self.samples {
            self.choose()?;
            self.set_estimating(false);
            self.chosen_at = Some(step);
        }
        Ok(())
    }

    fn reset_optimizer_after(&self, step: usize) -> bool {
        self.chosen_at == Some(step)
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let e = self.estimating() as u32;
        Ok(HashMap::from([(
            "fish.estimating".to_string(),
            Tensor::new(&[e], &Device::Cpu)?,
        )]))
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let e = state
            .get("fish.estimating")
            .ok_or_else(|| Error::msg("checkpoint lacks `fish.estimating`"))?
            .to_vec1::<u32>()?[0];
        self.set_estimating(e == 1);
        Ok(())
    }

    fn export(&self, _cfg: &mut AdapterConfig, _t: &mut HashMap<String, Tensor>) -> Result<()> {
        if self.estimating() {
            let seen = self.layers.first().map(|l| l.grads.count()).unwrap_or(0);
            return Err(Error::msg(format!(
                "FISH: the run ended while the Fisher was estimated ({seen} of fisher_samples = \
                 {} sequences): nothing was trained; raise --max-steps or lower fisher_samples",
                self.samples
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("fish", 1, 1.0, crate::testing::toy_targets());
    c.set("density", 0.1).unwrap();
    c
}

#[cfg(test)]
crate::conformance!(conformance, conformance_config, |inp, _out, _cfg| {
    // one global count over both toy linears, (12, 10) and (6, 12): int(0.1 x 192) = 19, shared
    // (counted once: here with fc1, whose input is 10)
    if inp == 10 {
        count(0.1, 12 * 10 + 6 * 12)
    } else {
        0
    }
});

#[cfg(test)]
#[path = "fish_tests.rs"]
mod tests;

/// Over a quantized base: the update meets the blocks' product as it meets W dequantized.
#[test]
fn fish_over_quantized_blocks_equals_fish_over_them_dequantized() {
    let c = conformance_config();
    crate::testing::check_over_quantized_blocks(&Fish, &c, (12, 32), &|_| {});
}
