//! PaCA, partial connection adaptation (Woo et al., ICLR 2025, "PaCA: Partial Connection
//! Adaptation for Efficient Fine-Tuning"; official code WooSunghyeon/paca, a PEFT fork): r random
//! input columns of W are trained, no adapter branch.
//!
//! `paca_indices` (r,) are drawn once (a random permutation's first r, as the official
//! `torch.randperm(in)[:r]`) and saved; `paca_w` (out, r) starts at `W[:, idx] / scaling`,
//! `scaling = paca_alpha / r`, so the layer starts at identity. The official layer writes
//! `scaling * paca_w` into W's columns in place; petal keeps W frozen: the update is the
//! column-sparse `dW[:, idx] = scaling * paca_w - W[:, idx]` (zero elsewhere), merged and
//! unmerged through `WeightUpdate::Add`, and in mixed batches added as one narrow product. Alone
//! on its module, the fused op (`petal_ops::paca_linear`) makes one product per direction with
//! the columns replaced. Saved as `peft_type: "PACA"` with the official names `paca_w` and
//! `paca_indices` (int64), so the saved paca_w holds the columns themselves (over scaling), not
//! their difference.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, SharedOption, WeightUpdate,
};
use crate::config::{finite, spec, AdapterConfig, Spec};
use crate::methods::{alpha_for, rank_for};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub const W: &str = "paca_w";
pub const INDICES: &str = "paca_indices";

pub struct Paca;

crate::method_options! {
    /// PaCA's options (the official `PacaConfig` keys).
    pub struct PacaOptions {
        /// Columns trained per module
        pub r: usize = 8,
        /// The columns are scaled by paca_alpha / r
        pub paca_alpha: f64 = 8.0,
        /// Per-module ranks: {"regex": r}
        pub rank_pattern: std::collections::BTreeMap<String, crate::config::RankValue> = Default::default(),
        /// Per-module alphas: {"regex": alpha}
        pub alpha_pattern: std::collections::BTreeMap<String, f64> = Default::default(),
        /// true: paca_w starts at W's columns (identity); false: at random values (a testing switch)
        pub init_weights: bool = true,
    }
}

impl Paca {
    fn sizes(cfg: &AdapterConfig, path: &str) -> Result<(usize, f64)> {
        let o: PacaOptions = cfg.options()?;
        let r = rank_for(o.r, &o.rank_pattern, path);
        Ok((r, alpha_for(o.paca_alpha, &o.alpha_pattern, path)))
    }
}

impl AdapterMethod for Paca {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // QPaCA: the replaced columns are decoded from the blocks (see `columns_of`)
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn peft_type(&self) -> &'static str {
        "PACA"
    }

    fn options(&self) -> Spec {
        spec::<PacaOptions>()
    }

    fn shared_key(&self, o: SharedOption) -> Option<&'static str> {
        match o {
            SharedOption::Rank => Some("r"),
            SharedOption::Alpha => Some("paca_alpha"),
            SharedOption::Dropout => None,
        }
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: PacaOptions = cfg.options()?;
        if o.r == 0 {
            return Err(Error::config(
                "adapter config",
                "r",
                "0 is out of range: PaCA trains at least 1 column",
            ));
        }
        finite("paca_alpha", o.paca_alpha, None)?;
        if o.paca_alpha == 0.0 {
            return Err(Error::config(
                "adapter config",
                "paca_alpha",
                "0 is out of range: the columns are stored over paca_alpha / r",
            ));
        }
        Ok(())
    }

    fn layer_values(&self, cfg: &AdapterConfig, path: &str, dims: &ModuleDims) -> Result<u64> {
        // the columns and their indices, and W with the columns replaced that a step builds
        let (r, _) = Self::sizes(cfg, path)?;
        Ok((r as u64).saturating_mul(dims.out as u64 + 1) + dims.full())
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: PacaOptions = cfg.options()?;
        let (r, alpha) = Self::sizes(cfg, path)?;
        let (out, inp) = (base.out_features, base.in_features);
        if r > inp {
            return Err(Error::config(
                "adapter config",
                "r",
                format!("{r} is out of range for `{path}`: at most its {inp} input columns"),
            ));
        }
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let mut perm: Vec<i64> = (0..inp as i64).collect();
        perm.shuffle(&mut g);
        perm.truncate(r);
        let orig = columns_of(base.weight, base.quant, &perm)?;
        let idx = Tensor::from_vec(perm.clone(), r, dev)?;
        let scaling = alpha / r as f64;
        let cols = if o.init_weights {
            (&orig / scaling)?
        } else {
            crate::methods::kaiming_uniform((out, r), &mut g, dev)?
        };
        let layer = PacaLayer::new(cols, idx, (base.weight, base.quant), inp, scaling)?;
        *layer.orig.lock().unwrap_or_else(|e| e.into_inner()) = (perm, orig);
        Ok(Box::new(layer))
    }
}

#[derive(Debug)]
struct PacaLayer {
    cols: Var, // paca_w (out, r): the columns over scaling
    idx: Var,  // paca_indices (r,), int64, never trained
    base: Tensor,
    quant: Option<petal_ops::quant::QFormat>, // W's block format when it is kept quantized
    /// W[:, idx] (out, r) f32, the columns replaced, and the indices they are for (a load
    /// replaces the indices drawn at build)
    orig: std::sync::Mutex<(Vec<i64>, Tensor)>,
    inp: usize,
    scaling: f64,
}

/// Columns `idx` of W (out, r) f32: gathered from a dense W, or decoded from a quantized one's
/// blocks a row at a time (QPaCA: W is never dequantized whole).
fn columns_of(w: &Tensor, quant: Option<petal_ops::quant::QFormat>, idx: &[i64]) -> Result<Tensor> {
    let (out, r) = (w.dim(0)?, idx.len());
    Ok(match quant {
        Some(fmt) => {
            let mut v = Vec::with_capacity(out * r);
            petal_ops::quant::for_each_row(w, fmt, |row| {
                v.extend(idx.iter().map(|&i| row[i as usize]))
            })?;
            Tensor::from_vec(v, (out, r), w.device())?
        }
        None => {
            let idx = Tensor::from_slice(idx, r, w.device())?;
            w.to_dtype(DType::F32)?.index_select(&idx, 1)?
        }
    })
}

impl PacaLayer {
    /// A layer over `base` (dense, or blocks in a format) of `inp` input columns.
    fn new(
        cols: Tensor,
        idx: Tensor,
        (base, quant): (&Tensor, Option<petal_ops::quant::QFormat>),
        inp: usize,
        scaling: f64,
    ) -> Result<Self> {
        Ok(PacaLayer {
            cols: Var::from_tensor(&cols)?,
            idx: Var::from_tensor(&idx)?,
            base: base.clone(),
            quant,
            orig: std::sync::Mutex::new((Vec::new(), Tensor::zeros(0, DType::F32, base.device())?)),
            inp,
            scaling,
        })
    }

    /// W[:, idx] for the indices held now.
    fn replaced(&self) -> Result<Tensor> {
        let idx: Vec<i64> = self.idx.as_tensor().to_dtype(DType::I64)?.to_vec1()?;
        let mut kept = self.orig.lock().unwrap_or_else(|e| e.into_inner());
        if kept.0 != idx {
            *kept = (idx.clone(), columns_of(&self.base, self.quant, &idx)?);
        }
        Ok(kept.1.clone())
    }

    /// The new columns, `scaling * paca_w` (out, r).
    fn columns(&self) -> Result<Tensor> {
        Ok((self.cols.as_tensor() * self.scaling)?)
    }
}

impl AdapterLayer for PacaLayer {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        let idx = self.idx.as_tensor();
        let d = petal_ops::paca::paca_delta(x, &self.replaced()?, &self.columns()?, idx)?;
        let d = d.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

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
        let run = || -> Result<Tensor> {
            let c = self.columns()?;
            Ok(petal_ops::paca_linear(
                ctx.kernels(),
                x,
                w,
                b,
                &c,
                self.idx.as_tensor(),
            )?)
        };
        Some(run())
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        if self.quant.is_some() {
            return Err(Error::Unsupported(
                "PaCA over a quantized base merges into its dequantized weights: load the model \
                 with --dtype f32 or bf16 to merge"
                    .into(),
            ));
        }
        let diff = (self.columns()? - self.replaced()?)?;
        let zeros = Tensor::zeros((diff.dim(0)?, self.inp), DType::F32, diff.device())?;
        Ok(WeightUpdate::Add(zeros.index_add(
            self.idx.as_tensor(),
            &diff,
            1,
        )?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: W,
            var: &self.cols,
        }]
    }

    fn buffers(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: INDICES,
            var: &self.idx,
        }]
    }

    fn check_loaded(&self) -> Result<()> {
        let inp = self.inp;
        let idx = self
            .idx
            .as_tensor()
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        let mut seen = vec![false; inp];
        for &i in &idx {
            if i < 0 || i as usize >= inp || std::mem::replace(&mut seen[i as usize], true) {
                return Err(Error::msg(format!(
                    "`{INDICES}` holds {i}: the indices must be distinct input columns in \
                     0..{inp}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    AdapterConfig::for_method("paca", 3, 6.0, crate::testing::toy_targets())
}

#[cfg(test)]
crate::conformance!(conformance, conformance_config, |_inp, out, _cfg| out * 3);

#[cfg(test)]
mod oracle {
    use super::*;
    use candle_core::Device;

    /// Output, gradients and the merged weight against the official layer
    /// (`tools/golden/paca_oracle.py` runs the PaCA fork's `Linear` and its autograd function).
    #[test]
    fn forward_gradients_and_merge_equal_the_official_layer() {
        let t = crate::testing::golden_fixture("paca");
        for (name, r, alpha) in [("square", 3, 6.0), ("wide", 4, 8.0), ("tall", 2, 2.0)] {
            let g = |k: &str| t[&format!("{name}.{k}")].clone();
            let w = g("w");
            let (s, inp) = (alpha / r as f64, w.dim(1).unwrap());
            let layer = PacaLayer::new(g("paca_w"), g("idx"), (&w, None), inp, s).unwrap();
            layer.check_loaded().unwrap();
            let x = Var::from_tensor(&g("x")).unwrap();
            let b = g("b");
            for k in [petal_ops::Kernels::FUSED, petal_ops::Kernels::REFERENCE] {
                let ctx = crate::Ctx::train(1).with_kernels(k);
                let y = layer
                    .fused_forward(x.as_tensor(), &layer.base, Some(&b), &ctx)
                    .unwrap()
                    .unwrap();
                let e = crate::testing::max_rel(&y, &g("y"));
                assert!(e < 1e-5, "{name}: output, relative error {e:e}");
                let grads = (y * g("proj"))
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let e = crate::testing::max_rel(grads.get(x.as_tensor()).unwrap(), &g("dx"));
                assert!(e < 1e-5, "{name}: dL/dx, relative error {e:e}");
                // the official gradient is of paca_w itself (the chain through scaling)
                let e = crate::testing::max_rel(
                    grads.get(layer.cols.as_tensor()).unwrap(),
                    &g("dpaca_w"),
                );
                assert!(e < 1e-5, "{name}: dL/dpaca_w, relative error {e:e}");
            }
            let WeightUpdate::Add(dw) = layer.weight_update().unwrap() else {
                panic!("an additive update")
            };
            let merged = (g("w") + dw).unwrap();
            let e = crate::testing::max_rel(&merged, &g("merged"));
            assert!(e < 1e-6, "{name}: merged W, relative error {e:e}");
        }
    }

    #[test]
    fn indices_out_of_range_or_repeated_are_refused_after_a_load() {
        let w = Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap();
        let layer = |idx: &[i64]| {
            let cols = Tensor::zeros((4, idx.len()), DType::F32, &Device::Cpu).unwrap();
            let idx = Tensor::new(idx, &Device::Cpu).unwrap();
            PacaLayer::new(cols, idx, (&w, None), 6, 1.0).unwrap()
        };
        assert!(layer(&[5, 0]).check_loaded().is_ok());
        for bad in [&[6i64, 0][..], &[-1, 2], &[2, 2]] {
            let e = layer(bad).check_loaded().unwrap_err().to_string();
            assert!(e.contains("paca_indices") && e.contains("0..6"), "{e}");
        }
    }
}

/// QPaCA (PaCA over a quantized base, as the paper pairs it with QLoRA's base): the replaced
/// columns decoded from the blocks give what the dequantized W's columns give.
#[test]
fn paca_over_quantized_blocks_equals_paca_over_them_dequantized() {
    let c = conformance_config();
    let off = |l: &dyn AdapterLayer| {
        let v = &l.tensors()[0].var;
        v.set(&(v.as_tensor() * 1.3).unwrap()).unwrap();
    };
    crate::testing::check_over_quantized_blocks(&Paca, &c, (12, 32), &off);
}
