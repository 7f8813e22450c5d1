//! IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning"): learned vectors that rescale activations. Mirrors PEFT
//! `tuners/ia3/layer.py` (`Linear`).
//!
//! For a targeted linear: `y = (x W^T + b) ⊙ l` with `l (out, 1)`, or, for the
//! `feedforward_modules`, `y = (x ⊙ l) W^T + b` with `l (1, in)`. Merge: `W' = W ⊙ l` (rows or
//! columns), and the bias ⊙ l for output scaling; unmerge divides. Init (`init_ia3_weights`):
//! ones (identity); `false`: N(0, 1). Saved as `ia3_l`. PEFT matches `feedforward_modules`
//! list entries as bare suffixes (`key.endswith(entry)`) and a string as a full-match regex.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, Flag, NamedTensor, NewAdapter, WeightUpdate,
};
use crate::config::{spec, AdapterConfig, Spec, Targets};
use crate::methods::normal;
use crate::Result;
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub struct Ia3;

#[derive(Debug)]
pub struct Ia3Layer {
    l: Var, // (1, in) when feedforward, else (out, 1)
    feedforward: bool,
    base: Tensor, // the frozen W (out, in), shared, for the unfused input-scaling path
    quant: Option<petal_ops::quant::QFormat>, // W's block format when it is kept quantized
}

crate::method_options! {
    /// IA3's options (PEFT `IA3Config`).
    pub struct Ia3Options {
        /// Targeted modules whose input is scaled, the others scale their output (comma list or
        /// `re:REGEX`; petal's training default: down_proj)
        [crate::config::parse_targets]
        pub feedforward_modules: Option<Targets> = None,
        /// true: all-ones vectors (identity); false: N(0, 1)
        pub init_ia3_weights: bool = true,
        /// Weights stored (in, out) (not supported)
        pub fan_in_fan_out: bool = false,
    }
}

/// petal's training default for `feedforward_modules` where the user gave none (IA3 and MoV),
/// PEFT's per-architecture one: each MLP output linear among the targets (Llama's down_proj,
/// BERT's output.dense); down_proj where the targets are a pattern.
pub(crate) fn default_feedforward(cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
    if new.given("feedforward_modules") {
        return Ok(());
    }
    let ff: Vec<&str> = match &cfg.target_modules {
        Some(Targets::List(l)) => ["down_proj", "output.dense"]
            .into_iter()
            .filter(|c| l.iter().any(|t| t == c))
            .collect(),
        _ => vec!["down_proj"],
    };
    if !ff.is_empty() {
        cfg.set("feedforward_modules", ff)?;
    }
    Ok(())
}

pub(crate) fn is_feedforward(modules: Option<&Targets>, key: &str) -> bool {
    match modules {
        None => false,
        Some(Targets::Regex(r)) => {
            regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(key))
        }
        Some(Targets::List(l)) => l.iter().any(|e| key.ends_with(e.as_str())),
    }
}

impl AdapterMethod for Ia3 {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn peft_type(&self) -> &'static str {
        "IA3"
    }

    fn options(&self) -> Spec {
        spec::<Ia3Options>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        if cfg.options::<Ia3Options>()?.fan_in_fan_out {
            return Err(crate::config::unsupported("fan_in_fan_out", true));
        }
        Ok(())
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

    fn bench_settings(&self) -> Option<&'static [(&'static str, &'static str)]> {
        Some(&[("feedforward_modules", r#"["down_proj"]"#)])
    }

    fn set_init_nonzero(&self, opts: &mut serde_json::Map<String, serde_json::Value>) {
        opts.insert("init_ia3_weights".into(), false.into());
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: Ia3Options = cfg.options()?;
        let feedforward = is_feedforward(o.feedforward_modules.as_ref(), path);
        let shape = if feedforward {
            (1, base.in_features)
        } else {
            (base.out_features, 1)
        };
        let dev = base.weight.device();
        let l = if !o.init_ia3_weights {
            normal(
                shape,
                1.0,
                &mut rand::rngs::StdRng::seed_from_u64(seed),
                dev,
            )?
        } else {
            Tensor::ones(shape, DType::F32, dev)?
        };
        Ok(Box::new(Ia3Layer {
            l: Var::from_tensor(&l)?,
            feedforward,
            base: base.weight.clone(),
            quant: base.quant,
        }))
    }
}

impl AdapterLayer for Ia3Layer {
    fn forward(&self, x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        let l = self.l.as_tensor().flatten_all()?;
        if self.feedforward {
            // (x ⊙ l) W^T + b = y + (x ⊙ (l - 1)) W^T
            let xs = x.to_dtype(DType::F32)?.broadcast_mul(&(l - 1.0)?)?;
            let d = crate::linear::frozen_xwt(ctx, &xs, &self.base, self.quant)?;
            let d = d.to_dtype(y.dtype())?;
            return Ok((y + d)?);
        }
        Ok(petal_ops::scale_last(ctx.kernels(), &y, &l)?)
    }

    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        if !self.feedforward {
            return None;
        }

        let run = || -> Result<Tensor> {
            let l = self.l.as_tensor().flatten_all()?;
            // bf16 activations stay bf16: no f32 copy of x in the graph
            let xs = petal_ops::scale_last(ctx.kernels(), x, &l)?;
            Ok(petal_ops::frozen_linear(ctx.kernels(), &xs, w, b)?.to_dtype(x.dtype())?)
        };
        Some(run())
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Scale(self.l.as_tensor().clone()))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: "ia3_l",
            var: &self.l,
        }]
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    // fc1 (with a bias) scales its output, fc2 its input
    let mut c = AdapterConfig::for_method("IA3", 1, 1.0, crate::testing::toy_targets());
    c.set("feedforward_modules", ["fc2"]).unwrap();
    c
}

#[cfg(test)]
crate::conformance!(
    conformance,
    conformance_config,
    |inp, out, _cfg: &AdapterConfig| if out == 6 { inp } else { out }
);
