//! Hugging Face folders of 4-bit GPTQ and AWQ checkpoints, read into petal's grouped int4 rows
//! (`petal_ops::quant::INT4`), which decode to the same values; the ModuLoRA path trains over
//! them and `--dtype f32` dequantizes them.
//!
//! **GPTQ** (AutoGPTQ / GPTQModel, `quant_method: "gptq"`, groups of 32, 64 or 128): each
//! quantized linear `X` is stored as `X.qweight` (int32 `(in / 8, out)`: eight 4-bit codes per
//! word along the input, the code of input i in bits `4 (i % 8)`), `X.qzeros` (int32 `(groups,
//! out / 8)`: the zero points packed along the output, stored less one in the `gptq` (v1)
//! checkpoint format, as they are in `gptq_v2`), `X.scales` (f16 `(groups, out)`) and `X.g_idx`
//! (the group of each input). Without act-order input i is in group `i / group`; with it
//! (`desc_act`) the groups gather the inputs in order of decreasing Hessian diagonal, and the
//! rows keep that order ([`Int4Ordered`]). A weight is `scale (q - zero)`.
//!
//! **AWQ** (AutoAWQ's GEMM layout, `quant_method: "awq"`, `version: "gemm"`, zero points):
//! `X.qweight` (int32 `(in, out / 8)`: eight codes per word along the output, interleaved: the
//! code of output `8 c + k` in nibble `[0, 4, 1, 5, 2, 6, 3, 7][k]` of word c), `X.qzeros`
//! (int32 `(groups, out / 8)`, packed the same way, not less one) and `X.scales` (f16 `(groups,
//! out)`); input i is in group `i / group`. A weight is `scale (q - zero)` as for GPTQ.

use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use petal_core::{Error, Result};
use petal_models::weights::WeightSource;
use petal_ops::quant::{Int4Ordered, QFormat, Quantizer, INT4, INT4_G32, INT4_G64};
use std::collections::{HashMap, HashSet};
use std::path::Path;

const PARTS: [&str; 4] = [".qweight", ".qzeros", ".scales", ".g_idx"];

/// The nibble of a packed AWQ word holding output `8 c + k` is `AWQ_NIBBLE[k]`.
const AWQ_NIBBLE: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// A 4-bit value of a packed tensor by (row, column) of its unpacked form.
type Nibble<'a> = Box<dyn Fn(usize, usize) -> u8 + 'a>;

/// How a folder packs its int4 linears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// GPTQ's; `zeros_less_one` in the v1 (`gptq`) checkpoint format.
    Gptq { zeros_less_one: bool },
    /// AutoAWQ's GEMM layout.
    Awq,
}

/// A GPTQ or AWQ folder's settings: its packing and group size.
#[derive(Debug, Clone, Copy)]
pub struct GptqConfig {
    pub group: usize,
    pub packing: Packing,
}

impl GptqConfig {
    /// What the folder holds, for messages (`GPTQ int4`, `AWQ int4`).
    pub fn held(&self) -> &'static str {
        match self.packing {
            Packing::Gptq { .. } => "GPTQ int4",
            Packing::Awq => "AWQ int4",
        }
    }
}

/// The `quantization_config` of a folder's config.json when it is GPTQ's or AWQ's: `Ok(None)`
/// when the method is another, an error naming the key for what petal does not read (other bit
/// widths, per-channel or other group sizes, other layouts).
pub fn gptq_config(config: &serde_json::Value, at: &Path) -> Result<Option<GptqConfig>> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if method != "gptq" && method != "awq" {
        return Ok(None);
    }
    let at = at.display().to_string();
    let key = |k: &str| format!("quantization_config.{k}");
    let bits = q.get("bits").and_then(|v| v.as_u64()).unwrap_or(0);
    if bits != 4 {
        return Err(Error::config(
            at,
            key("bits"),
            format!("{bits}: petal reads 4-bit {}", method.to_uppercase()),
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
    let group = group as usize;
    if method == "awq" {
        let version = q.get("version").and_then(|v| v.as_str()).unwrap_or("gemm");
        if !version.eq_ignore_ascii_case("gemm") {
            return Err(Error::config(
                at,
                key("version"),
                format!("`{version}`: petal reads AWQ's GEMM layout (`gemm`)"),
            ));
        }
        if q.get("zero_point").and_then(|v| v.as_bool()) == Some(false) {
            return Err(Error::config(
                at,
                key("zero_point"),
                "false: petal reads AWQ with zero points",
            ));
        }
        return Ok(Some(GptqConfig {
            group,
            packing: Packing::Awq,
        }));
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
        group,
        packing: Packing::Gptq {
            zeros_less_one: format == "gptq",
        },
    }))
}

fn int4_for(group: usize) -> &'static dyn Quantizer {
    match group {
        32 => &INT4_G32,
        64 => &INT4_G64,
        _ => &INT4,
    }
}

/// The order of the columns in their groups from a GPTQ `g_idx`: `None` when input i is in
/// group `i / group` (no act-order), else the inputs sorted by group (stably), each group
/// holding exactly `group` of them.
fn column_order(g_idx: &[i64], group: usize) -> std::result::Result<Option<Vec<u32>>, String> {
    if g_idx
        .iter()
        .enumerate()
        .all(|(i, &g)| g as usize == i / group)
    {
        return Ok(None);
    }
    let groups = g_idx.len() / group;
    let mut count = vec![0usize; groups];
    for (i, &g) in g_idx.iter().enumerate() {
        match count.get_mut(g as usize).filter(|_| g >= 0) {
            Some(c) => *c += 1,
            None => return Err(format!("g_idx[{i}] = {g} is not a group in 0..{groups}")),
        }
    }
    if let Some(g) = count.iter().position(|&c| c != group) {
        return Err(format!(
            "g_idx puts {} inputs in group {g}; petal reads groups of exactly {group}",
            count[g]
        ));
    }
    let mut order: Vec<u32> = (0..g_idx.len() as u32).collect();
    order.sort_by_key(|&i| g_idx[i as usize]);
    Ok(Some(order))
}

/// A GPTQ or AWQ folder's weights: its quantized linears as int4 rows, the rest dense.
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
        let width = qweight.first().map_or(0, Vec::len);
        let (inp, out) = match cfg.packing {
            Packing::Gptq { .. } => (qweight.len() * 8, width),
            Packing::Awq => (qweight.len(), width * 8),
        };
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
        let nibble = |word: i32, k: usize| ((word >> (4 * k)) & 15) as u8;
        let (code, zero): (Nibble, Nibble) = match cfg.packing {
            Packing::Gptq { zeros_less_one } => (
                Box::new(|i, o| nibble(qweight[i / 8][o], i % 8)),
                Box::new(move |g, o| nibble(qzeros[g][o / 8], o % 8) + zeros_less_one as u8),
            ),
            Packing::Awq => (
                Box::new(|i, o| nibble(qweight[i][o / 8], AWQ_NIBBLE[o % 8])),
                Box::new(move |g, o| nibble(qzeros[g][o / 8], AWQ_NIBBLE[o % 8])),
            ),
        };
        let g_idx = format!("{m}.g_idx");
        let order = match names.contains(&g_idx) && matches!(cfg.packing, Packing::Gptq { .. }) {
            true => {
                let g = raw(&g_idx, DType::I64)?.to_vec1::<i64>()?;
                if g.len() != inp {
                    return Err(at(format!(
                        "g_idx has {} entries for {inp} inputs",
                        g.len()
                    )));
                }
                column_order(&g, cfg.group).map_err(at)?
            }
            false => None,
        };
        let q: &'static dyn Quantizer = match &order {
            Some(o) => Int4Ordered::leak(cfg.group, o.clone()),
            None => int4_for(cfg.group),
        };
        let column = |k: usize| order.as_ref().map_or(k, |o| o[k] as usize);
        let fmt = QFormat::of(q, inp).map_err(at)?;
        let mut rows = Vec::with_capacity(out * fmt.row_bytes());
        for o in 0..out {
            rows.extend(
                (0..inp / 2).map(|j| code(column(2 * j), o) | (code(column(2 * j + 1), o) << 4)),
            );
            for g in 0..groups {
                rows.extend(half::f16::from_f32(scales[g][o]).to_le_bytes());
                rows.push(zero(g, o));
            }
        }
        let t = Tensor::from_vec(rows, (out, fmt.row_bytes()), &cpu)?;
        blocks.insert(format!("{m}.weight"), (t, fmt));
        modules.insert(m.to_string());
    }
    let dense = crate::weights::dense_rest(&file, &modules, &PARTS)?;
    Ok(Weights::Quantized { dense, blocks })
}
