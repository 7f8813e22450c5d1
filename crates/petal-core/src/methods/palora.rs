//! PaLoRA (Dimitriadis et al., ICLR 2025, "Pareto Low-Rank Adapters: Efficient Multi-Task
//! Learning with Preferences"; official code nik-dim/palora, `palora_modules.py` `PaLinear`,
//! `utils/samplers.py` `AnnealingSampler`): one LoRA per task on each targeted linear, mixed by
//! a preference ray ω on the simplex,
//!
//! `y = x W^T + b + (alpha / r) Σ_k ω_k (x A_k^T) B_k^T`,
//!
//! trained on the preference-weighted loss `Σ_k ω_k L_k` with rays that anneal from the
//! simplex's centre towards its vertices (`rays`). At inference any ω is one point of the
//! Pareto front (the `preference` option; uniform by default); for a fixed ω the adapter merges
//! as a LoRA. A_k starts kaiming-uniform and B_k at zero (identity), as officially. petal's
//! decisions (docs/methods/palora.md): the base stays frozen (the paper trains it too), each
//! example belongs to one task (L_k is the token-mean loss of task k's examples of the step),
//! and the official learning-rate multiplier K on the LoRA group is left to `--lr`.
//!
//! Fast path: the K adapters are one LoRA of rank K r whose rank blocks are weighted by ω.
//!
//! petal's own adapter: `peft_type: "PALORA"`, tensors `<module>.palora_A` (K r, in) (task k's
//! A in rows k r .. (k + 1) r) and `<module>.palora_B` (out, K r).

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, NewAdapter, Rays,
    TrainingHook, WeightUpdate,
};
use crate::config::{finite, spec, AdapterConfig, Spec};
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use rand::SeedableRng;
use std::sync::RwLock;

pub struct Palora;

crate::method_options! {
    /// PaLoRA's options.
    pub struct PaloraOptions {
        /// Rank of each task's LoRA
        pub r: usize = 8,
        /// Scale numerator: task k's update is (lora_alpha / r) ω_k B_k A_k
        pub lora_alpha: f64 = 16.0,
        /// The tasks, in the order of a preference's weights (comma list; `petal train` fills
        /// it with the training data's tasks, sorted)
        [crate::config::parse_names]
        pub tasks: Vec<String> = Vec::new(),
        /// The preference ω used at inference and for merging: one weight >= 0 per task,
        /// summing to 1 (comma list; empty: uniform)
        [crate::config::parse_numbers]
        pub preference: Vec<f64> = Vec::new(),
        /// Rays per training step (the paper's window, >= 2): each micro-batch runs forward and
        /// backward once per ray
        pub window: usize = 2,
        /// Annealing exponent (the official `mul`): at progress t the base rays are raised to
        /// the power anneal t and renormalised
        pub anneal: f64 = 5.0,
        /// Distance of the two-task base rays from the simplex's vertices (the official epsilon)
        pub epsilon: f64 = 0.01,
        /// true: B starts at zero (identity); false: random (a testing switch)
        pub init_weights: bool = true,
    }
}

impl AdapterMethod for Palora {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // the low-rank updates are added to the base output; W is never read
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("tasks", r#"["a","b"]"#)])
    }

    fn peft_type(&self) -> &'static str {
        "PALORA"
    }

    fn options(&self) -> Spec {
        spec::<PaloraOptions>()
    }

    /// The tasks from the training data when not given; given ones must match the data's.
    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        if new.tasks.is_empty() {
            return Ok(());
        }
        if !new.given("tasks") {
            return cfg.set("tasks", &new.tasks);
        }
        let o: PaloraOptions = cfg.options()?;
        for t in &o.tasks {
            if !new.tasks.contains(t) {
                return Err(Error::config(
                    "adapter config",
                    "tasks",
                    format!(
                        "task {t:?} is not in the training data (its tasks: {})",
                        new.tasks.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: PaloraOptions = cfg.options()?;
        let bad = |k: &str, m: String| Err(Error::config("adapter config", k, m));
        if o.r == 0 {
            return bad("r", "0 is out of range: r >= 1".into());
        }
        finite("lora_alpha", o.lora_alpha, None)?;
        if o.tasks.len() < 2 {
            return bad(
                "tasks",
                format!(
                    "PaLoRA needs at least two tasks, got {} (train on data with a `task` \
                     field, or list them)",
                    o.tasks.len()
                ),
            );
        }
        let mut seen = o.tasks.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != o.tasks.len() {
            return bad("tasks", "a task is listed twice".into());
        }
        if !o.preference.is_empty() {
            check_ray("preference", &o.preference, o.tasks.len())?;
        }
        if o.window < 2 {
            return bad(
                "window",
                format!("{} is out of range: window >= 2", o.window),
            );
        }
        finite("anneal", o.anneal, Some(0.0))?;
        if !(0.0..0.5).contains(&o.epsilon) {
            return bad(
                "epsilon",
                format!("{} is out of range: must be in [0, 0.5)", o.epsilon),
            );
        }
        Ok(())
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        let o: PaloraOptions = cfg.options()?;
        Ok((o.tasks.len() as u64)
            .saturating_mul(o.r as u64)
            .saturating_mul((dims.inp + dims.out) as u64))
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: PaloraOptions = cfg.options()?;
        let (k, r) = (o.tasks.len(), o.r);
        let (out, inp, dev) = (base.out_features, base.in_features, base.weight.device());
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let a = crate::methods::kaiming_uniform((k * r, inp), &mut g, dev)?;
        let b = crate::methods::param((out, k * r), o.init_weights, &mut g, dev)?;
        Ok(Box::new(PaloraLayer {
            a: Var::from_tensor(&a)?,
            b,
            r,
            scale: o.lora_alpha / r as f64,
            ray: RwLock::new(inference_ray(&o)),
        }))
    }

    fn training(
        &self,
        _model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Box<dyn TrainingHook>>> {
        let o: PaloraOptions = cfg.options()?;
        Ok(Some(Box::new(PaloraTraining {
            name: name.to_string(),
            preference: inference_ray(&o),
            o,
        })))
    }
}

/// `ray` must hold `k` finite weights >= 0 summing to 1.
fn check_ray(key: &str, ray: &[f64], k: usize) -> Result<()> {
    let sum: f64 = ray.iter().sum();
    let msg = if ray.len() != k {
        format!("{} weights for {k} tasks: give one per task", ray.len())
    } else if ray.iter().any(|w| !w.is_finite() || *w < 0.0) {
        "every weight must be finite and >= 0".to_string()
    } else if (sum - 1.0).abs() > 1e-6 {
        format!("the weights sum to {sum}: they must sum to 1 (a point of the simplex)")
    } else {
        return Ok(());
    };
    Err(Error::config("adapter config", key, msg))
}

/// The configured preference, or the uniform one.
fn inference_ray(o: &PaloraOptions) -> Vec<f64> {
    match o.preference.is_empty() {
        true => vec![1.0 / o.tasks.len() as f64; o.tasks.len()],
        false => o.preference.clone(),
    }
}

/// The official `AnnealingSampler` at training progress `t` in [0, 1]: `n` base rays, raised
/// elementwise to the power `anneal t` and renormalised, so every ray is uniform at t = 0 and
/// they spread towards the vertices as t grows. Two tasks: `(p_i, 1 - p_i)` for p =
/// linspace(eps, 1 - eps, n). Three or more: the points of the simplex lattice of the largest
/// level whose point count is at most `n` (the official sampler's three-task mesh; `0^0 = 1`,
/// so vertices' zeros stay zero after t = 0).
pub fn rays(k: usize, n: usize, anneal: f64, eps: f64, t: f64) -> Vec<Vec<f64>> {
    let base: Vec<Vec<f64>> = if k == 2 {
        (0..n)
            .map(|i| {
                let p = match n {
                    1 => eps,
                    _ => eps + (1.0 - 2.0 * eps) * i as f64 / (n - 1) as f64,
                };
                vec![p, 1.0 - p]
            })
            .collect()
    } else {
        lattice(k, n)
    };
    base.into_iter()
        .map(|ray| {
            let v: Vec<f64> = ray.iter().map(|w| w.powf(anneal * t)).collect();
            let s: f64 = v.iter().sum();
            v.into_iter().map(|w| w / s).collect()
        })
        .collect()
}

/// The points `c / m` of the simplex with K coordinates, c whole numbers summing to m, for the
/// largest level m with at most `n` points (at least the vertices' level 1), in the order of
/// meshzoo's `triangle` for three tasks: the last coordinate outermost, each ascending, the
/// first taking what is left.
fn lattice(k: usize, n: usize) -> Vec<Vec<f64>> {
    let count = |m: usize| (1..k).fold(1usize, |c, i| c * (m + i) / i); // C(m + k - 1, k - 1)
    let mut m = 1;
    while count(m + 1) <= n {
        m += 1;
    }
    fn fill(i: usize, left: usize, c: &mut Vec<usize>, m: usize, out: &mut Vec<Vec<f64>>) {
        if i == 0 {
            c[0] = left;
            out.push(c.iter().map(|&x| x as f64 / m as f64).collect());
            return;
        }
        for v in 0..=left {
            c[i] = v;
            fill(i - 1, left - v, c, m, out);
        }
    }
    let mut out = Vec::new();
    fill(k - 1, m, &mut vec![0usize; k], m, &mut out);
    out
}

#[derive(Debug)]
struct PaloraLayer {
    a: Var, // (K r, in)
    b: Var, // (out, K r)
    r: usize,
    scale: f64,
    /// The preference the forward mixes the tasks' adapters with.
    ray: RwLock<Vec<f64>>,
}

impl PaloraLayer {
    /// B (out, K r) with each task's columns scaled by its ω_k s.
    fn scaled_b(&self) -> Result<Tensor> {
        let b = self.b.as_tensor();
        Ok(b.broadcast_mul(&self.rank_weights()?.unsqueeze(0)?)?)
    }

    /// (K r,) weights: ω_k scale, repeated over task k's rank block.
    fn rank_weights(&self) -> Result<Tensor> {
        let ray = self
            .ray
            .read()
            .map_err(|_| Error::msg("PaLoRA: ray lock"))?;
        let w: Vec<f32> = ray
            .iter()
            .flat_map(|&w| std::iter::repeat_n((w * self.scale) as f32, self.r))
            .collect();
        let n = w.len();
        Ok(Tensor::from_vec(w, n, self.a.device())?)
    }

    fn set_ray(&self, ray: &[f64]) -> Result<()> {
        let mut r = self
            .ray
            .write()
            .map_err(|_| Error::msg("PaLoRA: ray lock"))?;
        r.clear();
        r.extend_from_slice(ray);
        Ok(())
    }
}

impl AdapterLayer for PaloraLayer {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        let x2 = crate::methods::flat_input(x)?;
        let xa = x2
            .matmul(&self.a.as_tensor().t()?)?
            .broadcast_mul(&self.rank_weights()?)?;
        let d = xa
            .matmul(&self.b.as_tensor().t()?)?
            .reshape(y.shape())?
            .to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    /// With the frozen linear: LoRA's op over A and B ⊙ (ω_k s per rank block), so backward
    /// keeps x and the small matrices, not the (n, out) update.
    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        let run = || -> Result<Tensor> {
            let bw = self.scaled_b()?;
            let a = self.a.as_tensor();
            Ok(petal_ops::lora(ctx.kernels(), x, w, bias, a, &bw, 1.0)?)
        };
        Some(run())
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let bw = self.scaled_b()?;
        Ok(WeightUpdate::Add(bw.matmul(self.a.as_tensor())?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "palora_A",
                var: &self.a,
            },
            NamedTensor {
                name: "palora_B",
                var: &self.b,
            },
        ]
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// Training: the annealed rays of each step; between steps (evaluation, saving) the layers
/// hold the configured preference.
struct PaloraTraining {
    name: String,
    o: PaloraOptions,
    preference: Vec<f64>,
}

impl TrainingHook for PaloraTraining {
    fn rays(&self, step: usize, max_steps: usize) -> Option<Rays> {
        let t = step as f64 / max_steps.max(1) as f64;
        let o = &self.o;
        Some(Rays {
            tasks: o.tasks.clone(),
            rays: rays(o.tasks.len(), o.window, o.anneal, o.epsilon, t),
        })
    }

    fn set_ray(&self, model: &dyn crate::Adaptable, ray: &[f64]) -> Result<()> {
        set_preference(model, Some(&self.name), ray)
    }

    fn after_step(
        &mut self,
        model: &dyn crate::Adaptable,
        _step: usize,
        _grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        set_preference(model, Some(&self.name), &self.preference)
    }
}

/// Put preference `ray` on every PaLoRA layer of adapter `name` (of every adapter: None): a
/// point of the Pareto front without reloading. Errors when no such layer exists or the ray
/// does not fit.
pub fn set_preference(model: &dyn crate::Adaptable, name: Option<&str>, ray: &[f64]) -> Result<()> {
    let mut found = false;
    for l in model.linears() {
        let names = match name {
            Some(n) => vec![n],
            None => l.adapter_names(),
        };
        for n in names {
            let Some(layer) = l
                .layer(n)
                .and_then(|a| a.as_any())
                .and_then(|a| a.downcast_ref::<PaloraLayer>())
            else {
                continue;
            };
            let k = layer.ray.read().map_err(|_| Error::msg("ray lock"))?.len();
            check_ray("preference", ray, k)?;
            layer.set_ray(ray)?;
            found = true;
        }
    }
    if !found {
        return Err(Error::msg(match name {
            Some(n) => format!("adapter `{n}` has no PaLoRA layer to set a preference on"),
            None => "no PaLoRA adapter is loaded to set a preference on".to_string(),
        }));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("palora", 2, 4.0, crate::testing::toy_targets());
    c.set("tasks", ["a", "b", "c"]).unwrap();
    c.set("preference", [0.2, 0.5, 0.3]).unwrap();
    c
}

#[cfg(test)]
#[test]
fn palora_takes_its_fused_form() {
    crate::testing::assert_fused_taken(&conformance_config());
}

#[cfg(test)]
crate::conformance!(conformance, conformance_config, |inp, out, _cfg| 3
    * 2
    * (inp + out));

#[cfg(test)]
#[path = "palora_tests.rs"]
mod tests;

/// Over a quantized base: the update meets the blocks' product as it meets W dequantized.
#[test]
fn palora_over_quantized_blocks_equals_palora_over_them_dequantized() {
    let c = conformance_config();
    crate::testing::check_over_quantized_blocks(&Palora, &c, (12, 32), &|_| {});
}
