//! VeRA (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation"). Mirrors PEFT
//! `tuners/vera/layer.py` (`Linear`) and `model.py` (the shared projections).
//!
//! One pair of frozen random matrices is shared by every adapted layer: `A (r, max_in)`,
//! `B (max_out, r)`, sized for the largest targeted linear; each layer uses the top-left corner
//! it needs and trains two vectors: `y + Λ_b B_s Λ_d A_s dropout(x)`, i.e.
//! `dW = (λ_b ⊙ B_s)(λ_d ⊙ A_s)` with `λ_d (r)`, `λ_b (out)`. A and B are kaiming-uniform
//! (bound `sqrt(6 / fan_in)`) from a generator seeded by `projection_prng_key`, and saved with
//! the adapter (`base_model.vera_A`, `base_model.vera_B`, PEFT's `save_projection = true`):
//! petal's generator is not torch's, so an adapter saved without them cannot be rebuilt and is
//! refused. Init: `λ_b = 0`, `λ_d = d_initial` (identity); `init_weights = false`: `λ_b = 1`,
//! `λ_d ~ N(0, 1)`. Trained parameters per layer: `out + r`.

use crate::adapter::ModuleDims;
use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, NamedTensor, SharedOption, WeightUpdate,
};
use crate::config::{probability, spec, AdapterConfig, InitWeights, Spec};
use crate::methods::lora::dropout;
use crate::methods::{check_plain_base, init_nonzero, normal};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

pub struct Vera;

crate::method_options! {
    /// VeRA's options (PEFT `VeraConfig`).
    pub struct VeraOptions {
        /// Rank of the shared random projections
        pub r: usize = 256,
        /// Seed of the shared projections
        pub projection_prng_key: u64 = 0,
        /// Save the shared projections with the adapter (petal requires it)
        pub save_projection: bool = true,
        /// Dropout on the adapter's input
        pub vera_dropout: f64 = 0.0,
        /// Initial value of the vector d
        pub d_initial: f64 = 0.1,
        /// true: b starts at zero (identity); false: random
        pub init_weights: InitWeights = InitWeights::Flag(true),
        /// Bias handling (only "none")
        pub bias: String = "none".into(),
        /// Weights stored (in, out) (not supported)
        pub fan_in_fan_out: bool = false,
    }
}

#[derive(Debug)]
pub struct VeraLayer {
    a: Var, // shared (r, max_in), frozen
    b: Var, // shared (max_out, r), frozen
    lambda_b: Var,
    lambda_d: Var,
    in_features: usize,
    out_features: usize,
    dropout: f64,
}

/// Kaiming-uniform with torch's gain for a (rows, cols) matrix: U(±sqrt(6 / cols)).
fn kaiming(shape: (usize, usize), g: &mut impl Rng, dev: &Device) -> Result<Tensor> {
    let bound = (6.0 / shape.1 as f64).sqrt();
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| g.gen_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

impl AdapterMethod for Vera {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // the trained vectors lambda_b (out) and lambda_d (r)
        Ok((dims.out as u64).saturating_add(cfg.options::<VeraOptions>()?.r as u64))
    }
    fn shared_values(&self, cfg: &AdapterConfig, dims: &ModuleDims) -> Result<u64> {
        // the frozen projections A (r, max in) and B (max out, r)
        let r = cfg.options::<VeraOptions>()?.r as u64;
        Ok(r.saturating_mul((dims.max_in + dims.max_out) as u64))
    }
    fn peft_type(&self) -> &'static str {
        "VERA"
    }

    fn options(&self) -> Spec {
        spec::<VeraOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: VeraOptions = cfg.options()?;
        if o.r == 0 {
            return Err(Error::config("adapter config", "r", "must be at least 1"));
        }
        if !o.save_projection {
            return Err(Error::config(
                "adapter config",
                "save_projection",
                "VeRA with save_projection = false: the shared projections would have to be \
                 regenerated with torch's generator, which petal does not reproduce; save the \
                 adapter with save_projection = true",
            ));
        }
        probability("vera_dropout", o.vera_dropout)?;
        check_plain_base(&o.bias, o.fan_in_fan_out, &o.init_weights)
    }

    fn shared_key(&self, o: SharedOption) -> Option<&'static str> {
        match o {
            SharedOption::Rank => Some("r"),
            SharedOption::Dropout => Some("vera_dropout"),
            SharedOption::Alpha => None,
        }
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: VeraOptions = cfg.options()?;
        let r = o.r;
        let dev = base.weight.device();
        let key = o.projection_prng_key;
        let (max_in, max_out) = (base.shared.max_in, base.shared.max_out);
        let mut g = rand::rngs::StdRng::seed_from_u64(key);
        let a = base
            .shared
            .get_or_init("vera_A", || kaiming((r, max_in), &mut g, dev))?;
        let b = base
            .shared
            .get_or_init("vera_B", || kaiming((max_out, r), &mut g, dev))?;
        if a.as_tensor().dim(0)? != r {
            return Err(Error::msg(format!(
                "{path}: VeRA rank differs from the shared projections"
            )));
        }
        let out = base.out_features;
        let (lb, ld) = if init_nonzero(&o.init_weights) {
            let mut g = rand::rngs::StdRng::seed_from_u64(seed);
            (
                Tensor::ones(out, DType::F32, dev)?,
                normal((1, r), 1.0, &mut g, dev)?.flatten_all()?,
            )
        } else {
            (
                Tensor::zeros(out, DType::F32, dev)?,
                (Tensor::ones(r, DType::F32, dev)? * o.d_initial)?,
            )
        };
        Ok(Box::new(VeraLayer {
            a,
            b,
            lambda_b: Var::from_tensor(&lb)?,
            lambda_d: Var::from_tensor(&ld)?,
            in_features: base.in_features,
            out_features: out,
            dropout: o.vera_dropout,
        }))
    }
}

impl VeraLayer {
    /// The corners of the shared projections this layer uses: A_s (r, in), B_s (out, r).
    fn sliced(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            // frozen: detached, so backprop never computes their gradients
            // contiguous: a GPU's matmul takes no column slice of a wider matrix
            self.a
                .as_tensor()
                .detach()
                .narrow(1, 0, self.in_features)?
                .contiguous()?,
            self.b
                .as_tensor()
                .detach()
                .narrow(0, 0, self.out_features)?,
        ))
    }
}

impl AdapterLayer for VeraLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let x2 = crate::methods::flat_input(x)?;
        let x2 = if ctx.is_train() && self.dropout > 0.0 {
            dropout(&x2, self.dropout, ctx)?
        } else {
            x2
        };
        let (a, b) = self.sliced()?;
        let h = petal_ops::scale_last(
            ctx.kernels(),
            &x2.matmul(&a.t()?)?,
            self.lambda_d.as_tensor(),
        )?;
        let d = petal_ops::scale_last(
            ctx.kernels(),
            &h.matmul(&b.t()?)?,
            self.lambda_b.as_tensor(),
        )?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    /// With the frozen linear: `lora_linear(x, W, bias, h, B ⊙ lambda_b)`, the output scaling
    /// folded into the (out, r) projection, so no pass over the (n, out) output besides the op's.
    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        if !petal_ops::cpu::fast_lora_ok(ctx.kernels(), x, w) {
            if ctx.is_train() && self.dropout > 0.0 {
                return None;
            }
            // any device: LoRA's graph node with A and B scaled by the vectors,
            // ((x A^T) ⊙ λd) B^T ⊙ λb = x (λd ⊙ A)^T (λb ⊙ B)^T; it keeps x and the two small
            // scaled matrices, not the (n, out) update
            let run = || -> Result<Tensor> {
                let (a, b) = self.sliced()?;
                let ad = a.broadcast_mul(&self.lambda_d.as_tensor().unsqueeze(1)?)?;
                let bl = b.broadcast_mul(&self.lambda_b.as_tensor().unsqueeze(1)?)?;
                Ok(petal_ops::lora(ctx.kernels(), x, w, bias, &ad, &bl, 1.0)?)
            };
            return Some(run());
        }
        let run = || -> Result<Tensor> {
            let (a, b) = self.sliced()?;
            // x A^T; without dropout a bf16 x is read as it is (no f32 copy in the graph)
            let low = if ctx.is_train() && self.dropout > 0.0 {
                let x2 = crate::methods::flat_input(x)?;
                dropout(&x2, self.dropout, ctx)?.matmul(&a.t()?)?
            } else {
                petal_ops::low_rank(ctx.kernels(), x, &a)?
            };
            let h = petal_ops::scale_last(ctx.kernels(), &low, self.lambda_d.as_tensor())?;
            let bl = b.broadcast_mul(&self.lambda_b.as_tensor().unsqueeze(1)?)?;
            Ok(petal_ops::lora_linear(
                ctx.kernels(),
                x,
                w,
                bias,
                &h,
                &bl,
                1.0,
            )?)
        };
        Some(run())
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let (a, b) = self.sliced()?;
        let bl = b.broadcast_mul(&self.lambda_b.as_tensor().unsqueeze(1)?)?;
        let ad = a.broadcast_mul(&self.lambda_d.as_tensor().unsqueeze(1)?)?;
        Ok(WeightUpdate::Add(bl.matmul(&ad)?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "vera_lambda_b",
                var: &self.lambda_b,
            },
            NamedTensor {
                name: "vera_lambda_d",
                var: &self.lambda_d,
            },
        ]
    }

    fn shared(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "vera_A",
                var: &self.a,
            },
            NamedTensor {
                name: "vera_B",
                var: &self.b,
            },
        ]
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.lambda_b.clone(), self.lambda_d.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::adapted;

    #[test]
    fn all_layers_share_one_projection_pair_sized_for_the_largest_linear() {
        let t = adapted(&conformance_config(), true);
        let shared: Vec<Vec<(usize, usize)>> = t
            .linears()
            .iter()
            .map(|l| {
                l.layer("default")
                    .unwrap()
                    .shared()
                    .iter()
                    .map(|n| n.var.as_tensor().dims2().unwrap())
                    .collect()
            })
            .collect();
        // fc1 10 -> 12, fc2 12 -> 6: A (r, 12), B (12, r)
        assert_eq!(shared[0], vec![(3, 12), (12, 3)]);
        assert_eq!(shared[0], shared[1]);
        let a0 = t.fc1.layer("default").unwrap().shared()[0]
            .var
            .as_tensor()
            .clone();
        let a1 = t.fc2.layer("default").unwrap().shared()[0]
            .var
            .as_tensor()
            .clone();
        assert_eq!(
            a0.id(),
            a1.id(),
            "the projections are one tensor, not copies"
        );
    }

    use crate::Adaptable;
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    AdapterConfig::for_method("VERA", 3, 1.0, crate::testing::toy_targets())
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |_inp, out, cfg: &AdapterConfig| out + crate::testing::opt_usize(cfg, "r")
);

#[cfg(test)]
#[test]
fn fused_vera_with_dropout_draws_the_same_mask_as_the_composed_form() {
    let mut c = conformance_config();
    c.set("vera_dropout", Some(0.3)).unwrap();
    crate::testing::check_fused_equals_composed(&c);
}
