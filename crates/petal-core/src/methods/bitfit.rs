//! BitFit (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
//! Transformer-based Masked Language-models") as a method of its own: train the bias of every
//! targeted linear and nothing else. Llama-family models have no biases; there a targeted linear
//! gets one, starting at zero, so the model starts unchanged (`b' = 0 + delta`).
//!
//! PEFT has no BitFit method (its LoRA `bias` option trains biases next to LoRA, see `bias.rs`),
//! so the adapter is petal's own: `peft_type: "BITFIT"`, tensors `<module>.bias` (PEFT's names
//! for trained biases). Merging adds the trained bias to the linear (creating it where the base
//! had none); a merged Llama model is written with `attention_bias` / `mlp_bias` set.

use super::bias::BiasCopy;
use crate::adapter::{AdapterLayer, AdapterMethod, BaseLinear};
use crate::config::{spec, AdapterConfig, Spec};
use crate::Result;
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

pub struct Bitfit;

crate::method_options! {
    /// BitFit's options (petal's own method).
    pub struct BitfitOptions {
        /// true: biases start as the base's (zero where it has none); false: random offsets
        pub init_weights: bool = true,
    }
}

impl AdapterMethod for Bitfit {
    fn needs_dense_base(&self, _cfg: &AdapterConfig) -> Option<&'static str> {
        None // a term next to the base output
    }

    fn in_peft(&self) -> bool {
        false
    }

    fn peft_type(&self) -> &'static str {
        "BITFIT"
    }

    fn options(&self) -> Spec {
        spec::<BitfitOptions>()
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        _path: &str,
        base: &BaseLinear,
        seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        let dev = base.weight.device();
        let out = base.out_features;
        let b = match base.bias {
            Some(b) => b.to_dtype(DType::F32)?,
            None => Tensor::zeros(out, DType::F32, dev)?,
        };
        let start = if !cfg.options::<BitfitOptions>()?.init_weights {
            // the testing switch: nn.Linear's bias init U(-1/sqrt(in), 1/sqrt(in)) on top of b
            let mut g = rand::rngs::StdRng::seed_from_u64(seed);
            let bound = 1.0 / (base.in_features as f64).sqrt();
            let v: Vec<f32> = (0..out)
                .map(|_| g.gen_range(-bound..bound) as f32)
                .collect();
            (&b + Tensor::from_vec(v, out, dev)?)?
        } else {
            b.copy()?
        };
        Ok(Box::new(BiasCopy::starting_at(start, b)?))
    }
}

#[cfg(test)]
fn conformance_config() -> AdapterConfig {
    AdapterConfig::for_method("bitfit", 8, 16.0, crate::testing::toy_targets())
}

// fc1 has a bias, fc2 none: both train `out` values
#[cfg(test)]
crate::conformance!(conformance, conformance_config, |_inp, out, _cfg| out);

#[cfg(test)]
#[test]
fn bitfit_takes_its_fused_form() {
    crate::testing::assert_fused_taken(&conformance_config());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{adapted, max_rel, Toy};
    use crate::Adaptable;

    #[test]
    fn merging_a_bias_into_a_linear_without_one_creates_it() {
        let mut t = adapted(&conformance_config(), true);
        assert!(t.fc2.bias().is_none());
        let x = Toy::input();
        let unmerged = t.forward(&x);
        for l in t.linears_mut() {
            l.merge_and_unload(&["default"]).unwrap();
        }
        assert!(t.fc2.bias().is_some());
        assert!(max_rel(&t.forward(&x), &unmerged) < 1e-6);
    }
}
