//! MoLoRA (Zadouri et al., ICLR 2024, arXiv 2309.05444, "Pushing Mixture of Experts to the Limit:
//! Extremely Parameter Efficient MoE for Instruction Tuning"; official code
//! for-ai/parameter-efficient-moe `src/molora.py`, `src/routing.py`): E LoRA experts on a linear,
//! soft-merged per token by a router.
//!
//! `y = x W^T + b + (alpha / r) Σ_e p_e(x) (x A_e) B_e`, `p(x) = softmax(x W_r)` over the experts
//! (f32, no bias), the router reading the linear's input. A (E, in, r) starts N(0, 0.02²), B
//! (E, r, out) at zero (identity), W_r (in, E) N(0, 0.02²) (the official initialisers). Not
//! mergeable: the mixture depends on each token. The layer is shared with SiRA, which routes
//! each token to its top k experts within a capacity (`Routing::TopK`).
//!
//! Fast path: all experts in two products, `(x A) (p ⊗ 1_r)` then `· B`, with A as (in, E r) and
//! B as (E r, out): a LoRA of rank E r whose rank blocks are gated per token; no per-token or
//! per-expert loop (top-k gates are zero off the chosen experts).
//!
//! petal's own adapter: `peft_type: "MOLORA"`, tensors `<module>.molora_A` (E, in, r),
//! `<module>.molora_B` (E, r, out) and `<module>.molora_router` (in, E), the official shapes.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, WeightUpdate,
};
use crate::config::{finite, spec, AdapterConfig, Spec};
use crate::methods::mixture::{self, per_rank, LoadMeter, RouterLoad};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub struct Molora;

crate::method_options! {
    /// MoLoRA's options (molora.gin: rank 4, 10 experts, alpha 16).
    pub struct MoloraOptions {
        /// Rank of each expert
        pub r: usize = 4,
        /// Scale numerator: each expert's update is (lora_alpha / r) B_e A_e
        pub lora_alpha: f64 = 16.0,
        /// Number of experts E
        pub num_experts: usize = 10,
        /// true: B starts at zero (identity); false: random (a testing switch)
        pub init_weights: bool = true,
    }
}

/// How a mixture of LoRA experts gates them per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Routing {
    /// Every expert, weighted by the router's probabilities (MoLoRA).
    Soft,
    /// The k most probable experts within an expert capacity, gates dropped out in training
    /// (SiRA).
    TopK {
        k: usize,
        capacity_factor: f64,
        gate_dropout: f64,
    },
}

/// Checks the sizes MoLoRA and SiRA share.
pub(crate) fn check_sizes(r: usize, experts: usize, alpha: f64) -> Result<()> {
    let bad = |k: &str, m: &str| Err(Error::config("adapter config", k, m));
    if r == 0 {
        return bad("r", "0 is out of range: r >= 1");
    }
    if experts == 0 {
        return bad("num_experts", "0 is out of range: num_experts >= 1");
    }
    finite("lora_alpha", alpha, None)
}

/// A mixture-of-LoRA layer for a module (out, in): E experts of rank r.
pub(crate) fn build_layer(
    base: &BaseLinear,
    r: usize,
    alpha: f64,
    experts: usize,
    init_zero: bool,
    routing: Routing,
    seed: u64,
) -> Result<Box<dyn AdapterLayer>> {
    let (out, inp) = (base.out_features, base.in_features);
    let dev = base.weight.device();
    let mut g = rand::rngs::StdRng::seed_from_u64(seed);
    let a = crate::methods::normal((experts * inp, r), 0.02, &mut g, dev)?;
    let b = if init_zero {
        Tensor::zeros((experts * r, out), DType::F32, dev)?
    } else {
        crate::methods::kaiming_uniform((experts * r, out), &mut g, dev)?
    };
    Ok(Box::new(MixtureLora {
        a: Var::from_tensor(&a.reshape((experts, inp, r))?)?,
        b: Var::from_tensor(&b.reshape((experts, r, out))?)?,
        router: Var::from_tensor(&mixture::router_init(inp, experts, seed, dev)?)?,
        scale: alpha / r as f64,
        routing,
        names: if matches!(routing, Routing::Soft) {
            ["molora_A", "molora_B", "molora_router"]
        } else {
            ["sira_A", "sira_B", "sira_router"]
        },
        meter: LoadMeter::default(),
    }))
}

impl AdapterMethod for Molora {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn peft_type(&self) -> &'static str {
        "MOLORA"
    }

    fn options(&self) -> Spec {
        spec::<MoloraOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: MoloraOptions = cfg.options()?;
        check_sizes(o.r, o.num_experts, o.lora_alpha)
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        let o: MoloraOptions = cfg.options()?;
        Ok(layer_count(dims.inp, dims.out, o.r, o.num_experts) as u64)
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: MoloraOptions = cfg.options()?;
        build_layer(
            base,
            o.r,
            o.lora_alpha,
            o.num_experts,
            o.init_weights,
            Routing::Soft,
            seed,
        )
    }
}

/// Trained values of one layer: A, B and the router.
pub(crate) fn layer_count(inp: usize, out: usize, r: usize, experts: usize) -> usize {
    experts * r * (inp + out) + inp * experts
}

#[derive(Debug)]
pub(crate) struct MixtureLora {
    a: Var,      // (E, in, r)
    b: Var,      // (E, r, out)
    router: Var, // (in, E)
    scale: f64,
    routing: Routing,
    names: [&'static str; 3],
    meter: LoadMeter,
}

impl MixtureLora {
    fn fused(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Result<Tensor> {
        let x2 = crate::methods::flat_input(x)?;
        let inp = x2.dim(1)?;
        let (e, _, r) = self.a.as_tensor().dims3()?;
        let out = w.dim(0)?;
        let (g, dropped, chosen) = self.gates(&x2, ctx)?;
        if ctx.is_train() {
            self.meter.record(&g, dropped, chosen)?;
        }
        let ab = Tensor::cat(
            &[
                self.a.as_tensor().transpose(0, 1)?.flatten_all()?,
                self.b.as_tensor().flatten_all()?,
            ],
            0,
        )?;
        let split = move |ab: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            let a = ab.narrow(0, 0, inp * e * r)?.reshape((inp, e * r))?;
            let bm = ab
                .narrow(0, inp * e * r, e * r * out)?
                .reshape((e * r, out))?;
            Ok((a, bm))
        };
        let (w0, b0, s, k) = (w.detach(), b.map(|t| t.detach()), self.scale, ctx.kernels());
        let w1 = w0.clone();
        let y = petal_ops::lean::lean3(
            [&x2, &ab, &g],
            |[x2, ab, g]| {
                let (a, bm) = split(ab)?;
                let v = (x2.matmul(&a)? * per_rank(g, r)?)?;
                petal_ops::frozen_linear(k, x2, &w0, b0.as_ref())? + (v.matmul(&bm)? * s)?
            },
            move |[x2, ab, g], need, _, dy| {
                let (a, bm) = split(ab)?;
                let (u, gr) = (x2.matmul(&a)?, per_rank(g, r)?);
                let dv = (dy.matmul(&bm.t()?)? * s)?;
                let du = (&dv * &gr)?;
                let dx = need[0]
                    .then(|| dy.matmul(&w1)? + du.matmul(&a.t()?)?)
                    .transpose()?;
                let dab = need[1]
                    .then(|| {
                        let da = x2.t()?.matmul(&du)?; // (in, E r)
                        let db = (((&u * &gr)?.t()?.matmul(dy))? * s)?; // (E r, out)
                        Tensor::cat(&[da.flatten_all()?, db.flatten_all()?], 0)
                    })
                    .transpose()?;
                let dg = need[2]
                    .then(|| {
                        let rows = dv.dim(0)?;
                        (dv * u)?.reshape((rows, e, r))?.sum(2)
                    })
                    .transpose()?;
                Ok([dx, dab, dg])
            },
        )?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap_or(&mut 0) = out;
        Ok(y.reshape(dims)?)
    }

    /// The gates (rows, E) for inputs x (rows, in) f32, and the dropped and chosen pairs.
    pub(crate) fn gates(&self, x: &Tensor, ctx: &crate::Ctx) -> Result<(Tensor, usize, usize)> {
        let p = mixture::probs(x, self.router.as_tensor(), ctx.kernels())?;
        let (rows, e) = p.dims2()?;
        match self.routing {
            Routing::Soft => Ok((p, 0, rows * e)),
            Routing::TopK {
                k,
                capacity_factor,
                gate_dropout,
            } => {
                // the capacity binds in training only: served, a token's output must not
                // depend on the other requests in its batch
                let cap = if ctx.is_train() {
                    mixture::capacity(capacity_factor, k, rows, e)
                } else {
                    usize::MAX
                };
                let (mask, dropped) = mixture::top_k_capacity(&p.detach(), k, cap)?;
                let mut g = (p * mask)?;
                if gate_dropout > 0.0 && ctx.is_train() {
                    g = crate::methods::lora::dropout(&g, gate_dropout, ctx)?;
                }
                Ok((g, dropped, rows * k))
            }
        }
    }
}

impl AdapterLayer for MixtureLora {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let x2 = crate::methods::flat_input(x)?;
        let inp = x2.dim(1)?;
        let (e, _, r) = self.a.as_tensor().dims3()?;
        let (g, dropped, chosen) = self.gates(&x2, ctx)?;
        if ctx.is_train() {
            self.meter.record(&g, dropped, chosen)?;
        }
        // A as (in, E r), B as (E r, out): every expert in two products, gated per rank block
        let a = self.a.as_tensor().transpose(0, 1)?.reshape((inp, e * r))?;
        let b = self.b.as_tensor().reshape((e * r, ()))?;
        let h = (x2.matmul(&a)? * mixture::per_rank(&g, r)?)?;
        let d = (h.matmul(&b)? * self.scale)?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    /// `x W^T + b` and every expert in one graph node over x, the experts' factors (A and B
    /// flattened end to end) and the gates, keeping only those: backward recomputes `x A` and
    /// takes `dB = s v^T dy`, `dv = s dy B^T`, `dA = x^T (dv ⊙ g)`, `dg = Σ_r dv ⊙ x A`,
    /// `dx = dy W + (dv ⊙ g) A^T` (v = x A ⊙ g, g repeated over each expert's ranks). The
    /// composed `forward` is its readable twin (the conformance test compares them, values and
    /// gradients). f32 only.
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
        Err(mixture::unmergeable(match self.routing {
            Routing::Soft => "MoLoRA",
            Routing::TopK { .. } => "SiRA",
        }))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: self.names[0],
                var: &self.a,
            },
            NamedTensor {
                name: self.names[1],
                var: &self.b,
            },
            NamedTensor {
                name: self.names[2],
                var: &self.router,
            },
        ]
    }

    fn router_load(&self) -> Option<RouterLoad> {
        self.meter.take()
    }
}

#[cfg(test)]
pub(crate) fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("molora", 2, 4.0, crate::testing::toy_targets());
    c.set("num_experts", 3).unwrap();
    c
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, _cfg| layer_count(inp, out, 2, 3),
    None,
    unmergeable
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Adaptable;

    /// tools/golden/moe_oracle.py: the official MoLoRA layer's einsums and router transcribed
    /// in NumPy; petal's output for the same A, B, router and input.
    #[test]
    fn the_output_equals_the_official_layer_transcribed() {
        let t = crate::testing::golden_fixture("moe");
        let layer = MixtureLora {
            a: Var::from_tensor(&t["molora.A"]).unwrap(),
            b: Var::from_tensor(&t["molora.B"]).unwrap(),
            router: Var::from_tensor(&t["molora.router"]).unwrap(),
            scale: 16.0 / 3.0,
            routing: Routing::Soft,
            names: ["molora_A", "molora_B", "molora_router"],
            meter: LoadMeter::default(),
        };
        let x = &t["molora.x"];
        let y = t["molora.base"].clone();
        let got = layer.forward(x, y, &crate::Ctx::eval()).unwrap();
        let e = crate::testing::max_rel(&got, &t["molora.y"]);
        assert!(e < 1e-5, "relative error {e:e}");
    }

    #[test]
    fn a_zero_expert_count_or_rank_is_refused_naming_the_key() {
        for k in ["num_experts", "r"] {
            let mut c = conformance_config();
            c.set(k, 0).unwrap();
            let e = c.validate("adapter_config.json").unwrap_err().to_string();
            assert!(e.contains(&format!("`{k}`")), "{e}");
        }
    }

    #[test]
    fn training_forwards_record_each_experts_mean_gate_and_merging_is_refused() {
        let mut t = crate::testing::adapted(&conformance_config(), true);
        let x = crate::testing::Toy::input();
        let ctx = crate::Ctx::train(1);
        t.forward_ctx(&x, &ctx);
        let lin = &t.linears()[0];
        // a second forward of other tokens: the load is the mean over both
        let x2 = (x.clone() * -0.5).unwrap();
        t.forward_ctx(&x2, &ctx);
        t.forward_ctx(&x2, &crate::Ctx::eval()); // evaluation records nothing
        let layer = lin.layer("default").unwrap();
        let load = layer.router_load().unwrap();
        let (a, b) = (
            crate::methods::mixture::load_written_out(layer, "molora_router", &x, 3),
            crate::methods::mixture::load_written_out(layer, "molora_router", &x2, 3),
        );
        assert_eq!((load.load.len(), a.len()), (3, 3));
        for (e, got) in load.load.iter().enumerate() {
            let want = (a[e] + b[e]) / 2.0;
            assert!((got - want).abs() < 1e-6, "expert {e}: {got} vs {want}");
        }
        assert_eq!(load.dropped, 0.0);
        assert!(layer.router_load().is_none(), "reading the load resets it");
        let e = t.linears_mut()[0]
            .merge("default", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be merged"), "{e}");
    }
}
