//! SSF (Lian et al., NeurIPS 2022, "Scaling & Shifting Your Features: A New Baseline for
//! Efficient Model Tuning"): a learned scale γ and shift β after each targeted linear,
//! `y' = γ ⊙ (x W^T + b) + β` over the output features, everything else frozen.
//!
//! Init: the paper's γ ~ N(1, σ), β ~ N(0, σ) with σ = 0.02 (`init_weights: "paper"`, the
//! default; only near the identity), or exactly γ = 1, β = 0 (`init_weights: true`). Merge is
//! the paper's re-parameterisation, `W' = diag(γ) W`, `b' = γ ⊙ b + β` (a linear without a bias
//! gets β as one), so a merged model runs at no extra cost. PEFT has no SSF: the adapter is
//! petal's own, `peft_type: "SSF"`, tensors `<module>.ssf_scale` and `<module>.ssf_shift`
//! (out,). With `norms` (the paper's placement, off by default), also after each norm that
//! feeds linears: `γ ⊙ norm(x) + β`, γ folding into the norm's weight and β into the biases of
//! the linears the norm feeds (`W β`) on merge; saved as `<norm>.ssf_scale` and
//! `<norm>.ssf_shift`. A model's final norm feeds the head, which has no bias in transformers,
//! so it is left alone (docs/methods/ssf.md).

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, WeightUpdate,
};
use crate::config::{finite, spec, AdapterConfig, InitWeights, Spec};
use crate::methods::normal;
use crate::Result;
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

pub struct Ssf;

crate::method_options! {
    /// SSF's options (petal's own method).
    pub struct SsfOptions {
        /// Init: paper (γ ~ N(1, init_std), β ~ N(0, init_std)) | true (exactly γ = 1, β = 0)
        /// | false (γ ~ N(1, 0.5), β ~ N(0, 0.5): a testing switch far from the identity)
        pub init_weights: InitWeights = InitWeights::Named("paper".into()),
        /// Standard deviation of the paper's init
        pub init_std: f64 = 0.02,
        /// Also scale and shift after each norm that feeds linears (the paper's placement)
        pub norms: bool = false,
    }
}

/// The standard deviation of γ and β at init: 0 for the exact identity.
fn init_std(o: &SsfOptions) -> Result<f64> {
    paper_std(&o.init_weights, o.init_std)
}

/// The standard deviation of SSF's init `init_weights` with the paper's `std` (FedIns's pool
/// entries take the same init).
pub(crate) fn paper_std(init_weights: &InitWeights, std: f64) -> Result<f64> {
    match init_weights {
        InitWeights::Named(n) if n == "paper" => Ok(std),
        InitWeights::Flag(true) => Ok(0.0),
        InitWeights::Flag(false) => Ok(0.5),
        InitWeights::Named(n) => Err(crate::Error::config(
            "adapter config",
            "init_weights",
            format!("{n:?} is not an SSF init: paper, true (identity) or false"),
        )),
    }
}

impl AdapterMethod for Ssf {
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
        "SSF"
    }

    fn options(&self) -> Spec {
        spec::<SsfOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: SsfOptions = cfg.options()?;
        finite("init_std", o.init_std, Some(0.0))?;
        init_std(&o).map(drop)
    }

    fn layer_values(&self, _cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        Ok(2 * dims.out as u64)
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let o: SsfOptions = cfg.options()?;
        let (scale, shift) = init(&o, base.out_features, seed, base.weight.device())?;
        Ok(Box::new(SsfLayer {
            scale: Var::from_tensor(&scale)?,
            shift: Var::from_tensor(&shift)?,
        }))
    }

    fn norm_affine(
        &self,
        cfg: &AdapterConfig,
        width: usize,
        seed: u64,
        dev: &candle_core::Device,
    ) -> Result<Option<(Tensor, Tensor, [&'static str; 2])>> {
        let o: SsfOptions = cfg.options()?;
        if !o.norms {
            return Ok(None);
        }
        let (scale, shift) = init(&o, width, seed, dev)?;
        Ok(Some((scale, shift, ["ssf_scale", "ssf_shift"])))
    }
}

/// γ and β of `width` values at init.
fn init(
    o: &SsfOptions,
    width: usize,
    seed: u64,
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let (scale, shift) = init_rows(init_std(o)?, 1, width, seed, dev)?;
    Ok((scale.flatten_all()?, shift.flatten_all()?))
}

/// `rows` independent (γ, β) of `width` values, (rows, width) each: γ ~ N(1, std),
/// β ~ N(0, std); exactly 1 and 0 when `std` is 0.
pub(crate) fn init_rows(
    std: f64,
    rows: usize,
    width: usize,
    seed: u64,
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let (mut scale, mut shift) = (
        Tensor::ones((rows, width), DType::F32, dev)?,
        Tensor::zeros((rows, width), DType::F32, dev)?,
    );
    if std > 0.0 {
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        scale = (scale + normal((rows, width), std, &mut g, dev)?)?;
        shift = normal((rows, width), std, &mut g, dev)?;
    }
    Ok((scale, shift))
}

#[derive(Debug)]
struct SsfLayer {
    scale: Var,
    shift: Var,
}

impl AdapterLayer for SsfLayer {
    fn forward(&self, _x: &Tensor, y: Tensor, ctx: &crate::Ctx) -> Result<Tensor> {
        // γ ⊙ y + β in y's dtype (f32 arithmetic inside), one node
        Ok(petal_ops::scale_shift_last(
            ctx.kernels(),
            &y,
            self.scale.as_tensor(),
            self.shift.as_tensor(),
        )?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Affine {
            scale: self.scale.as_tensor().clone(),
            shift: self.shift.as_tensor().clone(),
        })
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "ssf_scale",
                var: &self.scale,
            },
            NamedTensor {
                name: "ssf_shift",
                var: &self.shift,
            },
        ]
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("ssf", 1, 1.0, crate::testing::toy_targets());
    c.set("init_weights", true).unwrap();
    c
}

// γ and β of `out` values each per linear
#[cfg(test)]
crate::conformance!(conformance, conformance_config, |_inp, out, _cfg| 2 * out);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{adapted, Toy};
    use crate::Adaptable;

    /// γ, β and the base output read back as plain numbers, the SSF output computed by loops.
    #[test]
    fn the_output_is_the_base_output_scaled_and_shifted_per_feature() {
        let mut c = conformance_config();
        c.set("init_weights", "paper").unwrap();
        c.set("init_std", 0.3).unwrap();
        let t = adapted(&c, false);
        let x = Toy::input();
        let base = Toy::new();
        // fc1 alone: its output before and after the adapter
        let lin = &t.linears()[0];
        let rows = |y: Tensor| -> Vec<Vec<f32>> { y.flatten_to(1).unwrap().to_vec2().unwrap() };
        let y0 = rows(base.linears()[0].forward(&x, &crate::Ctx::eval()).unwrap());
        let y1 = rows(lin.forward(&x, &crate::Ctx::eval()).unwrap());
        let layer = lin.layer("default").unwrap();
        let named = layer.tensors();
        let g: Vec<f32> = named[0].var.as_tensor().to_vec1().unwrap();
        let b: Vec<f32> = named[1].var.as_tensor().to_vec1().unwrap();
        assert!(
            g.iter().any(|&v| (v - 1.0).abs() > 0.05),
            "the paper init moves γ"
        );
        for (r0, r1) in y0.iter().zip(&y1) {
            for j in 0..r0.len() {
                let want = g[j] * r0[j] + b[j];
                assert!(
                    (r1[j] - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{} vs {want}",
                    r1[j]
                );
            }
        }
    }

    /// tools/golden/ssf_oracle.py: an RMSNorm then a linear with SSF after each, transcribed
    /// from the paper in NumPy; petal's output and its merged norm weight, linear weight and
    /// bias equal the transcription's.
    #[test]
    fn a_norm_and_a_linear_with_ssf_equal_the_paper_transcription_before_and_after_merging() {
        let t = crate::testing::golden_fixture("ssf");
        let mut cfg = conformance_config();
        cfg.set("norms", true).unwrap();
        let mut norm = crate::AdaptableNorm::new("n", t["g"].clone());
        let (scale, shift, names) = Ssf
            .norm_affine(&cfg, 12, 0, &candle_core::Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            scale.to_vec1::<f32>().unwrap(),
            vec![1.0; 12],
            "identity init"
        );
        assert_eq!(shift.to_vec1::<f32>().unwrap(), vec![0.0; 12]);
        norm.add_affine(
            "default",
            t["norm_scale"].clone(),
            t["norm_shift"].clone(),
            names,
        )
        .unwrap();
        let mut lin = crate::AdaptableLinear::new("l", t["w"].clone(), Some(t["b"].clone()));
        let layer = Box::new(SsfLayer {
            scale: Var::from_tensor(&t["scale"]).unwrap(),
            shift: Var::from_tensor(&t["shift"]).unwrap(),
        });
        lin.add_adapter("default", layer).unwrap();
        lin.set_active(&["default"]);
        let run = |norm: &crate::AdaptableNorm, lin: &crate::AdaptableLinear| {
            let k = petal_ops::Kernels::FUSED;
            let mut h = petal_ops::rms_norm(k, &t["x"], &norm.weight().unwrap(), 1e-5).unwrap();
            if let Some(s) = norm.shift() {
                h = h.broadcast_add(s).unwrap();
            }
            lin.forward(&h, &crate::Ctx::eval()).unwrap()
        };
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let e = crate::testing::max_rel(a, b);
            assert!(e < 1e-5, "{what}: relative error {e:e}");
        };
        close(&run(&norm, &lin), &t["y"], "output");
        lin.merge_and_unload(&["default"]).unwrap();
        let s = norm.merge_and_unload().unwrap().expect("the norm's shift");
        lin.add_input_shift(&s).unwrap();
        close(norm.base(), &t["merged.norm_weight"], "merged norm weight");
        close(lin.weight(), &t["merged.weight"], "merged weight");
        close(lin.bias().unwrap(), &t["merged.bias"], "merged bias");
        close(&run(&norm, &lin), &t["y"], "merged output");
    }

    #[test]
    fn an_unknown_init_or_a_negative_std_is_refused_naming_the_key() {
        for (k, v) in [
            ("init_weights", serde_json::json!("xavier")),
            ("init_std", (-0.1).into()),
        ] {
            let mut c = conformance_config();
            c.set(k, v).unwrap();
            let e = c.validate("adapter_config.json").unwrap_err().to_string();
            assert!(e.contains(&format!("`{k}`")), "{e}");
        }
    }
}
