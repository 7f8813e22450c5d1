//! What petal refuses in an adapter config, naming the field.

use super::{pissa_niter, AdapterConfig, InitWeights};
use crate::{Error, Result};

impl AdapterConfig {
    /// Refuse settings petal cannot honour, naming the field.
    pub fn validate(&self, file: &str) -> Result<()> {
        if crate::registry::method(&self.peft_type).is_none() {
            let known: Vec<_> = crate::registry::METHODS
                .iter()
                .map(|m| m.peft_type())
                .collect();
            return Err(Error::config(
                file,
                "peft_type",
                format!(
                    "`{}` is not a method petal knows (known: {})",
                    self.peft_type,
                    known.join(", ")
                ),
            ));
        }
        let unsupported = |f: &str, v: String| {
            Err(Error::config(
                file,
                f,
                format!("{f} = {v} is not supported by petal yet"),
            ))
        };
        let lycoris = self.peft_type == "LOHA" || self.peft_type == "LOKR";
        if (self.rank_dropout != 0.0 && !lycoris)
            || (self.module_dropout != 0.0 && !lycoris && self.peft_type != "OFT")
        {
            return unsupported(
                "rank_dropout / module_dropout",
                format!(
                    "{} / {} (for {})",
                    self.rank_dropout, self.module_dropout, self.peft_type
                ),
            );
        }
        if !(0.0..1.0).contains(&self.rank_dropout) {
            return Err(Error::config(file, "rank_dropout", "must be in [0, 1)"));
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out", "true".into());
        }
        match self.bias.as_str() {
            "none" => {}
            "all" | "lora_only" if self.is_lora() => {}
            b => return unsupported("bias", format!("{b:?} (for {})", self.peft_type)),
        }
        if let Some(InitWeights::Named(n)) = &self.init_weights {
            if !(self.peft_type == "PREFIX_TUNING" && n == "zero") {
                return unsupported("init_weights", format!("{n:?}"));
            }
        }
        match &self.init_lora_weights {
            InitWeights::Flag(_) => {}
            InitWeights::Named(n)
                if n == "gaussian" || n == "pissa" || n == "olora" || pissa_niter(n).is_some() => {}
            InitWeights::Named(n) => return unsupported("init_lora_weights", format!("{n:?}")),
        }
        if self.r == 0 && self.peft_type != "OFT" && self.peft_type != "BOFT" {
            return Err(Error::config(file, "r", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.module_dropout) {
            return Err(Error::config(file, "module_dropout", "must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::config(file, "lora_dropout", "must be in [0, 1)"));
        }
        Ok(())
    }
}
