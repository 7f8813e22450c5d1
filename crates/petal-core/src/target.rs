//! Target matching with PEFT's exact semantics (`tuners_utils.check_target_module_exists`):
//! a list entry matches the full name or a `.`-suffix, never a bare suffix; a string is a
//! full-match regex; `all-linear` means every linear but the output head; `exclude_modules`
//! wins; `layers_to_transform` filters list matches by the index after `layers_pattern`.

use crate::config::{AdapterConfig, Layers, Targets};
use regex::Regex;
use std::collections::BTreeMap;

pub const ALL_LINEAR: &str = "all-linear";

fn full_match(pattern: &str, key: &str) -> bool {
    match Regex::new(&format!("^(?:{pattern})$")) {
        Ok(re) => re.is_match(key),
        Err(_) => false,
    }
}

fn list_match(list: &[String], key: &str) -> bool {
    list.iter()
        .any(|t| key == t || key.ends_with(&format!(".{t}")))
}

/// The layer index of `key`, found after one of `patterns` (or any segment when none).
fn layer_index(key: &str, patterns: Option<&Targets>) -> Option<usize> {
    let pats: Vec<String> = match patterns {
        None => vec!["[^.]*".into()],
        Some(Targets::Regex(p)) if p.is_empty() => vec!["[^.]*".into()],
        Some(Targets::Regex(p)) => vec![p.clone()],
        Some(Targets::List(l)) if l.is_empty() => vec!["[^.]*".into()],
        Some(Targets::List(l)) => l.clone(),
    };
    pats.iter().find_map(|p| {
        let re = Regex::new(&format!(r"^.*\.{p}\.(\d+)\.")).ok()?;
        re.captures(key)?.get(1)?.as_str().parse().ok()
    })
}

/// Whether the linear named `key` is targeted. `is_output_head` marks the LM head, which
/// `all-linear` skips. `linear_names` are the last components of every linear in the model.
pub fn is_target(cfg: &AdapterConfig, key: &str, is_output_head: bool) -> bool {
    if let Some(ex) = &cfg.exclude_modules {
        let excluded = match ex {
            Targets::Regex(r) => full_match(r, key),
            Targets::List(l) => list_match(l, key),
        };
        if excluded {
            return false;
        }
    }
    match &cfg.target_modules {
        None => false,
        Some(Targets::Regex(r)) if r == ALL_LINEAR => !is_output_head && layer_filter(cfg, key),
        Some(Targets::Regex(r)) => full_match(r, key),
        Some(Targets::List(l)) if l.iter().any(|t| t == key) => true,
        Some(Targets::List(l)) => list_match(l, key) && layer_filter(cfg, key),
    }
}

fn layer_filter(cfg: &AdapterConfig, key: &str) -> bool {
    let wanted = match &cfg.layers_to_transform {
        None => return true,
        Some(Layers::Many(v)) if v.is_empty() => return true,
        Some(l) => l,
    };
    match layer_index(key, cfg.layers_pattern.as_ref()) {
        None => false,
        Some(i) => match wanted {
            Layers::One(n) => i == *n,
            Layers::Many(v) => v.contains(&i),
        },
    }
}

/// Value of the first pattern key matching `path` as `(.*\.)?(key)$` (PEFT's
/// rank_pattern / alpha_pattern lookup).
pub fn pattern_value<V: Clone>(patterns: &BTreeMap<String, V>, path: &str) -> Option<V> {
    patterns.iter().find_map(|(k, v)| {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).ok()?;
        re.is_match(path).then(|| v.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: Targets) -> AdapterConfig {
        AdapterConfig::lora(8, 16.0, t)
    }
    fn list(v: &[&str]) -> Targets {
        Targets::List(v.iter().map(|s| s.to_string()).collect())
    }

    // Cases mirror PEFT's test_tuners_utils.py check_target_module_exists table.
    #[test]
    fn list_entries_match_the_full_name_or_a_dot_suffix_but_never_a_bare_suffix() {
        let c = cfg(list(&["q_proj"]));
        assert!(is_target(&c, "model.layers.0.self_attn.q_proj", false));
        assert!(is_target(&c, "q_proj", false));
        assert!(!is_target(&c, "model.layers.0.self_attn.xq_proj", false));
        assert!(!is_target(
            &c,
            "model.layers.0.self_attn.q_proj.lora",
            false
        ));
        let c = cfg(list(&["self_attn.q_proj"]));
        assert!(is_target(&c, "model.layers.3.self_attn.q_proj", false));
        assert!(!is_target(&c, "model.layers.3.cross_attn.q_proj", false));
    }

    #[test]
    fn a_string_target_is_a_full_match_regex() {
        let c = cfg(Targets::Regex(
            r".*\.layers\.[01]\.self_attn\.(q|v)_proj".into(),
        ));
        assert!(is_target(&c, "model.layers.1.self_attn.v_proj", false));
        assert!(!is_target(&c, "model.layers.2.self_attn.v_proj", false));
        assert!(!is_target(&c, "model.layers.1.self_attn.k_proj", false));
        let c = cfg(Targets::Regex("q_proj".into()));
        assert!(
            !is_target(&c, "model.layers.1.self_attn.q_proj", false),
            "regex must match in full"
        );
    }

    #[test]
    fn all_linear_skips_the_output_head_and_exclude_modules_wins() {
        let mut c = cfg(Targets::Regex(ALL_LINEAR.into()));
        assert!(is_target(&c, "model.layers.0.mlp.up_proj", false));
        assert!(!is_target(&c, "lm_head", true));
        c.exclude_modules = Some(list(&["up_proj"]));
        assert!(!is_target(&c, "model.layers.0.mlp.up_proj", false));
        assert!(is_target(&c, "model.layers.0.mlp.down_proj", false));
        c.exclude_modules = Some(Targets::Regex(r".*layers\.0\..*".into()));
        assert!(!is_target(&c, "model.layers.0.mlp.down_proj", false));
        assert!(is_target(&c, "model.layers.1.mlp.down_proj", false));
    }

    #[test]
    fn layers_to_transform_filters_list_matches_by_layer_index() {
        let mut c = cfg(list(&["q_proj"]));
        c.layers_to_transform = Some(Layers::Many(vec![1, 3]));
        assert!(is_target(&c, "model.layers.1.self_attn.q_proj", false));
        assert!(!is_target(&c, "model.layers.2.self_attn.q_proj", false));
        c.layers_to_transform = Some(Layers::One(2));
        c.layers_pattern = Some(Targets::Regex("layers".into()));
        assert!(is_target(&c, "model.layers.2.self_attn.q_proj", false));
        c.layers_pattern = Some(Targets::Regex("blocks".into()));
        assert!(!is_target(&c, "model.layers.2.self_attn.q_proj", false));
    }

    #[test]
    fn rank_pattern_keys_match_a_dot_suffix_or_the_whole_name() {
        let mut p = BTreeMap::new();
        p.insert(r"layers\.0\.self_attn\.q_proj".to_string(), 4usize);
        assert_eq!(
            pattern_value(&p, "model.layers.0.self_attn.q_proj"),
            Some(4)
        );
        assert_eq!(pattern_value(&p, "model.layers.10.self_attn.q_proj"), None);
        let mut p = BTreeMap::new();
        p.insert("v_proj".to_string(), 2usize);
        assert_eq!(
            pattern_value(&p, "model.layers.5.self_attn.v_proj"),
            Some(2)
        );
        assert_eq!(pattern_value(&p, "model.layers.5.self_attn.xv_proj"), None);
    }
}
