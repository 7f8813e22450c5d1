//! MoV (Zadouri et al., ICLR 2024, arXiv 2309.05444, "Pushing Mixture of Experts to the Limit";
//! official code for-ai/parameter-efficient-moe `src/mov.py`, `src/routing.py`): a mixture of
//! E IA3 vectors, soft-merged per token by a router that reads the activation they scale.
//!
//! On the IA3 placements: a targeted linear's output, `y' = y ⊙ (p(y) S)`, or, for the
//! `feedforward_modules`, its input, `y' = (x ⊙ (p(x) S)) W^T + b`, with
//! `p(a) = softmax(a W_r)` over the experts (f32, no bias). S (E, h) starts at ones (identity),
//! W_r (h, E) N(0, 0.02²) (the official initialisers). petal's decisions (docs/methods/mov.md):
//! the official MoVAttention routes each attention head's key (value) vector with one router
//! shared by the heads; petal routes the whole k_proj (v_proj) output of a token, as its linears
//! do not know the head layout. Not mergeable: the mixture depends on each token.
//!
//! petal's own adapter: `peft_type: "MOV"`, tensors `<module>.mov_scaling` (E, h) (the
//! official name) and `<module>.mov_router` (h, E).

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, Flag, ModuleDims, NamedTensor, NewAdapter,
    WeightUpdate,
};
use crate::config::{spec, AdapterConfig, Spec, Targets};
use crate::methods::ia3::{default_feedforward, is_feedforward};
use crate::methods::mixture::{self, LoadMeter, RouterLoad};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub struct Mov;

crate::method_options! {
    /// MoV's options.
    pub struct MovOptions {
        /// Number of experts E (IA3 vectors per module)
        pub num_experts: usize = 10,
        /// Targeted modules whose input is scaled, the others scale their output (comma list or
        /// `re:REGEX`; the training default: down_proj, as IA3)
        [crate::config::parse_targets]
        pub feedforward_modules: Option<Targets> = None,
        /// true: every vector starts at ones (identity); false: N(1, 0.5²) (a testing switch)
        pub init_weights: bool = true,
    }
}

impl AdapterMethod for Mov {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("feedforward_modules", r#"["down_proj"]"#)])
    }

    fn peft_type(&self) -> &'static str {
        "MOV"
    }

    fn options(&self) -> Spec {
        spec::<MovOptions>()
    }

    fn flags(&self) -> Vec<Flag> {
        vec![Flag::new("feedforward-modules", "feedforward_modules")]
    }

    fn default_targets(&self) -> Option<&'static str> {
        Some("k_proj,v_proj,down_proj")
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        default_feedforward(cfg, new)
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        if cfg.options::<MovOptions>()?.num_experts == 0 {
            return Err(Error::config(
                "adapter config",
                "num_experts",
                "0 is out of range: num_experts >= 1",
            ));
        }
        Ok(())
    }

    fn layer_values(&self, cfg: &AdapterConfig, path: &str, dims: &ModuleDims) -> Result<u64> {
        let o: MovOptions = cfg.options()?;
        let h = if feedforward(&o, path) {
            dims.inp
        } else {
            dims.out
        };
        Ok(2 * (o.num_experts * h) as u64)
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: MovOptions = cfg.options()?;
        let ff = feedforward(&o, path);
        let h = if ff {
            base.in_features
        } else {
            base.out_features
        };
        let (e, dev) = (o.num_experts, base.weight.device());
        let mut s = Tensor::ones((e, h), DType::F32, dev)?;
        if !o.init_weights {
            let mut g = rand::rngs::StdRng::seed_from_u64(seed);
            s = (s + crate::methods::normal((e, h), 0.5, &mut g, dev)?)?;
        }
        Ok(Box::new(MovLayer {
            scaling: Var::from_tensor(&s)?,
            router: Var::from_tensor(&mixture::router_init(h, e, seed, dev)?)?,
            base: ff.then(|| base.weight.clone()),
            quant: base.quant,
            meter: LoadMeter::default(),
        }))
    }
}

/// Whether module `path` is scaled at its input (IA3's rule for `feedforward_modules`).
fn feedforward(o: &MovOptions, path: &str) -> bool {
    is_feedforward(o.feedforward_modules.as_ref(), path)
}

#[derive(Debug)]
struct MovLayer {
    scaling: Var, // (E, h)
    router: Var,  // (h, E)
    /// The frozen W for input scaling (feedforward modules); None: output scaling.
    base: Option<Tensor>,
    quant: Option<petal_ops::quant::QFormat>,
    meter: LoadMeter,
}

impl MovLayer {
    /// One node: at an output, `y ⊙ s(y)` with `y = x W^T + b`; at an input, `(x ⊙ s(x)) W^T + b`;
    /// `s(a) = softmax(a W_r) S`. With `a` the scaled activation and `g` the gradient reaching
    /// `a ⊙ s`: `dS = p^T (g ⊙ a)`, `dp = (g ⊙ a) S^T`, `dl = p ⊙ (dp - Σ dp ⊙ p)` (softmax),
    /// `dW_r = a^T dl`, `da = g ⊙ s + dl W_r^T`, and at an output `dx = da W`, at an input
    /// `g = dy W` and `dx = da`.
    fn fused(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Result<Tensor> {
        let x2 = crate::methods::flat_input(x)?;
        let out = w.dim(0)?;
        let (e, h) = self.scaling.as_tensor().dims2()?;
        let sr = Tensor::cat(
            &[
                self.scaling.as_tensor().flatten_all()?,
                self.router.as_tensor().flatten_all()?,
            ],
            0,
        )?;
        let split = move |sr: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((
                sr.narrow(0, 0, e * h)?.reshape((e, h))?,
                sr.narrow(0, e * h, h * e)?.reshape((h, e))?,
            ))
        };
        let input_side = self.base.is_some();
        let (w0, b0, k) = (w.detach(), b.map(|t| t.detach()), ctx.kernels());
        let (w1, b1, w2) = (w0.clone(), b0.clone(), w0.clone());
        let train = ctx.is_train();
        // the scaled activation, the router's probabilities and the scale
        let parts = move |x2: &Tensor, sr: &Tensor| -> candle_core::Result<[Tensor; 3]> {
            let (s, wr) = split(sr)?;
            let a = if input_side {
                x2.clone()
            } else {
                petal_ops::frozen_linear(k, x2, &w1, b1.as_ref())?
            };
            let p = petal_ops::softmax_last_dim(k, &a.matmul(&wr)?)?;
            let scale = p.matmul(&s)?;
            Ok([a, p, scale])
        };
        let fwd = parts.clone();
        let y = petal_ops::lean::lean2(
            [&x2, &sr],
            |[x2, sr]| {
                let [a, p, scale] = fwd(x2, sr)?;
                if train {
                    let (rows, e) = p.dims2()?;
                    self.meter
                        .record(&p, 0, rows * e)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                }
                let scaled = (a * scale)?;
                if input_side {
                    petal_ops::frozen_linear(k, &scaled, &w0, b0.as_ref())
                } else {
                    Ok(scaled)
                }
            },
            move |[x2, sr], need, _, dy| {
                let (s, wr) = split(sr)?;
                let [a, p, scale] = parts(x2, sr)?;
                let w = &w2;
                let g = if input_side {
                    dy.matmul(w)?
                } else {
                    dy.clone()
                };
                let ga = (&g * &a)?;
                let dp = ga.matmul(&s.t()?)?;
                let dl = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(1)?)?)?;
                let dsr = need[1]
                    .then(|| {
                        let ds = p.t()?.matmul(&ga)?;
                        let dwr = a.t()?.matmul(&dl)?;
                        Tensor::cat(&[ds.flatten_all()?, dwr.flatten_all()?], 0)
                    })
                    .transpose()?;
                let dx = need[0]
                    .then(|| {
                        let da = ((&g * &scale)? + dl.matmul(&wr.t()?)?)?;
                        if input_side {
                            Ok(da)
                        } else {
                            da.matmul(w)
                        }
                    })
                    .transpose()?;
                Ok([dx, dsr])
            },
        )?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap_or(&mut 0) = out;
        Ok(y.reshape(dims)?)
    }

    /// `a ⊙ (p(a) S)` for the activations a (rows, h) f32, and the gates.
    fn scaled(&self, a: &Tensor, ctx: &crate::Ctx) -> Result<(Tensor, Tensor)> {
        let p = mixture::probs(a, self.router.as_tensor(), ctx.kernels())?;
        let s = p.matmul(self.scaling.as_tensor())?;
        Ok(((a * s)?, p))
    }
}

impl AdapterLayer for MovLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let (out, p) = match &self.base {
            // (x ⊙ s) W^T + b = y + (x ⊙ s - x) W^T
            Some(w) => {
                let x2 = crate::methods::flat_input(x)?;
                let (xs, p) = self.scaled(&x2, ctx)?;
                let d = crate::linear::frozen_xwt(ctx, &(xs - &x2)?, w, self.quant)?;
                let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
                ((y + d)?, p)
            }
            None => {
                let y2 = crate::methods::flat_input(&y)?;
                let (ys, p) = self.scaled(&y2, ctx)?;
                (ys.reshape(y.shape())?.to_dtype(y.dtype())?, p)
            }
        };
        if ctx.is_train() {
            let (rows, e) = p.dims2()?;
            self.meter.record(&p, 0, rows * e)?;
        }
        Ok(out)
    }

    /// The linear and the mixture in one graph node over x, S and W_r, keeping only those:
    /// backward recomputes the linear, the router and the scale (`fused`); the composed
    /// `forward` is its readable twin. f32 only.
    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        if !(x.dtype() == DType::F32 && w.dtype() == DType::F32) {
            return None;
        }
        Some(self.fused(x, w, b, ctx))
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Err(mixture::unmergeable("MoV"))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "mov_scaling",
                var: &self.scaling,
            },
            NamedTensor {
                name: "mov_router",
                var: &self.router,
            },
        ]
    }

    fn router_load(&self) -> Option<RouterLoad> {
        self.meter.take()
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("mov", 1, 1.0, crate::testing::toy_targets());
    c.set("num_experts", 3).unwrap();
    c.set("feedforward_modules", ["fc2"]).unwrap();
    c
}

// fc1 (12, 10) scales its output (h = 12), fc2 (6, 12) its input (h = 12)
#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |_inp, _out, _cfg| 2 * 3 * 12,
    None,
    unmergeable
);

#[cfg(test)]
mod tests {
    use super::*;

    /// tools/golden/moe_oracle.py: the official MoV layer's einsums and router transcribed in
    /// NumPy, scaling a linear's output and a linear's input (the product with W and b done in
    /// NumPy too).
    #[test]
    fn the_output_equals_the_official_layer_transcribed_at_both_placements() {
        let t = crate::testing::golden_fixture("moe");
        for side in ["out", "in"] {
            let f = |k: &str| t[&format!("mov_{side}.{k}")].clone();
            let layer = MovLayer {
                scaling: Var::from_tensor(&f("scaling")).unwrap(),
                router: Var::from_tensor(&f("router")).unwrap(),
                base: (side == "in").then(|| f("w")),
                quant: None,
                meter: LoadMeter::default(),
            };
            let mut lin = crate::AdaptableLinear::new("l", f("w"), Some(f("b")));
            lin.add_adapter("default", Box::new(layer)).unwrap();
            lin.set_active(&["default"]);
            let y = lin.forward(&f("x"), &crate::Ctx::eval()).unwrap();
            let want = &t[&format!("mov_{side}.y")];
            let e = crate::testing::max_rel(&y, want);
            assert!(e < 1e-5, "{side}: relative error {e:e}");
        }
    }

    #[test]
    fn a_zero_expert_count_is_refused_naming_the_key() {
        let mut c = conformance_config();
        c.set("num_experts", 0).unwrap();
        let e = c.validate("adapter_config.json").unwrap_err().to_string();
        assert!(e.contains("`num_experts`"), "{e}");
    }
}
