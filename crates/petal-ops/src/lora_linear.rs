//! Fused LoRA linear: `y = x W^T + b + s * h B^T` with `h = dropout(x) A^T` (n, r) formed by the
//! caller. One output buffer instead of three ((n, out) base output, adapter output, their sum),
//! and one graph node holding x, h and B. Backward: dx = g W (only when x needs it),
//! dh = s g B, dB = s g^T h; W is frozen and gets no gradient.

use crate::bf16;
use crate::cpu::{
    act_in, act_out, act_rows, bf16s, cast, f32s, fast_act_ok, fast_lora_ok, mm_wt, with_last,
};
use crate::frozen_linear::Bf16Linear;
use crate::quant::{self, QFormat};
use crate::Kernels;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;
use std::sync::Mutex;

struct LoraLinear {
    w: Tensor,           // (out, in), frozen
    b: Option<Vec<f32>>, // (out)
    scale: f64,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "petal-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = self.w.dims2()?;
        let r = bl.shape().dims2()?.1;
        let n = xl.shape().elem_count() / inp;
        let (ws, wl) = self.w.storage_and_layout();
        let wl = wl.clone();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("petal-lora-linear: cpu only")
        };
        let x2 = Layout::contiguous_with_offset((n, inp), xl.start_offset());
        let base = match ws {
            CpuStorage::BF16(_) => CpuStorage::F32(bf16::linear(
                act_rows(xs, &x2)?,
                bf16s(ws, &wl)?,
                out,
                inp,
                true,
            )),
            _ => crate::cpu::matmul_wt(xs, &x2, ws, &wl, (n, out, inp), true)?,
        };
        let h2 = Layout::contiguous_with_offset((n, r), hl.start_offset());
        let low = crate::cpu::matmul_wt(hs, &h2, bs, bl, (n, out, r), true)?;
        let (CpuStorage::F32(mut y), CpuStorage::F32(d)) = (base, low) else {
            candle_core::bail!("petal-lora-linear: f32 only")
        };
        let s = self.scale as f32;
        for (row_y, row_d) in y.chunks_mut(out).zip(d.chunks(out)) {
            match &self.b {
                Some(b) => row_y
                    .iter_mut()
                    .zip(row_d)
                    .zip(b)
                    .for_each(|((y, d), b)| *y += s * d + b),
                None => row_y.iter_mut().zip(row_d).for_each(|(y, d)| *y += s * d),
            }
        }
        // the output in x's dtype (bf16 activations stay bf16)
        Ok((act_out(y, xs.dtype())?, with_last(xl.shape().dims(), out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let out = self.w.dim(0)?;
        let r = b.dim(1)?;
        let n = g.elem_count() / out;
        // Gradients must not carry a graph: h and B track (they depend on trainable A, B).
        let (h, b) = (h.detach(), b.detach());
        let g2 = g.detach().contiguous()?.reshape((n, out))?;
        let dx = if x.track_op() {
            Some(frozen_input_grad(&g2, &self.w)?.reshape(x.shape())?)
        } else {
            None
        };
        // the adapter's products in f32 (a bf16 gradient is widened here, transiently)
        let g2 = cast(&g2, DType::F32)?;
        let dh = (g2.matmul(&b)? * self.scale)?.reshape(h.shape())?;
        let db = (g2.t()?.matmul(&h.reshape((n, r))?)? * self.scale)?;
        Ok((dx, Some(dh), Some(db)))
    }
}

/// g W for the frozen weight W (out, in) of a linear: the input gradient of rows g (n, out),
/// through the bf16 kernel for a bf16 W; in g's dtype.
fn frozen_input_grad(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() == DType::BF16 && crate::bf16::available() && w.device().is_cpu() {
        g.apply_op2_no_bwd(w, &Bf16Linear { wt: false })
    } else {
        g.matmul(w)
    }
}

/// A linear's bias as f32 values for the kernels.
fn bias_f32(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    bias.map(|t| t.to_dtype(DType::F32)?.to_vec1()).transpose()
}

/// `x W^T + bias + scale * h B^T`: fused on CPU f32, composed elsewhere.
pub fn lora_linear(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    h: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if !fast_lora_ok(k, x, w) {
        return lora_linear_reference(x, w, bias, h, b, scale);
    }
    let op = LoraLinear {
        w: w.clone(),
        b: bias_f32(bias)?,
        scale,
    };
    x.contiguous()?.apply_op3(&h.contiguous()?, b, op)
}

/// The whole LoRA linear in one graph node: `y = x W^T + b + s (x A^T) B^T`, with x's only
/// consumer this op (so a bf16 x gathers no gradient sum from a second branch). `h = x A^T`
/// (n, r, f32) is kept for backward.
struct LoraFull {
    w: Tensor,
    /// W as quantized rows (u8 blocks) in this format, products in this arithmetic
    quant: Option<(QFormat, quant::Mode)>,
    b: Option<Vec<f32>>,
    scale: f64,
    keep_h: bool,
    h: Mutex<Option<Tensor>>,
}

impl LoraFull {
    /// W's (out, in): a quantized W's rows hold `in` values in blocks of bytes.
    fn dims(&self) -> Result<(usize, usize)> {
        let (out, cols) = self.w.dims2()?;
        Ok((out, self.quant.map_or(cols, |(fmt, _)| fmt.cols)))
    }
}

impl CustomOp3 for LoraFull {
    fn name(&self) -> &'static str {
        "petal-lora"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = self.dims()?;
        let r = al.shape().dims2()?.0;
        let n = xl.shape().elem_count() / inp.max(1);
        let x2 = Layout::contiguous_with_offset((n, inp), xl.start_offset());
        let (a, bm) = (f32s(as_, al)?, f32s(bs, bl)?);
        let xf = act_in(xs, &x2)?;
        let mut h = vec![0f32; n * r];
        mm_wt(n, r, inp, &mut h, false, 1.0, &xf, a);
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("petal-lora: cpu only")
        };
        let mut y = match (ws, self.quant) {
            (CpuStorage::U8(blocks), Some((fmt, mode))) => {
                let (o1, o2) = wl.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("petal-lora: quantized weight not contiguous".into())
                })?;
                // a pass that will take a gradient keeps x in f32 for any number of rows
                quant::forward_rows(&xf, n, fmt, &blocks[o1..o2], out, mode, self.keep_h)
            }
            (CpuStorage::BF16(_), _) => {
                bf16::linear(act_rows(xs, &x2)?, bf16s(ws, wl)?, out, inp, true)
            }
            _ => {
                let mut y = vec![0f32; n * out];
                let w = f32s(ws, wl)?;
                mm_wt(n, out, inp, &mut y, false, 1.0, &xf, w);
                y
            }
        };
        // y += s h B^T, in the same buffer
        let s = self.scale as f32;
        mm_wt(n, out, r, &mut y, true, s, &h, bm);
        if let Some(b) = &self.b {
            y.par_chunks_mut(out)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        }
        if self.keep_h {
            *self
                .h
                .lock()
                .map_err(|_| candle_core::Error::Msg("petal-lora: poisoned".into()))? =
                Some(crate::cpu::tensor(CpuStorage::F32(h), (n, r)));
        }
        Ok((act_out(y, xs.dtype())?, with_last(xl.shape().dims(), out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = self.dims()?;
        let n = g.elem_count() / out;
        let h = self
            .h
            .lock()
            .map_err(|_| candle_core::Error::Msg("petal-lora: poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("petal-lora: backward without forward".into())
            })?;
        let (a, b) = (a.detach(), b.detach());
        // the adapter's products in f32; a bf16 gradient or input is widened here, transiently
        let gf = cast(&g.reshape((n, out))?, DType::F32)?;
        let dh = (gf.matmul(&b)? * self.scale)?; // (n, r)
        let db = (gf.t()?.matmul(&h)? * self.scale)?;
        let xf = cast(&x.reshape((n, inp))?, DType::F32)?;
        let da = dh.t()?.matmul(&xf)?;
        let dx = if x.track_op() {
            let base = match self.quant {
                Some((fmt, mode)) => quant::input_grad_tensor(&gf, &self.w, fmt, mode)?,
                None => frozen_input_grad(&gf, &self.w)?,
            };
            let dx = (base + dh.matmul(&a)?)?;
            Some(cast(&dx, x.dtype())?.reshape(x.shape())?)
        } else {
            None
        };
        Ok((dx, Some(da), Some(db)))
    }
}

/// `x W^T + bias + scale (x A^T) B^T` (LoRA without dropout) in one op on the CPU (x in f32
/// or bf16, W frozen in f32 or bf16, A and B in f32); composed elsewhere.
pub fn lora(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let f32_ab = a.dtype() == DType::F32 && b.dtype() == DType::F32;
    let rank_ok = a.dim(0)? <= crate::cuda::MAX_LORA_RANK;
    if crate::cuda::usable(k, x, crate::cuda::Family::Lora) && f32_ab && rank_ok {
        return crate::cuda::lora(x, w, bias, a, b, scale);
    }
    if !fast_lora_ok(k, x, w) || !f32_ab {
        // one node that keeps x, A, B and the output only (the base product, x A^T and the
        // scaled update are not kept for backward)
        let wc = w.clone();
        return crate::lean::lean3(
            [x, a, b],
            |[x, a, b]| lora_linear_reference(x, w, bias, &low_rank(k, x, a)?, b, scale),
            move |[x, a, b], need, _, dy| lora_backward([x, &wc, a, b], scale, dy, need),
        );
    }
    lora_full(x, w, None, bias, a, b, scale)
}

/// The `LoraFull` op on x, A, B for W (quantized rows where `quant` says so).
fn lora_full(
    x: &Tensor,
    w: &Tensor,
    quant: Option<(QFormat, quant::Mode)>,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = LoraFull {
        w: w.clone(),
        quant,
        b: bias_f32(bias)?,
        scale,
        keep_h: x.track_op() || a.track_op() || b.track_op(),
        h: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// LoRA without dropout over a quantized base, `x W^T + bias + scale (x A^T) B^T` for W as
/// quantized rows (u8 blocks) in `fmt`: one op on the CPU that writes the update into the base
/// product's buffer and keeps x, A, B and `x A^T` (n, r) only; backward decodes W's tiles again
/// for dx. Composed (`quant_lora_linear` on `x A^T`) where the fused kernels are off or A, B
/// are not f32.
#[allow(clippy::too_many_arguments)]
pub fn quant_lora(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    fmt: QFormat,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let f32_ab = a.dtype() == DType::F32 && b.dtype() == DType::F32;
    if !(fast_act_ok(k, x) && w.dtype() == DType::U8 && f32_ab) {
        let h = low_rank(k, x, a)?;
        return quant::quant_lora_linear(k, x, w, fmt, bias, &h, b, scale);
    }
    lora_full(x, w, Some((fmt, quant::mode(k))), bias, a, b, scale)
}

/// `x A^T` as (n, r) f32 for `x (.., in)` in f32 or bf16 and an f32 `A (r, in)`: LoRA's down
/// projection. A bf16 `x` is widened inside the op, so no f32 copy of it stays in the graph;
/// backward gives dx (in x's dtype) = dh A and dA = dh^T x.
pub fn low_rank(k: Kernels, x: &Tensor, a: &Tensor) -> Result<Tensor> {
    let inp = a.dim(1)?;
    let x2 = x.reshape((x.elem_count() / inp, inp))?;
    if x.dtype() == DType::F32 {
        return x2.matmul(&a.t()?);
    }
    if !fast_act_ok(k, x) || a.dtype() != DType::F32 {
        return x2.to_dtype(DType::F32)?.matmul(&a.t()?);
    }
    x2.contiguous()?.apply_op2(&a.contiguous()?, LowRank)
}

struct LowRank;

impl CustomOp2 for LowRank {
    fn name(&self) -> &'static str {
        "petal-low-rank"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (r, inp) = al.shape().dims2()?;
        let x = act_in(xs, xl)?;
        let a = crate::cpu::f32s(as_, al)?;
        let n = x.len() / inp.max(1);
        let mut h = vec![0f32; n * r];
        let (xv, av) = (crate::cpu::rows(&x, inp), crate::cpu::cols(a, inp));
        crate::cpu::mm(n, r, inp, &mut h, false, 1.0, xv, av, true);
        Ok((CpuStorage::F32(h), Shape::from((n, r))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _h: &Tensor,
        dh: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_da) = (x.track_op(), a.track_op());
        let (x, a, dh) = (x.detach(), a.detach(), dh.detach());
        let dx = need_dx
            .then(|| cast(&dh.matmul(&a)?, x.dtype()))
            .transpose()?;
        // a frozen A (VeRA's shared projection) gets no gradient computed
        let da = need_da
            .then(|| dh.t()?.matmul(&cast(&x, DType::F32)?))
            .transpose()?;
        Ok((dx, da))
    }
}

/// The gradients of `x W^T (+ bias) + s (x A^T) B^T` for a frozen W, x of any float dtype:
/// dx = dy W + s (dy B) A, dA = s (dy B)^T x, dB = s dy^T (x A^T) (f32 inside; each in its
/// input's dtype), computed where `need` asks.
pub(crate) fn lora_backward(
    [x, w, a, b]: [&Tensor; 4],
    scale: f64,
    dy: &Tensor,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    let (out, inp) = w.dims2()?;
    let n = x.elem_count() / inp;
    let g = dy.reshape((n, out))?;
    let gf = g.to_dtype(DType::F32)?;
    let (af, bf) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let dh = (gf.matmul(&bf)? * scale)?; // (n, r)
    let dx = need[0]
        .then(|| -> Result<Tensor> {
            let base = g.to_dtype(w.dtype())?.matmul(w)?.to_dtype(x.dtype())?;
            (base + dh.matmul(&af)?.to_dtype(x.dtype())?)?.reshape(x.shape())
        })
        .transpose()?;
    let xf = x.reshape((n, inp))?.to_dtype(DType::F32)?;
    let da = need[1]
        .then(|| dh.t()?.matmul(&xf)?.to_dtype(a.dtype()))
        .transpose()?;
    let db = need[2]
        .then(|| (gf.t()?.matmul(&xf.matmul(&af.t()?)?)? * scale)?.to_dtype(b.dtype()))
        .transpose()?;
    Ok([dx, da, db])
}

/// The composed twin of `lora_linear`: the base product through `frozen_linear` (tested on its
/// own; a bf16 weight takes the same AVX512-BF16 product as the fused op), plus the low-rank
/// term from candle ops.
pub fn lora_linear_reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    h: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let y = crate::frozen_linear(Kernels::FUSED, x, w, bias)?;
    let r = b.dim(1)?;
    let h2 = h.reshape((h.elem_count() / r, r))?;
    let d = (h2.matmul(&b.t()?)? * scale)?
        .reshape(y.shape())?
        .to_dtype(y.dtype())?;
    y + d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rand, same};

    #[test]
    fn fused_lora_linear_matches_base_plus_scaled_low_rank_in_value_and_all_gradients() {
        let w = rand(&[7, 5], 1);
        let bias = rand(&[7], 2);
        same(
            &[rand(&[2, 3, 5], 3), rand(&[2, 3, 4], 4), rand(&[7, 4], 5)],
            |t| lora_linear(Kernels::FUSED, &t[0], &w, Some(&bias), &t[1], &t[2], 1.25).unwrap(),
            |t| lora_linear_reference(&t[0], &w, Some(&bias), &t[1], &t[2], 1.25).unwrap(),
        );
    }

    #[test]
    fn one_node_lora_matches_base_plus_scaled_low_rank_in_value_and_every_gradient() {
        let w = rand(&[7, 5], 1);
        let bias = rand(&[7], 2);
        same(
            &[rand(&[2, 3, 5], 3), rand(&[4, 5], 4), rand(&[7, 4], 5)],
            |t| lora(Kernels::FUSED, &t[0], &w, Some(&bias), &t[1], &t[2], 1.25).unwrap(),
            |t| {
                let h = t[0]
                    .reshape((6, 5))
                    .unwrap()
                    .matmul(&t[1].t().unwrap())
                    .unwrap();
                lora_linear_reference(&t[0], &w, Some(&bias), &h, &t[2], 1.25).unwrap()
            },
        );
    }

    #[test]
    fn fused_lora_linear_on_a_bf16_weight_matches_the_composed_mixed_precision_form() {
        if !crate::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let w = rand(&[40, 37], 1).to_dtype(DType::BF16).unwrap();
        let bias = rand(&[40], 2);
        same(
            &[rand(&[2, 3, 37], 3), rand(&[2, 3, 4], 4), rand(&[40, 4], 5)],
            |t| lora_linear(Kernels::FUSED, &t[0], &w, Some(&bias), &t[1], &t[2], 0.5).unwrap(),
            |t| lora_linear_reference(&t[0], &w, Some(&bias), &t[1], &t[2], 0.5).unwrap(),
        );
    }
}
