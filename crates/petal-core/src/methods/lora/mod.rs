//! LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), with rsLoRA
//! scaling (Kalajdzievski, 2023). Mirrors PEFT `tuners/lora/layer.py` (`Linear`).
//!
//! `W' = W + s * B A`, `s = alpha / r` (rsLoRA: `alpha / sqrt(r)`), A (r, in), B (out, r).
//! Forward: `y + s * B(A(dropout(x)))`, never materialising dW.
//! Init (PEFT `reset_lora_parameters`): A kaiming-uniform with a = sqrt(5), i.e.
//! U(-1/sqrt(in), 1/sqrt(in)), B = 0; "gaussian": A ~ N(0, 1/r), B = 0; `false`: both
//! kaiming-uniform (nn.Linear's default), so the adapter is non-zero from the start.
//! Saved as `lora_A.weight` (r, in) and `lora_B.weight` (out, r), in f32.

use crate::adapter::ModuleDims;
use crate::adapter::{AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, WeightUpdate};
use crate::config::{pissa_niter, spec, AdapterConfig, InitWeights, Spec};
use crate::methods::dora::{Dora, MAGNITUDE};
use crate::methods::{kaiming_uniform, normal};
use crate::{rng, Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub const LORA_A: &str = "lora_A.weight";
pub const LORA_B: &str = "lora_B.weight";

pub struct Lora;

#[derive(Debug)]
pub struct LoraLayer {
    pub a: Var, // (r, in)
    pub b: Var, // (out, r)
    pub scaling: f64,
    pub dropout: f64,
    /// `use_dora`: the magnitude vector and what it needs of the base.
    pub dora: Option<Dora>,
    /// PiSSA / OLoRA: the part of W the adapter starts with (moved out of the base).
    pub base_offset: Option<Tensor>,
    /// PiSSA / OLoRA: A and B as initialised, for saving as plain LoRA (`as_plain_lora`).
    pub initial: Option<(Tensor, Tensor)>,
    /// MiCA: B is frozen (saved and loaded, never trained or counted).
    pub frozen_b: bool,
    /// `bias = "all" | "lora_only"`: the trained bias and the frozen one it started from.
    pub bias: Option<(Var, Tensor)>,
}

/// Whether `init` is `name`.
fn is_init(init: &InitWeights, name: &str) -> bool {
    matches!(init, InitWeights::Named(n) if n == name)
}

/// The named initialisations LoRA takes (PEFT's, less the data-driven EVA, CorDA and LoRA-GA).
fn known_init(n: &str) -> bool {
    ["gaussian", "pissa", "olora", "loftq", "mica", "orthogonal"].contains(&n)
        || pissa_niter(n).is_some()
}

impl AdapterMethod for Lora {
    fn needs_dense_base(&self, cfg: &AdapterConfig) -> Option<&'static str> {
        let o: LoraOptions = cfg.options().ok()?;
        match o.moved_base()? {
            MovedBase::Quantized => Some(
                "LoftQ quantizes the full-precision W itself (the base becomes its quantization)",
            ),
            MovedBase::Residual => {
                Some("its initialisation factors W and moves the factors out of it")
            }
        }
    }

    fn layer_values(&self, cfg: &AdapterConfig, path: &str, dims: &ModuleDims) -> Result<u64> {
        let o: LoraOptions = cfg.options()?;
        // A and B, a trained bias, and DoRA's magnitude and squared row norms (it reads the
        // model's own W), with the residual base PiSSA / OLoRA leave it
        let dora = match (o.dora, o.moved_base().is_some()) {
            (false, _) => 0,
            (true, false) => 2 * dims.out as u64,
            (true, true) => dims.full() + dims.out as u64,
        };
        let bias = if o.core.bias == "none" { 0 } else { dims.out };
        Ok(dims
            .low_rank(o.rank_for(path))
            .saturating_add(bias as u64 + dora))
    }
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn options(&self) -> Spec {
        spec::<LoraOptions>()
    }

    fn writes_layer_selection(&self) -> bool {
        true
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: LoraOptions = cfg.options()?;
        if o.core.r == 0 {
            return Err(Error::config("adapter config", "r", "must be at least 1"));
        }
        o.core.check(&["none", "all", "lora_only"], known_init)?;
        let loftq = is_init(&o.core.init, "loftq");
        if loftq {
            loftq::settings(&o.loftq_config)?;
        } else if !o.loftq_config.is_empty() {
            return Err(Error::config(
                "adapter config",
                "loftq_config",
                "is set but init_lora_weights is not \"loftq\"",
            ));
        }
        if is_init(&o.core.init, "orthogonal") && !o.core.r.is_multiple_of(2) {
            return Err(Error::config(
                "adapter config",
                "r",
                format!(
                    "{} is odd: init_lora_weights \"orthogonal\" needs an even r",
                    o.core.r
                ),
            ));
        }
        if o.dora && is_init(&o.core.init, "mica") {
            return Err(Error::config(
                "adapter config",
                "init_lora_weights",
                "\"mica\" with use_dora: MiCA is a LoRA variant of its own (PEFT has no DoRA form)",
            ));
        }
        Ok(())
    }

    fn builds_apart(&self, cfg: &AdapterConfig) -> bool {
        let Ok(o) = cfg.options::<LoraOptions>() else {
            return false;
        };
        o.moved_base().is_some() || is_init(&o.core.init, "mica")
    }

    fn notes(&self, cfg: &AdapterConfig) -> Vec<String> {
        let Ok(o) = cfg.options::<LoraOptions>() else {
            return Vec::new();
        };
        let s = o.scaling_for("");
        match is_init(&o.core.init, "loftq") && (s - 1.0).abs() > 1e-12 {
            true => vec![format!(
                "LoftQ starts at Q + {s} B A rather than at Q + B A ≈ W: as PEFT, it does not \
                 divide B A by the scaling lora_alpha / r = {s}; set --alpha to r ({}) to start \
                 near W",
                o.core.r
            )],
            false => Vec::new(),
        }
    }

    fn prepare(&self, cfg: &mut AdapterConfig, _new: &crate::NewAdapter) -> Result<()> {
        // LoftQ with no loftq_config: PEFT's LoftQConfig defaults, written out (PEFT asks for them)
        let o: LoraOptions = cfg.options()?;
        if is_init(&o.core.init, "loftq") {
            let mut c = o.loftq_config.clone();
            for (k, v) in [loftq::LOFTQ_BITS, loftq::LOFTQ_ITER] {
                c.entry(k.to_string()).or_insert(v);
            }
            cfg.options.insert(
                "loftq_config".into(),
                serde_json::to_value(c).map_err(|e| Error::msg(e.to_string()))?,
            );
        }
        Ok(())
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("rslora", "use_rslora"),
            Flag::new("dora", "use_dora"),
            Flag::new("init", "init_lora_weights"),
            Flag::new("bias", "bias"),
        ]
    }

    fn variants(&self) -> &'static [(&'static str, &'static str, &'static str)] {
        &[("dora", "use_dora", "true")]
    }

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[])
    }

    fn adapts_embeddings(&self) -> bool {
        true
    }

    fn convert_for_save(
        &self,
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
        tensors: &mut std::collections::HashMap<String, Tensor>,
    ) -> Result<AdapterConfig> {
        as_plain_lora(model, name, cfg, tensors)
    }

    fn trains_all_biases(&self, cfg: &AdapterConfig) -> bool {
        cfg.get("bias").and_then(|b| b.as_str()) == Some("all")
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: LoraOptions = cfg.options()?;
        let r = o.rank_for(path);
        let (inp, out) = (base.in_features, base.out_features);
        let dev = base.weight.device();
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        if base.embedding {
            return LoraEmbedding::build(&o, path, base, &mut g);
        }
        let (a, b) = match &o.core.init {
            InitWeights::Named(n) if n == "gaussian" => (
                normal((r, inp), 1.0 / r as f64, &mut g, dev)?,
                Tensor::zeros((out, r), DType::F32, dev)?,
            ),
            InitWeights::Flag(false) => (
                kaiming_uniform((r, inp), &mut g, dev)?,
                kaiming_uniform((out, r), &mut g, dev)?,
            ),
            InitWeights::Named(n) if n == "orthogonal" => {
                init::orthogonal_init((out, inp), r, &mut g, (dev, path))?
            }
            _ => (
                kaiming_uniform((r, inp), &mut g, dev)?,
                Tensor::zeros((out, r), DType::F32, dev)?,
            ),
        };
        let scaling = o.scaling_for(path);
        let (a, b, base_offset) = match &o.core.init {
            InitWeights::Named(n) if o.moved_base() == Some(MovedBase::Residual) => {
                let (a, b) = structured_init(n, base.weight, r, scaling, path)?;
                let offset = (b.matmul(&a)? * scaling)?;
                (a, b, Some(offset))
            }
            InitWeights::Named(n) if n == "loftq" => {
                let c = loftq::settings(&o.loftq_config)?;
                let w = base.weight.to_dtype(DType::F32)?;
                let (a, b, q) = loftq::loftq_init(&w, r, c, path)?;
                (a, b, Some((w - q)?))
            }
            InitWeights::Named(n) if n == "mica" => {
                let w = match base.quant {
                    Some(fmt) => petal_ops::quant::dequantize(base.weight, fmt)?,
                    None => base.weight.clone(),
                };
                let (a, b) = loftq::mica_init(&w, r, path)?;
                (a, b, None)
            }
            _ => (a, b, None),
        };
        let initial = match &base_offset {
            Some(_) if o.moved_base() == Some(MovedBase::Residual) => Some((a.copy()?, b.copy()?)),
            _ => None,
        };
        let bias = match (o.core.bias.as_str(), base.bias) {
            ("all" | "lora_only", Some(b)) => {
                let b = b.to_dtype(DType::F32)?;
                Some((Var::from_tensor(&b.copy()?)?, b))
            }
            _ => None,
        };
        let dora = if o.dora {
            // PiSSA / OLoRA: the magnitude and the direction's norm are over the residual base
            // plus the adapter (so m starts as ||W||), as PEFT initialises DoRA after them
            let w = match &base_offset {
                Some(o) => (base.weight.to_dtype(DType::F32)? - o)?,
                None => base.weight.clone(),
            };
            Some(Dora::new((&w, base.quant), base.bias, (&a, &b, scaling))?)
        } else {
            None
        };
        Ok(Box::new(LoraLayer {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling,
            dropout: o.core.dropout,
            dora,
            base_offset,
            initial,
            frozen_b: is_init(&o.core.init, "mica"),
            bias,
        }))
    }
}

mod embedding;
mod init;
mod loftq;
mod options;
pub use embedding::LoraEmbedding;
pub use init::as_plain_lora;
use init::structured_init;
pub use options::{LoraCore, LoraOptions, MovedBase};

/// Inverted dropout with a mask drawn from petal's per-step generator (see `rng`): one
/// splitmix64 draw per element, compared as an integer against p * 2^64.
pub fn dropout(x: &Tensor, p: f64, ctx: &crate::Ctx) -> Result<Tensor> {
    Ok(x.mul(&dropout_mask(x, p, ctx.next_seed())?)?)
}

/// The inverted-dropout mask (0 or 1 / (1 - p)) for `x`'s shape drawn from `seed`.
fn dropout_mask(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    use rayon::prelude::*;
    let threshold = (p * u64::MAX as f64) as u64;
    let keep = (1.0 / (1.0 - p)) as f32;
    // element i draws from seed + (i + 1) * the golden-ratio step (a Weyl sequence, so any
    // element's draw is known without the ones before it: drawn in parallel)
    let m: Vec<f32> = (0..x.elem_count())
        .into_par_iter()
        .with_min_len(1 << 14)
        .map(|i| {
            let state = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if rng::splitmix(state) < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect();
    Ok(Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

/// `dropout(x) A^T` for `x (n, in)` as one node that keeps x and A only: the mask is drawn
/// again from its seed in backward instead of being kept with the dropped input (two (n, in)
/// buffers per adapted linear until backward).
fn dropout_low_rank(x: &Tensor, a: &Tensor, p: f64, ctx: &crate::Ctx) -> Result<Tensor> {
    let seed = ctx.next_seed();
    Ok(petal_ops::lean::lean2(
        [x, a],
        |[x, a]| {
            x.mul(&dropout_mask(x, p, seed).map_err(candle)?)?
                .matmul(&a.t()?)
        },
        move |[x, a], need, _, dh| {
            let m = dropout_mask(x, p, seed).map_err(candle)?;
            let dx = need[0].then(|| dh.matmul(a)?.mul(&m)).transpose()?;
            let da = need[1].then(|| dh.t()?.matmul(&x.mul(&m)?)).transpose()?;
            Ok([dx, da])
        },
    )?)
}

fn candle(e: Error) -> candle_core::Error {
    candle_core::Error::msg(e.to_string())
}

impl LoraLayer {
    /// The (dropped) input as (n, in) f32, and whether dropout acted.
    fn input(&self, x: &Tensor, ctx: &crate::Ctx) -> Result<(Tensor, bool)> {
        let xf = x.to_dtype(DType::F32)?;
        let inp = xf.dim(candle_core::D::Minus1)?;
        let x2 = xf.reshape((xf.elem_count() / inp, inp))?; // plain 2-D matmuls
        if ctx.is_train() && self.dropout > 0.0 {
            return Ok((dropout(&x2, self.dropout, ctx)?, true));
        }
        Ok((x2, false))
    }

    /// h = dropout(x) A^T as (n, r), in f32 (without an f32 copy of a bf16 x where no dropout
    /// acts).
    fn low(&self, x: &Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if !(ctx.is_train() && self.dropout > 0.0) {
            return Ok(petal_ops::low_rank(ctx.kernels(), x, self.a.as_tensor())?);
        }
        let xf = x.to_dtype(DType::F32)?;
        let inp = xf.dim(candle_core::D::Minus1)?;
        let x2 = xf.reshape((xf.elem_count() / inp, inp))?;
        dropout_low_rank(&x2, self.a.as_tensor(), self.dropout, ctx)
    }

    /// A, B and s, as DoRA takes them.
    fn parts(&self) -> (&Tensor, &Tensor, f64) {
        (self.a.as_tensor(), self.b.as_tensor(), self.scaling)
    }

    /// s B A (out, in).
    fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?)
    }
}

impl AdapterLayer for LoraLayer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        if let Some(dora) = &self.dora {
            let (xd, dropped) = self.input(x, ctx)?;
            let lora = xd
                .matmul(&self.a.as_tensor().t()?)?
                .matmul(&self.b.as_tensor().t()?)?;
            let out = lora.dim(1)?;
            let y2 = y.to_dtype(DType::F32)?.reshape((lora.dim(0)?, out))?;
            let mut z = dora.forward(ctx, (&y2, &xd, &lora), self.parts(), dropped)?;
            if let Some((trained, frozen)) = &self.bias {
                // PEFT trains the base bias in place, outside the magnitude's scaling
                z = z.broadcast_add(&(trained.as_tensor() - frozen)?)?;
            }
            return Ok(z.reshape(y.shape())?.to_dtype(y.dtype())?);
        }
        let h = (self.low(x, ctx)? * self.scaling)?; // (n, r), scaled while small
        let mut d = h.matmul(&self.b.as_tensor().t()?)?; // (n, out)
        if let Some((trained, frozen)) = &self.bias {
            d = d.broadcast_add(&(trained.as_tensor() - frozen)?)?;
        }
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        // DoRA with dropout acting recomputes its base term from the dropped input: composed
        let no_dropout = !(ctx.is_train() && self.dropout > 0.0);
        let fast = petal_ops::cpu::fast_lora_ok(ctx.kernels(), x, w);
        if self.bias.is_some() || (self.dora.is_some() && !no_dropout) || !(fast || no_dropout) {
            return None;
        }
        let run = || -> Result<Tensor> {
            // without dropout, LoRA goes through `petal_ops::lora` on any device: the fused
            // kernel on the CPU, elsewhere one graph node that keeps x, A and B only; DoRA
            // then scales its output
            let (la, lb) = (self.a.as_tensor(), self.b.as_tensor());
            if self.dora.is_none() && no_dropout {
                return Ok(petal_ops::lora(
                    ctx.kernels(),
                    x,
                    w,
                    b,
                    la,
                    lb,
                    self.scaling,
                )?);
            }
            if let (Some(d), false) = (&self.dora, fast) {
                let lin = petal_ops::lora(ctx.kernels(), x, w, b, la, lb, self.scaling)?;
                return d.fused_forward(ctx, &lin, self.parts());
            }
            let h = self.low(x, ctx)?;
            let lin = petal_ops::lora_linear(
                ctx.kernels(),
                x,
                w,
                b,
                &h,
                self.b.as_tensor(),
                self.scaling,
            )?;
            match &self.dora {
                Some(d) => d.fused_forward(ctx, &lin, self.parts()),
                None => Ok(lin),
            }
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
        let dropping = ctx.is_train() && self.dropout > 0.0;
        if self.bias.is_some() || (self.dora.is_some() && dropping) {
            return None;
        }
        let run = || -> Result<Tensor> {
            let (lb, s) = (self.b.as_tensor(), self.scaling);
            let k = ctx.kernels();
            if !dropping {
                // one op keeping x, A and B only (the update written into the base's buffer);
                // DoRA (QDoRA) then scales its output
                let la = self.a.as_tensor();
                let lin = petal_ops::quant_lora(k, x, w, fmt, b, la, lb, s)?;
                return match &self.dora {
                    Some(d) => d.fused_forward(ctx, &lin, self.parts()),
                    None => Ok(lin),
                };
            }
            let h = self.low(x, ctx)?;
            Ok(petal_ops::quant::quant_lora_linear(
                k, x, w, fmt, b, &h, lb, s,
            )?)
        };
        Some(run())
    }

    fn base_offset(&self) -> Option<Tensor> {
        self.base_offset.clone()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let dw = match &self.dora {
            Some(d) => d.update(&self.delta()?)?,
            None => self.delta()?,
        };
        Ok(match &self.bias {
            Some((trained, frozen)) => WeightUpdate::AddBias {
                dw: Some(dw),
                db: (trained.as_tensor() - frozen)?,
            },
            None => WeightUpdate::Add(dw),
        })
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let mut v = vec![NamedTensor {
            name: LORA_A,
            var: &self.a,
        }];
        if !self.frozen_b {
            v.push(NamedTensor {
                name: LORA_B,
                var: &self.b,
            });
        }
        if let Some((trained, _)) = &self.bias {
            v.push(NamedTensor {
                name: "base_layer.bias",
                var: trained,
            });
        }
        if let Some(d) = &self.dora {
            v.push(NamedTensor {
                name: MAGNITUDE,
                var: &d.m,
            });
        }
        v
    }

    fn buffers(&self) -> Vec<NamedTensor<'_>> {
        match self.frozen_b {
            true => vec![NamedTensor {
                name: LORA_B,
                var: &self.b,
            }],
            false => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
