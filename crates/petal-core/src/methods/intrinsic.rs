//! Intrinsic dimension (Li et al., ICLR 2018, "Measuring the Intrinsic Dimension of Objective
//! Landscapes"; official code jgamper/intrinsic-dimensionality, `intrinsic/fastfood.py`): every
//! adapted weight moves in one random d-dimensional subspace.
//!
//! `W = W₀ + reshape(P_l θ)` for each targeted linear l, with one trained vector θ (d,) shared
//! by all of them, zero at init (identity), and a fixed random projection per linear: Fastfood
//! (`petal_ops::fastfood`; its signs, permutation and Gaussian diagonal regenerated from
//! `projection_seed` and the module's place, never stored), or a dense Gaussian `N(0, 1/d)`
//! matrix where that is small (refused above `max_dense_values`). As the official code, one
//! projection per weight tensor, all sharing θ. Mergeable. petal's own adapter `peft_type:
//! "INTRINSIC"`: `base_model.intrinsic_theta` (d) and the seed in the config. Unmerged
//! inference keeps each layer's dW once made, while θ holds the same values (making it is a
//! projection of out·in values; θ has d); a training forward drops it, so it is only held
//! between an evaluation and the next step.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, WeightUpdate,
};
use crate::config::{spec, AdapterConfig, Spec};
use crate::methods::{add_dense_delta, dense_linear, KeptDelta};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use petal_ops::fastfood::Fastfood;
use rand::SeedableRng;
use std::sync::Arc;

pub const THETA: &str = "intrinsic_theta";

pub struct Intrinsic;

crate::method_options! {
    /// The intrinsic-dimension adapter's options.
    pub struct IntrinsicOptions {
        /// The subspace's dimension d (at most the targeted weights' count)
        pub d: usize = 1000,
        /// The projection: fastfood, or dense (only where its matrices are small)
        pub projection: String = "fastfood".into(),
        /// Seed of the random projections (saved; they are regenerated from it)
        pub projection_seed: u64 = 0,
        /// The most values a dense projection may hold over all modules (out x in x d)
        pub max_dense_values: u64 = 1 << 26,
        /// true: θ starts at zero (identity); false: at random values (a testing switch)
        pub init_weights: bool = true,
    }
}

impl AdapterMethod for Intrinsic {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // the projected update is added to the base output; W is never read
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn peft_type(&self) -> &'static str {
        "INTRINSIC"
    }

    fn options(&self) -> Spec {
        spec::<IntrinsicOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: IntrinsicOptions = cfg.options()?;
        if o.d == 0 {
            return Err(Error::config(
                "adapter config",
                "d",
                "0 is out of range: d >= 1",
            ));
        }
        if !matches!(o.projection.as_str(), "fastfood" | "dense") {
            return Err(Error::config(
                "adapter config",
                "projection",
                format!(
                    "{:?} is not a projection petal knows: fastfood or dense",
                    o.projection
                ),
            ));
        }
        Ok(())
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // the projection (Fastfood: three vectors of the padded length; dense: out in d) and
        // the dense dW a step builds
        let o: IntrinsicOptions = cfg.options()?;
        let n = (dims.out * dims.inp) as u64;
        let proj = match o.projection.as_str() {
            "dense" => n.saturating_mul(o.d as u64),
            _ => 3 * n.next_power_of_two(),
        };
        Ok(proj + dims.full())
    }

    fn shared_values(&self, cfg: &AdapterConfig, _dims: &ModuleDims) -> Result<u64> {
        Ok(cfg.options::<IntrinsicOptions>()?.d as u64)
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        _seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: IntrinsicOptions = cfg.options()?;
        let (out, inp) = (base.out_features, base.in_features);
        let sh = base.shared;
        if o.d > sh.numel {
            return Err(Error::config(
                "adapter config",
                "d",
                format!(
                    "{} is out of range: the targeted modules hold {} weights, and the subspace \
                     cannot have more dimensions than that",
                    o.d, sh.numel
                ),
            ));
        }
        if o.projection == "dense" {
            let all = (sh.numel as u64).saturating_mul(o.d as u64);
            if all > o.max_dense_values {
                return Err(Error::config(
                    "adapter config",
                    "projection",
                    format!(
                        "dense needs {all} values (weights x d), over max_dense_values = {}: use \
                         projection = fastfood, or a smaller d",
                        o.max_dense_values
                    ),
                ));
            }
        }
        let dev = base.weight.device();
        let theta = sh.get_or_init(THETA, || {
            if o.init_weights {
                Ok(Tensor::zeros(o.d, DType::F32, dev)?)
            } else {
                let mut g = rand::rngs::StdRng::seed_from_u64(o.projection_seed ^ 0x7e7a);
                Ok(crate::methods::normal((1, o.d), 0.1, &mut g, dev)?.reshape(o.d)?)
            }
        })?;
        // each module's projection from the seed and its place among the targeted weights
        let offset = sh.claim(out * inp);
        let mut g = rand::rngs::StdRng::seed_from_u64(crate::rng::splitmix(
            o.projection_seed ^ crate::rng::splitmix(offset as u64),
        ));
        let projection = match o.projection.as_str() {
            "dense" => Projection::Dense(crate::methods::normal(
                (out * inp, o.d),
                1.0 / (o.d as f64).sqrt(),
                &mut g,
                dev,
            )?),
            _ => Projection::Fastfood(Arc::new(Fastfood::draw(out * inp, &mut g))),
        };
        Ok(Box::new(IntrinsicLayer {
            theta,
            projection,
            out,
            inp,
            kept: KeptDelta::default(),
        }))
    }
}

#[derive(Debug)]
enum Projection {
    Fastfood(Arc<Fastfood>),
    Dense(Tensor), // (out in, d)
}

#[derive(Debug)]
struct IntrinsicLayer {
    theta: Var, // shared (d,)
    projection: Projection,
    out: usize,
    inp: usize,
    /// Inference's dW.
    kept: KeptDelta,
}

impl IntrinsicLayer {
    /// dW for a forward under `ctx` (kept for inference).
    fn delta_for(&self, ctx: &crate::Ctx) -> Result<Tensor> {
        self.kept
            .get(ctx, self.theta.as_tensor(), || self.delta(ctx.kernels()))
    }

    /// dW (out, in) = reshape(P θ).
    fn delta(&self, k: petal_ops::Kernels) -> Result<Tensor> {
        let t = self.theta.as_tensor();
        let flat = match &self.projection {
            Projection::Fastfood(ff) => petal_ops::fastfood::fastfood(k, t, ff)?,
            Projection::Dense(p) => p.matmul(&t.unsqueeze(1)?)?.squeeze(1)?,
        };
        Ok(flat.reshape((self.out, self.inp))?)
    }
}

impl AdapterLayer for IntrinsicLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        add_dense_delta(x, y, &self.delta_for(ctx)?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        dense_linear(ctx.kernels(), x, w, b, || Ok(Some(self.delta_for(ctx)?)))
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Add(
            self.delta(petal_ops::Kernels::default())?,
        ))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        Vec::new()
    }

    fn shared_trained(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: THETA,
            var: &self.theta,
        }]
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("intrinsic", 1, 1.0, crate::testing::toy_targets());
    c.set("d", 7).unwrap();
    c
}

#[cfg(test)]
fn dense_config() -> AdapterConfig {
    let mut c = conformance_config();
    c.set("projection", "dense").unwrap();
    c
}

/// θ is shared: counted once, with fc1 (whose input is 10).
#[cfg(test)]
fn count(inp: usize, _out: usize, _cfg: &AdapterConfig) -> usize {
    if inp == 10 {
        7
    } else {
        0
    }
}

#[cfg(test)]
crate::conformance!(conformance, conformance_config, count);

#[cfg(test)]
crate::conformance!(dense, dense_config, count);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_keeps_the_update_while_theta_holds_and_makes_it_anew_when_theta_moves() {
        let mut c = conformance_config();
        c.set("init_weights", false).unwrap();
        crate::testing::check_inference_follows_the_values(&c, THETA);
    }

    #[test]
    fn a_d_over_the_weight_count_and_a_dense_projection_over_the_cap_are_refused() {
        let mut c = conformance_config();
        c.set("d", 193).unwrap(); // the toy's two linears hold 192 weights
        let mut t = crate::testing::Toy::new();
        let e = crate::inject_adapter(&mut t, "default", &c, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("d") && e.contains("192"), "{e}");
        let mut c = dense_config();
        c.set("max_dense_values", 100).unwrap();
        let mut t = crate::testing::Toy::new();
        let e = crate::inject_adapter(&mut t, "default", &c, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("projection") && e.contains("max_dense_values"),
            "{e}"
        );
        let mut c = conformance_config();
        c.set("projection", "sparse").unwrap();
        assert!(Intrinsic
            .validate(&c)
            .unwrap_err()
            .to_string()
            .contains("projection"));
    }
}

#[cfg(test)]
mod oracle {
    use candle_core::Var;
    use petal_ops::fastfood::{fastfood, Fastfood};

    /// The projection and its gradient against the official `fastfood_torched`, fed the signs,
    /// permutation and diagonal the official `fastfood_vars` drew
    /// (`tools/golden/intrinsic_oracle.py`).
    #[test]
    fn the_projection_and_its_gradient_equal_the_official_fastfood() {
        let t = crate::testing::golden_fixture("intrinsic");
        for (name, numel) in [("padded", 120), ("exact", 64), ("wide", 100)] {
            let g = |k: &str| t[&format!("{name}.{k}")].clone();
            let ff = std::sync::Arc::new(Fastfood {
                signs: g("signs").to_vec1().unwrap(),
                perm: g("perm")
                    .to_vec1::<i64>()
                    .unwrap()
                    .into_iter()
                    .map(|p| p as u32)
                    .collect(),
                gauss: g("gauss").to_vec1().unwrap(),
                numel,
            });
            for k in [petal_ops::Kernels::FUSED, petal_ops::Kernels::REFERENCE] {
                let v = Var::from_tensor(&g("v")).unwrap();
                let y = fastfood(k, v.as_tensor(), &ff).unwrap();
                let e = crate::testing::max_rel(&y, &g("y"));
                assert!(e < 1e-5, "{name} {k:?}: projection {e:e}");
                let grads = (y * g("proj"))
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let e = crate::testing::max_rel(grads.get(v.as_tensor()).unwrap(), &g("dv"));
                assert!(e < 1e-5, "{name} {k:?}: gradient {e:e}");
            }
        }
    }
}

/// Over a quantized base: the update meets the blocks' product as it meets W dequantized.
#[test]
fn intrinsic_over_quantized_blocks_equals_intrinsic_over_them_dequantized() {
    let c = conformance_config();
    // (4, 32): the reference fastfood twin reshapes to one axis per power of 2, at most 8
    crate::testing::check_over_quantized_blocks(&Intrinsic, &c, (4, 32), &|_| {});
}
