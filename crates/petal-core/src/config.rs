//! `adapter_config.json`, field for field as Hugging Face PEFT writes it.
//!
//! Unknown keys that are switched off (null, false, empty) are accepted, since every PEFT
//! release adds a few; an unknown or unsupported feature that is switched on is an error naming
//! the field, so an adapter never silently loads as something else.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

mod options;
mod validate;

pub use options::{
    nearest, parse_list, parse_names, parse_numbers, parse_targets, parse_upper, parse_value, spec,
    unknown, MethodOptions, OptionSpec, Spec,
};
pub use validate::{finite, probability, unsupported};

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

/// An adapter_config.json: the fields every method shares, and the method's own options under
/// PEFT's flat keys (`options`), read through the typed struct in the method's file
/// (`cfg.options::<LoraOptions>()`). Holds exactly the method's keys, defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub target_modules: Option<Targets>,
    #[serde(default)]
    pub exclude_modules: Option<Targets>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Layers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_pattern: Option<Targets>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Rows of the token embedding trained in full (`TrainableTokensLayer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<TokenIndices>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub options: Map<String, Value>,
}

/// `pissa_niter_K`: PiSSA by a randomised SVD with K power iterations.
pub fn pissa_niter(init: &str) -> Option<usize> {
    init.strip_prefix("pissa_niter_")?.parse().ok()
}

/// The Hugging Face PEFT release whose file format petal reads and writes (and tests against).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// Informational keys whose values never change the computation.
const INFORMATIONAL: &[&str] = &[
    "peft_version",
    "revision",
    "auto_mapping",
    "megatron_core",
    "tokenizer_kwargs",
];

/// Whether an unknown key's value turns a feature on (null, false, 0, "" and empties do not).
fn is_switched_on(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => false,
    }
}

/// Whether a value differs from "nothing" (null, false, 0, "" and empties).
fn is_set(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        v => is_switched_on(v),
    }
}

impl AdapterConfig {
    /// A config for `peft_type` with the method's defaults (PEFT's) and no targets.
    pub fn new(peft_type: &str) -> Result<Self> {
        let m = crate::registry::method(peft_type)
            .ok_or_else(|| unknown_method(peft_type, "peft_type"))?;
        Ok(AdapterConfig {
            peft_type: m.peft_type().into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: None,
            trainable_token_indices: None,
            inference_mode: false,
            options: (m.options().defaults)(),
        })
    }

    /// A LoRA config with PEFT's defaults.
    pub fn lora(r: usize, alpha: f64, targets: Targets) -> Self {
        Self::for_method("LORA", r, alpha, targets)
    }

    /// A config for `peft_type` ("LORA", "LOHA", …) with rank r and alpha `alpha` where the
    /// method has them (see `AdapterMethod::shared_key`). An unknown method gives a config that
    /// `validate` refuses.
    pub fn for_method(peft_type: &str, r: usize, alpha: f64, targets: Targets) -> Self {
        let Ok(mut c) = Self::new(peft_type) else {
            let mut c = Self::new("LORA").unwrap_or_else(|_| unreachable!("LoRA is registered"));
            c.peft_type = peft_type.to_ascii_uppercase();
            return c;
        };
        c.target_modules = Some(targets);
        if let Some(m) = c.method() {
            m.set_size(&mut c.options, r, alpha);
        }
        c
    }

    /// The method of `peft_type`, from the registry.
    pub fn method(&self) -> Option<&'static dyn crate::AdapterMethod> {
        crate::registry::method(&self.peft_type)
    }

    /// The method's options as its typed struct.
    pub fn options<T: MethodOptions>(&self) -> Result<T> {
        options::read(&self.options).map_err(|(key, e)| {
            Error::config(
                "adapter config",
                key.as_deref().unwrap_or(&self.peft_type),
                e,
            )
        })
    }

    /// One option's value (`None`: the method has no such key).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.options.get(key)
    }

    /// Set option `key` of the method (null keeps the default); an unknown key is refused with
    /// the nearest one suggested.
    pub fn set(&mut self, key: &str, value: impl Serialize) -> Result<()> {
        let spec = self.method().map(|m| m.options());
        let Some(spec) = spec.clone().filter(|s| s.has(key)) else {
            let known = spec.map(|s| s.names()).unwrap_or_default();
            let what = format!("option of {}", self.peft_type);
            return Err(Error::config(
                "adapter config",
                key,
                unknown(&what, key, &known),
            ));
        };
        let v = serde_json::to_value(value).map_err(|e| Error::msg(e.to_string()))?;
        let v = if v.is_null() {
            (spec.defaults)().remove(key).unwrap_or(Value::Null)
        } else {
            v
        };
        self.options.insert(key.to_string(), v);
        Ok(())
    }

    /// Switch the method's init to its non-zero variant (PEFT's testing switch).
    pub fn set_init_nonzero(&mut self) {
        if let Some(m) = self.method() {
            m.set_init_nonzero(&mut self.options);
        }
    }

    /// Parse adapter_config.json text; `file` names the source in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let raw: Value = serde_json::from_str(text)
            .map_err(|e| Error::config(file, "(json)", format!("not valid JSON: {e}")))?;
        if !raw.is_object() {
            return Err(Error::config(file, "(json)", "expected a JSON object"));
        }
        let bad_layers = raw
            .get("layers_to_transform")
            .is_some_and(|v| serde_json::from_value::<Option<Layers>>(v.clone()).is_err());
        if bad_layers {
            let e = "expected a layer index (a whole number >= 0) or a list of them";
            return Err(Error::config(file, "layers_to_transform", e));
        }
        let mut cfg: AdapterConfig = serde_json::from_value(raw)
            .map_err(|e| Error::config(file, "(schema)", e.to_string()))?;
        let m = cfg
            .method()
            .ok_or_else(|| unknown_method(&cfg.peft_type, file))?;
        cfg.peft_type = m.peft_type().into();
        let spec = m.options();
        let others: Vec<&str> = crate::registry::METHODS
            .iter()
            .flat_map(|m| m.options().names())
            .collect();
        let mut options = (spec.defaults)();
        for (k, v) in std::mem::take(&mut cfg.options) {
            if spec.has(&k) {
                if !v.is_null() {
                    options.insert(k, v);
                }
            } else if INFORMATIONAL.contains(&k.as_str()) {
            } else if is_switched_on(&v) || (others.contains(&k.as_str()) && is_set(&v)) {
                return Err(Error::config(
                    file,
                    &k,
                    format!(
                        "PEFT feature `{k}` = {v} is not supported by petal for {}",
                        cfg.peft_type
                    ),
                ));
            }
        }
        cfg.options = options;
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> Result<String> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::msg(e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            // an option left unset is not written (PEFT takes its default for a missing key)
            o.retain(|k, v| !(v.is_null() && self.options.contains_key(k)));
            if self.method().is_some_and(|m| m.writes_layer_selection()) {
                for k in ["layers_to_transform", "layers_pattern"] {
                    o.entry(k).or_insert(Value::Null);
                }
            }
            // PEFT parses this as a version and gates format changes on it (OFT's
            // Cayley-Neumann form changed in 0.18): write the release whose format petal follows.
            o.insert(
                "peft_version".into(),
                Value::String(PEFT_FORMAT_VERSION.into()),
            );
        }
        serde_json::to_string_pretty(&v).map_err(|e| Error::msg(e.to_string()))
    }
}

/// `peft_type` names no method petal has.
fn unknown_method(peft_type: &str, file: &str) -> Error {
    let known: Vec<_> = crate::registry::METHODS
        .iter()
        .map(|m| m.peft_type())
        .collect();
    Error::config(
        file,
        "peft_type",
        format!(
            "`{peft_type}` is not a method petal knows (known: {})",
            known.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::METHODS;

    #[test]
    fn every_kept_flag_and_shared_size_names_an_option_of_its_method_and_no_flag_means_two_things()
    {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for m in METHODS {
            let spec = m.options();
            for f in m.flags() {
                assert!(
                    spec.has(f.key),
                    "{}: --{} -> {}",
                    m.peft_type(),
                    f.name,
                    f.key
                );
                match seen.iter().find(|(n, _)| *n == f.name) {
                    Some((_, k)) => assert_eq!(*k, f.key, "--{} means two things", f.name),
                    None => seen.push((f.name, f.key)),
                }
            }
            for o in [
                crate::SharedOption::Rank,
                crate::SharedOption::Alpha,
                crate::SharedOption::Dropout,
            ] {
                if let Some(k) = m.shared_key(o) {
                    assert!(spec.has(k), "{}: {o:?} -> {k}", m.peft_type());
                }
            }
        }
    }

    #[test]
    fn every_method_s_config_reads_back_equal_from_the_json_petal_writes() {
        for m in METHODS {
            let mut c =
                AdapterConfig::for_method(m.peft_type(), 4, 8.0, Targets::List(vec!["q".into()]));
            c.layers_to_transform = Some(Layers::Many(vec![0, 2]));
            // what a method needs from its data (PaLoRA's tasks, PASTA's special tokens)
            for (k, v) in m.bench_settings().unwrap_or(&[]) {
                c.set(k, crate::config::parse_value(v)).unwrap();
            }
            let text = c.to_json().unwrap();
            let back = AdapterConfig::from_json(&text, "x.json")
                .unwrap_or_else(|e| panic!("{}: {e}\n{text}", m.peft_type()));
            assert_eq!(back, c, "{}", m.peft_type());
            let keys: Vec<String> = serde_json::from_str::<Map<String, Value>>(&text)
                .unwrap()
                .keys()
                .cloned()
                .collect();
            for k in m.options().names() {
                let set = c.get(k).is_some_and(|v| !v.is_null());
                let written = keys.iter().any(|x| x == k);
                assert_eq!(
                    written,
                    set,
                    "{}: {k} (unset options are left out)",
                    m.peft_type()
                );
            }
        }
    }

    #[test]
    fn a_peft_file_may_carry_switched_off_features_but_not_ones_petal_lacks() {
        let base = r#""peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"]"#;
        let read = |extra: &str| AdapterConfig::from_json(&format!("{{{base}{extra}}}"), "a.json");
        let c = read(r#", "eva_config": null, "use_qalora": false, "loftq_config": {}, "rank_dropout": 0.0, "revision": "main""#)
            .unwrap();
        assert_eq!(c.get("r"), Some(&Value::from(4)));
        assert!(
            c.get("rank_dropout").is_none(),
            "another method's key is not kept"
        );
        for (extra, field) in [
            (r#", "use_qalora": true"#, "use_qalora"),
            (r#", "rank_dropout": 0.1"#, "rank_dropout"),
            (r#", "lora_dropout": 1.5"#, "lora_dropout"),
            (r#", "bias": "sideways""#, "bias"),
            (r#", "peft_type": "NOPE""#, "peft_type"),
        ] {
            let e = read(extra).unwrap_err().to_string();
            assert!(e.contains("a.json") && e.contains(field), "{extra}: {e}");
        }
    }

    #[test]
    fn setting_an_unknown_option_suggests_the_nearest_key_of_the_method() {
        let mut c = AdapterConfig::for_method("LORA", 4, 8.0, Targets::List(vec![]));
        let e = c.set("lora_alpa", 3.0).unwrap_err().to_string();
        assert!(e.contains("did you mean `lora_alpha`"), "{e}");
        c.set("lora_alpha", 3.0).unwrap();
        assert_eq!(c.get("lora_alpha"), Some(&Value::from(3.0)));
    }
}
