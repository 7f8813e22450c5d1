//! `petal methods [NAME]`: the registry's methods, each with its options (PEFT keys, defaults,
//! help) and the flags kept for them; `--json` for tools.

use crate::adapter_opts::{method_name, resolve_method};
use anyhow::Result;
use petal_core::registry::METHODS;
use petal_core::{AdapterMethod, SharedOption};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct MethodsArgs {
    /// Show one method's options (e.g. lora, road)
    pub name: Option<String>,
    /// Print as JSON
    #[arg(long)]
    pub json: bool,
}

/// One method as JSON: name, kept flags, shared sizes, and each option with its default.
fn describe(m: &dyn AdapterMethod) -> Value {
    let spec = m.options();
    let defaults = (spec.defaults)();
    let options: Vec<Value> = spec
        .keys
        .iter()
        .map(|o| {
            let flag = m
                .flags()
                .into_iter()
                .find(|f| f.key == o.key)
                .map(|f| f.name);
            json!({"key": o.key, "default": defaults.get(o.key), "help": o.help.trim(),
                   "flag": flag.map(|f| format!("--{f}"))})
        })
        .collect();
    let shared: serde_json::Map<String, Value> = [
        ("--r", SharedOption::Rank),
        ("--alpha", SharedOption::Alpha),
        ("--dropout", SharedOption::Dropout),
    ]
    .into_iter()
    .filter_map(|(f, o)| Some((f.to_string(), json!(m.shared_key(o)?))))
    .collect();
    json!({
        "method": method_name(m),
        "peft_type": m.peft_type(),
        "variants": m.variants().iter().map(|v| v.0).collect::<Vec<_>>(),
        "default_targets": m.default_targets(),
        "shared": shared,
        "benchmarked": m.bench_settings().is_some(),
        "options": options,
    })
}

pub fn run(a: MethodsArgs) -> Result<()> {
    let list: Vec<Value> = match &a.name {
        Some(n) => vec![describe(resolve_method(n)?.0)],
        None => METHODS.iter().map(|m| describe(*m)).collect(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for m in &list {
        let shared: Vec<String> = m["shared"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(f, k)| format!("{f} -> {}", k.as_str().unwrap_or("")))
            .collect();
        println!(
            "{} ({})  {}",
            m["method"].as_str().unwrap_or(""),
            m["peft_type"].as_str().unwrap_or(""),
            shared.join(", ")
        );
        if a.name.is_none() {
            continue;
        }
        for o in m["options"].as_array().into_iter().flatten() {
            let flag = o["flag"]
                .as_str()
                .map(|f| format!(" ({f})"))
                .unwrap_or_default();
            println!(
                "  --set {}={}{flag}\n      {}",
                o["key"].as_str().unwrap_or(""),
                o["default"],
                o["help"].as_str().unwrap_or("")
            );
        }
    }
    if a.name.is_none() {
        println!("\n`petal methods NAME` lists a method's options (set them with --set KEY=VALUE or a [NAME] table in --config)");
    }
    Ok(())
}
