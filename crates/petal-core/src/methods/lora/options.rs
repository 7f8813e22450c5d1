//! LoRA's options: `LoraCore` (shared with the methods built on LoRA, such as AdaLoRA) and
//! `LoraOptions`, as PEFT's `LoraConfig` names them.

use crate::config::{probability, unsupported, InitWeights, RankValue};
use crate::Result;
use std::collections::BTreeMap;

crate::method_options! {
    /// The options LoRA shares with the methods built on it (AdaLoRA).
    pub struct LoraCore {
        /// Rank of A and B
        pub r: usize = 8,
        /// Scale numerator: the update is (alpha / r) B A
        pub alpha as "lora_alpha": f64 = 8.0,
        /// Dropout on the adapter's input
        pub dropout as "lora_dropout": f64 = 0.0,
        /// Init: true | false (non-zero) | gaussian | orthogonal | pissa | pissa_niter_K |
        /// olora | loftq | mica (PiSSA/OLoRA start from W's SVD/QR and leave the residual in
        /// the base; LoftQ leaves W's quantization there; MiCA starts B from W's smallest
        /// singular vectors and trains A only; orthogonal: A and B nonzero, B A = 0)
        [parse_init]
        pub init as "init_lora_weights": InitWeights = InitWeights::Flag(true),
        /// Also train biases: none | lora_only | all
        pub bias: String = "none".into(),
        /// Weights stored (in, out) as GPT-2's Conv1D (not supported)
        pub fan_in_fan_out: bool = false,
        /// Ranks per module (keys match module paths as `(.*\\.)?KEY$`)
        pub rank_pattern: BTreeMap<String, RankValue> = BTreeMap::new(),
    }
}

crate::method_options! {
    /// LoRA's options (PEFT `LoraConfig`).
    pub struct LoraOptions {
        flatten core: LoraCore;
        /// Scale by alpha / sqrt(r) (rsLoRA)
        pub rslora as "use_rslora": bool = false,
        /// DoRA: learn a magnitude per output next to the LoRA direction
        pub dora as "use_dora": bool = false,
        /// Alphas per module
        pub alpha_pattern: BTreeMap<String, f64> = BTreeMap::new(),
        /// LoftQ's quantizer and steps (init_lora_weights = "loftq"): {"loftq_bits": 4 (NF4) or
        /// 8 (int8), "loftq_iter": 1 or more}
        pub loftq_config: BTreeMap<String, u64> = BTreeMap::new(),
    }
}

/// What an initialisation leaves in the base in place of W (`LoraOptions::moved_base`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MovedBase {
    /// W less the adapter's initial part (PiSSA, OLoRA)
    Residual,
    /// W's quantization (LoftQ)
    Quantized,
}

impl LoraOptions {
    /// Whether the init replaces the base W, and by what: B A then applies to that base, not
    /// to the model's own W.
    pub fn moved_base(&self) -> Option<MovedBase> {
        match &self.core.init {
            InitWeights::Named(n) if n == "loftq" => Some(MovedBase::Quantized),
            InitWeights::Named(n)
                if n == "pissa" || n == "olora" || crate::config::pissa_niter(n).is_some() =>
            {
                Some(MovedBase::Residual)
            }
            _ => None,
        }
    }

    /// Rank for one module, honouring `rank_pattern`.
    pub fn rank_for(&self, path: &str) -> usize {
        crate::methods::rank_for(self.core.r, &self.core.rank_pattern, path)
    }

    /// LoRA scaling for one module: alpha/r, or alpha/sqrt(r) with rsLoRA.
    pub fn scaling_for(&self, path: &str) -> f64 {
        let r = self.rank_for(path) as f64;
        let a = crate::methods::alpha_for(self.core.alpha, &self.alpha_pattern, path);
        if self.rslora {
            a / r.sqrt()
        } else {
            a / r
        }
    }
}

/// `--init default` is PEFT's default init (`true`).
fn parse_init(s: &str) -> serde_json::Value {
    match s {
        "default" => true.into(),
        s => crate::config::parse_value(s),
    }
}

impl LoraCore {
    /// The checks LoRA and the methods built on it share: dropout a probability, W stored as
    /// (out, in), a bias mode among `biases`, a named init only where `named_init` takes it.
    pub(crate) fn check(&self, biases: &[&str], named_init: impl Fn(&str) -> bool) -> Result<()> {
        probability("lora_dropout", self.dropout)?;
        if self.fan_in_fan_out {
            return Err(unsupported("fan_in_fan_out", true));
        }
        if !biases.contains(&self.bias.as_str()) {
            return Err(unsupported("bias", format!("{:?}", self.bias)));
        }
        match &self.init {
            InitWeights::Named(n) if !named_init(n) => {
                Err(unsupported("init_lora_weights", format!("{n:?}")))
            }
            _ => Ok(()),
        }
    }
}
