//! Fused LoRA linear: `y = x W^T + b + s * h B^T` with `h = dropout(x) A^T` (n, r) formed by the
//! caller. One output buffer instead of three ((n, out) base output, adapter output, their sum),
//! and one graph node holding x, h and B. Backward: dx = g W (only when x needs it),
//! dh = s g B, dB = s g^T h; W is frozen and gets no gradient.

use crate::bf16;
use crate::cpu::{bf16s, f32s, fast_lora_ok, with_last};
use crate::frozen_linear::Bf16Linear;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

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
                f32s(xs, &x2)?,
                bf16s(ws, &wl)?,
                out,
                inp,
                true,
            )),
            _ => xs.matmul(ws, (1, n, out, inp), &x2, &wl.transpose(0, 1)?)?,
        };
        let h2 = Layout::contiguous_with_offset((n, r), hl.start_offset());
        let low = hs.matmul(bs, (1, n, out, r), &h2, &bl.transpose(0, 1)?)?;
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
        Ok((CpuStorage::F32(y), with_last(xl.shape().dims(), out)))
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
            let dx = if self.w.dtype() == DType::BF16 {
                g2.apply_op2(&self.w, Bf16Linear { wt: false })?
            } else {
                g2.matmul(&self.w)?
            };
            Some(dx.reshape(x.shape())?)
        } else {
            None
        };
        let dh = (g2.matmul(&b)? * self.scale)?.reshape(h.shape())?;
        let db = (g2.t()?.matmul(&h.reshape((n, r))?)? * self.scale)?;
        Ok((dx, Some(dh), Some(db)))
    }
}

/// `x W^T + bias + scale * h B^T`: fused on CPU f32, composed elsewhere.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    h: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if !fast_lora_ok(x, w) {
        return lora_linear_reference(x, w, bias, h, b, scale);
    }
    let op = LoraLinear {
        w: w.clone(),
        b: bias
            .map(|t| t.to_dtype(DType::F32)?.to_vec1())
            .transpose()?,
        scale,
    };
    x.contiguous()?.apply_op3(&h.contiguous()?, b, op)
}

pub fn lora_linear_reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    h: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let y = crate::frozen_linear(x, w, bias)?;
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
            |t| lora_linear(&t[0], &w, Some(&bias), &t[1], &t[2], 1.25).unwrap(),
            |t| lora_linear_reference(&t[0], &w, Some(&bias), &t[1], &t[2], 1.25).unwrap(),
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
            |t| lora_linear(&t[0], &w, Some(&bias), &t[1], &t[2], 0.5).unwrap(),
            |t| lora_linear_reference(&t[0], &w, Some(&bias), &t[1], &t[2], 0.5).unwrap(),
        );
    }
}
