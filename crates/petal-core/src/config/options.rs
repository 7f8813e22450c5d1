//! A method's own options: a typed struct in the method's file, declared with
//! [`method_options!`](crate::method_options), which also gives the registry each option's key,
//! help text, default and command-line parser. The CLI, TOML run files and `petal bench` read
//! them from there, so no code outside the method's file names its options.

use super::Targets;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

/// One option of a method: its key (PEFT's name in adapter_config.json, the key of the
/// method's TOML table and of `--set KEY=VALUE`), its help text, and how a command-line value
/// becomes JSON.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    pub key: &'static str,
    pub help: &'static str,
    pub parse: fn(&str) -> Value,
}

/// A method's options struct (see [`method_options!`](crate::method_options)).
pub trait MethodOptions: Serialize + DeserializeOwned + Default {
    /// Its options, those of the structs it flattens first.
    fn spec() -> Vec<OptionSpec>;
}

/// What the registry knows of a method's options, without their Rust type.
#[derive(Clone)]
pub struct Spec {
    pub keys: Vec<OptionSpec>,
    /// The defaults as JSON (PEFT's defaults, which a file without the key gets).
    pub defaults: fn() -> Map<String, Value>,
    /// Whether a set of values reads as the typed struct; the error names the key whose value
    /// is wrong where one can be found, and serde's message.
    pub check: fn(&Map<String, Value>) -> std::result::Result<(), (Option<String>, String)>,
}

impl Spec {
    pub fn key(&self, k: &str) -> Option<OptionSpec> {
        self.keys.iter().find(|o| o.key == k).copied()
    }
    pub fn has(&self, k: &str) -> bool {
        self.key(k).is_some()
    }
    pub fn names(&self) -> Vec<&'static str> {
        self.keys.iter().map(|o| o.key).collect()
    }
}

/// The [`Spec`] of options struct `T`.
pub fn spec<T: MethodOptions>() -> Spec {
    Spec {
        keys: T::spec(),
        defaults: || match serde_json::to_value(T::default()) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        },
        check: |m| read::<T>(m).map(drop),
    }
}

/// Options `m` read as `T`. On failure: the first key whose value alone, next to the
/// defaults, fails too (serde names the type it wanted, not the key), and serde's message.
pub fn read<T: MethodOptions>(
    m: &Map<String, Value>,
) -> std::result::Result<T, (Option<String>, String)> {
    serde_json::from_value(Value::Object(m.clone())).map_err(|e| {
        let defaults = match serde_json::to_value(T::default()) {
            Ok(Value::Object(d)) => d,
            _ => Map::new(),
        };
        let key = m.iter().find_map(|(k, v)| {
            let mut one = defaults.clone();
            one.insert(k.clone(), v.clone());
            serde_json::from_value::<T>(Value::Object(one))
                .is_err()
                .then(|| k.clone())
        });
        (key, e.to_string())
    })
}

/// A command-line value as JSON: a number, `true`/`false`, `null`, a JSON list or object, or
/// else the text itself.
pub fn parse_value(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

/// A list of whole numbers as the command line writes them: `16,8,8,4` (or a JSON list);
/// anything else stays text, for the option's type check to refuse naming the key.
pub fn parse_list(s: &str) -> Value {
    if s.trim_start().starts_with('[') {
        return parse_value(s);
    }
    let v: Option<Vec<u64>> = s.split(',').map(|x| x.trim().parse().ok()).collect();
    v.map(|v| v.into())
        .unwrap_or_else(|| Value::String(s.into()))
}

/// A list of names as the command line writes them: `a,b` (or a JSON list).
pub fn parse_names(s: &str) -> Value {
    if s.trim_start().starts_with('[') {
        return parse_value(s);
    }
    s.split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| Value::String(x.to_string()))
        .collect::<Vec<_>>()
        .into()
}

/// A list of numbers as the command line writes them: `0.3,0.7` (or a JSON list); anything
/// else stays text, for the option's type check to refuse naming the key.
pub fn parse_numbers(s: &str) -> Value {
    if s.trim_start().starts_with('[') {
        return parse_value(s);
    }
    let v: Option<Vec<f64>> = s.split(',').map(|x| x.trim().parse().ok()).collect();
    v.map(|v| v.into())
        .unwrap_or_else(|| Value::String(s.into()))
}

/// Module names as the command line writes them: a comma list, `all-linear`, or `re:REGEX`
/// (a JSON string in the file is a regex, as in PEFT).
pub fn parse_targets(s: &str) -> Value {
    let t = match s.strip_prefix("re:") {
        Some(r) => Targets::Regex(r.to_string()),
        None if s == "all-linear" => Targets::Regex(s.to_string()),
        None if s.starts_with('[') => return parse_value(s),
        None => Targets::List(
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
        ),
    };
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// Upper-cased text (PEFT's enum values: "MLP", "TEXT").
pub fn parse_upper(s: &str) -> Value {
    Value::String(s.to_ascii_uppercase())
}

/// Levenshtein distance, for "did you mean" hints.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The known name nearest to `key`, if one is near enough to be a likely misspelling.
pub fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (distance(key, k), *k))
        .filter(|(d, _)| *d <= 3.max(key.len() / 3))
        .min()
        .map(|(_, k)| k)
}

/// "unknown X `k`; did you mean `y`?" or "(known: …)".
pub fn unknown(what: &str, key: &str, known: &[&str]) -> String {
    match nearest(key, known) {
        Some(s) => format!("unknown {what} `{key}`; did you mean `{s}`?"),
        None => format!("unknown {what} `{key}` (known: {})", known.join(", ")),
    }
}

/// Declares a method's options struct: first any options structs it shares with other methods
/// (`flatten shape: PromptShape;`, their keys at the same level in the file), then each field
/// with its doc comment (the help text), an optional PEFT key where it is not the field's name
/// (`as "deltaT"`), its type, its default and an optional command-line parser
/// (`[parse_targets]`; default [`parse_value`]).
///
/// ```ignore
/// petal_core::method_options! {
///     /// IA3's options.
///     pub struct Ia3Options {
///         /// Targeted modules whose input is scaled (the others scale their output)
///         [parse_targets] pub feedforward_modules: Option<Targets> = None,
///     }
/// }
/// ```
#[macro_export]
macro_rules! method_options {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $(flatten $flat:ident : $flat_ty:ty;)*
            $(
                $(#[doc = $doc:literal])*
                $([$parse:path])?
                pub $field:ident $(as $key:literal)? : $ty:ty = $def:expr
            ),* $(,)?
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct $name {
            $(
                #[serde(flatten)]
                pub $flat: $flat_ty,
            )*
            $(
                $(#[doc = $doc])*
                $(#[serde(rename = $key)])?
                pub $field: $ty,
            )*
        }
        impl Default for $name {
            fn default() -> Self {
                $name { $($flat: Default::default(),)* $($field: $def,)* }
            }
        }
        impl $crate::config::MethodOptions for $name {
            fn spec() -> Vec<$crate::config::OptionSpec> {
                #[allow(unused_mut)]
                let mut v: Vec<$crate::config::OptionSpec> = Vec::new();
                $(v.extend(<$flat_ty as $crate::config::MethodOptions>::spec());)*
                $(v.push($crate::config::OptionSpec {
                    key: $crate::method_options!(@key $field $($key)?),
                    help: concat!($($doc),*),
                    parse: $crate::method_options!(@parse $($parse)?),
                });)*
                v
            }
        }
    };
    (@key $field:ident $key:literal) => { $key };
    (@key $field:ident) => { stringify!($field) };
    (@parse $parse:path) => { $parse };
    (@parse) => { $crate::config::parse_value };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_key_suggests_the_nearest_known_one() {
        assert_eq!(
            nearest("learning_rat", &["lr", "learning_rate", "seed"]),
            Some("learning_rate")
        );
        assert_eq!(
            nearest("max_step", &["max_steps", "batch_size"]),
            Some("max_steps")
        );
        assert_eq!(nearest("zzzzzzzz", &["lr", "seed"]), None);
    }

    #[test]
    fn command_line_values_read_as_json_where_they_are_json_and_as_text_otherwise() {
        assert_eq!(parse_value("4"), Value::from(4));
        assert_eq!(parse_value("true"), Value::Bool(true));
        assert_eq!(parse_value("road_2"), Value::from("road_2"));
        assert_eq!(
            parse_targets("down_proj, up_proj"),
            serde_json::json!(["down_proj", "up_proj"])
        );
        assert_eq!(parse_targets("re:.*fc"), Value::from(".*fc"));
    }
}
