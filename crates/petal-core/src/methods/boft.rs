//! BOFT (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
//! Factorization"). Mirrors PEFT `tuners/boft/layer.py` (`Linear`).
//!
//! The input is rotated by a product of `m` butterfly factors, each a block-diagonal orthogonal
//! matrix conjugated by a fixed permutation, then the output (bias excluded) is scaled:
//! `y = ((x R) W^T) ⊙ s + b`, `R = F_(m-1) … F_0`, `F_i = P_i diag(R_i1 … R_iD) P_i^T`, each
//! block the exact Cayley transform `(I - S)(I + S)^-1` of `S = (A - A^T) / 2`.
//! Trained: `boft_R (m, D, b, b)` (D blocks of size b, `D * b = in`) and `boft_s (out, 1)`.
//! Merge: `W' = (W R^T) ⊙ s`, bias unchanged; unmerge: `W = (W' / s) R^-T`.
//! `boft_dropout`: in training, `int(p D)` random blocks of one random factor become identity.
//! Init: A = 0, s = 1 (identity); `init_weights = false`: A ~ N(0, 0.1^2), s ~ N(1, 0.1^2).
//! PEFT applies butterfly factors > 1 only with its CUDA extension (on CPU it silently trains
//! one factor); petal computes them on every device.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, NewAdapter, SharedOption,
    WeightUpdate,
};
use crate::config::{spec, AdapterConfig, InitWeights, Spec};
use crate::methods::orthogonal::{block_diag, cayley, rotate_blocks};
use crate::methods::{check_plain_base, init_nonzero, normal};
use crate::{rng, Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub struct Boft;

crate::method_options! {
    /// BOFT's options (PEFT `BOFTConfig`): give the block size or the block count.
    pub struct BoftOptions {
        /// Size of the orthogonal blocks (0: from boft_block_num)
        pub boft_block_size: usize = 0,
        /// Number of blocks (0: from boft_block_size)
        pub boft_block_num: usize = 0,
        /// Butterfly factors
        pub boft_n_butterfly_factor: usize = 1,
        /// Multiplicative dropout of whole blocks in training
        pub boft_dropout: f64 = 0.0,
        /// true: identity rotation at start; false: random
        pub init_weights: InitWeights = InitWeights::Flag(true),
        /// Bias handling (only "none")
        pub bias: String = "none".into(),
        /// Weights stored (in, out) (not supported)
        pub fan_in_fan_out: bool = false,
    }
}

#[derive(Debug)]
pub struct BoftLayer {
    a: Var, // (m, D, b, b)
    s: Var, // (out, 1)
    /// Per factor: the permutation `p` (x P = x[:, p_inv]) and its inverse.
    perms: Vec<(Tensor, Tensor)>,
    dropout: f64,
    base: Tensor,
    quant: Option<petal_ops::quant::QFormat>, // W's block format when it is kept quantized
    inp: usize,
}

/// PEFT's `block_butterfly_perm(n, b, r, n_butterfly_factor)`: within each of `b` blocks of
/// `n / b`, reorder the runs of `r` elements as even runs, then odd runs.
pub fn butterfly_perm(n: usize, b: usize, r: usize, factors_minus_one: usize) -> Result<Vec<u32>> {
    if factors_minus_one == 0 {
        return Ok((0..n as u32).collect());
    }
    if b * r * 2 > n {
        return Err(Error::msg(
            "BOFT: invalid number of blocks for the butterfly",
        ));
    }
    let bs = n / b;
    let steps = bs.div_ceil(r); // torch.arange(0, bs / r, 2) over a float bound
    let runs: Vec<usize> = (0..steps).step_by(2).chain((1..steps).step_by(2)).collect();
    let mut order = vec![0usize; bs];
    for (i, pos) in runs.iter().enumerate() {
        for j in 0..r {
            if i * r + j < bs && pos * r + j < bs {
                order[i * r + j] = pos * r + j;
            }
        }
    }
    let mut idx: Vec<u32> = (0..n as u32).collect();
    for start in (0..n).step_by(bs) {
        let block: Vec<u32> = idx[start..start + bs].to_vec();
        for (k, &o) in order.iter().enumerate() {
            idx[start + k] = block[o];
        }
    }
    Ok(idx)
}

/// (factors, blocks, block size) for a linear with `inp` inputs, checked as PEFT checks them.
pub fn shape_for(o: &BoftOptions, inp: usize) -> Result<(usize, usize, usize)> {
    let m = o.boft_n_butterfly_factor;
    if m == 0 {
        return Err(Error::msg(
            "BOFT: boft_n_butterfly_factor must be at least 1",
        ));
    }
    let f = m - 1;
    let (bs, bn) = (o.boft_block_size, o.boft_block_num);
    let (bs, bn) = match (bs, bn) {
        (0, 0) => return Err(Error::msg("BOFT: give boft_block_size or boft_block_num")),
        (0, bn) => {
            if inp % bn != 0 {
                return Err(Error::msg(format!(
                    "BOFT: in_features ({inp}) must be divisible by boft_block_num ({bn})"
                )));
            }
            if f > 0 && (f as u32 > bn.ilog2() || bn % (1 << f) != 0) {
                return Err(Error::msg(format!(
                    "BOFT: boft_block_num ({bn}) must be a multiple of 2^{f} for {m} butterfly factors"
                )));
            }
            (inp / bn, bn)
        }
        (bs, 0) => {
            if inp % bs != 0 {
                return Err(Error::msg(format!(
                    "BOFT: in_features ({inp}) must be divisible by boft_block_size ({bs})"
                )));
            }
            if f > 0 && inp % (bs << f) != 0 {
                return Err(Error::msg(format!(
                    "BOFT: in_features ({inp}) must be divisible by boft_block_size x 2^{f}"
                )));
            }
            (bs, inp / bs)
        }
        _ => {
            return Err(Error::msg(
                "BOFT: give boft_block_size or boft_block_num, not both",
            ))
        }
    };
    if f > 0 && (bn % 2 != 0 || bs % 2 != 0) {
        return Err(Error::msg(format!(
            "BOFT: block count ({bn}) and block size ({bs}) must be even with butterfly factors"
        )));
    }
    Ok((m, bn, bs))
}

impl AdapterMethod for Boft {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // the input is rotated and the output scaled; W is only multiplied by
    }

    fn peft_type(&self) -> &'static str {
        "BOFT"
    }

    fn options(&self) -> Spec {
        spec::<BoftOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: BoftOptions = cfg.options()?;
        check_plain_base(&o.bias, o.fan_in_fan_out, &o.init_weights)
    }

    fn shared_key(&self, o: SharedOption) -> Option<&'static str> {
        (o == SharedOption::Rank).then_some("boft_block_num")
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("boft-block-size", "boft_block_size"),
            Flag::new("boft-block-num", "boft_block_num"),
            Flag::new("boft-butterfly-factor", "boft_n_butterfly_factor"),
        ]
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        // one of block size and count: blocks of 4 unless a count is given
        let (size, num) = (new.given("boft_block_size"), new.given("boft_block_num"));
        if num && !size {
            cfg.set("boft_block_size", 0)?;
        } else if !num {
            cfg.set("boft_block_num", 0)?;
            if !size {
                cfg.set("boft_block_size", 4)?;
            }
        }
        Ok(())
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("boft_block_num", "0"), ("boft_block_size", "8")])
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: BoftOptions = cfg.options()?;
        let (m, bn, bs) =
            shape_for(&o, base.in_features).map_err(|e| Error::msg(format!("{path}: {e}")))?;
        let dev = base.weight.device();
        let mut perms = Vec::new();
        for i in 0..m {
            let p = butterfly_perm(base.in_features, bn >> i, bs / 2, m - 1)?;
            let mut inv = vec![0u32; p.len()];
            for (k, &v) in p.iter().enumerate() {
                inv[v as usize] = k as u32;
            }
            perms.push((
                Tensor::new(p.as_slice(), dev)?,
                Tensor::new(inv.as_slice(), dev)?,
            ));
        }
        let out = base.out_features;
        let (a, s) = if init_nonzero(&o.init_weights) {
            let mut g = rand::rngs::StdRng::seed_from_u64(seed);
            (
                normal((m * bn * bs, bs), 0.1, &mut g, dev)?.reshape((m, bn, bs, bs))?,
                (normal((out, 1), 0.1, &mut g, dev)? + 1.0)?,
            )
        } else {
            (
                Tensor::zeros((m, bn, bs, bs), DType::F32, dev)?,
                Tensor::ones((out, 1), DType::F32, dev)?,
            )
        };
        Ok(Box::new(BoftLayer {
            a: Var::from_tensor(&a)?,
            s: Var::from_tensor(&s)?,
            perms,
            dropout: o.boft_dropout,
            base: base.weight.clone(),
            quant: base.quant,
            inp: base.in_features,
        }))
    }
}

impl BoftLayer {
    /// The orthogonal blocks (m, D, b, b); in training, PEFT's multiplicative block dropout.
    fn blocks(&self, ctx: &crate::Ctx) -> Result<Tensor> {
        let (m, d, b, _) = self.a.as_tensor().dims4()?;
        let a = self.a.as_tensor().reshape((m * d, b, b))?;
        let skew = ((&a - a.transpose(1, 2)?)? * 0.5)?;
        let r = cayley(&skew)?;
        if !(ctx.is_train() && self.dropout > 0.0) {
            return Ok(r.reshape((m, d, b, b))?);
        }
        // int(p D) blocks of one factor replaced by the identity
        let mut state = ctx.next_seed();
        let mut draw = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            rng::splitmix(state)
        };
        let factor = (draw() % m as u64) as usize;
        let mut order: Vec<usize> = (0..d).collect();
        for i in (1..d).rev() {
            order.swap(i, (draw() % (i as u64 + 1)) as usize);
        }
        let mut mask = vec![0f32; m * d];
        for &k in order.iter().take((self.dropout * d as f64) as usize) {
            mask[factor * d + k] = 1.0;
        }
        let mask = Tensor::from_vec(mask, (m * d, 1, 1), r.device())?;
        let eye = Tensor::eye(b, DType::F32, r.device())?.unsqueeze(0)?;
        let keep = (1.0 - &mask)?;
        let r = (r.broadcast_mul(&keep)? + mask.broadcast_mul(&eye)?)?;
        Ok(r.reshape((m, d, b, b))?)
    }

    /// x R = x F_(m-1) … F_0 with `x F_i = ((x P_i) diag(R_i)) P_i^T`.
    fn rotate(&self, x: &Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let blocks = self.blocks(ctx)?;
        // in x's dtype: the block rotation reads bf16 activations itself (f32 inside)
        let inp = x.dim(candle_core::D::Minus1)?;
        let mut h = x.reshape((x.elem_count() / inp, inp))?;
        for i in (0..self.perms.len()).rev() {
            let (p, p_inv) = &self.perms[i];
            h = h.index_select(p_inv, 1)?;
            h = rotate_blocks(ctx.kernels(), &h, &blocks.get(i)?)?;
            h = h.index_select(p, 1)?;
        }
        Ok(h.reshape(x.shape())?)
    }

    /// `((x R) W^T) ⊙ s + b`, the frozen product `xwt` of the rotated input.
    fn rotate_scale(
        &self,
        x: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
        xwt: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let y = xwt(&self.rotate(x, ctx)?)?;
        // f32 scales on y in its own dtype (f32 arithmetic inside): no f32 copy of y
        let y = petal_ops::scale_last(ctx.kernels(), &y, &self.s.as_tensor().flatten_all()?)?;
        let y = match b {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        Ok(y.to_dtype(x.dtype())?)
    }

    /// The dense rotation, or its inverse, for merging.
    fn dense(&self, inverse: bool) -> Result<Tensor> {
        let blocks = self.blocks(&crate::Ctx::eval())?;
        let n = self.inp;
        let mut total = Tensor::eye(n, DType::F32, blocks.device())?;
        for (i, (p, _)) in self.perms.iter().enumerate() {
            let r = blocks.get(i)?;
            let r = if inverse {
                r.transpose(1, 2)?.contiguous()?
            } else {
                r
            };
            // (P B P^T)[a, c] = B[p[a], p[c]]
            let f = block_diag(&r)?.index_select(p, 0)?.index_select(p, 1)?;
            total = if inverse {
                total.matmul(&f)? // R^-1 = F_0^-1 … F_(m-1)^-1
            } else {
                f.matmul(&total)? // R = F_(m-1) … F_0
            };
        }
        Ok(total)
    }
}

impl AdapterLayer for BoftLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        // ((x R) W^T) ⊙ s + b = y + ((x R) W^T) ⊙ s - x W^T
        let xr = self.rotate(x, ctx)?;
        let xwt = |x| crate::linear::frozen_xwt(ctx, x, &self.base, self.quant);
        let rotated = xwt(&xr)?.to_dtype(DType::F32)?;
        let plain = xwt(x)?.to_dtype(DType::F32)?;
        let s = self.s.as_tensor().flatten_all()?;
        let d = (rotated.broadcast_mul(&s)? - plain)?;
        Ok((y + d.to_dtype(x.dtype())?)?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        Some(self.rotate_scale(x, b, ctx, |xr| {
            Ok(petal_ops::frozen_linear(ctx.kernels(), xr, w, None)?)
        }))
    }

    fn fused_forward_quant(
        &self,
        x: &Tensor,
        w: &Tensor,
        fmt: petal_ops::quant::QFormat,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        Some(self.rotate_scale(x, b, ctx, |xr| {
            Ok(petal_ops::quant::quant_linear(
                ctx.kernels(),
                xr,
                w,
                fmt,
                None,
            )?)
        }))
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Rotate {
            r: self.dense(false)?,
            r_inv: self.dense(true)?,
            s: Some(self.s.as_tensor().clone()),
        })
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "boft_R",
                var: &self.a,
            },
            NamedTensor {
                name: "boft_s",
                var: &self.s,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use petal_ops::testing::{max_rel, rand};

    #[test]
    fn the_butterfly_permutation_reorders_runs_as_peft_does() {
        // n 8, 2 blocks of 4, runs of 1: [0, 2, 1, 3] in each block (even runs, then odd)
        assert_eq!(
            butterfly_perm(8, 2, 1, 1).unwrap(),
            vec![0, 2, 1, 3, 4, 6, 5, 7]
        );
        // n 8, 1 block of 8, runs of 2: runs 0, 2 then 1, 3
        assert_eq!(
            butterfly_perm(8, 1, 2, 1).unwrap(),
            vec![0, 1, 4, 5, 2, 3, 6, 7]
        );
        assert_eq!(butterfly_perm(4, 2, 1, 0).unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn the_factored_rotation_equals_its_dense_matrix_and_is_orthogonal() {
        let mut cfg = conformance_config();
        cfg.set("boft_n_butterfly_factor", Some(2)).unwrap();
        cfg.set("boft_block_num", Some(0)).unwrap();
        cfg.set("boft_block_size", Some(2)).unwrap();
        cfg.set_init_nonzero();
        let w = rand(&[3, 8], 1);
        let base = BaseLinear {
            weight: &w,
            bias: None,
            in_features: 8,
            out_features: 3,
            shared: &Default::default(),
            embedding: false,
            quant: None,
        };
        let layer = Boft.build(&cfg, "fc", &base, 7).unwrap();
        let WeightUpdate::Rotate { r, r_inv, .. } = layer.weight_update().unwrap() else {
            panic!("BOFT rotates")
        };
        let eye = Tensor::eye(8, DType::F32, w.device()).unwrap();
        assert!(max_rel(&r.matmul(&r_inv).unwrap(), &eye) < 1e-5);
        assert!(max_rel(&r.matmul(&r.t().unwrap()).unwrap(), &eye) < 1e-5);
        // x R through the permuted blocks equals x times the dense R (merge's matrix)
        let x = rand(&[5, 8], 2);
        let y = layer
            .fused_forward(&x, &w, None, &crate::Ctx::eval())
            .unwrap()
            .unwrap();
        let s = layer.tensors()[1].var.as_tensor().flatten_all().unwrap();
        let want = x
            .matmul(&r)
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_mul(&s)
            .unwrap();
        assert!(max_rel(&y, &want) < 1e-5);
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    // 2 blocks: fc1 (in 10) of 5, fc2 (in 12) of 6
    AdapterConfig::for_method("BOFT", 2, 1.0, crate::testing::toy_targets())
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, _cfg: &AdapterConfig| {
        let b = inp / 2;
        2 * b * b + out
    }
);

/// Over a quantized base: the rotated input meets the blocks, as it meets W dequantized.
#[test]
fn boft_over_quantized_blocks_equals_boft_over_them_dequantized() {
    let mut c = conformance_config();
    c.set("init_weights", InitWeights::Flag(false)).unwrap();
    crate::testing::check_over_quantized_blocks(&Boft, &c, (6, 32), &|_| {});
}
