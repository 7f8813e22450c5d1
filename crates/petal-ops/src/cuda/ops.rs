//! The ops on petal's CUDA kernels: each builds its launches and a backward.

use super::launch::{
    int, launch, rows_cols, sfx, Arg, Bwd1, Bwd2, Bwd3, Kernel, Kernel2, Kernel3, Spec,
};
use super::MAX_HEAD_DIM;
use candle_core::{DType, Result, Shape, Tensor};

/// RMSNorm with a frozen weight, `x r w` in w's dtype (r = 1 / sqrt(mean(x^2) + eps)).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (rows, cols) = rows_cols(&x)?;
    let (sx, sw) = (sfx(x.dtype()), sfx(w.dtype()));
    let eps = eps as f32;
    let fwd = Spec::rows(
        format!("rms_fwd_{sx}_{sw}"),
        rows,
        cols,
        x.shape().clone(),
        w.dtype(),
    )
    .arg(int(cols)?)
    .arg(Arg::F32(eps));
    let wb = w.clone();
    let bwd: Bwd1 = Box::new(move |x, _, dy| {
        let spec = Spec::rows(
            format!("rms_bwd_{}_{}", sfx(x.dtype()), sfx(wb.dtype())),
            rows,
            cols,
            x.shape().clone(),
            x.dtype(),
        )
        .arg(int(cols)?)
        .arg(Arg::F32(eps));
        launch(spec, &[x, &wb, &dy.to_dtype(wb.dtype())?])
    });
    x.apply_op1(Kernel {
        spec: fwd,
        rest: vec![w],
        bwd: Some(bwd),
    })
}

/// softmax(scale x) over the last dimension; `causal` (t, offset): rows are groups of t
/// queries at positions offset.., each seeing the keys up to its own position.
pub fn softmax(x: &Tensor, scale: f64, causal: Option<(usize, usize)>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (rows, cols) = rows_cols(&x)?;
    let (t, offset) = causal.unwrap_or((0, 0));
    let s = sfx(x.dtype());
    let scale = scale as f32;
    let fwd = Spec::rows(
        format!("softmax_fwd_{s}"),
        rows,
        cols,
        x.shape().clone(),
        x.dtype(),
    )
    .arg(int(cols)?)
    .arg(Arg::F32(scale))
    .arg(int(t)?)
    .arg(int(offset)?);
    let bwd: Bwd1 = Box::new(move |x, y, dy| {
        let spec = Spec::rows(
            format!("softmax_bwd_{}", sfx(y.dtype())),
            rows,
            cols,
            x.shape().clone(),
            y.dtype(),
        )
        .arg(int(cols)?)
        .arg(Arg::F32(scale));
        launch(spec, &[y, &dy.to_dtype(y.dtype())?])
    });
    x.apply_op1(Kernel {
        spec: fwd,
        rest: vec![],
        bwd: Some(bwd),
    })
}

fn rope_spec(x: &Tensor, d: usize, t: usize, per_pos: usize, sign: f32) -> Result<Spec> {
    let heads = x.elem_count() / d;
    Ok(Spec::items(
        format!("rope_{}", sfx(x.dtype())),
        heads * d / 2,
        x.shape().clone(),
        x.dtype(),
    )
    .arg(Arg::I64(heads as i64))
    .arg(int(d)?)
    .arg(int(t)?)
    .arg(int(per_pos)?)
    .arg(Arg::F32(sign)))
}

/// Rotate-half RoPE: heads of `d = 2 * cos.dim(1)` values, head h at position
/// `(h / per_pos) % t` of the tables cos/sin (t, d/2); backward turns back.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, t: usize, per_pos: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    let f = |c: &Tensor| c.to_dtype(DType::F32)?.contiguous();
    let (cos, sin) = (f(cos)?, f(sin)?);
    let d = 2 * cos.dim(1)?;
    let (cb, sb) = (cos.clone(), sin.clone());
    let bwd: Bwd1 = Box::new(move |x, _, dy| {
        let dy = dy.to_dtype(x.dtype())?;
        launch(rope_spec(&dy, d, t, per_pos, -1.0)?, &[&dy, &cb, &sb])
    });
    x.apply_op1(Kernel {
        spec: rope_spec(&x, d, t, per_pos, 1.0)?,
        rest: vec![cos, sin],
        bwd: Some(bwd),
    })
}

/// silu(g) u for g, u of one shape and dtype.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    let n = g.elem_count();
    let s = sfx(g.dtype());
    let fwd = Spec::items(format!("swiglu_fwd_{s}"), n, g.shape().clone(), g.dtype())
        .arg(Arg::I64(n as i64));
    let bwd: Bwd2 = Box::new(move |g, u, dy| {
        let mut dims = vec![2];
        dims.extend(g.dims());
        let spec = Spec::items(
            format!("swiglu_bwd_{}", sfx(g.dtype())),
            n,
            Shape::from(dims),
            g.dtype(),
        )
        .arg(Arg::I64(n as i64));
        let both = launch(spec, &[g, u, &dy.to_dtype(g.dtype())?])?;
        Ok((both.get(0)?, both.get(1)?))
    });
    g.apply_op2(
        &u,
        Kernel2 {
            spec: fwd,
            rest: vec![],
            bwd,
        },
    )
}

/// Per-row cross-entropy (rows,) in f32 of logits (rows, vocab) against `labels` (rows,) i64
/// on the device; 0 on ignored rows (negative labels). No graph.
pub fn cross_entropy_rows(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (rows, cols) = rows_cols(logits)?;
    let spec = Spec::rows(
        format!("ce_fwd_{}", sfx(logits.dtype())),
        rows,
        cols,
        Shape::from(rows),
        DType::F32,
    )
    .arg(int(cols)?);
    launch(spec, &[logits, labels])
}

/// `dy (softmax(logits) - onehot(labels))` in `dtype`, 0 on ignored rows; `dy` one f32 on the
/// device. No graph.
pub fn cross_entropy_grad(
    logits: &Tensor,
    labels: &Tensor,
    dy: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let (rows, cols) = rows_cols(logits)?;
    let spec = Spec::rows(
        format!("ce_grad_{}_{}", sfx(logits.dtype()), sfx(dtype)),
        rows,
        cols,
        logits.shape().clone(),
        dtype,
    )
    .arg(int(cols)?);
    let dy = dy.to_dtype(DType::F32)?.reshape(1)?;
    launch(spec, &[logits, labels, &dy])
}

/// Causal attention `softmax(scale q k^T + mask) v` on the token-major layout: q (b, t, nh *
/// d) or (b, t, nh, d), k and v (b, T, nkv * d) or (b, T, nkv, d), query i at position
/// T - t + i seeing keys up to it, query head h reading kv head h / (nh / nkv). With `rope`
/// (cos, sin tables (positions >= T, d/2) from position 0, and the first key to rotate), q
/// and k come unrotated and the kernels rotate them as they read them (and turn dq, dk back).
/// Never holds the (t, T) scores nor a rotated copy: forward keeps nothing but the output,
/// backward recomputes the rows' log-sum-exp, then dq and dk, dv. `head_dim` up to
/// `MAX_HEAD_DIM`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    head_dim: usize,
    scale: f64,
    rope: Option<(&Tensor, &Tensor, usize)>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (b, t, keys, d) = (q.dim(0)?, q.dim(1)?, k.dim(1)?, head_dim);
    let (nh, nkv) = (
        q.elem_count() / (b * t * d),
        k.elem_count() / (b * keys * d),
    );
    if d == 0 || d > MAX_HEAD_DIM || nkv == 0 || nh % nkv != 0 || keys < t {
        candle_core::bail!("cuda attention: heads of {d} (at most {MAX_HEAD_DIM}), {nh} query and {nkv} kv heads, {t} queries over {keys} keys")
    }
    // the tables' rows for positions 0..keys (a placeholder without RoPE)
    let (tables, from) = match rope {
        Some((cos, sin, from)) => {
            let f = |x: &Tensor| x.narrow(0, 0, keys)?.to_dtype(DType::F32)?.contiguous();
            (vec![f(cos)?, f(sin)?], from)
        }
        None => {
            let z = Tensor::zeros(1, DType::F32, q.device())?;
            (vec![z.clone(), z], 0)
        }
    };
    // rows per block and keys per tile (TQ, TK in attention.cu)
    let tile = if d > 64 { 16 } else { 32 };
    let scale = scale as f32;
    let on = Arg::I32(i32::from(rope.is_some()));
    let (dims, with_b) = (
        vec![int(t)?, int(keys)?, int(nh)?, int(nkv)?, Arg::F32(scale)],
        int(b)?,
    );
    let spec = move |kernel: &str, dt: DType, shape: Shape, over_keys: bool| {
        let mut args = dims.clone();
        if kernel != "fwd" {
            args.push(with_b);
        }
        args.extend([on, int(from)?]);
        Ok::<_, candle_core::Error>(Spec {
            name: format!("attn_{kernel}_{}", sfx(dt)),
            shape,
            dtype: if kernel == "stats" { DType::F32 } else { dt },
            args,
            grid: match over_keys {
                true => (keys.div_ceil(tile) as u32, nkv as u32, b as u32),
                false => (t.div_ceil(tile) as u32, nh as u32, b as u32),
            },
            block: tile as u32,
            head_dim: d,
        })
    };
    let fwd = spec("fwd", q.dtype(), q.shape().clone(), false)?;
    let (cs, sn) = (tables[0].clone(), tables[1].clone());
    let bwd: Bwd3 = Box::new(move |[q, k, v], _, o, dy| {
        let dy = dy.to_dtype(q.dtype())?;
        let dt = q.dtype();
        let stats_shape = Shape::from((2, b, nh, t));
        let stats = launch(
            spec("stats", dt, stats_shape, false)?,
            &[q, k, o, &dy, &cs, &sn],
        )?;
        let dq = launch(
            spec("dq", dt, q.shape().clone(), false)?,
            &[q, k, v, &dy, &stats, &cs, &sn],
        )?;
        let mut two = vec![2];
        two.extend(k.dims());
        let dkv = launch(
            spec("dkv", dt, Shape::from(two), true)?,
            &[q, k, v, &dy, &stats, &cs, &sn],
        )?;
        Ok([Some(dq), Some(dkv.get(0)?), Some(dkv.get(1)?)])
    });
    q.apply_op3(&k, &v, Kernel3::new(fwd, tables, bwd))
}

/// The largest LoRA rank `lora` takes (its kernel keeps x A^T of a row in shared memory).
pub const MAX_LORA_RANK: usize = 64;

/// LoRA without dropout, `x W^T + bias + scale (x A^T) B^T`: the base product by candle (a
/// frozen matmul, not kept by the graph), then one launch adding the low-rank term. A and B in
/// f32, rank up to `MAX_LORA_RANK`. Backward: LoRA's closed form (dx, dA, dB).
pub fn lora(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let r = a.dim(0)?;
    if r > MAX_LORA_RANK || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        candle_core::bail!("cuda lora: rank {r} (at most {MAX_LORA_RANK}) with f32 A and B")
    }
    let x = x.contiguous()?;
    let n = x.elem_count() / inp;
    let base = crate::frozen_linear(crate::Kernels::FUSED, &x.detach(), w, bias)?.contiguous()?;
    let spec = Spec {
        name: format!("lora_fwd_{}", sfx(x.dtype())),
        shape: base.shape().clone(),
        dtype: x.dtype(),
        args: vec![int(inp)?, int(r)?, int(out)?, Arg::F32(scale as f32)],
        grid: (n as u32, 1, 1),
        block: 256,
        head_dim: 0,
    };
    let wc = w.clone();
    let bwd: Bwd3 = Box::new(move |[x, a, b], need, _, dy| {
        crate::lora_linear::lora_backward([x, &wc, a, b], scale, dy, need)
    });
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    x.apply_op3(&a, &b, Kernel3::new(spec, vec![base], bwd))
}

/// One AdamW step's constants, bias corrections included.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1 - beta1^t and 1 - beta2^t
    pub bc1: f64,
    pub bc2: f64,
}

/// AdamW on every parameter at once, in place: `w[i]`, `m[i]`, `v[i]` (contiguous f32 CUDA
/// tensors on one device, the optimizer's own) updated from `g[i]`, torch.optim.AdamW's
/// arithmetic; one launch and one small copy of their addresses, in place of a dozen
/// launches per parameter plus copies in and out of flat buffers.
pub fn adamw_step(
    w: &[Tensor],
    g: &[Tensor],
    m: &[Tensor],
    v: &[Tensor],
    s: AdamStep,
) -> Result<()> {
    let n = w.len();
    if g.len() != n || m.len() != n || v.len() != n {
        candle_core::bail!(
            "adamw_step: {n} parameters but {}, {}, {} gradients, m, v",
            g.len(),
            m.len(),
            v.len()
        )
    }
    for i in 0..n {
        for t in [&w[i], &g[i], &m[i], &v[i]] {
            let ok = t.dtype() == DType::F32
                && t.is_contiguous()
                && t.elem_count() == w[i].elem_count()
                && t.device().same_device(w[0].device());
            if !ok {
                candle_core::bail!("adamw_step: parameter {i}'s tensors are not contiguous f32 of one size on one device")
            }
        }
    }
    #[cfg(feature = "cuda")]
    return super::imp::adamw(w, g, m, v, s);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = s;
        super::launch::no_cpu()
    }
}
