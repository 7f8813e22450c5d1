//! A read-only bag of named tensors: memory-mapped safetensors or an in-memory map (GGUF).

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use petal_core::{Error, Result};
use petal_models::weights::{shaped, WeightSource};
use petal_ops::quant::QFormat;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub enum Weights {
    Mmap {
        st: MmapedSafetensors,
        files: Vec<PathBuf>,
        names: Vec<String>,
    },
    Map(HashMap<String, Tensor>),
    /// A GGUF file read with its quantized linears kept as raw blocks (`--dtype quantized`).
    Quantized {
        dense: HashMap<String, Tensor>,
        blocks: HashMap<String, (Tensor, QFormat)>,
    },
}

impl Weights {
    /// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::msg(format!("{}: not valid JSON: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::config(
                        index.display().to_string(),
                        "weight_map",
                        "missing or not an object",
                    )
                })?;
            let mut f: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            f.sort();
            f.dedup();
            f.into_iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(Error::msg(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        };
        Self::from_files(&files)
    }

    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        for f in files {
            if !f.exists() {
                return Err(Error::msg(format!("{}: file not found", f.display())));
            }
        }
        // SAFETY: the files are opened read-only; petal never writes to a file it has mapped
        // (all writes go to a temp file renamed over the target).
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            Error::msg(format!(
                "{}: not a valid safetensors file: {e}",
                files[0].display()
            ))
        })?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Weights::Mmap {
            st,
            files: files.to_vec(),
            names,
        })
    }

    pub fn names(&self) -> Vec<String> {
        match self {
            Weights::Mmap { names, .. } => names.clone(),
            Weights::Map(m) => m.keys().cloned().collect(),
            Weights::Quantized { dense, blocks } => {
                dense.keys().chain(blocks.keys()).cloned().collect()
            }
        }
    }
}

/// Every tensor of `file` but the stored parts of its quantized modules (`base + suffix` for a
/// `base` in `quantized`), in f32: what a quantized folder holds besides its blocks.
pub(crate) fn dense_rest(
    file: &Weights,
    quantized: &std::collections::HashSet<String>,
    suffixes: &[&str],
) -> Result<HashMap<String, Tensor>> {
    let part = |n: &str| {
        suffixes
            .iter()
            .any(|s| n.strip_suffix(s).is_some_and(|b| quantized.contains(b)))
    };
    let mut dense = HashMap::new();
    for n in file.names().into_iter().filter(|n| !part(n)) {
        let t = file.get(&n, None, candle_core::DType::F32, &Device::Cpu)?;
        dense.insert(n, t);
    }
    Ok(dense)
}

impl WeightSource for Weights {
    fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Mmap { st, .. } => st.get(name).is_ok(),
            Weights::Map(m) => m.contains_key(name),
            Weights::Quantized { dense, blocks } => {
                dense.contains_key(name) || blocks.contains_key(name)
            }
        }
    }

    /// Tensor `name` in `dtype` on `device`, checked against `shape` when given.
    fn get(
        &self,
        name: &str,
        shape: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match self {
            Weights::Mmap { st, files, .. } => {
                let t = st.load(name, device).map_err(|_| {
                    Error::msg(format!(
                        "tensor `{name}` is missing from {}",
                        files[0].display()
                    ))
                })?;
                shaped(name, t, shape, dtype)
            }
            Weights::Map(m) => WeightSource::get(m, name, shape, dtype, device),
            Weights::Quantized { dense, blocks } => match blocks.get(name) {
                Some((t, fmt)) => {
                    let w = petal_ops::quant::dequantize(t, *fmt)?.to_device(device)?;
                    shaped(name, w, shape, dtype)
                }
                None => WeightSource::get(dense, name, shape, dtype, device),
            },
        }
    }

    fn get_quantized(
        &self,
        name: &str,
        shape: [usize; 2],
        device: &Device,
    ) -> Result<Option<(Tensor, QFormat)>> {
        let Weights::Quantized { blocks, .. } = self else {
            return Ok(None);
        };
        let Some((t, fmt)) = blocks.get(name) else {
            return Ok(None);
        };
        let found = [t.dim(0)?, fmt.cols];
        if found != shape {
            return Err(Error::Shape {
                tensor: name.into(),
                expected: shape.to_vec(),
                found: found.to_vec(),
            });
        }
        if !device.is_cpu() {
            return Err(Error::Unsupported(format!(
                "{name}: quantized ({}) weights run on the CPU only for now; use --dtype f32 \
                 or bf16 on {device:?}",
                fmt.name()
            )));
        }
        Ok(Some((t.clone(), *fmt)))
    }
}
