//! The composed twins of the attention kernel, from candle ops: the reference the kernel is
//! tested against, and the path other devices take (inside one recomputing graph node).

use super::{token_heads, Rope};
use crate::Kernels;
use candle_core::{DType, Result, Tensor};

/// `causal_attention_bthd` composed from candle ops: RoPE, heads turned first, grouped queries,
/// `causal_attention_composed`, turned back (`kern`: which softmax and RoPE ops).
pub(super) fn attention_bthd_composed(
    kern: Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d: usize,
    scale: f64,
    rope: Option<Rope>,
) -> Result<Tensor> {
    let (nh, nkv) = (token_heads(q.dims(), d)?, token_heads(k.dims(), d)?);
    let (b, t, keys) = (q.dim(0)?, q.dim(1)?, k.dim(1)?);
    let (q, k) = rotate(kern, q, k, rope)?;
    // (b, heads, t, d)
    let g = |x: &Tensor, h| x.reshape((b, (), h, d))?.transpose(1, 2)?.contiguous();
    let qg = g(&q, nh)?.reshape((b, nkv, nh / nkv * t, d))?;
    let o = causal_attention_composed(kern, &qg, &g(&k, nkv)?, &g(v, nkv)?, scale, t, keys - t)?;
    o.reshape((b, nh, t, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(q.shape())
}

/// q and k (token-major) rotated by `rope` as graph nodes: query i at position T - t + i, key j
/// at j, keys before `rope.from` as they are.
pub(super) fn rotate(
    kern: Kernels,
    q: &Tensor,
    k: &Tensor,
    rope: Option<Rope>,
) -> Result<(Tensor, Tensor)> {
    let Some(r) = rope else {
        return Ok((q.clone(), k.clone()));
    };
    let (t, keys) = (q.dim(1)?, k.dim(1)?);
    let at = |x: &Tensor, p0: usize, n: usize| -> Result<Tensor> {
        crate::apply_rope_bthd(kern, x, &r.cos.narrow(0, p0, n)?, &r.sin.narrow(0, p0, n)?)
    };
    let tail = at(&k.narrow(1, r.from, keys - r.from)?, r.from, keys - r.from)?;
    let k = match r.from {
        0 => tail, // no keys before the rotated ones: nothing to join
        f => Tensor::cat(&[&k.narrow(1, 0, f)?, &tail], 1)?,
    };
    Ok((at(q, keys - t, t)?, k))
}

/// The composed twin: scores, `causal_softmax` (in f32) and the weighted sum of values.
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    t: usize,
    offset: usize,
) -> Result<Tensor> {
    causal_attention_composed(Kernels::REFERENCE, q, k, v, scale, t, offset)
}

/// The composed path with `kern`'s softmax (a CUDA kernel where switched on).
pub(super) fn causal_attention_composed(
    kern: Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    t: usize,
    offset: usize,
) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?; // (b, g, R, T)
    let p = crate::causal_softmax(kern, &scores, scale, t, offset)?.to_dtype(v.dtype())?;
    p.matmul(v)
}
