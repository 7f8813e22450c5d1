//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`, keys
//! `base_model.model.<module path>.<tensor>` with the adapter name stripped.

use crate::{write_atomic, write_safetensors_atomic};
use candle_core::{Device, Tensor};
use petal_core::{
    inject_adapter_within, Adaptable, AdapterConfig, Error, InjectionReport, MemoryLimit, Result,
};
use std::collections::HashMap;
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const KEY_PREFIX: &str = "base_model.model.";
/// Tensors saved at the top level, without `base_model.model.`: PEFT's prompt learning, and
/// petal's input-side methods alike (PASTA, E2VPT-style prompts).
const TOP_LEVEL: &[&str] = &[
    "prompt_embeddings",
    petal_core::methods::pasta::TENSOR,
    petal_core::methods::kv_prompt::KV,
];

/// Model-level shared tensors (VeRA's projections) keep their `base_model.` key.
use petal_core::walk::SHARED_PREFIX;

fn disk_key(k: &str) -> String {
    if TOP_LEVEL.contains(&k) || k.starts_with(SHARED_PREFIX) {
        k.to_string()
    } else {
        format!("{KEY_PREFIX}{k}")
    }
}

/// Write an adapter folder. `tensors` maps module-relative names
/// ("model.layers.0.self_attn.q_proj.lora_A.weight") to tensors.
pub fn save_adapter(
    dir: &Path,
    cfg: &AdapterConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    crate::atomic::write_dir_atomic(dir, |tmp| write_adapter_files(tmp, cfg, tensors))
}

/// The files of an adapter folder, written into `dir` (which `save_adapter` builds whole).
pub fn write_adapter_files(
    dir: &Path,
    cfg: &AdapterConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let keyed: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (disk_key(k), t.clone()))
        .collect();
    write_safetensors_atomic(&dir.join(ADAPTER_WEIGHTS), &keyed)?;
    write_atomic(&dir.join(ADAPTER_CONFIG), cfg.to_json()?.as_bytes())
}

/// Read an adapter folder (or a LoRA in llama.cpp's GGUF layout, `*.gguf`): its config and
/// tensors keyed by module-relative names.
/// The most bytes an `adapter_config.json` may hold: a config is a few KB (a large
/// `rank_pattern` some hundreds); a bigger file is not one, and is not read whole.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The text of a config file, read only where it is a regular file (a FIFO would block the
/// reader) of at most [`MAX_CONFIG_BYTES`].
pub fn read_config_text(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::msg(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(Error::msg(format!(
            "{}: {} bytes, more than a config holds (at most {MAX_CONFIG_BYTES})",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

pub fn load_adapter(
    dir: &Path,
    device: &Device,
) -> Result<(AdapterConfig, HashMap<String, Tensor>)> {
    if is_gguf(dir) {
        return crate::gguf_out::read_lora(dir, device);
    }
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = read_config_text(&cfg_path)?;
    let cfg = AdapterConfig::from_json(&text, &cfg_path.display().to_string())?;
    let w_path = dir.join(ADAPTER_WEIGHTS);
    if !w_path.exists() {
        return Err(Error::msg(format!("{}: file not found", w_path.display())));
    }
    let raw = candle_core::safetensors::load(&w_path, device).map_err(|e| {
        Error::msg(format!(
            "{}: not a valid safetensors file: {e}",
            w_path.display()
        ))
    })?;
    let mut out = HashMap::new();
    for (k, t) in raw {
        let key = k.strip_prefix(KEY_PREFIX).unwrap_or(&k).to_string();
        out.insert(key, t);
    }
    Ok((cfg, out))
}

/// An adapter given as a file in llama.cpp's LoRA GGUF layout rather than a PEFT folder.
fn is_gguf(p: &Path) -> bool {
    p.is_file() && p.extension().is_some_and(|e| e == "gguf")
}

/// Tensors of adapter `name` under module-relative PEFT names.
pub fn adapter_tensors(model: &dyn Adaptable, name: &str) -> HashMap<String, Tensor> {
    petal_core::walk::adapter_tensors(model, name)
        .into_iter()
        .map(|t| (t.key, t.var.as_tensor().clone()))
        .collect()
}

/// Adapter `name` of `model` in its saved form, as PEFT's `save_pretrained` writes it: the
/// config marked `inference_mode`, and an input adapter's exported form where it has one
/// (P-tuning's encoder output). Checkpoints keep the trained tensors instead (`adapter_tensors`).
pub fn exported_adapter(
    model: &dyn Adaptable,
    name: &str,
    cfg: &AdapterConfig,
) -> Result<(AdapterConfig, HashMap<String, Tensor>)> {
    let mut tensors = adapter_tensors(model, name);
    if let Some((_, input)) = model.input_adapter().filter(|(n, _)| *n == name) {
        if let Some(export) = input.export()? {
            for t in input.tensors() {
                tensors.remove(t.name);
            }
            tensors.extend(export.into_iter().map(|(k, t)| (k.to_string(), t)));
        }
    }
    let mut cfg = cfg.clone();
    cfg.inference_mode = true;
    Ok((cfg, tensors))
}

/// Save adapter `name` of `model` as a PEFT folder (see `exported_adapter`).
pub fn save_model_adapter(
    model: &dyn Adaptable,
    name: &str,
    cfg: &AdapterConfig,
    dir: &Path,
) -> Result<()> {
    let (cfg, tensors) = exported_adapter(model, name, cfg)?;
    save_adapter(dir, &cfg, &tensors)
}

/// Load a PEFT adapter folder into `model` as adapter `name` (made active). Every tensor in the
/// file must land on a module, with the shape the module expects, and hold finite values.
pub fn attach_adapter(
    model: &mut dyn Adaptable,
    dir: &Path,
    name: &str,
) -> Result<(AdapterConfig, InjectionReport)> {
    let (cfg, report, _) = attach_adapter_with(model, dir, name, &AttachOptions::default())?;
    Ok((cfg, report))
}

/// How `attach_adapter_with` treats an untrusted folder.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttachOptions {
    /// Tensors holding NaN or infinite values load too, their keys returned (for a warning),
    /// instead of the folder being refused.
    pub allow_nonfinite: bool,
    /// The most memory the adapter may take (its config is checked before any allocation).
    pub limit: MemoryLimit,
}

/// `attach_adapter` under `opts`; returns the keys of non-finite tensors it let through.
pub fn attach_adapter_with(
    model: &mut dyn Adaptable,
    dir: &Path,
    name: &str,
    opts: &AttachOptions,
) -> Result<(AdapterConfig, InjectionReport, Vec<String>)> {
    let allow_nonfinite = opts.allow_nonfinite;
    let device = model
        .linears()
        .first()
        .map(|l| l.weight().device().clone())
        .unwrap_or(Device::Cpu);
    let (cfg, tensors) = load_adapter(dir, &device)?;
    let report = inject_adapter_within(model, name, &cfg, 0, &opts.limit)?;
    let file = match is_gguf(dir) {
        true => dir.to_path_buf(),
        false => dir.join(ADAPTER_WEIGHTS),
    };
    let nonfinite = load_into_checked(model, name, tensors, &file, allow_nonfinite)?;
    Ok((cfg, report, nonfinite))
}

/// Set adapter `name`'s tensors from `tensors` (module-relative keys, as `load_adapter` and
/// `adapter_tensors` give them). Every tensor the adapter owns must be there with its shape and
/// finite values, and every tensor given must land somewhere; `file` names the source in errors.
pub fn load_into(
    model: &dyn Adaptable,
    name: &str,
    tensors: HashMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    load_into_checked(model, name, tensors, file, false).map(drop)
}

/// `load_into`; with `allow_nonfinite`, non-finite tensors load and their keys are returned.
fn load_into_checked(
    model: &dyn Adaptable,
    name: &str,
    mut tensors: HashMap<String, Tensor>,
    file: &Path,
    allow_nonfinite: bool,
) -> Result<Vec<String>> {
    let mut nonfinite = Vec::new();
    let mut take = |key: String, var: &candle_core::Var| -> Result<()> {
        let src = tensors.remove(&key).ok_or_else(|| {
            Error::msg(format!(
                "{}: tensor `{}` is missing (the config targets this module)",
                file.display(),
                disk_key(&key)
            ))
        })?;
        let want = var.as_tensor().dims();
        if src.dims() != want {
            return Err(Error::msg(format!(
                "{}: tensor `{}` has shape {:?} but the model expects {want:?}",
                file.display(),
                disk_key(&key),
                src.dims()
            )));
        }
        let want_dt = var.as_tensor().dtype();
        if src.dtype().is_float() != want_dt.is_float() {
            return Err(Error::msg(format!(
                "{}: tensor `{}` is {:?}, but it holds {} values ({want_dt:?})",
                file.display(),
                disk_key(&key),
                src.dtype(),
                if want_dt.is_float() {
                    "floating-point"
                } else {
                    "integer"
                }
            )));
        }
        if !is_finite(&src)? {
            if !allow_nonfinite {
                return Err(Error::msg(format!(
                    "{}: tensor `{}` holds NaN or infinite values (--allow-nonfinite loads it \
                     anyway)",
                    file.display(),
                    disk_key(&key)
                )));
            }
            nonfinite.push(disk_key(&key));
        }
        Ok(var.set(&src.to_dtype(var.as_tensor().dtype())?)?)
    };
    for t in petal_core::walk::adapter_tensors(model, name) {
        take(t.key, t.var)?;
    }
    for lin in model.linears() {
        if let Some(layer) = lin.layer(name) {
            layer.check_loaded().map_err(|e| {
                Error::msg(format!("{}: module `{}`: {e}", file.display(), lin.path()))
            })?;
        }
    }
    // PEFT saves a targeted embedding's base table too (`save_embedding_layers="auto"`): it must
    // be the table this model has (a resized vocabulary would need it loaded, which petal
    // does not do)
    for lin in model.linears().into_iter().filter(|l| l.is_embedding()) {
        let key = format!("{}.base_layer.weight", lin.path());
        if let Some(t) = tensors.remove(&key) {
            // compared in the model's precision: a bf16 model holds the table rounded (a
            // quantized one, as its blocks decode)
            let w = lin.dense_weight()?;
            let same = t.dims() == w.dims()
                && (t.to_dtype(w.dtype())?.to_dtype(candle_core::DType::F32)?
                    - w.to_dtype(candle_core::DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                    <= 1e-5;
            if !same {
                return Err(Error::msg(format!(
                    "{}: `{}` differs from this model's embedding table (resized vocabulary?)",
                    file.display(),
                    disk_key(&key)
                )));
            }
        }
    }
    if let Some(k) = tensors.keys().min() {
        return Err(Error::msg(format!(
            "{}: tensor `{}` matches no adapted module of the model ({} unused tensors)",
            file.display(),
            disk_key(k),
            tensors.len()
        )));
    }
    Ok(nonfinite)
}

/// Whether every value of `t` is finite (bf16 and f16 through f32).
fn is_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    let v = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(v.iter().all(|x| x.is_finite()))
}
