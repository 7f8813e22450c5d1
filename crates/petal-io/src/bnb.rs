//! Hugging Face folders saved with bitsandbytes 4-bit quantization (QLoRA checkpoints, the
//! hub's `*-bnb-4bit` models): `config.json` has `quantization_config.quant_method =
//! "bitsandbytes"` and each quantized linear `X.weight` is stored as bitsandbytes' packed codes
//! with its state beside it (`X.weight.absmax`, `.nested_absmax`, `.nested_quant_map`,
//! `.quant_map`, `.quant_state.bitsandbytes__nf4`: a JSON of shape, block size and offset).
//! petal reads NF4 with double-quantized scales into its own NF4 rows
//! (`petal_ops::quant::NF4`), which decode to bitsandbytes' values bit for bit; everything else
//! in the file (embedding, head, norms) is read as it is.

use crate::weights::Weights;
use candle_core::{DType, Device, Tensor};
use petal_core::{Error, Result};
use petal_models::weights::WeightSource;
use petal_ops::quant::{Nf4Parts, QFormat, NF4};
use std::collections::HashMap;
use std::path::Path;

const STATE: &str = ".quant_state.bitsandbytes__nf4";
/// Tensors of a quantized weight's state, after `X.weight`.
const PARTS: [&str; 4] = [
    ".absmax",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_map",
];

/// The `quantization_config` of a folder's config.json when it is bitsandbytes': `Ok(None)` for
/// an unquantized folder, an error for what petal does not read (8-bit, FP4, single-quantized
/// scales) naming the key.
pub fn bnb_config(config: &serde_json::Value, at: &Path) -> Result<Option<()>> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    let at = at.display().to_string();
    if method != "bitsandbytes" {
        return Err(Error::config(
            at,
            "quantization_config.quant_method",
            format!("`{method}` is not read (petal reads bitsandbytes NF4, GPTQ and AWQ folders, GGUF files)"),
        ));
    }
    let flag = |k: &str| q.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    if !flag("load_in_4bit") {
        return Err(Error::config(
            at,
            "quantization_config.load_in_4bit",
            "false: 8-bit bitsandbytes weights are not read (4-bit NF4 ones are)",
        ));
    }
    let ty = q
        .get("bnb_4bit_quant_type")
        .and_then(|v| v.as_str())
        .unwrap_or("fp4");
    if ty != "nf4" {
        return Err(Error::config(
            at,
            "quantization_config.bnb_4bit_quant_type",
            format!("`{ty}` is not read (nf4 is)"),
        ));
    }
    if !flag("bnb_4bit_use_double_quant") {
        return Err(Error::config(
            at,
            "quantization_config.bnb_4bit_use_double_quant",
            "false: single-quantized scales are not read yet (double-quantized ones are)",
        ));
    }
    Ok(Some(()))
}

/// A bitsandbytes NF4 folder's weights: its quantized linears as NF4 rows, the rest dense.
pub fn read(dir: &Path) -> Result<Weights> {
    let file = Weights::from_hf_folder(dir)?;
    let names = file.names();
    let cpu = Device::Cpu;
    let raw = |name: &str, dt: DType| file.get(name, None, dt, &cpu);
    let mut blocks = HashMap::new();
    let mut state_of = std::collections::HashSet::new();
    for name in names.iter().filter(|n| n.ends_with(STATE)) {
        let w = &name[..name.len() - STATE.len()];
        let at = |e: String| Error::msg(format!("{}: tensor `{w}`: {e}", dir.display()));
        let bytes = raw(name, DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
        let state: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| at(format!("its quant state: {e}")))?;
        let shape: Vec<usize> = state
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|s| {
                s.iter()
                    .filter_map(|d| d.as_u64())
                    .map(|d| d as usize)
                    .collect()
            })
            .unwrap_or_default();
        let [rows, cols] = shape[..] else {
            return Err(at(format!(
                "quant state shape {shape:?} is not (rows, cols)"
            )));
        };
        let num = |k: &str| state.get(k).and_then(|v| v.as_f64());
        if state.get("quant_type").and_then(|t| t.as_str()) != Some("nf4")
            || num("blocksize") != Some(64.0)
            || num("nested_blocksize") != Some(256.0)
        {
            return Err(at(format!(
                "quant state {state} is not NF4 in blocks of 64 with scales in groups of 256"
            )));
        }
        let fmt = QFormat::of(&NF4, cols).map_err(at)?;
        // the file's code tables must be the ones petal decodes with
        let code = raw(&format!("{w}.quant_map"), DType::F32)?.to_vec1::<f32>()?;
        if code != petal_ops::quant::nf4_code() {
            return Err(at("its quant_map is not NF4's code".into()));
        }
        let parts = Nf4Parts {
            packed: &raw(w, DType::U8)?.flatten_all()?.to_vec1::<u8>()?,
            scale_codes: &raw(&format!("{w}.absmax"), DType::U8)?.to_vec1::<u8>()?,
            group_scales: &raw(&format!("{w}.nested_absmax"), DType::F32)?.to_vec1::<f32>()?,
            offset: num("nested_offset").unwrap_or(0.0) as f32,
        };
        let dyn_code = raw(&format!("{w}.nested_quant_map"), DType::F32)?.to_vec1::<f32>()?;
        if dyn_code != petal_ops::quant::nf4_scale_code() {
            return Err(at(
                "its nested_quant_map is not bitsandbytes' dynamic code".into()
            ));
        }
        let b = NF4.from_parts(cols, &parts).map_err(at)?;
        if Some(b.len()) != rows.checked_mul(fmt.row_bytes()) {
            return Err(at(format!(
                "{} bytes of codes for {rows} x {cols}",
                parts.packed.len()
            )));
        }
        blocks.insert(
            w.to_string(),
            (Tensor::from_vec(b, (rows, fmt.row_bytes()), &cpu)?, fmt),
        );
        state_of.insert(w.to_string());
    }
    // the weight itself, its state's tensors and the state's JSON
    let parts = [&[""][..], &PARTS, &[STATE]].concat();
    let dense = crate::weights::dense_rest(&file, &state_of, &parts)?;
    Ok(Weights::Quantized { dense, blocks })
}
