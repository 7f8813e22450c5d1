//! Writing GGUF files llama.cpp reads: a whole (merged) model (`petal merge --format gguf`), and
//! the file format (metadata values, tensor types, alignment) that a LoRA adapter in
//! llama.cpp's layout (`crate::gguf_lora`) is written in too.

use crate::gguf::{gguf_name, permute};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use petal_core::{Error, QuantGrid, Result};
use petal_data::tokenizer::BpeParts;
use petal_models::{LlamaConfig, RopeScaling};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

pub use crate::gguf_lora::{read_lora, write_lora};

/// A GGUF output type by name: `f32`, `f16`, `bf16`, or a GGML block type (`q8_0`, `q4_k`, ...).
pub fn out_type(name: &str) -> Result<GgmlDType> {
    match name {
        "f32" => return Ok(GgmlDType::F32),
        "f16" => return Ok(GgmlDType::F16),
        "bf16" => return Ok(GgmlDType::BF16),
        _ => {}
    }
    let blocks = petal_ops::quant::BLOCK_TYPES;
    blocks
        .iter()
        .find(|t| petal_ops::quant::type_name(**t) == name)
        .copied()
        .ok_or_else(|| {
            let names: Vec<String> = blocks
                .iter()
                .map(|t| petal_ops::quant::type_name(*t))
                .collect();
            Error::msg(format!(
                "GGUF type `{name}` is not one of f32, f16, bf16, {} (llama.cpp has no NF4 or \
                 int4 type)",
                names.join(", ")
            ))
        })
}

/// GGUF's architecture name for a model: qwen2, or llama (Llama and Mistral).
pub(crate) fn arch_of(cfg: &LlamaConfig) -> &'static str {
    match cfg.model_type.as_str() {
        "qwen2" => "qwen2",
        _ => "llama",
    }
}

/// llama.cpp's `general.file_type` for the type most tensors take.
fn file_type(t: GgmlDType) -> u32 {
    use GgmlDType::*;
    match t {
        F32 => 0,
        F16 => 1,
        Q4_0 => 2,
        Q4_1 => 3,
        Q8_0 => 7,
        Q5_0 => 8,
        Q5_1 => 9,
        Q2K => 10,
        Q3K => 12,
        Q4K => 15,
        Q5K => 17,
        Q6K => 18,
        BF16 => 32,
        _ => 0,
    }
}

/// One tensor in the file's type: 1-D ones (norms, biases) stay f32, 2-D ones take `ty`, or
/// f16 where their rows are not whole blocks of it (as llama.cpp's tools fall back); the
/// names of those go to `fell_back`.
pub(crate) fn encode(
    name: &str,
    t: &Tensor,
    ty: GgmlDType,
    fell_back: &mut Vec<String>,
) -> Result<QTensor> {
    let t = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .contiguous()?;
    let cols = *t.dims().last().unwrap_or(&0);
    let ty = match (t.rank() < 2, cols % ty.block_size() == 0) {
        (true, _) => GgmlDType::F32,
        (false, true) => ty,
        (false, false) => {
            fell_back.push(name.to_string());
            GgmlDType::F16
        }
    };
    Ok(QTensor::quantize(&t, ty)?)
}

/// A metadata value as GGUF types it (an empty array keeps its element type: llama.cpp checks
/// it, and candle's writer cannot say it).
pub(crate) enum Meta {
    Str(String),
    U32(u32),
    F32(f32),
    Bool(bool),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

impl Meta {
    /// GGUF's value type number.
    fn kind(&self) -> u32 {
        match self {
            Meta::U32(_) => 4,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Strs(_) | Meta::I32s(_) => 9,
        }
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&self.kind().to_le_bytes())?;
        match self {
            Meta::Str(s) => put_str(w, s),
            Meta::U32(v) => w.write_all(&v.to_le_bytes()),
            Meta::F32(v) => w.write_all(&v.to_le_bytes()),
            Meta::Bool(v) => w.write_all(&[*v as u8]),
            Meta::Strs(v) => {
                w.write_all(&8u32.to_le_bytes())?;
                w.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|s| put_str(w, s))
            }
            Meta::I32s(v) => {
                w.write_all(&5u32.to_le_bytes())?;
                w.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
            }
        }
    }
}

/// GGML's type number of a tensor type.
fn ggml_id(t: GgmlDType) -> u32 {
    use GgmlDType::*;
    match t {
        F32 => 0,
        F16 => 1,
        Q4_0 => 2,
        Q4_1 => 3,
        Q5_0 => 6,
        Q5_1 => 7,
        Q8_0 => 8,
        Q8_1 => 9,
        Q2K => 10,
        Q3K => 11,
        Q4K => 12,
        Q5K => 13,
        Q6K => 14,
        Q8K => 15,
        BF16 => 30,
    }
}

const ALIGN: u64 = 32;

fn pad(w: &mut impl Write, at: u64) -> std::io::Result<u64> {
    let n = (ALIGN - at % ALIGN) % ALIGN;
    w.write_all(&vec![0u8; n as usize])?;
    Ok(at + n)
}

/// Write `md` and `tensors` to `path` as GGUF version 3 (alignment 32), whole or not at all.
pub(crate) fn write_file(
    path: &Path,
    md: &[(String, Meta)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path, e);
    let data: Vec<std::borrow::Cow<'_, [u8]>> = tensors
        .iter()
        .map(|(_, t)| t.data())
        .collect::<candle_core::Result<_>>()?;
    crate::atomic::write_atomic_with(path, |w| {
        let mut head = Vec::new();
        head.extend(0x4655_4747u32.to_le_bytes()); // "GGUF"
        head.extend(3u32.to_le_bytes());
        head.extend((tensors.len() as u64).to_le_bytes());
        head.extend((md.len() as u64).to_le_bytes());
        for (k, v) in md {
            put_str(&mut head, k).map_err(io)?;
            v.write(&mut head).map_err(io)?;
        }
        let mut offset = 0u64;
        for ((name, t), bytes) in tensors.iter().zip(&data) {
            put_str(&mut head, name).map_err(io)?;
            let dims = t.shape().dims();
            head.extend((dims.len() as u32).to_le_bytes());
            for d in dims.iter().rev() {
                head.extend((*d as u64).to_le_bytes());
            }
            head.extend(ggml_id(t.dtype()).to_le_bytes());
            head.extend(offset.to_le_bytes());
            offset += bytes.len() as u64;
            offset += (ALIGN - offset % ALIGN) % ALIGN;
        }
        w.write_all(&head).map_err(io)?;
        pad(w, head.len() as u64).map_err(io)?;
        for bytes in &data {
            w.write_all(bytes).map_err(io)?;
            pad(w, bytes.len() as u64).map_err(io)?;
        }
        Ok(())
    })
}

pub(crate) fn text(s: &str) -> Meta {
    Meta::Str(s.to_string())
}

/// The tokenizer's GGUF keys (gpt2-style BPE), its tokens padded to the model's vocabulary
/// with `[PADi]` tokens of type unused (5), as llama.cpp's converter pads them.
fn tokenizer_metadata(tok: &BpeParts, vocab: usize) -> Result<Vec<(String, Meta)>> {
    if tok.tokens.len() > vocab {
        return Err(Error::msg(format!(
            "the tokenizer has {} tokens, more than the model's {vocab} embedding rows",
            tok.tokens.len()
        )));
    }
    let mut tokens = tok.tokens.clone();
    let mut types = tok.token_types.clone();
    types.resize(tokens.len(), 1);
    for i in tokens.len()..vocab {
        tokens.push(format!("[PAD{i}]"));
        types.push(5);
    }
    let mut md = vec![
        ("tokenizer.ggml.model".into(), text("gpt2")),
        ("tokenizer.ggml.pre".into(), text(&tok.pre)),
        ("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type".into(), Meta::I32s(types)),
        (
            "tokenizer.ggml.merges".into(),
            Meta::Strs(tok.merges.clone()),
        ),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Meta::Bool(tok.add_bos),
        ),
    ];
    if let Some(id) = tok.bos_id {
        md.push(("tokenizer.ggml.bos_token_id".into(), Meta::U32(id)));
    }
    if let Some(id) = tok.eos_id {
        md.push(("tokenizer.ggml.eos_token_id".into(), Meta::U32(id)));
    }
    if let Some(t) = &tok.chat_template {
        md.push(("tokenizer.chat_template".into(), text(t)));
    }
    Ok(md)
}

/// A weight held as 4-bit codes on a grid per group of 32 (L4Q's at 4 bits) as GGUF's Q4_1
/// blocks, exactly (`d` = step, `m` = offset, both f16 values already): `None` for other grids.
pub fn q4_1_of_grid(g: &QuantGrid) -> Result<Option<QTensor>> {
    let (out, inp) = g.codes.dims2()?;
    if g.bits != 4 || g.step.dims2()? != (out, inp / 32) || inp % 32 != 0 {
        return Ok(None);
    }
    let codes = g
        .codes
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let half = |t: &Tensor| -> Result<Vec<half::f16>> {
        Ok(t.to_dtype(DType::F16)?
            .flatten_all()?
            .to_vec1::<half::f16>()?)
    };
    let (d, m) = (half(&g.step)?, half(&g.offset)?);
    let mut bytes = Vec::with_capacity(out * inp / 32 * 20);
    for (i, block) in codes.chunks_exact(32).enumerate() {
        bytes.extend(d[i].to_le_bytes());
        bytes.extend(m[i].to_le_bytes());
        // value j in the low nibble of byte j, value j + 16 in its high nibble
        bytes.extend((0..16).map(|j| block[j] | (block[j + 16] << 4)));
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(bytes),
        &Device::Cpu,
        GgmlDType::Q4_1,
    )?;
    Ok(Some(QTensor::new(storage, (out, inp))?))
}

/// Write a model (HF-named tensors, as `Llama::named_base_tensors` gives them) as a GGUF file
/// llama.cpp loads: hyper-parameters from `cfg`, the tokenizer, 2-D tensors in `ty`; the
/// tensors in `exact` (HF names: Q4_1 blocks of an L4Q grid) are written as they are. Returns
/// the tensors written in f16 instead, their rows not being whole blocks of `ty`.
pub fn write_model(
    path: &Path,
    cfg: &LlamaConfig,
    tensors: Vec<(String, Tensor)>,
    exact: HashMap<String, QuantGrid>,
    tok: &BpeParts,
    ty: GgmlDType,
) -> Result<Vec<String>> {
    let arch = arch_of(cfg);
    let u = |v: usize| Meta::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut md: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), text(arch)),
        ("general.name".into(), text(&name)),
        ("general.file_type".into(), Meta::U32(file_type(ty))),
        ("general.quantization_version".into(), Meta::U32(2)),
        (key("vocab_size"), u(cfg.vocab_size)),
        (key("context_length"), u(cfg.max_position_embeddings)),
        (key("embedding_length"), u(cfg.hidden_size)),
        (key("block_count"), u(cfg.num_hidden_layers)),
        (key("feed_forward_length"), u(cfg.intermediate_size)),
        (key("attention.head_count"), u(cfg.num_attention_heads)),
        (key("attention.head_count_kv"), u(cfg.num_key_value_heads)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Meta::F32(cfg.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), Meta::F32(cfg.rope_theta as f32)),
        (key("rope.dimension_count"), u(cfg.head_dim)),
    ];
    if let Some(s) = cfg
        .rope_scaling
        .as_ref()
        .filter(|s| s.rope_type == "longrope")
    {
        // llama.cpp holds LongRoPE's factors as tensors of its phi3 architecture only
        return Err(Error::Unsupported(format!(
            "{}: LongRoPE scaling (rope_scaling.rope_type `{}`) has no GGUF form for the llama \
             and qwen2 architectures (llama.cpp reads its factors for phi3 only)",
            path.display(),
            s.rope_type
        )));
    }
    let written = |s: &&RopeScaling| s.rope_type == "linear" || s.rope_type == "yarn";
    if let Some(s) = cfg.rope_scaling.as_ref().filter(written) {
        // linear and yarn as llama.cpp's converter writes them (llama3: a tensor, below;
        // dynamic NTK acts only past the context length, so within it there is nothing to write)
        md.push((key("rope.scaling.type"), text(&s.rope_type)));
        md.push((key("rope.scaling.factor"), Meta::F32(s.factor as f32)));
        if s.rope_type == "yarn" {
            if !s.yarn_defaults() {
                return Err(Error::Unsupported(format!(
                    "{}: YaRN with attention_factor {} (not 0.1 ln(factor) + 1) or truncate \
                     false has no GGUF key that every llama.cpp reads the same way",
                    path.display(),
                    s.attention_factor
                )));
            }
            md.push((
                key("rope.scaling.original_context_length"),
                u(s.original_max_position_embeddings),
            ));
            md.push((
                key("rope.scaling.yarn_beta_fast"),
                Meta::F32(s.beta_fast as f32),
            ));
            md.push((
                key("rope.scaling.yarn_beta_slow"),
                Meta::F32(s.beta_slow as f32),
            ));
        }
    }
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        md.push((key("attention.key_length"), u(cfg.head_dim)));
        md.push((key("attention.value_length"), u(cfg.head_dim)));
    }
    md.extend(
        tokenizer_metadata(tok, cfg.vocab_size)
            .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?,
    );
    let mut out = Vec::with_capacity(tensors.len());
    let mut fell_back = Vec::new();
    for (hf, t) in tensors {
        if hf == "lm_head.weight" && cfg.tie_word_embeddings {
            continue; // llama.cpp reads the embedding for a missing output.weight
        }
        let g =
            gguf_name(&hf).ok_or_else(|| Error::msg(format!("tensor `{hf}` has no GGUF name")))?;
        let llama_qk = match (arch, qk_heads(&g, cfg)) {
            ("llama", Some(h)) => Some(h),
            _ => None,
        };
        let t = match llama_qk {
            Some(h) => permute(&t, h)?,
            None => t,
        };
        let grid = match (exact.get(&hf), ty) {
            (Some(grid), GgmlDType::Q4_1) => {
                let rows = |t: &Tensor| match llama_qk {
                    Some(h) => permute(t, h),
                    None => Ok(t.clone()),
                };
                let grid = QuantGrid {
                    codes: rows(&grid.codes)?,
                    step: rows(&grid.step)?,
                    offset: rows(&grid.offset)?,
                    bits: grid.bits,
                };
                q4_1_of_grid(&grid)?
            }
            _ => None,
        };
        let q = match grid {
            Some(q) => q,
            None => encode(&g, &t, ty, &mut fell_back)?,
        };
        out.push((g.clone(), q));
    }
    if let Some(f) = cfg.rope_freq_factors() {
        // llama3 rope scaling as llama.cpp's converter writes it: the factors as a tensor, no
        // metadata
        let t = Tensor::from_vec(f.clone(), f.len(), &candle_core::Device::Cpu)?;
        out.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    write_file(path, &md, &out)?;
    Ok(fell_back)
}

/// Heads of a q or k projection named in GGUF (`blk.N.attn_q.*`, `blk.N.attn_k.*`).
pub(crate) fn qk_heads(gguf: &str, cfg: &LlamaConfig) -> Option<usize> {
    if gguf.contains(".attn_q.") {
        Some(cfg.num_attention_heads)
    } else if gguf.contains(".attn_k.") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}
