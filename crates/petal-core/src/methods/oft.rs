//! OFT (Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"; Liu
//! et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization" for the
//! Cayley-Neumann form). Mirrors PEFT `tuners/oft/layer.py` (`OFTRotationModule`, `Linear`).
//!
//! The input is rotated block by block before the frozen linear: `y = (x R) W^T + b` with
//! `R = diag(R_1, …, R_r)`, `r` blocks of size `b` (`r * b = in`). Each block is the Cayley
//! transform of a skew-symmetric `Q` whose strictly upper triangle is trained (`b(b-1)/2` values
//! per block, saved as `oft_R.weight (r, b(b-1)/2)`): exactly `R = (I - Q)(I + Q)^-1`, or by
//! PEFT's default truncated Neumann series `R = I + 2Q + 2Q^2 + … + Q^(n-1)` (n terms).
//! `block_share`: one block for all. `coft`: before each use, Q is projected onto the ball of
//! Frobenius radius `eps / sqrt(r)`. Merge: `W' = W R^T`; unmerge uses `R^-1` (the series makes
//! R only nearly orthogonal). Init: Q = 0 (identity); `init_weights = false`: N(0, 0.1^2).
//! PEFT accepts `module_dropout` for OFT linears but never applies it; neither does petal.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, NewAdapter, WeightUpdate,
};
use crate::config::{spec, AdapterConfig, InitWeights, Spec};
use crate::methods::orthogonal::{
    block_diag, cayley, cayley_neumann, rotate_blocks, skew_from_upper,
};
use crate::methods::{check_plain_base, init_nonzero, normal};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use petal_ops::Kernels;
use rand::SeedableRng;

pub struct Oft;

crate::method_options! {
    /// OFT's options (PEFT `OFTConfig`): give the block count `r` or the block size.
    pub struct OftOptions {
        /// Number of blocks (0: from oft_block_size)
        pub r: usize = 0,
        /// Block size (0: from r)
        pub oft_block_size: usize = 0,
        /// Skip the adapter for a forward call with this probability
        pub module_dropout: f64 = 0.0,
        /// true: identity rotation at start; false: random
        pub init_weights: InitWeights = InitWeights::Flag(true),
        /// Constrained OFT: project onto a ball of radius eps
        pub coft: bool = false,
        /// COFT's radius
        pub eps: f64 = 6e-5,
        /// One block shared by all blocks of a layer
        pub block_share: bool = false,
        /// Cayley transform by a truncated Neumann series (PEFT's default) or exactly
        pub use_cayley_neumann: bool = true,
        /// Terms of the Neumann series
        pub num_cayley_neumann_terms: usize = 5,
        /// Bias handling (only "none")
        pub bias: String = "none".into(),
        /// Weights stored (in, out) (not supported)
        pub fan_in_fan_out: bool = false,
    }
}

#[derive(Debug)]
pub struct OftLayer {
    q: Var, // (blocks or 1, b(b-1)/2)
    blocks: usize,
    block: usize,
    neumann: Option<usize>, // number of series terms; None: exact Cayley
    coft_eps: Option<f64>,
    base: Tensor,                             // frozen W, for the unfused path
    quant: Option<petal_ops::quant::QFormat>, // W's block format when it is kept quantized
}

/// PEFT's `adjust_oft_parameters`: the divisor of `n` nearest to `p` (ties go down).
fn nearest_divisor(n: usize, p: usize) -> usize {
    if p >= n {
        return n;
    }
    let mut hi = p;
    while hi <= n && n % hi != 0 {
        hi += 1;
    }
    let mut lo = p;
    while lo > 1 && n % lo != 0 {
        lo -= 1;
    }
    if p - lo <= hi - p {
        lo
    } else {
        hi
    }
}

/// (blocks, block size) for a linear with `inp` inputs, as PEFT resolves `r` / `oft_block_size`.
pub fn blocks_for(o: &OftOptions, inp: usize) -> Result<(usize, usize)> {
    match (o.r, o.oft_block_size) {
        (0, 0) => Err(Error::msg("OFT: give `r` or `oft_block_size`")),
        (0, bs) => {
            let bs = if inp % bs != 0 || bs > inp {
                nearest_divisor(inp, bs)
            } else {
                bs
            };
            Ok((inp / bs, bs))
        }
        (r, 0) => {
            let r = if inp % r != 0 || r > inp {
                nearest_divisor(inp, r)
            } else {
                r
            };
            Ok((r, inp / r))
        }
        (r, bs) => Err(Error::msg(format!(
            "OFT: give `r` ({r}) or `oft_block_size` ({bs}), not both (r x block size = in_features)"
        ))),
    }
}

impl AdapterMethod for Oft {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // the input is rotated; W is only multiplied by
    }

    fn peft_type(&self) -> &'static str {
        "OFT"
    }

    fn options(&self) -> Spec {
        spec::<OftOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: OftOptions = cfg.options()?;
        crate::config::probability("module_dropout", o.module_dropout)?;
        check_plain_base(&o.bias, o.fan_in_fan_out, &o.init_weights)
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("oft-block-size", "oft_block_size"),
            Flag {
                name: "exact-cayley",
                key: "use_cayley_neumann",
                invert: true,
            },
            Flag::new("module-dropout", "module_dropout"),
        ]
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        // blocks of 32 unless a block count (r) alone is given
        if !new.given("r") || new.given("oft_block_size") {
            cfg.set("r", 0)?;
            if !new.given("oft_block_size") {
                cfg.set("oft_block_size", 32)?;
            }
        }
        Ok(())
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("r", "0"), ("oft_block_size", "32")])
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: OftOptions = cfg.options()?;
        let (blocks, block) =
            blocks_for(&o, base.in_features).map_err(|e| Error::msg(format!("{path}: {e}")))?;
        if block < 2 {
            return Err(Error::msg(format!(
                "{path}: OFT block size {block} leaves nothing to rotate; use fewer, larger blocks"
            )));
        }
        let rows = if o.block_share { 1 } else { blocks };
        let shape = (rows, block * (block - 1) / 2);
        let dev = base.weight.device();
        let q = if init_nonzero(&o.init_weights) {
            normal(
                shape,
                0.1,
                &mut rand::rngs::StdRng::seed_from_u64(seed),
                dev,
            )?
        } else {
            Tensor::zeros(shape, DType::F32, dev)?
        };
        let neumann = o.use_cayley_neumann.then_some(o.num_cayley_neumann_terms);
        Ok(Box::new(OftLayer {
            q: Var::from_tensor(&q)?,
            blocks,
            block,
            neumann,
            coft_eps: o.coft.then_some(o.eps),
            base: base.weight.clone(),
            quant: base.quant,
        }))
    }
}

impl OftLayer {
    /// COFT: keep each block's Q within the Frobenius ball of radius eps / sqrt(rows), in place
    /// (as PEFT does, outside the graph). ||Q||_F = sqrt(2) ||upper triangle||.
    fn project(&self, eps: f64) -> Result<()> {
        let rows = self.q.as_tensor().dim(0)?;
        let eps = eps / (rows as f64).sqrt();
        let norms = (self.q.as_tensor().sqr()?.sum_keepdim(1)? * 2.0)?.sqrt()?;
        let factor = norms
            .to_vec2::<f32>()?
            .into_iter()
            .map(|n| {
                if n[0] as f64 <= eps {
                    1.0
                } else {
                    (eps / n[0] as f64) as f32
                }
            })
            .collect::<Vec<_>>();
        let f = Tensor::from_vec(factor, (rows, 1), self.q.as_tensor().device())?;
        Ok(self.q.set(&self.q.as_tensor().broadcast_mul(&f)?)?)
    }

    /// The rotation blocks (blocks, b, b), shared blocks repeated.
    fn rotation(&self) -> Result<Tensor> {
        if let Some(eps) = self.coft_eps {
            self.project(eps)?;
        }
        let q = skew_from_upper(self.q.as_tensor(), self.block)?;
        let r = match self.neumann {
            Some(t) => cayley_neumann(&q, t)?,
            None => cayley(&q)?,
        };
        if r.dim(0)? == 1 && self.blocks > 1 {
            return Ok(r.repeat((self.blocks, 1, 1))?);
        }
        Ok(r)
    }

    /// x R in x's dtype (bf16 activations are rotated without an f32 copy in the graph).
    fn rotated(&self, k: Kernels, x: &Tensor) -> Result<Tensor> {
        let inp = x.dim(candle_core::D::Minus1)?;
        let x2 = x.reshape((x.elem_count() / inp, inp))?;
        Ok(rotate_blocks(k, &x2, &self.rotation()?)?.reshape(x.shape())?)
    }
}

impl AdapterLayer for OftLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        // (x R) W^T + b = y + (x R - x) W^T
        let d =
            (self.rotated(ctx.kernels(), x)?.to_dtype(DType::F32)? - x.to_dtype(DType::F32)?)?;
        let d = crate::linear::frozen_xwt(ctx, &d, &self.base, self.quant)?;
        Ok((y + d.to_dtype(x.dtype())?)?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        let run = || -> Result<Tensor> {
            let xr = self.rotated(ctx.kernels(), x)?; // in x's dtype; frozen_linear meets w's dtype
            Ok(petal_ops::frozen_linear(ctx.kernels(), &xr, w, b)?.to_dtype(x.dtype())?)
        };
        Some(run())
    }

    fn fused_forward_quant(
        &self,
        x: &Tensor,
        w: &Tensor,
        fmt: petal_ops::quant::QFormat,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        let run = || -> Result<Tensor> {
            let xr = self.rotated(ctx.kernels(), x)?;
            Ok(petal_ops::quant::quant_linear(
                ctx.kernels(),
                &xr,
                w,
                fmt,
                b,
            )?)
        };
        Some(run())
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let r = self.rotation()?;
        Ok(WeightUpdate::Rotate {
            r: block_diag(&r)?,
            r_inv: block_diag(&petal_ops::inverse(&r)?)?,
            s: None,
        })
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: "oft_R.weight",
            var: &self.q,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Targets;
    use crate::methods::orthogonal::eye_batch;
    use candle_core::Device;
    use petal_ops::testing::{max_rel, rand};

    #[test]
    fn block_sizes_resolve_like_peft_including_the_nearest_divisor() {
        let mut c = AdapterConfig::for_method("OFT", 0, 1.0, Targets::List(vec![]));
        c.set("oft_block_size", Some(32)).unwrap();
        assert_eq!(blocks_for(&c.options().unwrap(), 576).unwrap(), (18, 32));
        c.set("oft_block_size", 7).unwrap(); // 576 = 2^6 3^2: 6 and 8 are 1 away, ties go down
        assert_eq!(blocks_for(&c.options().unwrap(), 576).unwrap(), (96, 6));
        c.set("oft_block_size", Some(0)).unwrap();
        c.set("r", 4).unwrap();
        assert_eq!(blocks_for(&c.options().unwrap(), 48).unwrap(), (4, 12));
        c.set("oft_block_size", Some(8)).unwrap();
        assert!(blocks_for(&c.options().unwrap(), 48).is_err());
    }

    #[test]
    fn exact_cayley_is_orthogonal_and_the_series_approaches_its_transpose() {
        let q = skew_from_upper(&(rand(&[3, 10], 1) * 0.05).unwrap(), 5).unwrap();
        let exact = cayley(&q).unwrap();
        let eye = eye_batch(3, 5, &Device::Cpu).unwrap();
        let rtr = exact.transpose(1, 2).unwrap().matmul(&exact).unwrap();
        assert!(max_rel(&rtr, &eye) < 1e-6);
        // PEFT's series expands (I + Q)(I - Q)^-1 = R^T: the two forms rotate opposite ways
        let exact = exact.transpose(1, 2).unwrap();
        let e5 = max_rel(&cayley_neumann(&q, 5).unwrap(), &exact);
        let e9 = max_rel(&cayley_neumann(&q, 9).unwrap(), &exact);
        assert!(
            e9 < e5 && e5 < 1e-3,
            "series error {e5} (5 terms), {e9} (9 terms)"
        );
    }

    #[test]
    fn blockwise_rotation_equals_the_dense_block_diagonal_product() {
        let r = rand(&[3, 4, 4], 2);
        let x = rand(&[5, 12], 3);
        let dense = x.matmul(&block_diag(&r).unwrap()).unwrap();
        assert!(max_rel(&rotate_blocks(Kernels::FUSED, &x, &r).unwrap(), &dense) < 1e-6);
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    // 2 blocks: fc1 (in 10) blocks of 5, fc2 (in 12) blocks of 6
    AdapterConfig::for_method("OFT", 2, 1.0, crate::testing::toy_targets())
}

#[cfg(test)]
fn exact_config() -> AdapterConfig {
    let mut c = conformance_config();
    c.set("use_cayley_neumann", Some(false)).unwrap();
    c.set("r", 0).unwrap();
    c.set("oft_block_size", Some(2)).unwrap();
    c
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, _out, _cfg: &AdapterConfig| {
        let b = inp / 2;
        2 * b * (b - 1) / 2
    }
);

#[cfg(test)]
crate::conformance!(
    conformance_exact_cayley,
    exact_config,
    |inp, _out, _cfg: &AdapterConfig| inp / 2
);

/// Over a quantized base: the rotated input meets the blocks, as it meets W dequantized.
#[test]
fn oft_over_quantized_blocks_equals_oft_over_them_dequantized() {
    let mut c = conformance_config();
    c.set("init_weights", InitWeights::Flag(false)).unwrap();
    crate::testing::check_over_quantized_blocks(&Oft, &c, (6, 32), &|_| {});
}
