//! `adapter_config.json`, field for field as Hugging Face PEFT writes it.
//!
//! Unknown keys that are switched off (null, false, empty) are accepted, since every PEFT
//! release adds a few; an unknown or unsupported feature that is switched on is an error naming
//! the field, so an adapter never silently loads as something else.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

mod validate;

/// `target_modules` / `exclude_modules` / `layers_pattern`: a list of names or one regex.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    List(Vec<String>),
    Regex(String),
}

/// `layers_to_transform`: one index or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    One(usize),
    Many(Vec<usize>),
}

/// A `rank_pattern` value: a rank (LoRA family), or AdaLoRA's mask of the kept ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RankValue {
    Rank(usize),
    Mask(Vec<bool>),
}

impl RankValue {
    pub fn rank(&self) -> usize {
        match self {
            RankValue::Rank(r) => *r,
            RankValue::Mask(m) => m.iter().filter(|&&k| k).count(),
        }
    }
}

impl From<usize> for RankValue {
    fn from(r: usize) -> Self {
        RankValue::Rank(r)
    }
}

/// `trainable_token_indices`: token ids of the input embedding, or per embedding module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIndices {
    List(Vec<u32>),
    PerModule(BTreeMap<String, Vec<u32>>),
}

/// `init_lora_weights`: true / false / a named scheme ("gaussian", …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitWeights {
    Flag(bool),
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<Targets>,
    #[serde(default)]
    pub exclude_modules: Option<Targets>,
    #[serde(default)]
    pub layers_to_transform: Option<Layers>,
    #[serde(default)]
    pub layers_pattern: Option<Targets>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub rank_pattern: BTreeMap<String, RankValue>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "default_init")]
    pub init_lora_weights: InitWeights,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Rows of the token embedding trained in full (`TrainableTokensLayer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<TokenIndices>,
    #[serde(default)]
    pub inference_mode: bool,
    /// LyCORIS-family methods (LoHa, LoKr) call it `alpha`, not `lora_alpha`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// LyCORIS-family name of the init switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_weights: Option<InitWeights>,
    #[serde(default)]
    pub rank_dropout: f64,
    #[serde(default)]
    pub module_dropout: f64,
    /// LoKr: rescale the kept rows of dW under rank dropout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_dropout_scale: Option<bool>,
    /// LoKr: also factor the left Kronecker factor into two low-rank matrices.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub decompose_both: bool,
    /// LoKr: factor the dimensions around this divisor (-1: near the square root).
    #[serde(default = "minus_one", skip_serializing_if = "is_minus_one")]
    pub decompose_factor: i64,
    /// IA3: targeted modules whose *input* is scaled (the others scale their output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedforward_modules: Option<Targets>,
    /// IA3: start from all-ones vectors (identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_ia3_weights: Option<bool>,
    /// Prompt tuning: number of virtual tokens, their width, and PEFT's bookkeeping fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_virtual_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_transformer_submodules: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_layers: Option<usize>,
    /// "RANDOM" or "TEXT".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init_text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_name_or_path: Option<String>,
    /// OFT: block size (r = in / block size; give one of the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oft_block_size: Option<usize>,
    /// OFT: the Cayley transform by a truncated Neumann series (PEFT's default) or exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_cayley_neumann: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_cayley_neumann_terms: Option<usize>,
    /// OFT: one block shared by all blocks of a layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_share: Option<bool>,
    /// OFT: constrained variant (projection onto a ball of radius `eps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coft: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// BOFT: block size or block count (one of the two), butterfly factors, block dropout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boft_block_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boft_block_num: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boft_n_butterfly_factor: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boft_dropout: Option<f64>,
    /// RoAd: "road_1", "road_2" or "road_4", and the size of the groups pairs are taken in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<usize>,
    /// VeRA: seed of the shared projections, whether they are saved, dropout, init of d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_prng_key: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_projection: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vera_dropout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_initial: Option<f64>,
    /// Prefix tuning: the reparameterising MLP (training only) and its width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_projection: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<usize>,
    /// AdaLoRA: ranks at start and target, the budget schedule (warm-up `tinit`, final
    /// `tfinal`, masking every `deltaT` steps over `total_step`), the importance EMAs and the
    /// orthogonal regulariser's weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_r: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_r: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tinit: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tfinal: Option<usize>,
    #[serde(default, rename = "deltaT", skip_serializing_if = "Option::is_none")]
    pub delta_t: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orth_reg_weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_step: Option<usize>,
    /// P-tuning: "MLP" or "LSTM", its layers and dropout (PEFT's bookkeeping for the MLP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_reparameterization_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_num_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_dropout: Option<f64>,
}

/// `null` reads as the empty default (PEFT writes `"rank_pattern": null` for some methods).
fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn minus_one() -> i64 {
    -1
}
fn is_minus_one(v: &i64) -> bool {
    *v == -1
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_init() -> InitWeights {
    InitWeights::Flag(true)
}
fn default_bias() -> String {
    "none".into()
}

/// Keys petal reads; everything else in the file goes through `is_switched_on`.
const KNOWN: &[&str] = &[
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "init_lora_weights",
    "bias",
    "fan_in_fan_out",
    "use_dora",
    "modules_to_save",
    "trainable_token_indices",
    "inference_mode",
    "alpha",
    "init_weights",
    "rank_dropout",
    "module_dropout",
    "decompose_both",
    "decompose_factor",
    "rank_dropout_scale",
    "feedforward_modules",
    "init_ia3_weights",
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
    "oft_block_size",
    "use_cayley_neumann",
    "num_cayley_neumann_terms",
    "block_share",
    "coft",
    "eps",
    "boft_block_size",
    "boft_block_num",
    "boft_n_butterfly_factor",
    "boft_dropout",
    "variant",
    "group_size",
    "projection_prng_key",
    "save_projection",
    "vera_dropout",
    "d_initial",
    "prefix_projection",
    "encoder_hidden_size",
    "encoder_reparameterization_type",
    "encoder_num_layers",
    "encoder_dropout",
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
];

/// Keys every method's config carries; the rest come from `AdapterMethod::config_keys`.
const COMMON: &[&str] = &[
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "inference_mode",
];

/// `pissa_niter_K`: PiSSA by a randomised SVD with K power iterations.
pub fn pissa_niter(init: &str) -> Option<usize> {
    init.strip_prefix("pissa_niter_")?.parse().ok()
}

/// The Hugging Face PEFT release whose file format petal reads and writes (and tests against).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// Informational keys whose values never change the computation.
const INFORMATIONAL: &[&str] = &["peft_version", "revision", "auto_mapping", "megatron_core"];

fn is_switched_on(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => false,
    }
}

impl AdapterConfig {
    /// A LoRA config with PEFT's defaults.
    pub fn lora(r: usize, alpha: f64, targets: Targets) -> Self {
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            r,
            lora_alpha: alpha,
            lora_dropout: 0.0,
            target_modules: Some(targets),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: false,
            init_lora_weights: InitWeights::Flag(true),
            bias: "none".into(),
            fan_in_fan_out: false,
            use_dora: false,
            modules_to_save: None,
            trainable_token_indices: None,
            inference_mode: false,
            alpha: None,
            init_weights: None,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            rank_dropout_scale: None,
            decompose_both: false,
            decompose_factor: -1,
            feedforward_modules: None,
            init_ia3_weights: None,
            num_virtual_tokens: None,
            token_dim: None,
            num_transformer_submodules: None,
            num_attention_heads: None,
            num_layers: None,
            prompt_tuning_init: None,
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            oft_block_size: None,
            use_cayley_neumann: None,
            num_cayley_neumann_terms: None,
            block_share: None,
            coft: None,
            eps: None,
            boft_block_size: None,
            boft_block_num: None,
            boft_n_butterfly_factor: None,
            boft_dropout: None,
            variant: None,
            group_size: None,
            projection_prng_key: None,
            save_projection: None,
            vera_dropout: None,
            d_initial: None,
            prefix_projection: None,
            encoder_hidden_size: None,
            encoder_reparameterization_type: None,
            encoder_num_layers: None,
            encoder_dropout: None,
            init_r: None,
            target_r: None,
            tinit: None,
            tfinal: None,
            delta_t: None,
            beta1: None,
            beta2: None,
            orth_reg_weight: None,
            total_step: None,
        }
    }

    /// A config for `peft_type` ("LORA", "LOHA", …) with rank r and alpha `alpha`.
    pub fn for_method(peft_type: &str, r: usize, alpha: f64, targets: Targets) -> Self {
        let mut c = Self::lora(r, alpha, targets);
        c.peft_type = peft_type.to_ascii_uppercase();
        match c.peft_type.as_str() {
            "LORA" => {}
            "IA3" => c.init_ia3_weights = Some(true),
            "ADALORA" => {
                c.init_r = Some(r);
                c.r = r;
                c.target_r = Some((r / 2).max(1));
                c.tinit = Some(0);
                c.tfinal = Some(0);
                c.delta_t = Some(1);
                c.beta1 = Some(0.85);
                c.beta2 = Some(0.85);
                c.orth_reg_weight = Some(0.5);
                c.lora_alpha = alpha;
            }
            "P_TUNING" => {
                c.num_transformer_submodules = Some(1);
                c.encoder_reparameterization_type = Some("MLP".into());
                c.encoder_num_layers = Some(2);
                c.encoder_dropout = Some(0.0);
            }
            "PREFIX_TUNING" => {
                c.num_transformer_submodules = Some(1);
                c.prefix_projection = Some(false);
            }
            "PROMPT_TUNING" => {
                c.num_transformer_submodules = Some(1);
                c.prompt_tuning_init = Some("RANDOM".into());
            }
            "OFT" => {
                c.oft_block_size = Some(0);
                c.use_cayley_neumann = Some(true);
                c.num_cayley_neumann_terms = Some(5);
                c.block_share = Some(false);
                c.coft = Some(false);
                c.eps = Some(6e-5);
                c.init_weights = Some(InitWeights::Flag(true));
            }
            "BOFT" => {
                c.boft_block_size = Some(0);
                c.boft_block_num = Some(r);
                c.boft_n_butterfly_factor = Some(1);
                c.boft_dropout = Some(0.0);
                c.init_weights = Some(InitWeights::Flag(true));
            }
            "ROAD" => {
                c.variant = Some("road_1".into());
                c.group_size = Some(64);
                c.init_weights = Some(InitWeights::Flag(true));
            }
            "VERA" => {
                c.projection_prng_key = Some(0);
                c.save_projection = Some(true);
                c.vera_dropout = Some(0.0);
                c.d_initial = Some(0.1);
                c.init_weights = Some(InitWeights::Flag(true));
            }
            _ => {
                c.alpha = Some(alpha);
                c.init_weights = Some(InitWeights::Flag(true));
            }
        }
        c
    }

    pub fn is_lora(&self) -> bool {
        self.peft_type.eq_ignore_ascii_case("LORA")
    }

    /// Switch the method's init to its non-zero variant (PEFT's testing switch).
    pub fn set_init_nonzero(&mut self) {
        match self.peft_type.as_str() {
            "LORA" | "ADALORA" => self.init_lora_weights = InitWeights::Flag(false),
            "IA3" => self.init_ia3_weights = Some(false),
            _ => self.init_weights = Some(InitWeights::Flag(false)),
        }
    }

    /// Whether the method should start from a non-zero update (`init_lora_weights = false`,
    /// or `init_weights = false` for the LyCORIS family): PEFT's switch for tests.
    pub fn init_nonzero(&self) -> bool {
        match self.peft_type.as_str() {
            "LORA" | "ADALORA" => self.init_lora_weights == InitWeights::Flag(false),
            "IA3" => self.init_ia3_weights == Some(false),
            _ => self.init_weights == Some(InitWeights::Flag(false)),
        }
    }

    /// Parse adapter_config.json text; `file` names the source in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let raw: Value = serde_json::from_str(text)
            .map_err(|e| Error::config(file, "(json)", format!("not valid JSON: {e}")))?;
        let obj = raw
            .as_object()
            .ok_or_else(|| Error::config(file, "(json)", "expected a JSON object"))?;
        for (k, v) in obj {
            if !KNOWN.contains(&k.as_str())
                && !INFORMATIONAL.contains(&k.as_str())
                && is_switched_on(v)
            {
                return Err(Error::config(
                    file,
                    k,
                    format!("PEFT feature `{k}` = {v} is not supported by petal"),
                ));
            }
        }
        let cfg: AdapterConfig = serde_json::from_value(raw.clone())
            .map_err(|e| Error::config(file, "(schema)", e.to_string()))?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> Result<String> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::msg(e.to_string()))?;
        let own = crate::registry::method(&self.peft_type)
            .map(|m| m.config_keys())
            .unwrap_or(&[]);
        if let Some(o) = v.as_object_mut() {
            o.retain(|k, _| COMMON.contains(&k.as_str()) || own.contains(&k.as_str()));
            // PEFT parses this as a version and gates format changes on it (OFT's
            // Cayley-Neumann form changed in 0.18): write the release whose format petal follows.
            o.insert(
                "peft_version".into(),
                Value::String(PEFT_FORMAT_VERSION.into()),
            );
        }
        serde_json::to_string_pretty(&v).map_err(|e| Error::msg(e.to_string()))
    }

    /// Rank for one module, honouring `rank_pattern` (keys match as `(.*\.)?(key)$`).
    pub fn rank_for(&self, path: &str) -> usize {
        crate::target::pattern_value(&self.rank_pattern, path)
            .map(|v| v.rank())
            .unwrap_or(self.r)
    }

    /// Alpha for one module, honouring `alpha_pattern`.
    pub fn alpha_for(&self, path: &str) -> f64 {
        let base = if self.is_lora() {
            self.lora_alpha
        } else {
            self.alpha.unwrap_or(8.0)
        };
        crate::target::pattern_value(&self.alpha_pattern, path).unwrap_or(base)
    }

    /// LoRA scaling for one module: alpha/r, or alpha/sqrt(r) with rsLoRA.
    pub fn scaling_for(&self, path: &str) -> f64 {
        let r = self.rank_for(path) as f64;
        let a = self.alpha_for(path);
        if self.use_rslora {
            a / r.sqrt()
        } else {
            a / r
        }
    }
}
