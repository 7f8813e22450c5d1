//! Adapters loaded and unloaded while the server runs (`petal serve --adapter-dir DIR`), with
//! vLLM's endpoints and bodies: `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and
//! `POST /v1/unload_lora_adapter {"lora_name"}`; a request naming an adapter that is not
//! loaded but is a sub-folder of DIR loads it first. `lora_path` is resolved inside DIR only
//! (relative to it; `..` or a symlink leading out is refused). Caps: the number of adapters
//! loaded at once (the least recently used one not in use is unloaded to make room; those
//! given with `--adapter` at start are pinned, never unloaded), their rank and their size on
//! disk. The engine does this between decoding steps, so no sequence sees an adapter change.

use crate::response::Key;
use crate::server::{bad, Failure, Served};
use crate::Decoder;
use petal_core::mixed::{rows_ctx, BASE};
use petal_core::Adaptable;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where adapters may be loaded from at run time, and the caps on them.
#[derive(Debug, Clone)]
pub struct AdapterDir {
    pub dir: PathBuf,
    /// The most adapters loaded at once, pinned ones included
    pub max_loras: usize,
    /// The highest rank (`r`) an adapter may have
    pub max_rank: usize,
    /// The most bytes an adapter's weights file may hold
    pub max_bytes: u64,
}

/// The engine's record of run-time adapters: when each was last asked for.
#[derive(Default)]
pub(crate) struct Lifecycle {
    /// loaded at run time (not pinned): the tick of its last use
    last_used: HashMap<String, u64>,
    tick: u64,
}

impl Lifecycle {
    /// Notes a use of `adapter` (for least-recently-used eviction).
    pub fn used(&mut self, adapter: &str) {
        self.tick += 1;
        if let Some(t) = self.last_used.get_mut(adapter) {
            *t = self.tick;
        }
    }

    /// Notes `adapter` loaded at run time (and so not pinned), as just used.
    fn loaded(&mut self, adapter: &str) {
        self.last_used.insert(adapter.to_string(), 0);
        self.used(adapter);
    }
}

/// A name adapters may take: a folder name, not a path.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl Served<'_> {
    /// `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (`load`: which one).
    pub(crate) fn lifecycle(
        &mut self,
        load: bool,
        body: &Value,
        life: &mut Lifecycle,
        dec: &mut Decoder<Key>,
    ) -> Result<Value, Failure> {
        let field = |k: &str| {
            body.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("`{k}` (a string) is required")))
        };
        let name = field("lora_name")?;
        if load {
            let path = field("lora_path")?;
            self.load(&name, &path, life, dec)?;
            Ok(json!({"object": "lora_adapter", "id": name, "status": "loaded"}))
        } else {
            self.unload(&name, life, dec)?;
            Ok(json!({"object": "lora_adapter", "id": name, "status": "unloaded"}))
        }
    }

    /// Loads the adapter a request's `model` names if it is not loaded but is a sub-folder of
    /// the adapter folder (its name being the folder's).
    pub(crate) fn load_on_use(
        &mut self,
        req: &Value,
        life: &mut Lifecycle,
        dec: &mut Decoder<Key>,
    ) -> Result<(), Failure> {
        let Some(name) = req.get("model").and_then(Value::as_str) else {
            return Ok(());
        };
        let Some(d) = &self.adapter_dir else {
            return Ok(());
        };
        if name == self.model_id || name == BASE || !valid_name(name) {
            return Ok(());
        }
        if !self.adapters().iter().any(|a| a == name) && d.dir.join(name).is_dir() {
            self.load(name, name, life, dec)?;
        }
        Ok(())
    }

    fn load(
        &mut self,
        name: &str,
        path: &str,
        life: &mut Lifecycle,
        dec: &mut Decoder<Key>,
    ) -> Result<(), Failure> {
        let d = self.adapter_dir.clone().ok_or_else(not_enabled)?;
        if !valid_name(name) || name == self.model_id || name == BASE {
            return Err(bad(format!(
                "`lora_name` `{name}`: letters, digits, `.`, `_` and `-` only, and not the base \
                 model's name"
            )));
        }
        if self.adapters().iter().any(|a| a == name) {
            return Err(bad(format!("adapter `{name}` is loaded already")));
        }
        let folder = inside(&d.dir, path)?;
        check_config(&folder, path, &d)?;
        let loaded = self.adapters();
        if loaded.len() >= d.max_loras {
            // room: the least recently used run-time adapter no sequence is using
            let victim = life
                .last_used
                .iter()
                .filter(|(n, _)| !dec.uses(n))
                .min_by_key(|(_, t)| **t)
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else {
                return Err(Failure(
                    503,
                    "server_error",
                    format!(
                        "{} adapters are loaded (petal serve --max-loras) and each is pinned or \
                         in use: retry later",
                        loaded.len()
                    ),
                ));
            };
            self.unload(&victim, life, dec)?;
            tracing::info!(adapter = %victim, "adapter unloaded to make room (least recently used)");
        }
        let attached = petal_io::attach_adapter(&mut *self.model, &folder, name)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                rows_ctx(&*self.model, &[name])
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = attached {
            detach(&mut *self.model, name);
            // the client's own path for the folder, never the server's layout
            let e = e.replace(&folder.display().to_string(), path);
            return Err(bad(format!("adapter `{name}` ({path}): {e}")));
        }
        life.loaded(name);
        tracing::info!(adapter = %name, path = %folder.display(), "adapter loaded");
        Ok(())
    }

    fn unload(
        &mut self,
        name: &str,
        life: &mut Lifecycle,
        dec: &mut Decoder<Key>,
    ) -> Result<(), Failure> {
        if self.adapter_dir.is_none() {
            return Err(not_enabled());
        }
        if !self.adapters().iter().any(|a| a == name) {
            return Err(Failure(
                404,
                "not_found_error",
                format!("adapter `{name}` is not loaded"),
            ));
        }
        if !life.last_used.contains_key(name) {
            return Err(bad(format!(
                "adapter `{name}` was given with --adapter at start: pinned, it stays loaded"
            )));
        }
        if dec.uses(name) {
            return Err(Failure(
                409,
                "conflict_error",
                format!("adapter `{name}` is in use by running completions: retry when they end"),
            ));
        }
        detach(&mut *self.model, name);
        dec.forget(name);
        life.last_used.remove(name);
        tracing::info!(adapter = %name, "adapter unloaded");
        Ok(())
    }
}

fn not_enabled() -> Failure {
    Failure(
        404,
        "not_found_error",
        "adapters are loaded at run time only with petal serve --adapter-dir".into(),
    )
}

/// `path` (relative to `dir`, or absolute) as a folder inside `dir`, links resolved.
fn inside(dir: &Path, path: &str) -> Result<PathBuf, Failure> {
    let out = || {
        bad(format!(
            "`lora_path` `{path}` is not a folder inside the adapter folder (petal serve \
             --adapter-dir)"
        ))
    };
    let root = dir.canonicalize().map_err(|_| out())?;
    let p = root.join(path).canonicalize().map_err(|_| out())?;
    if p == root || !p.starts_with(&root) || !p.is_dir() {
        return Err(out());
    }
    Ok(p)
}

/// Before loading: the method acts per row (on linear layers; not prompts or norms, which act
/// on every row of a batch), and the rank and size caps, from the adapter's config and weights
/// file. Errors name the file as the client gave it (`path`), not the server's layout.
fn check_config(folder: &Path, path: &str, d: &AdapterDir) -> Result<(), Failure> {
    let cfg = folder.join("adapter_config.json");
    let shown = format!("{path}/adapter_config.json");
    let text = petal_io::adapter::read_config_text(&cfg).map_err(|e| {
        // the error names the server's path: the client's instead
        let why = e.to_string();
        let why = why
            .rsplit_once(": ")
            .map_or(why.as_str(), |(_, w)| w)
            .to_string();
        bad(format!("{shown}: {why}"))
    })?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("{shown}: not JSON: {e}")))?;
    let kind = v
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_uppercase();
    let input_side = [
        "PROMPT_TUNING",
        "P_TUNING",
        "PREFIX_TUNING",
        "MULTITASK_PROMPT_TUNING",
        "KV_PROMPT",
        "PASTA",
    ];
    let norms = petal_core::registry::method(&kind).is_some_and(|m| m.tunes_norms().is_some())
        || v.get("norms") == Some(&Value::Bool(true));
    if input_side.contains(&kind.as_str()) || norms {
        return Err(bad(format!(
            "{shown}: a {kind} adapter acts on every row of a batch (prompts or norms), so it \
             cannot be chosen per request"
        )));
    }
    if let Some(r) = v.get("r").and_then(Value::as_u64) {
        if r as usize > d.max_rank {
            return Err(bad(format!(
                "{shown}: rank {r} is above this server's limit of {} (petal serve \
                 --max-lora-rank)",
                d.max_rank
            )));
        }
    }
    let weights = folder.join("adapter_model.safetensors");
    let meta = std::fs::metadata(&weights)
        .map_err(|e| bad(format!("{path}/adapter_model.safetensors: {e}")))?;
    if !meta.is_file() {
        return Err(bad(format!(
            "{path}/adapter_model.safetensors: not a regular file"
        )));
    }
    let bytes = meta.len();
    if bytes > d.max_bytes {
        return Err(bad(format!(
            "{path}/adapter_model.safetensors: {bytes} bytes, above this server's limit of {} \
             (petal serve --max-lora-bytes)",
            d.max_bytes
        )));
    }
    Ok(())
}

/// Adapter `name` off every module.
fn detach(model: &mut dyn Adaptable, name: &str) {
    for l in model.linears_mut() {
        let _ = l.delete_adapter(name);
    }
}
