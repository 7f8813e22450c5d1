//! LN tuning (Zhao et al., 2024, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal
//! LLM Finetuning"): train a copy of each targeted norm's weight, nothing else. Mirrors PEFT
//! `tuners/ln_tuning` (which deep-copies the norm module). The model asks its `AdaptableNorm`
//! for the weight in use; merging makes the trained copy the weight. Saved as
//! `<module>.ln_tuning_layers.weight`. PEFT's default targets for Llama-family models are the
//! norms ("input_layernorm", "post_attention_layernorm", "norm").

use crate::adapter::AdapterMethod;
use crate::config::{spec, Spec};

pub const WEIGHT: &str = "ln_tuning_layers.weight";

pub struct LnTuning;

crate::method_options! {
    /// LN tuning has no options of its own.
    pub struct LnTuningOptions {}
}

impl AdapterMethod for LnTuning {
    fn peft_type(&self) -> &'static str {
        "LN_TUNING"
    }

    fn options(&self) -> Spec {
        spec::<LnTuningOptions>()
    }

    fn default_targets(&self) -> Option<&'static str> {
        Some("input_layernorm,post_attention_layernorm,norm")
    }

    fn tunes_norms(&self) -> Option<&'static str> {
        Some(WEIGHT)
    }
}
