//! Where a model's weights come from. Models are built from a [`WeightSource`]: plain tensors
//! (a `HashMap`), or a file reader of petal-io (safetensors folders, GGUF files), which
//! implements it. petal-models reads no file itself.

use candle_core::{DType, Device, Tensor};
use petal_core::{Error, Result};
use petal_ops::quant::QFormat;
use std::collections::HashMap;

pub trait WeightSource {
    /// Whether the source holds tensor `name` (HF names: `model.layers.0.self_attn.q_proj.weight`).
    fn contains(&self, name: &str) -> bool;
    /// Tensor `name` in `dtype` on `device`, checked against `shape` when given.
    fn get(
        &self,
        name: &str,
        shape: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor>;
    /// Tensor `name` as the raw blocks the source holds it in, `(rows, row_bytes)` of `u8`
    /// with their format, checked against `shape` (rows, cols) in values; `None` when the
    /// source holds it unquantized (dense sources always).
    fn get_quantized(
        &self,
        _name: &str,
        _shape: [usize; 2],
        _device: &Device,
    ) -> Result<Option<(Tensor, QFormat)>> {
        Ok(None)
    }
}

/// A frozen weight `(rows, cols)` as `p` asks: the source's blocks where it keeps them and
/// `p.quantized`, else dense in `p.weights`.
pub fn frozen(
    w: &dyn WeightSource,
    name: &str,
    shape: [usize; 2],
    p: crate::Precision,
    device: &Device,
) -> Result<(Tensor, Option<QFormat>)> {
    if p.quantized {
        if let Some((t, f)) = w.get_quantized(name, shape, device)? {
            return Ok((t, Some(f)));
        }
    }
    if let Some(q) = p.quantize {
        let ty = q.name();
        if !device.is_cpu() {
            return Err(Error::Unsupported(format!(
                "--quantize {ty}: quantized weights run on the CPU only for now ({device:?})"
            )));
        }
        QFormat::of(q, shape[1])
            .map_err(|e| Error::msg(format!("--quantize {ty}: tensor `{name}`: {e}")))?;
        let dense = w.get(name, Some(&shape), DType::F32, device)?;
        let (t, f) = petal_ops::quant::quantize_with(&dense, q)?;
        return Ok((t, Some(f)));
    }
    Ok((w.get(name, Some(&shape), p.weights, device)?, None))
}

impl WeightSource for HashMap<String, Tensor> {
    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }

    fn get(
        &self,
        name: &str,
        shape: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = HashMap::get(self, name)
            .ok_or_else(|| Error::msg(format!("tensor `{name}` is missing from the model file")))?;
        shaped(name, t.to_device(device)?, shape, dtype)
    }
}

/// Tensor `name` as read, checked against `shape` when given, in `dtype`: what every
/// `WeightSource::get` ends with.
pub fn shaped(name: &str, t: Tensor, shape: Option<&[usize]>, dtype: DType) -> Result<Tensor> {
    if let Some(s) = shape.filter(|s| t.dims() != *s) {
        return Err(Error::Shape {
            tensor: name.into(),
            expected: s.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(t.to_dtype(dtype)?)
}
