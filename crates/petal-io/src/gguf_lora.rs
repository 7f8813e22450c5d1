//! LoRA adapters in llama.cpp's GGUF layout: written by `petal export --format gguf-lora`, read
//! back as `--adapter file.gguf`. No written spec of the layout exists; llama.cpp's
//! `convert_lora_to_gguf.py` and its loader (`src/llama-adapter.cpp`) define it:
//! `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (f32), per adapted
//! tensor `<gguf name>.lora_a` = PEFT's A (r, in) and `.lora_b` = B (out, r) as they are (the
//! token embedding's A transposed), B's rows of q/k permuted as the base's are for the `llama`
//! architecture; llama.cpp scales each pair by alpha / r with r = B's columns.

use crate::gguf::{gguf_name, hf_name, meta_f64, meta_str, meta_u64, permute, unpermute};
use crate::gguf_out::{arch_of, encode, qk_heads, text, write_file, Meta};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use petal_core::config::Targets;
use petal_core::methods::lora::{LoraOptions, MovedBase};
use petal_core::{AdapterConfig, Error, Result};
use petal_models::LlamaConfig;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A LoRA adapter's tensor (module-relative PEFT key) -> its GGUF name and whether it is A.
fn lora_gguf_name(key: &str) -> Option<(String, bool)> {
    let (module, a) = [
        (".lora_A.weight", true),
        (".lora_B.weight", false),
        (".lora_embedding_A", true),
        (".lora_embedding_B", false),
    ]
    .iter()
    .find_map(|(suffix, a)| key.strip_suffix(suffix).map(|m| (m, *a)))?;
    let g = gguf_name(&format!("{module}.weight"))?;
    Some((format!("{g}.lora_{}", if a { "a" } else { "b" }), a))
}

/// The module path of a PEFT key (`model.layers.0.self_attn.q_proj.lora_A.weight` ->
/// `model.layers.0.self_attn.q_proj`).
fn module_of(key: &str) -> &str {
    key.split(".lora_").next().unwrap_or(key)
}

/// Write a LoRA adapter (its config and its tensors under module-relative PEFT keys) in
/// llama.cpp's LoRA GGUF layout for a base model of `cfg`. Each module's PEFT scale is kept:
/// llama.cpp scales by alpha / r with one alpha for the file, so where PEFT's scale differs
/// (rsLoRA, `alpha_pattern`) B is multiplied by the ratio. petal also writes the base's head
/// counts, which its reader needs to undo the q/k permutation. Returns the tensors written in
/// f16 instead of `ty` (rows not whole blocks of it: B's rows are r long).
pub fn write_lora(
    path: &Path,
    cfg: &LlamaConfig,
    adapter: &AdapterConfig,
    tensors: &HashMap<String, Tensor>,
    ty: GgmlDType,
) -> Result<Vec<String>> {
    let lora = match adapter.peft_type.as_str() {
        "LORA" => adapter.options::<LoraOptions>()?,
        other => {
            return Err(Error::Unsupported(format!(
                "{}: a {other} adapter has no llama.cpp form (LoRA has)",
                path.display()
            )))
        }
    };
    if lora.dora {
        return Err(Error::Unsupported(format!(
            "{}: a DoRA adapter has no llama.cpp form (its magnitudes have no place there)",
            path.display()
        )));
    }
    // llama.cpp adds B A to the file's own W; these adapters' B A is relative to another base
    if let Some(moved) = lora.moved_base() {
        let (base, plain) = match moved {
            MovedBase::Quantized => ("W's quantization (LoftQ)", ""),
            MovedBase::Residual => (
                "W less its initial part (PiSSA/OLoRA)",
                ", or train it with --save-as-lora true for a plain LoRA of rank 2r",
            ),
        };
        return Err(Error::Unsupported(format!(
            "{}: this adapter's B A applies to {base}, not to the model file's W that llama.cpp \
             adds it to: merge it (`petal merge --format gguf`){plain}",
            path.display()
        )));
    }
    let arch = arch_of(cfg);
    let alpha = lora.core.alpha;
    let mut out = Vec::new();
    let mut fell_back = Vec::new();
    for (key, t) in tensors.iter().collect::<BTreeMap<_, _>>() {
        let (g, is_a) = lora_gguf_name(key).ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: adapter tensor `{key}` has no llama.cpp LoRA form (DoRA magnitudes, biases \
                 and other modules have none)",
                path.display()
            ))
        })?;
        let module = g.trim_end_matches(".lora_a").trim_end_matches(".lora_b");
        let t = match (is_a, g.starts_with("token_embd")) {
            (true, true) => t.t()?.contiguous()?, // llama.cpp looks rows of A up by token
            (true, false) => t.clone(),
            (false, _) => {
                let r = t.dim(1)? as f64;
                let peft = lora.scaling_for(module_of(key));
                let b = (t.to_dtype(DType::F32)? * (peft / (alpha / r)))?;
                match (arch, qk_heads(module, cfg)) {
                    ("llama", Some(h)) => permute(&b, h)?,
                    _ => b,
                }
            }
        };
        out.push((g.clone(), encode(&g, &t, ty, &mut fell_back)?));
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let md = vec![
        ("general.architecture".to_string(), text(arch)),
        ("general.type".into(), text("adapter")),
        ("adapter.type".into(), text("lora")),
        ("general.name".into(), text(&name)),
        ("adapter.lora.alpha".into(), Meta::F32(alpha as f32)),
        ("general.quantization_version".into(), Meta::U32(2)),
        (
            format!("{arch}.attention.head_count"),
            Meta::U32(cfg.num_attention_heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Meta::U32(cfg.num_key_value_heads as u32),
        ),
    ];
    write_file(path, &md, &out)?;
    Ok(fell_back)
}

/// Read a LoRA adapter in llama.cpp's GGUF layout: a LoRA config (alpha from the file, the rank
/// most modules have, `rank_pattern` for the others, the modules found as targets) and its
/// tensors under module-relative PEFT keys, q/k rows of B un-permuted for the `llama`
/// architecture (by the head counts petal writes beside them).
pub fn read_lora(path: &Path, device: &Device) -> Result<(AdapterConfig, HashMap<String, Tensor>)> {
    let at = |e: String| Error::msg(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let c =
        gguf_file::Content::read(&mut f).map_err(|e| at(format!("not a valid GGUF file: {e}")))?;
    let md = &c.metadata;
    if meta_str(md, "general.type") != Some("adapter")
        || meta_str(md, "adapter.type") != Some("lora")
    {
        return Err(at(
            "not a LoRA adapter (general.type must be `adapter`, adapter.type `lora`)".into(),
        ));
    }
    let arch = meta_str(md, "general.architecture")
        .unwrap_or("llama")
        .to_string();
    let alpha = meta_f64(md, "adapter.lora.alpha").unwrap_or(0.0);
    let heads = |k: &str| meta_u64(md, &format!("{arch}.attention.{k}")).map(|h| h as usize);
    let mut tensors = HashMap::new();
    let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    for name in c.tensor_infos.keys() {
        let (base, is_a) = match (name.strip_suffix(".lora_a"), name.strip_suffix(".lora_b")) {
            (Some(b), _) => (b, true),
            (_, Some(b)) => (b, false),
            _ => continue,
        };
        let module = hf_name(base)
            .and_then(|h| h.strip_suffix(".weight").map(String::from))
            .ok_or_else(|| {
                at(format!(
                    "tensor `{name}`: no module of petal's models is `{base}`"
                ))
            })?;
        let named = |e: String| at(format!("tensor `{name}`: {e}"));
        crate::gguf::check_extent(&c.tensor_infos[name], c.tensor_data_offset, file_len)
            .map_err(|e| named(e.to_string()))?;
        let t = c
            .tensor(&mut f, name, device)
            .map_err(|e| named(e.to_string()))?;
        let mut t = t.dequantize(device)?.to_dtype(DType::F32)?;
        let embed = base.starts_with("token_embd");
        if is_a && embed {
            t = t.t()?.contiguous()?;
        }
        if !is_a {
            ranks.insert(module.clone(), t.dim(1).map_err(|e| named(e.to_string()))?);
            let h = match base {
                b if b.contains(".attn_q.") => heads("head_count"),
                b if b.contains(".attn_k.") => heads("head_count_kv").or(heads("head_count")),
                _ => None,
            };
            if arch == "llama" && (base.contains(".attn_q.") || base.contains(".attn_k.")) {
                let h = h.ok_or_else(|| {
                    at(format!(
                        "tensor `{name}`: q/k rows are permuted and the file gives no head count"
                    ))
                })?;
                t = unpermute(&t, h).map_err(|e| named(e.to_string()))?;
            }
        }
        let key = match (embed, is_a) {
            (true, true) => format!("{module}.lora_embedding_A"),
            (true, false) => format!("{module}.lora_embedding_B"),
            (false, true) => format!("{module}.lora_A.weight"),
            (false, false) => format!("{module}.lora_B.weight"),
        };
        tensors.insert(key, t);
    }
    let r =
        most_common(ranks.values().copied()).ok_or_else(|| at("holds no LoRA tensors".into()))?;
    if alpha <= 0.0 {
        // no alpha: llama.cpp scales every pair by 1; as alpha = r, B of rank k times k / r
        for (module, k) in &ranks {
            for key in [
                format!("{module}.lora_B.weight"),
                format!("{module}.lora_embedding_B"),
            ] {
                if let Some(b) = tensors.get_mut(&key) {
                    *b = (&*b * (*k as f64 / r as f64))?;
                }
            }
        }
    }
    let modules: Vec<String> = ranks.keys().cloned().collect();
    let mut cfg = AdapterConfig::lora(
        r,
        if alpha > 0.0 { alpha } else { r as f64 },
        Targets::List(modules),
    );
    let pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, k)| **k != r)
        .map(|(m, k)| (m.clone(), (*k).into()))
        .collect();
    if !pattern.is_empty() {
        cfg.options.insert("rank_pattern".into(), pattern.into());
    }
    Ok((cfg, tensors))
}

fn most_common(xs: impl Iterator<Item = usize>) -> Option<usize> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for x in xs {
        *counts.entry(x).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(k, n)| (*n, *k))
        .map(|(k, _)| k)
}
