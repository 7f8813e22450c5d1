//! RoAd (Liao et al., 2024, "2D Rotary Adaptation for Efficient Parameter-Efficient
//! Fine-Tuning"). Mirrors PEFT `tuners/road/layer.py` (`Linear`).
//!
//! The output of the frozen linear is split into groups of `g` (`group_size`); inside a group,
//! element j of the first half pairs with element j + g/2 and the pair is rotated and scaled:
//! `y'_j = f_j y_j - s_j y_(j+g/2)`, `y'_(j+g/2) = f_(j+g/2) y_(j+g/2) + s_(j+g/2) y_j`, i.e.
//! `y' = y ⊙ f + rotate_half(y) ⊙ s` with `f = α cos θ`, `s = α sin θ`. Variants: `road_1`
//! shares one (θ, α) per pair (out/2 each), `road_2` one per element (out each), `road_4` separate
//! angles and scales for f and s (2 out each). Saved as `road_theta`, `road_alpha`.
//! Merge: `W' = M W`, `b' = M b` with M the (out, out) matrix of the pair transforms; unmerge
//! applies each pair's 2x2 inverse. Init: θ = 0, α = 1 (identity); `init_weights = false`:
//! θ ~ N(0, 0.5^2), α ~ N(1, 0.5^2).

use crate::adapter::{AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, WeightUpdate};
use crate::config::{spec, AdapterConfig, InitWeights, Spec};
use crate::methods::{check_plain_base, init_nonzero, normal};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub struct Road;

crate::method_options! {
    /// RoAd's options (PEFT `RoadConfig`).
    pub struct RoadOptions {
        /// road_1 | road_2 | road_4: one, two or four parameters per pair of outputs
        pub variant: String = "road_1".into(),
        /// Size of the groups whose halves are paired
        pub group_size: usize = 64,
        /// true: identity at start; false: random
        pub init_weights: InitWeights = InitWeights::Flag(true),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    One,
    Two,
    Four,
}

#[derive(Debug)]
pub struct RoadLayer {
    theta: Var,
    alpha: Var,
    variant: Variant,
    group: usize,
}

fn variant(o: &RoadOptions) -> Result<Variant> {
    match o.variant.as_str() {
        "road_1" => Ok(Variant::One),
        "road_2" => Ok(Variant::Two),
        "road_4" => Ok(Variant::Four),
        v => Err(Error::config(
            "adapter config",
            "variant",
            format!("RoAd: variant `{v}` is not one of road_1, road_2, road_4"),
        )),
    }
}

impl AdapterMethod for Road {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // it rotates the base output; W is never read
    }

    fn peft_type(&self) -> &'static str {
        "ROAD"
    }

    fn options(&self) -> Spec {
        spec::<RoadOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: RoadOptions = cfg.options()?;
        variant(&o)?;
        check_plain_base("none", false, &o.init_weights)
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("road-variant", "variant"),
            Flag::new("group-size", "group_size"),
        ]
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("group_size", "64")])
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: RoadOptions = cfg.options()?;
        let v = variant(&o)?;
        let group = o.group_size;
        let out = base.out_features;
        if group == 0 || group % 2 != 0 || out % group != 0 {
            return Err(Error::msg(format!(
                "{path}: RoAd group_size {group} must be even and divide out_features {out}"
            )));
        }
        let size = match v {
            Variant::One => out / 2,
            Variant::Two => out,
            Variant::Four => out * 2,
        };
        let dev = base.weight.device();
        let (theta, alpha) = if init_nonzero(&o.init_weights) {
            let mut g = rand::rngs::StdRng::seed_from_u64(seed);
            (
                normal((1, size), 0.5, &mut g, dev)?.flatten_all()?,
                (normal((1, size), 0.5, &mut g, dev)?.flatten_all()? + 1.0)?,
            )
        } else {
            (
                Tensor::zeros(size, DType::F32, dev)?,
                Tensor::ones(size, DType::F32, dev)?,
            )
        };
        Ok(Box::new(RoadLayer {
            theta: Var::from_tensor(&theta)?,
            alpha: Var::from_tensor(&alpha)?,
            variant: v,
            group,
        }))
    }
}

impl RoadLayer {
    /// The per-element factors (f, s), each (out,): PEFT's `_prepare_cols`.
    fn cols(&self) -> Result<(Tensor, Tensor)> {
        let (t, a) = (self.theta.as_tensor(), self.alpha.as_tensor());
        let g = self.group;
        Ok(match self.variant {
            Variant::One => {
                // each group's g/2 values serve both halves of the group
                let rep = |v: &Tensor| -> Result<Tensor> {
                    let n = v.dim(0)? / (g / 2);
                    Ok(v.reshape((n, 1, g / 2))?
                        .broadcast_as((n, 2, g / 2))?
                        .flatten_all()?)
                };
                let (t, a) = (rep(t)?, rep(a)?);
                ((&a * t.cos()?)?, (a * t.sin()?)?)
            }
            Variant::Two => ((a * t.cos()?)?, (a * t.sin()?)?),
            Variant::Four => {
                let n = t.dim(0)? / (2 * g);
                let (t, a) = (t.reshape((n, 2, g))?, a.reshape((n, 2, g))?);
                let half = |v: &Tensor, i: usize| -> Result<Tensor> {
                    Ok(v.narrow(1, i, 1)?.flatten_all()?)
                };
                (
                    (half(&a, 0)? * half(&t, 0)?.cos()?)?,
                    (half(&a, 1)? * half(&t, 1)?.sin()?)?,
                )
            }
        })
    }

    /// M (out, out) with `y' = M y`, built from (f, s); `inverse` gives each pair's inverse.
    fn matrix(&self, inverse: bool) -> Result<Tensor> {
        let (f, s) = self.cols()?;
        let (f, s) = (f.to_vec1::<f32>()?, s.to_vec1::<f32>()?);
        let n = f.len();
        let h = self.group / 2;
        let mut m = vec![0f32; n * n];
        for start in (0..n).step_by(self.group) {
            for j in start..start + h {
                let k = j + h; // its partner
                               // [[f_j, -s_j], [s_k, f_k]] acting on (y_j, y_k)
                let (a, b, c, d) = (f[j] as f64, -s[j] as f64, s[k] as f64, f[k] as f64);
                let (a, b, c, d) = if inverse {
                    let det = a * d - b * c;
                    (d / det, -b / det, -c / det, a / det)
                } else {
                    (a, b, c, d)
                };
                m[j * n + j] = a as f32;
                m[j * n + k] = b as f32;
                m[k * n + j] = c as f32;
                m[k * n + k] = d as f32;
            }
        }
        Ok(Tensor::from_vec(
            m,
            (n, n),
            self.theta.as_tensor().device(),
        )?)
    }
}

impl AdapterLayer for RoadLayer {
    fn forward(&self, _x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let (f, s) = self.cols()?;
        // in y's dtype (bf16 activations: no f32 copy in the graph), f32 inside
        Ok(petal_ops::pair_rotate(
            ctx.kernels(),
            &y,
            &f,
            &s,
            self.group,
        )?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Transform {
            m: self.matrix(false)?,
            m_inv: self.matrix(true)?,
        })
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "road_theta",
                var: &self.theta,
            },
            NamedTensor {
                name: "road_alpha",
                var: &self.alpha,
            },
        ]
    }
}

#[cfg(test)]
fn config(variant: &str, group: usize) -> AdapterConfig {
    let mut c = AdapterConfig::for_method("ROAD", 1, 1.0, crate::testing::toy_targets());
    c.set("variant", variant).unwrap();
    c.set("group_size", Some(group)).unwrap();
    c
}

#[cfg(test)]
crate::conformance!(
    conformance_road_1,
    || config("road_1", 6),
    |_inp, out, _cfg: &AdapterConfig| out
);

#[cfg(test)]
crate::conformance!(
    conformance_road_2,
    || config("road_2", 2),
    |_inp, out, _cfg: &AdapterConfig| 2 * out
);

#[cfg(test)]
crate::conformance!(
    conformance_road_4,
    || config("road_4", 6),
    |_inp, out, _cfg: &AdapterConfig| 4 * out
);

/// Over a quantized base: RoAd rotates the base output, whichever product made it.
#[test]
fn road_over_quantized_blocks_equals_road_over_them_dequantized() {
    let mut c = config("road_2", 2);
    c.set("init_weights", InitWeights::Flag(false)).unwrap();
    crate::testing::check_over_quantized_blocks(&Road, &c, (6, 32), &|_| {});
}
