//! GGUF files of the llama and qwen2 architectures: metadata, and tensors dequantized and
//! renamed to the Hugging Face layout (mapping and Q/K un-permute as in ../shared/ASSETS.md;
//! llama.cpp permutes q/k for `llama` only, so qwen2's rows are as in the HF model).

use crate::Weights;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use petal_core::{Error, Result};
use petal_ops::quant::{QFormat, BLOCK_TYPES};
use std::collections::HashMap;
use std::path::Path;

pub use gguf_file::Value;

/// The GGUF architectures petal reads (each a Llama-family decoder; qwen2 adds q/k/v biases).
pub const ARCHITECTURES: &[&str] = &["llama", "qwen2"];

pub struct Gguf {
    pub metadata: HashMap<String, Value>,
    pub weights: Weights,
    /// The block types of the file's quantized 2-D tensors (empty for an f32/f16/bf16 file).
    pub block_types: Vec<candle_core::quantized::GgmlDType>,
    /// `rope_freqs.weight`: llama.cpp's per-frequency RoPE factors (llama3 rope scaling).
    pub rope_factors: Option<Vec<f32>>,
}

/// Whole-model tensors: GGUF name, HF name.
pub(crate) const FIXED_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// A layer's tensors: GGUF name after `blk.N.`, HF name after `model.layers.N.`.
pub(crate) const LAYER_NAMES: [(&str, &str); 12] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// GGUF tensor name -> HF name.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = FIXED_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (n, tail) = rest.split_once('.')?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == tail)?;
    Some(format!("model.layers.{n}.{hf}"))
}

/// HF tensor name -> GGUF name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = FIXED_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (n, tail) = rest.split_once('.')?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == tail)?;
    Some(format!("blk.{n}.{g}"))
}

/// llama.cpp's interleaved-RoPE permutation of q/k rows (its converter's `permute`, what the
/// `llama` architecture stores): W (out, in) -> W.reshape(heads, 2, d/2, in).transpose(1, 2)
/// .reshape(out, in). Biases (out,) alike. The inverse of [`unpermute`].
pub fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let (out, rest) = pair_split(&dims, heads)?;
    let t = w
        .reshape((heads, 2, out / heads / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok(t.reshape(dims)?)
}

/// Rows and the product of the other dims of a q/k projection, checked to split into `heads`
/// heads of pairs.
fn pair_split(dims: &[usize], heads: usize) -> Result<(usize, usize)> {
    let Some((&out, tail)) = dims.split_first() else {
        return Err(Error::msg("a q/k projection that is a scalar".to_string()));
    };
    if heads == 0 || heads > out || out % (2 * heads) != 0 {
        return Err(Error::msg(format!(
            "a q/k projection of {out} rows does not split into {heads} heads of pairs"
        )));
    }
    Ok((out, tail.iter().product()))
}

/// Undo llama.cpp's interleaved-RoPE permutation of q/k rows: W (out, in) ->
/// W.reshape(heads, d/2, 2, in).transpose(1, 2).reshape(out, in). Biases (out,) alike.
pub fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let (out, rest) = pair_split(&dims, heads)?;
    let t = w
        .reshape((heads, out / heads / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok(t.reshape(dims)?)
}

pub fn meta_u64(md: &HashMap<String, Value>, key: &str) -> Option<u64> {
    let v = md.get(key)?;
    v.to_u64()
        .ok()
        .or_else(|| v.to_u32().ok().map(u64::from))
        .or_else(|| v.to_i32().ok().map(|x| x as u64))
}

pub fn meta_f64(md: &HashMap<String, Value>, key: &str) -> Option<f64> {
    let v = md.get(key)?;
    v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok())
}

pub fn meta_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<&'a str> {
    md.get(key)?.to_string().ok().map(String::as_str)
}

/// Read a llama- or qwen2-architecture GGUF, tensors renamed: every tensor dequantized to f32,
/// or with `keep_quantized` the 2-D ones in a block type petal's quantized linears run
/// (`petal_ops::quant::BLOCK_TYPES`) kept as their raw blocks.
pub fn read(path: &Path, keep_quantized: bool) -> Result<Gguf> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut f)
        .map_err(|e| Error::msg(format!("{}: not a valid GGUF file: {e}", path.display())))?;
    let arch = meta_str(&content.metadata, "general.architecture")
        .unwrap_or("?")
        .to_string();
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(Error::Unsupported(format!(
            "{}: GGUF architecture `{arch}` is not supported (petal reads {})",
            path.display(),
            ARCHITECTURES.join(", ")
        )));
    }
    let heads =
        meta_u64(&content.metadata, &format!("{arch}.attention.head_count")).ok_or_else(|| {
            Error::config(
                path.display().to_string(),
                format!("{arch}.attention.head_count"),
                "missing",
            )
        })? as usize;
    let kv_heads = meta_u64(
        &content.metadata,
        &format!("{arch}.attention.head_count_kv"),
    )
    .map(|v| v as usize)
    .unwrap_or(heads);
    // llama.cpp's per-frequency RoPE factors (Llama 3.1's rope scaling, as its converter
    // writes it): the config is made from them (ignoring them would rotate every position wrongly)
    let rope_factors = match content.tensor_infos.contains_key("rope_freqs.weight") {
        true => Some(
            content
                .tensor(&mut f, "rope_freqs.weight", &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| {
                    Error::msg(format!(
                        "{}: tensor `rope_freqs.weight`: {e}",
                        path.display()
                    ))
                })?,
        ),
        false => None,
    };
    // llama.cpp's converter interleaves q/k rows for RoPE only for the llama architecture
    let permuted = arch == "llama";
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut map = HashMap::new();
    let mut blocks = HashMap::new();
    let mut block_types = Vec::new();
    for (name, info) in &content.tensor_infos {
        let Some(hf) = hf_name(name) else { continue };
        check_extent(info, content.tensor_data_offset, file_len)
            .map_err(|e| Error::msg(format!("{}: tensor `{name}`: {e}", path.display())))?;
        let at = |e: Error| Error::msg(format!("{}: tensor `{name}`: {e}", path.display()));
        let q = content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(|e| at(e.into()))?;
        use candle_core::quantized::GgmlDType as G;
        let float = matches!(info.ggml_dtype, G::F32 | G::F16 | G::BF16);
        if info.shape.rank() == 2 && !float && !block_types.contains(&info.ggml_dtype) {
            block_types.push(info.ggml_dtype);
        }
        let kept = match info.shape.dims() {
            [_, cols] if keep_quantized && BLOCK_TYPES.contains(&info.ggml_dtype) => {
                Some(QFormat::new(info.ggml_dtype, *cols).map_err(|e| at(Error::msg(e)))?)
            }
            _ => None,
        };
        let mut t = match kept {
            Some(fmt) => {
                let rows = info.shape.dims()[0];
                let bytes = q.data()?.into_owned();
                Tensor::from_vec(bytes, (rows, fmt.row_bytes()), &Device::Cpu)?
            }
            None => q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?,
        };
        if permuted && name.contains("attn_q.") {
            t = unpermute(&t, heads).map_err(at)?;
        } else if permuted && name.contains("attn_k.") {
            t = unpermute(&t, kv_heads).map_err(at)?;
        }
        match kept {
            Some(fmt) => {
                blocks.insert(hf, (t, fmt));
            }
            None => {
                map.insert(hf, t);
            }
        }
    }
    let weights = match keep_quantized {
        true => Weights::Quantized { dense: map, blocks },
        false => Weights::Map(map),
    };
    Ok(Gguf {
        metadata: content.metadata,
        weights,
        block_types,
        rope_factors,
    })
}

/// Whether a tensor's declared shape fits its file: its element count without overflow, whole
/// blocks of its type, and its bytes inside the file. candle's reader multiplies the
/// dimensions unchecked, so a header claiming dimensions whose product overflows would pass its
/// size check and then ask for an impossible allocation (found by `tools/fuzz.sh`).
pub(crate) fn check_extent(
    info: &gguf_file::TensorInfo,
    data_offset: u64,
    file_len: u64,
) -> Result<()> {
    let dims = info.shape.dims();
    let elems = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .filter(|&n| n <= isize::MAX as u64 / 4)
        .ok_or_else(|| Error::msg(format!("shape {dims:?} is too large")))?;
    // an empty tensor reaches candle's cast of an empty buffer to blocks, whose dangling
    // pointer is not aligned for them; no model has one
    if elems == 0 {
        return Err(Error::msg(format!("shape {dims:?} holds no values")));
    }
    let block = info.ggml_dtype.block_size() as u64;
    if elems % block != 0 {
        return Err(Error::msg(format!(
            "shape {dims:?} is not whole blocks of {block} ({:?})",
            info.ggml_dtype
        )));
    }
    let bytes = elems / block * info.ggml_dtype.type_size() as u64;
    let start = data_offset.saturating_add(info.offset);
    if start.saturating_add(bytes) > file_len {
        return Err(Error::msg(format!(
            "declares {bytes} bytes at offset {start}, past the end of the file ({file_len} bytes)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_frequency_factors_are_read_not_ignored() {
        use crate::gguf_out::{text, write_file, Meta};
        use candle_core::quantized::QTensor;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let md = vec![
            ("general.architecture".to_string(), text("llama")),
            ("llama.attention.head_count".to_string(), Meta::U32(4)),
        ];
        let f = Tensor::new(&[1f32, 2.0, 4.0, 8.0], &Device::Cpu).unwrap();
        let t = QTensor::quantize(&f, candle_core::quantized::GgmlDType::F32).unwrap();
        write_file(&path, &md, &[("rope_freqs.weight".to_string(), t)]).unwrap();
        let g = read(&path, false).unwrap();
        assert_eq!(g.rope_factors, Some(vec![1.0, 2.0, 4.0, 8.0]));
    }

    #[test]
    fn permute_interleaves_rows_as_llama_cpp_and_unpermute_inverts_it() {
        // llama.cpp's converter, row by row: new row h d + 2 j + t = old row h d + t d/2 + j
        let (h, d, inp) = (2usize, 4usize, 3usize);
        let w = Tensor::arange(0f32, (h * d * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((h * d, inp))
            .unwrap();
        let rows = w.to_vec2::<f32>().unwrap();
        let p = permute(&w, h).unwrap().to_vec2::<f32>().unwrap();
        for hh in 0..h {
            for j in 0..d / 2 {
                for t in 0..2 {
                    assert_eq!(p[hh * d + 2 * j + t], rows[hh * d + t * d / 2 + j]);
                }
            }
        }
        let back = unpermute(&permute(&w, h).unwrap(), h).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), rows);
        // head counts from a file that do not fit: an error, not an overflow
        for heads in [0, 3, 1usize << 63, usize::MAX] {
            assert!(
                unpermute(&w, heads).is_err() && permute(&w, heads).is_err(),
                "{heads}"
            );
        }
    }

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.7.attn_output.weight").unwrap(),
            "model.layers.7.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert!(hf_name("rope_freqs.weight").is_none());
        for (g, h) in FIXED_NAMES {
            assert_eq!(gguf_name(h).unwrap(), g);
        }
        for (g, h) in LAYER_NAMES {
            let hf = format!("model.layers.3.{h}");
            assert_eq!(gguf_name(&hf).unwrap(), format!("blk.3.{g}"));
            assert_eq!(hf_name(&gguf_name(&hf).unwrap()).unwrap(), hf);
        }
    }
}
