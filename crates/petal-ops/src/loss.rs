//! Token-level cross-entropy with ignored positions (label -100, as in transformers).

use crate::Kernels;
use candle_core::{DType, Result, Tensor, D};

pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of logits (n, vocab) against labels (n,) (i64), skipping IGNORE_INDEX.
/// Returns (sum of losses, number of counted tokens) so callers can average across batches.
/// One graph node (`lean`) with the closed-form gradient `softmax(logits) - onehot(label)` on
/// counted rows: only the logits stay alive for backward.
pub fn masked_cross_entropy(
    k: Kernels,
    logits: &Tensor,
    labels: &Tensor,
) -> Result<(Tensor, usize)> {
    let lab: Vec<i64> = labels.to_vec1()?;
    let count = lab.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if crate::cuda::usable(k, logits, crate::cuda::Family::Loss) {
        let dl = Tensor::from_slice(&lab, lab.len(), logits.device())?;
        let d2 = dl.clone();
        let sum = crate::lean::lean(
            logits,
            |x| crate::cuda::cross_entropy_rows(x, &dl)?.sum_all(),
            move |x, _, dy| crate::cuda::cross_entropy_grad(x, &d2, dy, x.dtype()),
        )?;
        return Ok((sum, count));
    }
    let l2 = lab.clone();
    let sum = crate::lean::lean(
        logits,
        |x| Ok(cross_entropy_composed(x, &lab)?.0),
        move |x, _, dy| cross_entropy_grad(x, &l2, dy)?.to_dtype(x.dtype()),
    )?;
    Ok((sum, count))
}

/// The gradient of the summed cross-entropy with respect to logits (n, vocab), scaled by the
/// upstream `dy` (a scalar): `softmax(logits) - onehot(label)` on counted rows, 0 on ignored
/// ones; in f32.
pub(crate) fn cross_entropy_grad(logits: &Tensor, lab: &[i64], dy: &Tensor) -> Result<Tensor> {
    let (n, dev) = (lab.len(), logits.device());
    let targets: Vec<u32> = lab.iter().map(|&l| l.max(0) as u32).collect();
    let weight: Vec<f32> = lab.iter().map(|&l| f32::from(l != IGNORE_INDEX)).collect();
    let p = crate::nn::softmax_last_dim_reference(&logits.to_dtype(DType::F32)?)?;
    let vocab = p.dim(D::Minus1)?;
    let onehot = Tensor::arange(0u32, vocab as u32, dev)?
        .reshape((1, vocab))?
        .broadcast_eq(&Tensor::from_vec(targets, (n, 1), dev)?)?
        .to_dtype(DType::F32)?;
    let w = Tensor::from_vec(weight, (n, 1), dev)?
        .broadcast_mul(&dy.to_dtype(DType::F32)?.reshape((1, 1))?)?;
    (p - onehot)?.broadcast_mul(&w)
}

/// The composed cross-entropy: log-sum-exp minus the target's logit, summed over counted rows.
pub(crate) fn cross_entropy_composed(logits: &Tensor, lab: &[i64]) -> Result<(Tensor, usize)> {
    let logits = logits.to_dtype(DType::F32)?;
    let keep: Vec<u32> = lab
        .iter()
        .enumerate()
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(i, _)| i as u32)
        .collect();
    let count = keep.len();
    if count == 0 {
        return Ok((Tensor::zeros((), DType::F32, logits.device())?, 0));
    }
    let targets: Vec<u32> = keep.iter().map(|&i| lab[i as usize] as u32).collect();
    let idx = Tensor::from_vec(keep, count, logits.device())?;
    let rows = logits.index_select(&idx, 0)?; // (count, vocab)
    let max = rows.max_keepdim(D::Minus1)?.detach();
    let shifted = rows.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (count, 1)
    let tgt = Tensor::from_vec(targets, (count, 1), logits.device())?;
    let picked = shifted.gather(&tgt, D::Minus1)?; // (count, 1)
    let loss = (lse - picked)?.sum_all()?;
    Ok((loss, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_log_sum_exp_formula_and_skips_ignored_labels() {
        let logits =
            Tensor::new(&[[1f32, 2., 0.5], [3., 1., 0.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[1i64, IGNORE_INDEX, 2], &Device::Cpu).unwrap();
        let (sum, n) = masked_cross_entropy(Kernels::FUSED, &logits, &labels).unwrap();
        let l0 = (1f32.exp() + 2f32.exp() + 0.5f32.exp()).ln() - 2.0;
        let l2 = (3.0f32).ln();
        assert_eq!(n, 2);
        assert!((sum.to_scalar::<f32>().unwrap() - (l0 + l2)).abs() < 1e-5);
    }

    #[test]
    fn the_closed_form_gradient_matches_autograd_through_the_composed_formula() {
        let labels = [3i64, IGNORE_INDEX, 0, 8, IGNORE_INDEX];
        let lab = Tensor::new(&labels, &Device::Cpu).unwrap();
        crate::testing::same(
            &[crate::testing::rand(&[5, 9], 7)],
            |t| masked_cross_entropy(Kernels::FUSED, &t[0], &lab).unwrap().0,
            |t| cross_entropy_composed(&t[0], &labels).unwrap().0,
        );
    }
}
