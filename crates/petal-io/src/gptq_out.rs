//! Writing a model whose decoder linears are quantized to 4 bits (by `petal quantize`) as a
//! GPTQ folder in AutoGPTQ's layout (see [`crate::gptq`] for the tensors), which petal reads
//! back, and transformers (with a GPTQ backend), GPTQModel and vLLM load.

use crate::LoadedModel;
use candle_core::{Device, Tensor};
use petal_core::{Error, Result};
use petal_ops::quant::gptq::GptqWeight;
use std::collections::HashMap;
use std::path::Path;

/// The GPTQ tensors of one linear: `qweight` (in / 8, out), `qzeros` (groups, out / 8), both
/// int32, `scales` (groups, out) f16, `g_idx` (in) int32. Zero points are stored less one when
/// `less_one` (the `gptq` checkpoint format), as they are otherwise (`gptq_v2`).
pub fn pack(q: &GptqWeight, less_one: bool) -> Result<Vec<(&'static str, Tensor)>> {
    let (out, inp, groups) = (q.rows, q.cols, q.cols / q.group);
    if out % 8 != 0 || inp % 8 != 0 {
        return Err(Error::msg(format!(
            "a ({out}, {inp}) weight: GPTQ packs eight codes a word, so both sizes must be multiples of 8"
        )));
    }
    let cpu = &Device::Cpu;
    let mut qweight = vec![0u32; inp / 8 * out];
    for o in 0..out {
        for i in 0..inp {
            qweight[i / 8 * out + o] |= (q.codes[o * inp + i] as u32) << (4 * (i % 8));
        }
    }
    let mut qzeros = vec![0u32; groups * out / 8];
    for g in 0..groups {
        for o in 0..out {
            let z = q.zeros[o * groups + g] as u32 - less_one as u32;
            qzeros[g * out / 8 + o / 8] |= (z & 15) << (4 * (o % 8));
        }
    }
    let scales: Vec<half::f16> = (0..groups * out)
        .map(|k| half::f16::from_f32(q.scales[(k % out) * groups + k / out]))
        .collect();
    let as_i32 = |v: Vec<u32>| v.into_iter().map(|w| w as i32).collect::<Vec<i32>>();
    Ok(vec![
        (
            "qweight",
            Tensor::from_vec(as_i32(qweight), (inp / 8, out), cpu)?,
        ),
        (
            "qzeros",
            Tensor::from_vec(as_i32(qzeros), (groups, out / 8), cpu)?,
        ),
        ("scales", Tensor::from_vec(scales, (groups, out), cpu)?),
        (
            "g_idx",
            Tensor::from_vec(
                q.g_idx.iter().map(|&g| g as i32).collect::<Vec<_>>(),
                inp,
                cpu,
            )?,
        ),
    ])
}

/// Write `lm` as a GPTQ folder at `out` (whole or not at all): the linears in `quantized` (by
/// module path) packed, every other tensor as the model has it, config.json with the
/// `quantization_config`, and the tokenizer. `less_one`: the `gptq` (v1) checkpoint format,
/// possible when no zero point is 0; else `gptq_v2`.
pub fn write(
    out: &Path,
    lm: &LoadedModel,
    quantized: &HashMap<String, GptqWeight>,
    act_order: bool,
    less_one: bool,
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in lm.model.named_base_tensors()? {
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        if !quantized.contains_key(module) {
            tensors.insert(name, t);
        }
    }
    let mut group = 0;
    for (module, q) in quantized {
        group = q.group;
        for (part, t) in pack(q, less_one).map_err(|e| Error::msg(format!("{module}: {e}")))? {
            tensors.insert(format!("{module}.{part}"), t);
        }
    }
    let mut cfg = lm.model.cfg.to_hf_json("float32");
    cfg["quantization_config"] = serde_json::json!({
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group,
        "desc_act": act_order,
        "sym": false,
        "checkpoint_format": if less_one { "gptq" } else { "gptq_v2" },
        "true_sequential": false,
        "quantizer": ["petal"],
    });
    let cfg = serde_json::to_string_pretty(&cfg).map_err(|e| Error::msg(e.to_string()))?;
    crate::write_dir_atomic(out, |tmp| {
        crate::write_safetensors_atomic(&tmp.join("model.safetensors"), &tensors)?;
        crate::write_atomic(&tmp.join("config.json"), cfg.as_bytes())?;
        crate::mark_output(tmp, "quantize")?;
        lm.tokenizer
            .save(tmp)
            .map_err(|e| Error::msg(format!("{}: {e}", out.display())))
    })
}
