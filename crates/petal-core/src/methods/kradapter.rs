//! KRAdapter (Albert et al., ICCV 2025, arXiv 2508.00230, "Towards Higher Effective Rank in
//! Parameter-efficient Fine-tuning using Khatri–Rao Product"; official code
//! PaulAlbert31/KRAdapter): a full-rank update from about `2 n sqrt(N)` parameters, with no
//! rank to choose.
//!
//! For a linear (out, in), `n = min(in, out)`, `N = max(in, out)`, `r = floor(sqrt(n))` and `d`
//! the smallest count with `r (r + d) >= N`. Two factors with n rows, U (n, r) and V (n, r + d);
//! row i of `M (n, r (r + d))` is the Kronecker product of their i-th rows,
//! `M[i, a r + b] = V[i, a] U[i, b]` (the column-wise Khatri–Rao product of Vᵀ and Uᵀ). M cut to
//! its first N columns is the update along the long side: `dW = scaling * M[:, :N]` when
//! `out <= in`, its transpose otherwise. U starts at zero (dW = 0), V kaiming-uniform.
//! Mergeable (dW is additive). petal's own adapter: `peft_type: "KRADAPTER"`, tensors
//! `<module>.kr_weight` (U) and `<module>.kr_v_weight` (V), after the official `weight` and
//! `v_weight`.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, WeightUpdate,
};
use crate::config::{finite, spec, AdapterConfig, Spec};
use crate::methods::{add_dense_delta, dense_linear, param};
use crate::Result;
use candle_core::{Tensor, Var};
use rand::SeedableRng;

pub const U: &str = "kr_weight";
pub const V: &str = "kr_v_weight";

pub struct KrAdapter;

crate::method_options! {
    /// KRAdapter's options (petal's own method; the official layer's defaults).
    pub struct KrAdapterOptions {
        /// The update is scaled by this
        pub scaling: f64 = 2.0,
        /// true: U starts at zero (dW = 0); false: U random too (a testing switch)
        pub init_weights: bool = true,
    }
}

/// `(n, r, d)` of a linear (out, in): the short side, the square root of it, and the columns
/// added so that `r (r + d)` covers the long side.
pub fn shape(out: usize, inp: usize) -> (usize, usize, usize) {
    let (n, big) = (out.min(inp), out.max(inp));
    let r = (1..=n).take_while(|k| k * k <= n).last().unwrap_or(1);
    let d = big.div_ceil(r).saturating_sub(r);
    (n, r, d)
}

impl AdapterMethod for KrAdapter {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // the Khatri-Rao update is added to the base output; W is never read
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn peft_type(&self) -> &'static str {
        "KRADAPTER"
    }

    fn options(&self) -> Spec {
        spec::<KrAdapterOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        finite("scaling", cfg.options::<KrAdapterOptions>()?.scaling, None)
    }

    fn layer_values(&self, _cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        // U and V, and the dense dW a step builds
        let (n, r, d) = shape(dims.out, dims.inp);
        Ok((n * (2 * r + d)) as u64 + dims.full())
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: KrAdapterOptions = cfg.options()?;
        let (out, inp) = (base.out_features, base.in_features);
        let (n, r, d) = shape(out, inp);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let v = param((n, r + d), false, &mut g, dev)?;
        let u = param((n, r), o.init_weights, &mut g, dev)?;
        Ok(Box::new(KrLayer {
            u,
            v,
            out,
            inp,
            scaling: o.scaling,
        }))
    }
}

#[derive(Debug)]
struct KrLayer {
    u: Var, // (n, r)
    v: Var, // (n, r + d)
    out: usize,
    inp: usize,
    scaling: f64,
}

impl KrLayer {
    /// dW (out, in) in f32: the rows' Kronecker products, cut to the long side, along W.
    /// dW (out, in), one graph node over U and V that keeps only them: its backward is the
    /// closed form `dU[i, b] = s Σ_a G[i, a, b] V[i, a]`, `dV[i, a] = s Σ_b G[i, a, b] U[i, b]`
    /// for the gradient G of M (zero past the N used columns), so none of M's (n, r (r + d))
    /// intermediates is held from forward to backward.
    fn delta(&self) -> Result<Tensor> {
        let (u, v) = (self.u.as_tensor(), self.v.as_tensor());
        let (n, r) = u.dims2()?;
        let rd = v.dim(1)?;
        let (long, s, tall) = (self.out.max(self.inp), self.scaling, self.out > self.inp);
        let build = move |u: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
            // (n, r + d, 1) * (n, 1, r) -> (n, r + d, r): [i, a, b] = V[i, a] U[i, b]
            let m = v
                .unsqueeze(2)?
                .broadcast_mul(&u.unsqueeze(1)?)?
                .reshape((n, rd * r))?;
            let m = (m.narrow(1, 0, long)? * s)?;
            if tall {
                m.t()?.contiguous()
            } else {
                Ok(m)
            }
        };
        Ok(petal_ops::lean::lean2(
            [u, v],
            |[u, v]| build(u, v),
            move |[u, v], need, _, dy| {
                let g = if tall { dy.t()? } else { dy.clone() };
                let g = g.pad_with_zeros(1, 0, rd * r - long)?.reshape((n, rd, r))?;
                let du = need[0]
                    .then(|| g.broadcast_mul(&v.unsqueeze(2)?)?.sum(1)? * s)
                    .transpose()?;
                let dv = need[1]
                    .then(|| g.broadcast_mul(&u.unsqueeze(1)?)?.sum(2)? * s)
                    .transpose()?;
                Ok([du, dv])
            },
        )?)
    }
}

impl AdapterLayer for KrLayer {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        add_dense_delta(x, y, &self.delta()?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        dense_linear(ctx.kernels(), x, w, b, || Ok(Some(self.delta()?)))
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Add(self.delta()?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: U,
                var: &self.u,
            },
            NamedTensor {
                name: V,
                var: &self.v,
            },
        ]
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    AdapterConfig::for_method("kradapter", 1, 1.0, crate::testing::toy_targets())
}

#[cfg(test)]
crate::conformance!(conformance, conformance_config, |inp, out, _cfg| {
    let (n, r, d) = shape(out, inp);
    n * (2 * r + d)
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_factors_cover_the_long_side_with_the_fewest_extra_columns() {
        // SmolLM2's q (576, 576), k (192, 576), gate (1536, 576): as the official rule
        for (out, inp, want) in [
            (576, 576, (576, 24, 0)),
            (192, 576, (192, 13, 32)),
            (1536, 576, (576, 24, 40)),
            (12, 10, (10, 3, 1)),
            (1, 7, (1, 1, 6)),
        ] {
            let (n, r, d) = shape(out, inp);
            assert_eq!((n, r, d), want, "({out}, {inp})");
            assert!(r * (r + d) >= out.max(inp) && (d == 0 || r * (r + d - 1) < out.max(inp)));
        }
    }
}

#[cfg(test)]
mod oracle {
    use super::*;

    /// The update from U and V against `tools/golden/kradapter_oracle.py`, a NumPy
    /// transcription of the paper's Khatri-Rao product written apart from this file.
    #[test]
    fn the_update_equals_the_transcription_of_the_paper_in_both_orientations() {
        let t = crate::testing::golden_fixture("kradapter");
        for (name, (out, inp)) in [
            ("wide", (7, 20)),
            ("tall", (20, 7)),
            ("square", (9, 9)),
            ("long", (24, 80)),
        ] {
            let layer = KrLayer {
                u: Var::from_tensor(&t[&format!("{name}.U")]).unwrap(),
                v: Var::from_tensor(&t[&format!("{name}.V")]).unwrap(),
                out,
                inp,
                scaling: 2.0,
            };
            let got = layer.delta().unwrap();
            let want = &t[&format!("{name}.delta")];
            assert_eq!(got.dims(), want.dims(), "{name}");
            let e = crate::testing::max_rel(&got, want);
            assert!(e < 1e-6, "{name}: relative error {e:e}");
        }
    }
}

/// Over a quantized base: the update meets the blocks' product as it meets W dequantized.
#[test]
fn kradapter_over_quantized_blocks_equals_kradapter_over_them_dequantized() {
    let c = conformance_config();
    crate::testing::check_over_quantized_blocks(&KrAdapter, &c, (12, 32), &|_| {});
}
