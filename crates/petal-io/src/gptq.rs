//! Hugging Face folders of GPTQ checkpoints (AutoGPTQ / GPTQModel, `quant_method: "gptq"`,
//! 4 bits, groups of 32, 64 or 128, no act-order): each quantized linear `X` is stored as
//! `X.qweight` (int32 `(in / 8, out)`: eight 4-bit codes per word along the input, the code of
//! input i in bits `4 (i % 8)`), `X.qzeros` (int32 `(groups, out / 8)`: the zero points packed
//! along the output, stored less one in the `gptq` (v1) checkpoint format, as they are in
//! `gptq_v2`), `X.scales` (f16 `(groups, out)`) and `X.g_idx`. A weight is
//! `scale (q - zero)`; petal reads it into its grouped int4 rows (`petal_ops::quant::INT4`),
//! which decode to the same values, and the ModuLoRA path trains over them.

use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use petal_core::{Error, Result};
use petal_models::weights::WeightSource;
use petal_ops::quant::{QFormat, Quantizer, INT4, INT4_G32, INT4_G64};
use std::collections::{HashMap, HashSet};
use std::path::Path;

const PARTS: [&str; 4] = [".qweight", ".qzeros", ".scales", ".g_idx"];

/// A GPTQ folder's settings: the group size and whether zeros are stored less one (v1).
#[derive(Debug, Clone, Copy)]
pub struct GptqConfig {
    pub group: usize,
    pub zeros_less_one: bool,
}

/// The `quantization_config` of a folder's config.json when it is GPTQ's: `Ok(None)` when the
/// method is another, an error naming the key for what petal does not read (other bit widths,
/// act-order, per-channel or other group sizes).
pub fn gptq_config(config: &serde_json::Value, at: &Path) -> Result<Option<GptqConfig>> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    if q.get("quant_method").and_then(|m| m.as_str()) != Some("gptq") {
        return Ok(None);
    }
    let at = at.display().to_string();
    let key = |k: &str| format!("quantization_config.{k}");
    let bits = q.get("bits").and_then(|v| v.as_u64()).unwrap_or(0);
    if bits != 4 {
        return Err(Error::config(
            at,
            key("bits"),
            format!("{bits}: petal reads 4-bit GPTQ"),
        ));
    }
    if q.get("desc_act").and_then(|v| v.as_bool()).unwrap_or(false) {
        return Err(Error::config(
            at,
            key("desc_act"),
            "true: act-order checkpoints (groups reordered by g_idx) are not read yet",
        ));
    }
    let group = q.get("group_size").and_then(|v| v.as_i64()).unwrap_or(-1);
    if ![32, 64, 128].contains(&group) {
        return Err(Error::config(
            at,
            key("group_size"),
            format!("{group}: petal reads 32, 64, 128"),
        ));
    }
    let format = q
        .get("checkpoint_format")
        .and_then(|v| v.as_str())
        .unwrap_or("gptq");
    if !["gptq", "gptq_v2"].contains(&format) {
        return Err(Error::config(
            at,
            key("checkpoint_format"),
            format!("`{format}` (gptq, gptq_v2)"),
        ));
    }
    Ok(Some(GptqConfig {
        group: group as usize,
        zeros_less_one: format == "gptq",
    }))
}

fn int4_for(group: usize) -> &'static dyn Quantizer {
    match group {
        32 => &INT4_G32,
        64 => &INT4_G64,
        _ => &INT4,
    }
}

/// A GPTQ folder's weights: its quantized linears as int4 rows, the rest dense.
pub fn read(dir: &Path, cfg: GptqConfig) -> Result<Weights> {
    let file = Weights::from_hf_folder(dir)?;
    let names = file.names();
    let cpu = Device::Cpu;
    let raw = |name: &str, dt: DType| file.get(name, None, dt, &cpu);
    let mut blocks = HashMap::new();
    let mut modules = HashSet::new();
    for name in names.iter().filter(|n| n.ends_with(".qweight")) {
        let m = &name[..name.len() - ".qweight".len()];
        let at = |e: String| Error::msg(format!("{}: tensor `{m}`: {e}", dir.display()));
        let qweight = raw(name, DType::I32)?.to_vec2::<i32>()?;
        let qzeros = raw(&format!("{m}.qzeros"), DType::I32)?.to_vec2::<i32>()?;
        let scales = raw(&format!("{m}.scales"), DType::F32)?.to_vec2::<f32>()?;
        let (inp, out) = (qweight.len() * 8, qweight.first().map_or(0, Vec::len));
        let groups = inp / cfg.group;
        if inp % cfg.group != 0 || scales.len() != groups || qzeros.len() != groups {
            return Err(at(format!(
                "{inp} inputs in groups of {} need {groups} rows of scales and zeros, not {} and {}",
                cfg.group,
                scales.len(),
                qzeros.len()
            )));
        }
        if scales.iter().any(|r| r.len() != out) || qzeros.iter().any(|r| r.len() * 8 != out) {
            return Err(at(format!(
                "scales or zeros do not cover its {out} outputs"
            )));
        }
        let g_idx = format!("{m}.g_idx");
        if names.contains(&g_idx) {
            let g = raw(&g_idx, DType::I64)?.to_vec1::<i64>()?;
            if g.iter()
                .enumerate()
                .any(|(i, &x)| x as usize != i / cfg.group)
            {
                return Err(at(
                    "g_idx reorders the groups (act-order): not read yet".into()
                ));
            }
        }
        let q = int4_for(cfg.group);
        let fmt = QFormat::of(q, inp).map_err(at)?;
        let mut rows = Vec::with_capacity(out * fmt.row_bytes());
        let code = |i: usize, o: usize| ((qweight[i / 8][o] >> (4 * (i % 8))) & 15) as u8;
        for o in 0..out {
            rows.extend((0..inp / 2).map(|j| code(2 * j, o) | (code(2 * j + 1, o) << 4)));
            for g in 0..groups {
                let zero = ((qzeros[g][o / 8] >> (4 * (o % 8))) & 15) + cfg.zeros_less_one as i32;
                rows.extend(half::f16::from_f32(scales[g][o]).to_le_bytes());
                rows.push(zero as u8);
            }
        }
        let t = Tensor::from_vec(rows, (out, fmt.row_bytes()), &cpu)?;
        blocks.insert(format!("{m}.weight"), (t, fmt));
        modules.insert(m.to_string());
    }
    let dense = crate::weights::dense_rest(&file, &modules, &PARTS)?;
    Ok(Weights::Quantized { dense, blocks })
}
