//! The adapter config `petal train` builds from its options, with no method named here: the
//! method list, each method's options (keys, help, defaults, parsers), its kept flags and its
//! training defaults all come from the registry.
//!
//! Options reach a method four ways, all under the method's own keys: the shared `--r`,
//! `--alpha`, `--dropout` (mapped by `AdapterMethod::shared_key`), the method's kept flags
//! (`--road-variant`), `--set KEY=VALUE`, and a TOML table named after the method
//! (`[road] variant = "road_2"`).

use crate::train_cmd::TrainOpts;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use petal_core::config::{parse_targets, unknown, Targets};
use petal_core::registry::METHODS;
use petal_core::{AdapterConfig, AdapterMethod, NewAdapter, SharedOption};
use serde_json::Value;

pub fn targets(s: &str) -> Targets {
    serde_json::from_value(parse_targets(s)).unwrap_or_else(|_| Targets::List(vec![s.into()]))
}

/// A method's name as `--method` takes it (its `peft_type`, lower-case).
pub fn method_name(m: &dyn AdapterMethod) -> String {
    m.peft_type().to_ascii_lowercase()
}

/// `--method NAME`: a method, or one of its variants (LoRA's "dora") with the options it sets.
pub fn resolve_method(name: &str) -> Result<(&'static dyn AdapterMethod, Vec<(String, Value)>)> {
    let name = name.to_ascii_lowercase();
    for &m in METHODS {
        if method_name(m) == name {
            return Ok((m, Vec::new()));
        }
        for (v, key, json) in m.variants() {
            if *v == name {
                let value = serde_json::from_str(json).context("variant value")?;
                return Ok((m, vec![(key.to_string(), value)]));
            }
        }
    }
    let mut known: Vec<String> = METHODS.iter().map(|m| method_name(*m)).collect();
    known.extend(
        METHODS
            .iter()
            .flat_map(|m| m.variants().iter().map(|v| v.0.to_string())),
    );
    bail!(
        "--method {name}: not available (petal has: {})",
        known.join(", ")
    )
}

/// Every kept method flag of the registry, once per name, with the help text of its option.
fn registry_flags() -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for &m in METHODS {
        for f in m.flags() {
            let help = m.options().key(f.key).map(|o| o.help.trim()).unwrap_or("");
            let help = match f.invert {
                true => format!("true sets {} = false ({help})", f.key),
                false => help.to_string(),
            };
            let who = method_name(m);
            match out.iter_mut().find(|(n, _)| *n == f.name) {
                Some((_, h)) => h.push_str(&format!(", {who}")),
                None => out.push((f.name, format!("{help} [method: {who}"))),
            }
        }
    }
    for (_, h) in &mut out {
        h.push(']');
    }
    out
}

/// The method flags given on the command line, as (flag name, text).
#[derive(Debug, Clone, Default)]
pub struct MethodFlags {
    pub given: Vec<(String, String)>,
}

impl FromArgMatches for MethodFlags {
    fn from_arg_matches(m: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        let mut given = Vec::new();
        for (name, _) in registry_flags() {
            if let Some(v) = m.get_one::<String>(name) {
                given.push((name.to_string(), v.clone()));
            }
        }
        Ok(MethodFlags { given })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for MethodFlags {
    fn augment_args(mut cmd: Command) -> Command {
        for (name, help) in registry_flags() {
            cmd = cmd.arg(
                Arg::new(name)
                    .long(name)
                    .help(help)
                    .value_name("VALUE")
                    .action(ArgAction::Set)
                    .help_heading(
                        "Method options (also --set KEY=VALUE; `petal methods` lists all)",
                    ),
            );
        }
        cmd
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// Every name a TOML run file may use at its top level for a method flag (snake_case), and as
/// a table.
pub fn toml_names() -> (Vec<String>, Vec<String>) {
    let flags = registry_flags()
        .into_iter()
        .map(|(n, _)| n.replace('-', "_"))
        .collect();
    let tables = METHODS.iter().map(|m| method_name(*m)).collect();
    (flags, tables)
}

/// Options given for the method, each as (where it came from, key, value).
#[derive(Debug, Default)]
pub struct Given(Vec<(String, String, Value)>);

impl Given {
    fn push(&mut self, from: impl Into<String>, key: &str, v: Value) {
        self.0.push((from.into(), key.to_string(), v));
    }
    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(_, k, _)| k == key)
    }
}

/// Collect what the user set for method `m`: the TOML table of the method first, then what
/// overrides it: shared sizes, kept flags (command line and TOML top level) and `--set` (so a
/// run's own run.toml, which holds `r` at its top level and in its table, replays).
pub fn given_options(
    m: &dyn AdapterMethod,
    o: &TrainOpts,
    flags: &[(String, String)],
    table: Option<&toml::Table>,
) -> Result<Given> {
    let name = method_name(m);
    let spec = m.options();
    let mut g = Given::default();
    // the table first: a later value of the same key wins (`AdapterConfig::set` in turn)
    for (k, v) in table.into_iter().flatten() {
        if !spec.has(k) {
            bail!(
                "[{name}] table: {}",
                unknown(&format!("option of {name}"), k, &spec.names())
            );
        }
        g.push(format!("[{name}]"), k, serde_json::to_value(v)?);
    }
    let shared = [
        ("--r", SharedOption::Rank, o.r.map(Value::from)),
        ("--alpha", SharedOption::Alpha, o.alpha.map(Value::from)),
        (
            "--dropout",
            SharedOption::Dropout,
            o.dropout.map(Value::from),
        ),
    ];
    for (flag, which, v) in shared {
        let Some(v) = v else { continue };
        match m.shared_key(which) {
            Some(k) => g.push(flag, k, v),
            None if which == SharedOption::Dropout && v == Value::from(0.0) => {}
            None => bail!("{flag} does not apply to --method {name}: it has no such option"),
        }
    }
    for (flag, text) in flags {
        let Some(f) = m.flags().into_iter().find(|f| f.name == flag) else {
            let owners: Vec<String> = METHODS
                .iter()
                .filter(|x| x.flags().iter().any(|f| f.name == flag))
                .map(|x| method_name(*x))
                .collect();
            bail!(
                "--{flag} is an option of --method {}, not of --method {name} (its options: {})",
                owners.join(" / "),
                spec.names().join(", ")
            );
        };
        let opt = spec.key(f.key).context("flag without its option")?;
        let mut v = (opt.parse)(text);
        if f.invert {
            v = Value::Bool(
                !v.as_bool()
                    .with_context(|| format!("--{flag} {text}: expected true or false"))?,
            );
        }
        g.push(format!("--{flag}"), f.key, v);
    }
    for kv in o.set.iter().flatten() {
        let (k, text) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        let k = k.trim();
        let opt = spec.key(k).ok_or_else(|| {
            anyhow::anyhow!(
                "--set: {}",
                unknown(&format!("option of {name}"), k, &spec.names())
            )
        })?;
        g.push("--set", opt.key, (opt.parse)(text.trim()));
    }
    Ok(g)
}

/// The adapter config for method `m` (with `preset` options of a variant) on a model with
/// config `mc`, from the options the user gave.
pub fn adapter_config(
    o: &TrainOpts,
    m: &dyn AdapterMethod,
    preset: Vec<(String, Value)>,
    given: Given,
    shape: petal_core::adapter::InputShape,
    attention_heads: usize,
    tasks: &[String],
    special_tokens: &[u32],
) -> Result<AdapterConfig> {
    let mut cfg = AdapterConfig::new(m.peft_type())?;
    cfg.target_modules = match (&o.target_modules, m.default_targets()) {
        (Some(t), _) => Some(targets(t)),
        (None, d) => d.map(targets),
    };
    if let Some(k) = m.shared_key(SharedOption::Alpha).filter(|k| !given.has(k)) {
        cfg.set(k, 16.0)?; // petal's default alpha, 2 r for the default rank
    }
    let mut keys = Vec::new();
    for (from, key, v) in preset
        .into_iter()
        .map(|(k, v)| {
            (
                format!("--method {}", o.method.as_deref().unwrap_or("")),
                k,
                v,
            )
        })
        .chain(given.0)
    {
        cfg.set(&key, v).with_context(|| format!("{from}"))?;
        keys.push(key);
    }
    cfg.exclude_modules = o.exclude_modules.as_deref().map(targets);
    if let Some(l) = &o.layers_to_transform {
        let bad = || {
            anyhow!(
                "--layers-to-transform {l:?}: expected a comma list of layer indices in 0..={}",
                shape.layers.saturating_sub(1)
            )
        };
        let layers = l
            .split(',')
            .map(|s| s.trim().parse::<usize>().ok().filter(|&i| i < shape.layers))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
        cfg.layers_to_transform = Some(petal_core::config::Layers::Many(layers));
    }
    if let Some(t) = &o.trainable_tokens {
        let ids = t
            .split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .with_context(|| {
                format!("--trainable-tokens {t:?}: expected a comma list of token ids")
            })?;
        cfg.trainable_token_indices = Some(petal_core::config::TokenIndices::List(ids));
    }
    cfg.modules_to_save = o
        .modules_to_save
        .as_deref()
        .map(|s| s.split(',').map(|p| p.trim().to_string()).collect());
    let new = NewAdapter {
        shape,
        attention_heads,
        max_steps: o.max_steps.unwrap_or(100),
        given: keys,
        tasks: tasks.to_vec(),
        special_tokens: special_tokens.to_vec(),
    };
    m.prepare(&mut cfg, &new)?;
    cfg.validate(&format!("--method {} options", method_name(m)))?;
    for note in m.notes(&cfg) {
        eprintln!("note: {note}");
    }
    Ok(cfg)
}

/// `--merge-adapter`: each folder attached to `model`, then merged into its base weights and
/// unloaded, in the order given, before the trained adapter is made.
pub(crate) fn merge_adapters(o: &TrainOpts, model: &mut dyn petal_core::Adaptable) -> Result<()> {
    for (i, dir) in o.merge_adapter.iter().flatten().enumerate() {
        let what = || format!("--merge-adapter {}", dir.display());
        petal_io::attach_adapter(model, dir, &format!("merged-{i}")).with_context(what)?;
        petal_core::inject::merge_and_unload_all(model).with_context(what)?;
    }
    Ok(())
}

/// `--init-adapter DIR`: the injected adapter's weights replaced by DIR's (a federated round's
/// global adapter, a warm start), which must be of the same method and shapes.
pub(crate) fn init_adapter(
    o: &TrainOpts,
    model: &dyn petal_core::Adaptable,
    device: &candle_core::Device,
    acfg: &AdapterConfig,
) -> Result<()> {
    let Some(dir) = &o.init_adapter else {
        return Ok(());
    };
    if o.resume.is_some() {
        bail!("--init-adapter and --resume: give one (--resume restores its own adapter)");
    }
    let (cfg, tensors) = petal_io::load_adapter(dir, device)
        .with_context(|| format!("--init-adapter {}", dir.display()))?;
    if cfg.peft_type != acfg.peft_type {
        bail!(
            "--init-adapter {}: a {} adapter, but --method makes {}",
            dir.display(),
            cfg.peft_type,
            acfg.peft_type
        );
    }
    petal_io::load_into(model, "default", tensors, dir)
        .with_context(|| format!("--init-adapter {}", dir.display()))?;
    Ok(())
}
