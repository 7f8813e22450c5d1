//! Token-level cross-entropy with ignored positions (label -100, as in transformers).

use candle_core::{DType, Result, Tensor, D};

pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of logits (n, vocab) against labels (n,) (i64), skipping IGNORE_INDEX.
/// Returns (sum of losses, number of counted tokens) so callers can average across batches.
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let logits = logits.to_dtype(DType::F32)?;
    let lab: Vec<i64> = labels.to_vec1()?;
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
        let (sum, n) = masked_cross_entropy(&logits, &labels).unwrap();
        let l0 = (1f32.exp() + 2f32.exp() + 0.5f32.exp()).ln() - 2.0;
        let l2 = (3.0f32).ln();
        assert_eq!(n, 2);
        assert!((sum.to_scalar::<f32>().unwrap() - (l0 + l2)).abs() < 1e-5);
    }
}
