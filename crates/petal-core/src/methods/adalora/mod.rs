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

use crate::adapter::ModuleDims;
use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, NewAdapter, SharedOption,
    WeightUpdate,
};
use crate::config::{spec, AdapterConfig, InitWeights, RankValue, Spec};
use crate::methods::lora::{dropout, LoraCore};
use crate::methods::normal;
use crate::Result;
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use serde_json::{Map, Value};

pub struct AdaLora;

crate::method_options! {
    /// AdaLoRA's options (PEFT `AdaLoraConfig`): LoRA's (its `r` unused: layers are sized by
    /// init_r; `rank_pattern` holds the kept ranks per `<module>.lora_E`, written at save) and
    /// the budget schedule's.
    pub struct AdaLoraOptions {
        flatten core: LoraCore;
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
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // A, B and E (the singular values) at the initial rank
        let r = cfg.options::<AdaLoraOptions>()?.init_r;
        Ok(dims.low_rank(r).saturating_add(r as u64))
    }
    fn peft_type(&self) -> &'static str {
        "ADALORA"
    }

    fn options(&self) -> Spec {
        spec::<AdaLoraOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: AdaLoraOptions = cfg.options()?;
        o.core.check(&["none"], |_| false)
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
        // the run's length unless given; a run of no steps (one that only writes the new
        // adapter, or counts its values) gets a schedule of one, which prunes nothing
        if !new.given("total_step") {
            cfg.set("total_step", steps.max(1))?;
        }
        Ok(())
    }

    fn training(
        &self,
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Box<dyn crate::TrainingHook>>> {
        let Some(alloc) = RankAllocator::new(model, name, cfg)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(allocator::AdaLoraTraining {
            alloc,
            name: name.to_string(),
            orth_reg_weight: cfg.options::<AdaLoraOptions>()?.orth_reg_weight,
        })))
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
        let kept = match o.core.rank_pattern.get(&format!("{path}.lora_E")) {
            Some(RankValue::Mask(m)) => m.iter().filter(|&&k| k).count(),
            _ => init_r,
        };
        let (inp, out) = (base.in_features, base.out_features);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let nonzero = o.core.init == InitWeights::Flag(false);
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
        let alpha = o.core.alpha;
        Ok(Box::new(AdaLoraLayer {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            e: Var::from_tensor(&e)?,
            scaling: if alpha > 0.0 { alpha } else { init_r as f64 },
            ranknum: init_r as f64,
            dropout: o.core.dropout,
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
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if self.rank() == 0 {
            return Ok(y);
        }
        let mut x2 = crate::methods::flat_input(x)?;
        if ctx.is_train() && self.dropout > 0.0 {
            x2 = dropout(&x2, self.dropout, ctx)?;
        }
        let h = (x2.matmul(&self.scaled_a()?.t()?)? * self.factor())?;
        let d = h.matmul(&self.b.as_tensor().t()?)?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    /// With the frozen linear: LoRA's op over (A ⊙ E, B) at `scaling / ranknum`, so backward
    /// keeps x and the small matrices, not the (n, out) update; dropout (on the CPU's fused
    /// kernel only) draws the composed form's mask.
    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        let dropping = ctx.is_train() && self.dropout > 0.0;
        if self.rank() == 0 || (dropping && !petal_ops::cpu::fast_lora_ok(ctx.kernels(), x, w)) {
            return None;
        }
        let run = || -> Result<Tensor> {
            let (a, b, k) = (self.scaled_a()?, self.b.as_tensor(), ctx.kernels());
            if !dropping {
                return Ok(petal_ops::lora(k, x, w, bias, &a, b, self.factor())?);
            }
            let x2 = dropout(&crate::methods::flat_input(x)?, self.dropout, ctx)?;
            let h = x2.matmul(&a.t()?)?;
            Ok(petal_ops::lora_linear(k, x, w, bias, &h, b, self.factor())?)
        };
        Some(run())
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
#[test]
fn fused_adalora_equals_the_composed_form_with_and_without_dropout() {
    for p in [0.0, 0.3] {
        let mut c = conformance_config();
        c.set("init_lora_weights", false).unwrap(); // E nonzero: every gradient checked
        c.set("lora_dropout", p).unwrap();
        crate::testing::assert_fused_taken(&c);
        crate::testing::check_fused_equals_composed(&c);
    }
}

#[cfg(test)]
#[test]
fn the_schedule_spans_the_run_or_the_given_total_step() {
    let total = |max_steps, given: &[&str], set: Option<usize>| {
        let mut c = AdapterConfig::for_method("ADALORA", 3, 6.0, crate::testing::toy_targets());
        if let Some(t) = set {
            c.set("total_step", t).unwrap();
        }
        AdaLora
            .prepare(&mut c, &crate::testing::new_adapter(max_steps, given, &[]))
            .unwrap();
        let o: AdaLoraOptions = c.options().unwrap();
        (o.total_step, o.tinit, o.tfinal)
    };
    assert_eq!(total(40, &[], None), (Some(40), 4, 8));
    assert_eq!(total(0, &[], None), (Some(1), 0, 0));
    assert_eq!(total(40, &["total_step"], Some(100)), (Some(100), 4, 8));
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, cfg: &AdapterConfig| cfg.options::<AdaLoraOptions>().unwrap().init_r
        * (inp + out + 1)
);

mod allocator;
pub use allocator::{orth_regulariser, RankAllocator};
