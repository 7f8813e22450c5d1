//! Fused output head + cross-entropy: `sum_i CE(h_i W^T, y_i)` over rows in chunks. The
//! gradient with respect to h is formed in the same pass ((softmax - onehot) W per chunk), so
//! no more than one chunk of logits, or of their gradient, ever exists; W is frozen and gets no
//! gradient. Backward only scales the stored dh by the upstream gradient of each row's loss.
//! Replaces: an (n, V) logits buffer, ~6 composed passes over it forward and ~8 backward.

use crate::cpu::{cols, f32s, fast_ok, last_dim, mm, rows};
use crate::loss::{masked_cross_entropy, IGNORE_INDEX};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

const CHUNK: usize = 256;

struct HeadLoss {
    w: Tensor, // (V, d), frozen
    labels: Vec<i64>,
    need_grad: bool,
    dh: Mutex<Option<Tensor>>,
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "petal-head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, d) = (f32s(s, l)?, last_dim(l));
        let n = h.len() / d;
        let v = self.w.dim(0)?;
        let w = self.w.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cpu(wc) = &*ws else {
            candle_core::bail!("head loss: the CPU kernel got a weight on another device")
        };
        let w = f32s(wc, wl)?;
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
            mm(
                b - a,
                v,
                d,
                z,
                false,
                1.0,
                rows(&h[a * d..b * d], d),
                cols(w, d),
                true,
            );
            let labels = &self.labels[a..b];
            z.par_chunks_mut(v)
                .zip(loss[a..b].par_iter_mut())
                .zip(labels.par_iter())
                .for_each(|((row, lo), &y)| {
                    if y == IGNORE_INDEX {
                        row.iter_mut().for_each(|x| *x = 0.0);
                        return;
                    }
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = row.iter().map(|x| (x - m).exp()).sum();
                    let lse = m + sum.ln();
                    *lo = lse - row[y as usize];
                    for x in row.iter_mut() {
                        *x = (*x - lse).exp(); // softmax
                    }
                    row[y as usize] -= 1.0;
                });
            if self.need_grad {
                let dhc = &mut dh[a * d..b * d];
                mm(b - a, d, v, dhc, false, 1.0, rows(z, v), rows(w, d), true);
            }
        }
        if self.need_grad {
            let t = Tensor::from_vec(dh, (n, d), &Device::Cpu)?;
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
        Ok(Some(dh.broadcast_mul(&g.unsqueeze(1)?)?))
    }
}

/// Summed next-token cross-entropy of `h (n, d) W^T` against `labels (n)` (IGNORE_INDEX
/// skipped), and the number of scored rows. Fused on CPU f32; `W` must be frozen.
pub fn head_cross_entropy(h: &Tensor, w: &Tensor, labels: &[i64]) -> Result<(Tensor, usize)> {
    let count = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if !fast_ok(h) || w.dtype() != h.dtype() {
        let logits = crate::frozen_linear(h, w, None)?;
        let lab = Tensor::from_slice(labels, labels.len(), h.device())?;
        return masked_cross_entropy(&logits, &lab);
    }
    let op = HeadLoss {
        w: w.clone(),
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

    #[test]
    fn fused_head_loss_matches_logits_then_cross_entropy_in_value_and_gradient() {
        let w = rand(&[700, 16], 3); // 700 classes, 600 rows: three chunks, one partial
        let labels: Vec<i64> = (0..600)
            .map(|i| {
                if i % 7 == 0 {
                    IGNORE_INDEX
                } else {
                    (i * 13 % 700) as i64
                }
            })
            .collect();
        let lab = Tensor::from_slice(&labels, 600, &Device::Cpu).unwrap();
        same(
            &[rand(&[600, 16], 4)],
            |t| head_cross_entropy(&t[0], &w, &labels).unwrap().0,
            |t| {
                masked_cross_entropy(&t[0].matmul(&w.t().unwrap()).unwrap(), &lab)
                    .unwrap()
                    .0
            },
        );
    }
}
