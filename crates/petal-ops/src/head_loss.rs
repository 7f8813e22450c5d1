//! Fused output head + cross-entropy: `sum_i CE(h_i W^T, y_i)` over rows in chunks. The
//! gradient with respect to h is formed in the same pass ((softmax - onehot) W per chunk), so
//! no more than one chunk of logits, or of their gradient, ever exists; W is frozen and gets no
//! gradient. Backward only scales the stored dh by the upstream gradient of each row's loss.
//! Replaces: an (n, V) logits buffer, ~6 composed passes over it forward and ~8 backward.

use crate::bf16::{mm_bf16_packed, BView, PackedB};
use crate::cpu::{
    act_in, act_out, bf16s, cols, f32s, fast_bf16_ok, fast_linear_ok, last_dim, mm, rows,
};
use crate::loss::{cross_entropy_composed, cross_entropy_grad, IGNORE_INDEX};
use crate::quant::{self, QFormat};
use crate::vmath;
use crate::Kernels;
use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

const CHUNK: usize = 256;

struct HeadLoss {
    w: Tensor, // (V, d), frozen; raw blocks (V, row_bytes) when `quant`
    quant: Option<QFormat>,
    /// a quantized head's product arithmetic (see `quant::mode`)
    quant_mode: quant::Mode,
    labels: Vec<i64>,
    need_grad: bool,
    dh: Mutex<Option<Tensor>>,
}

/// The head weight as the kernels read it.
enum Head<'a> {
    F32(&'a [f32]),
    Bf16(PackedB, Option<PackedB>),
    /// Quantized rows: each product decodes tiles of W (`quant`), never all of it.
    Quant(&'a [u8], QFormat, quant::Mode),
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "petal-head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // bf16 rows are widened once (n x d, small next to one chunk of logits)
        let (h, d) = (act_in(s, l)?, last_dim(l));
        let n = h.len() / d;
        let v = self.w.dim(0)?;
        let w = self.w.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cpu(wc) = &*ws else {
            candle_core::bail!("head loss: the CPU kernel got a weight on another device")
        };
        // a bf16 head is packed once for both products (logits: W^T; input gradient: W)
        let w = match wc {
            CpuStorage::BF16(_) => {
                let b = bf16s(wc, wl)?;
                let fwd = PackedB::new(d, v, BView { x: b, rs: 1, cs: d }, true);
                let bwd = self
                    .need_grad
                    .then(|| PackedB::new(v, d, BView { x: b, rs: d, cs: 1 }, true));
                Head::Bf16(fwd, bwd)
            }
            CpuStorage::U8(b) => {
                let fmt = self.quant.ok_or_else(|| {
                    candle_core::Error::Msg("head loss: u8 weight without a block format".into())
                })?;
                let (o1, o2) = wl.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("head loss: weight not contiguous".into())
                })?;
                Head::Quant(&b[o1..o2], fmt, self.quant_mode)
            }
            _ => Head::F32(f32s(wc, wl)?),
        };
        let mut loss = vec![0f32; n];
        let mut dh = if self.need_grad {
            vec![0f32; n * d]
        } else {
            Vec::new()
        };
        // one logits buffer for all chunks: no fresh (rows, V) allocation per chunk
        let mut z = vec![0f32; CHUNK.min(n) * v];
        for a in (0..n).step_by(CHUNK) {
            let b = (a + CHUNK).min(n);
            let z = &mut z[..(b - a) * v];
            let hc = rows(&h[a * d..b * d], d);
            match &w {
                Head::F32(w) => mm(b - a, v, d, z, false, 1.0, hc, cols(w, d), true),
                Head::Bf16(fwd, _) => mm_bf16_packed(b - a, z, false, 1.0, hc.into(), fwd, true),
                Head::Quant(w, f, bf) => {
                    quant::forward_into(&h[a * d..b * d], b - a, *f, w, v, z, *bf)
                }
            }
            let labels = &self.labels[a..b];
            z.par_chunks_mut(v)
                .zip(loss[a..b].par_iter_mut())
                .zip(labels.par_iter())
                .for_each(|((row, lo), &y)| {
                    if y == IGNORE_INDEX {
                        row.iter_mut().for_each(|x| *x = 0.0);
                        return;
                    }
                    let m = vmath::max(row);
                    let picked = row[y as usize];
                    let sum = vmath::exp_sub_sum(row, m); // one exp pass
                    *lo = m + sum.ln() - picked;
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv); // softmax
                    row[y as usize] -= 1.0;
                });
            if self.need_grad {
                let dhc = &mut dh[a * d..b * d];
                match &w {
                    Head::F32(w) => mm(b - a, d, v, dhc, false, 1.0, rows(z, v), rows(w, d), true),
                    Head::Bf16(_, Some(bwd)) => {
                        mm_bf16_packed(b - a, dhc, false, 1.0, rows(z, v).into(), bwd, true)
                    }
                    Head::Bf16(_, None) => unreachable!("packed when the gradient is needed"),
                    Head::Quant(w, f, bf) => quant::input_grad_into(z, b - a, *f, w, v, dhc, *bf),
                }
            }
        }
        if self.need_grad {
            // the gradient in h's own dtype
            let t = crate::cpu::tensor(act_out(dh, s.dtype())?, (n, d));
            *self
                .dh
                .lock()
                .map_err(|_| candle_core::Error::Msg("head loss: poisoned".into()))? = Some(t);
        }
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(&self, _h: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dh = self
            .dh
            .lock()
            .map_err(|_| candle_core::Error::Msg("head loss: poisoned".into()))?
            .clone();
        let dh =
            dh.ok_or_else(|| candle_core::Error::Msg("head loss: no stored gradient".into()))?;
        Ok(Some(
            dh.broadcast_mul(&g.to_dtype(dh.dtype())?.unsqueeze(1)?)?,
        ))
    }
}

/// Rows of logits per chunk in the composed head loss: about 4M values (16 MB in f32; its
/// backward holds about four such temporaries at once).
fn composed_chunk_rows(vocab: usize) -> usize {
    ((1 << 22) / vocab.max(1)).max(1)
}

/// The head loss from candle ops, on any device, as one `lean` node: forward and backward each
/// go through the rows a chunk of logits at a time, so no more than one chunk of logits or of
/// their gradient exists at once (backward computes the chunk's logits again). `step` rows
/// per chunk.
fn head_loss_composed(
    k: Kernels,
    h: &Tensor,
    w: &Tensor,
    labels: &[i64],
    step: usize,
) -> Result<Tensor> {
    let n = labels.len();
    let h2 = h.reshape((n, w.dim(1)?))?;
    let spans: Vec<(usize, usize)> = (0..n).step_by(step).map(|s| (s, step.min(n - s))).collect();
    let (lab, wc, sp) = (labels.to_vec(), w.clone(), spans.clone());
    // the labels on the device, for the CUDA cross-entropy kernels
    let on_gpu = crate::cuda::usable(k, h, crate::cuda::Family::Loss);
    let dl = match on_gpu {
        true => Some(Tensor::from_slice(labels, n, h.device())?),
        false => None,
    };
    let dl2 = dl.clone();
    crate::lean::lean(
        &h2,
        |h| {
            let mut total = Tensor::zeros((), DType::F32, h.device())?;
            for &(s, len) in &spans {
                let logits = crate::frozen_linear(k, &h.narrow(0, s, len)?, w, None)?;
                let part = match &dl {
                    Some(dl) => crate::cuda::cross_entropy_rows(&logits, &dl.narrow(0, s, len)?)?
                        .sum_all()?,
                    None => cross_entropy_composed(&logits, &labels[s..s + len])?.0,
                };
                total = (total + part)?;
            }
            Ok(total)
        },
        move |h, _, dy| {
            let parts = sp
                .iter()
                .map(|&(s, len)| {
                    let logits = crate::frozen_linear(k, &h.narrow(0, s, len)?, &wc, None)?;
                    let g = match &dl2 {
                        Some(dl) => crate::cuda::cross_entropy_grad(
                            &logits,
                            &dl.narrow(0, s, len)?,
                            dy,
                            wc.dtype(),
                        )?,
                        None => cross_entropy_grad(&logits, &lab[s..s + len], dy)?
                            .to_dtype(wc.dtype())?,
                    };
                    g.matmul(&wc)?.to_dtype(h.dtype())
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        },
    )
}

/// Summed next-token cross-entropy of `h (n, d) W^T` against `labels (n)` (IGNORE_INDEX
/// skipped), and the number of scored rows. Fused on CPU f32; `W` must be frozen.
pub fn head_cross_entropy(
    k: Kernels,
    h: &Tensor,
    w: &Tensor,
    labels: &[i64],
) -> Result<(Tensor, usize)> {
    let count = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if !(fast_linear_ok(k, h, w) || fast_bf16_ok(k, h, w)) {
        let step = composed_chunk_rows(w.dim(0)?);
        return Ok((head_loss_composed(k, h, w, labels, step)?, count));
    }
    let op = HeadLoss {
        w: w.clone(),
        quant: None,
        quant_mode: quant::Mode::F32,
        labels: labels.to_vec(),
        need_grad: h.track_op(),
        dh: Mutex::new(None),
    };
    Ok((h.contiguous()?.apply_op1(op)?.sum_all()?, count))
}

/// [`head_cross_entropy`] for a head kept quantized (`w`: raw blocks in `fmt`, see
/// `quant`): the fused kernel, decoding tiles of W in each product.
pub fn head_cross_entropy_quant(
    k: Kernels,
    h: &Tensor,
    w: &Tensor,
    fmt: QFormat,
    labels: &[i64],
) -> Result<(Tensor, usize)> {
    let count = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if !h.device().is_cpu() {
        candle_core::bail!("quantized heads run on the CPU only (for now)")
    }
    let op = HeadLoss {
        w: w.clone(),
        quant: Some(fmt),
        quant_mode: quant::mode(k),
        labels: labels.to_vec(),
        need_grad: h.track_op(),
        dh: Mutex::new(None),
    };
    Ok((h.contiguous()?.apply_op1(op)?.sum_all()?, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rand, same};

    /// `rows` labels over `classes`, every 7th ignored.
    fn labels(rows: usize, classes: usize) -> Vec<i64> {
        (0..rows)
            .map(|i| match i % 7 {
                0 => IGNORE_INDEX,
                _ => (i * 13 % classes) as i64,
            })
            .collect()
    }

    #[test]
    fn quantized_head_loss_matches_dequantized_logits_then_cross_entropy() {
        // 700 classes over two tiles of rows, 300 rows: two chunks, one partial
        let (q, fmt) = quant::quantize(&rand(&[700, 512], 3), quant::GgmlDType::Q4K).unwrap();
        let dense = quant::dequantize(&q, fmt).unwrap();
        let labels = labels(300, 700);
        same(
            &[rand(&[300, 512], 4)],
            |t| {
                head_cross_entropy_quant(Kernels::REFERENCE, &t[0], &q, fmt, &labels)
                    .unwrap()
                    .0
            },
            |t| {
                let logits = t[0].matmul(&dense.t().unwrap()).unwrap();
                cross_entropy_composed(&logits, &labels).unwrap().0
            },
        );
    }

    #[test]
    fn fused_head_loss_matches_logits_then_cross_entropy_in_value_and_gradient() {
        let w = rand(&[700, 16], 3); // 700 classes, 600 rows: three chunks, one partial
        let labels = labels(600, 700);
        same(
            &[rand(&[600, 16], 4)],
            |t| {
                head_cross_entropy(Kernels::FUSED, &t[0], &w, &labels)
                    .unwrap()
                    .0
            },
            |t| {
                cross_entropy_composed(&t[0].matmul(&w.t().unwrap()).unwrap(), &labels)
                    .unwrap()
                    .0
            },
        );
    }

    #[test]
    fn fused_head_loss_on_a_bf16_head_matches_rounded_logits_then_cross_entropy() {
        if !crate::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let bf = candle_core::DType::BF16;
        let w = rand(&[300, 40], 3).to_dtype(bf).unwrap();
        let wf = w.to_dtype(candle_core::DType::F32).unwrap();
        let labels: Vec<i64> = (0..260).map(|i| (i * 7 % 300) as i64).collect();
        let x = candle_core::Var::from_tensor(&rand(&[260, 40], 4)).unwrap();
        let (fast, _) = head_cross_entropy(Kernels::FUSED, x.as_tensor(), &w, &labels).unwrap();
        let xr = x
            .as_tensor()
            .to_dtype(bf)
            .unwrap()
            .to_dtype(wf.dtype())
            .unwrap();
        let (slow, _) =
            cross_entropy_composed(&xr.matmul(&wf.t().unwrap()).unwrap(), &labels).unwrap();
        let rel = crate::testing::max_rel(&fast, &slow);
        assert!(rel < 1e-5, "loss differs: {rel}");
        // d loss / dh = (softmax - onehot) W, with the softmax rounded to bf16 on its way in
        let g = fast.backward().unwrap();
        let x2 = candle_core::Var::from_tensor(&xr).unwrap();
        let logits = x2.as_tensor().matmul(&wf.t().unwrap()).unwrap();
        let g2 = cross_entropy_composed(&logits, &labels)
            .unwrap()
            .0
            .backward()
            .unwrap();
        let rel = crate::testing::max_rel(g.get(&x).unwrap(), g2.get(&x2).unwrap());
        assert!(rel < 1e-2, "gradient differs: {rel}");
    }

    #[test]
    fn the_composed_head_loss_in_chunks_matches_logits_then_cross_entropy_in_value_and_gradient() {
        // the path a GPU takes: 5 rows a chunk over 23 rows (a partial last chunk), a graph node
        // whose backward recomputes each chunk's logits
        let w = rand(&[40, 6], 5);
        let labels: Vec<i64> = (0..23)
            .map(|i| {
                if i % 4 == 1 {
                    IGNORE_INDEX
                } else {
                    (i * 11 % 40) as i64
                }
            })
            .collect();
        same(
            &[rand(&[23, 6], 6)],
            |t| head_loss_composed(Kernels::REFERENCE, &t[0], &w, &labels, 5).unwrap(),
            |t| {
                cross_entropy_composed(&t[0].matmul(&w.t().unwrap()).unwrap(), &labels)
                    .unwrap()
                    .0
            },
        );
    }
}
