//! Sequence classification on a BERT encoder: the cross-entropy of the class logits averaged
//! over examples; evaluation adds accuracy and macro-F1. Examples come from
//! `petal_data::load_classification` (tokens in `ids`, the class as the one entry of `labels`).

use crate::eval::EvalResult;
use crate::objective::Objective;
use candle_core::{Device, Tensor};
use petal_core::{Adaptable, Ctx, Error, Result};
use petal_data::Example;
use petal_models::{segments, Bert, Grads};
use petal_ops::Kernels;

pub struct ClsObjective<'a> {
    pub model: &'a Bert,
    pub pad: u32,
    /// `[SEP]`: token types are 1 after the first one.
    pub sep: u32,
}

impl ClsObjective<'_> {
    /// ids, token types (b, t) u32 and mask (b, t) f32, right-padded to the longest; labels,
    /// each checked against the head's classes.
    fn batch(&self, examples: &[Example]) -> Result<([Tensor; 3], Tensor)> {
        let classes = self.model.num_labels() as i64;
        let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let b = examples.len();
        let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        let mut labels = Vec::with_capacity(b);
        for e in examples {
            let n = e.ids.len();
            ids.extend(
                e.ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(self.pad, t - n)),
            );
            types.extend(
                segments(&e.ids, self.sep)
                    .into_iter()
                    .chain(std::iter::repeat_n(0, t - n)),
            );
            mask.extend((0..t).map(|i| f32::from(u8::from(i < n))));
            let class = *e.labels.first().ok_or_else(|| {
                Error::msg("a classification example has no label (read it as classification data)")
            })?;
            if !(0..classes).contains(&class) {
                return Err(Error::msg(format!(
                    "label {class} is outside the head's classes 0..{}",
                    classes - 1
                )));
            }
            labels.push(class);
        }
        let dev = self.model.device();
        Ok((
            [
                Tensor::from_vec(ids, (b, t), dev)?,
                Tensor::from_vec(types, (b, t), dev)?,
                Tensor::from_vec(mask, (b, t), dev)?,
            ],
            Tensor::from_vec(labels, b, dev)?,
        ))
    }

    /// Class logits (b, classes) of the examples.
    fn logits(&self, examples: &[Example], ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        let ([ids, types, mask], labels) = self.batch(examples)?;
        Ok((self.model.logits(&ids, &types, &mask, ctx)?, labels))
    }
}

impl Objective for ClsObjective<'_> {
    fn model(&self) -> &dyn Adaptable {
        self.model
    }
    fn device(&self) -> &Device {
        self.model.device()
    }
    fn kernels(&self) -> Kernels {
        self.model.kernels()
    }
    fn units(&self, examples: &[Example]) -> usize {
        examples.len()
    }
    fn backward(&self, examples: &[Example], scale: f64, seed: u64) -> Result<(f64, Grads)> {
        let (logits, labels) = self.logits(examples, &Ctx::train(seed))?;
        let (sum, _) = petal_ops::masked_cross_entropy(self.kernels(), &logits, &labels)?;
        let mut grads = Grads::default();
        grads.absorb((&sum / scale)?.backward()?)?;
        Ok((sum.to_scalar::<f32>()? as f64, grads))
    }
    fn evaluate(&self, examples: &[Example], batch_size: usize) -> Result<EvalResult> {
        if examples.is_empty() {
            return Err(Error::msg("evaluation data has no examples"));
        }
        let (mut sum, mut pairs) = (0f64, Vec::with_capacity(examples.len()));
        for chunk in examples.chunks(batch_size.max(1)) {
            let (logits, labels) = self.logits(chunk, &Ctx::eval())?;
            let (s, _) = petal_ops::masked_cross_entropy(self.kernels(), &logits, &labels)?;
            sum += s.to_scalar::<f32>()? as f64;
            let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            let truth: Vec<i64> = labels.to_vec1()?;
            pairs.extend(
                truth
                    .into_iter()
                    .zip(pred)
                    .map(|(t, p)| (t as usize, p as usize)),
            );
        }
        let n = examples.len();
        let loss = sum / n as f64;
        let (accuracy, f1) = scores(&pairs);
        Ok(EvalResult {
            loss,
            perplexity: loss.exp(),
            tokens: n,
            tasks: Default::default(),
            accuracy: Some(accuracy),
            macro_f1: Some(f1),
        })
    }
}

/// Accuracy and macro-F1 of (label, prediction) pairs; F1 averaged over the classes that occur
/// as a label or a prediction, a class with no true or predicted positive scoring 0 (scikit-
/// learn's `f1_score(average="macro", zero_division=0)`).
pub fn scores(pairs: &[(usize, usize)]) -> (f64, f64) {
    let n = pairs.len().max(1) as f64;
    let right = pairs.iter().filter(|(t, p)| t == p).count() as f64;
    let mut classes: Vec<usize> = pairs.iter().flat_map(|&(t, p)| [t, p]).collect();
    classes.sort_unstable();
    classes.dedup();
    let f1: f64 = classes
        .iter()
        .map(|&c| {
            let tp = pairs.iter().filter(|&&(t, p)| t == c && p == c).count() as f64;
            let fp = pairs.iter().filter(|&&(t, p)| t != c && p == c).count() as f64;
            let fneg = pairs.iter().filter(|&&(t, p)| t == c && p != c).count() as f64;
            if tp == 0.0 {
                0.0
            } else {
                2.0 * tp / (2.0 * tp + fp + fneg)
            }
        })
        .sum::<f64>()
        / classes.len().max(1) as f64;
    (right / n, f1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scikit-learn 1.9.1: accuracy_score and f1_score(average="macro", zero_division=0) of
    /// y_true = [0, 0, 1, 1, 2, 2, 2], y_pred = [0, 1, 1, 1, 2, 0, 3] give 0.5714285714285714
    /// and 0.45.
    #[test]
    fn accuracy_and_macro_f1_follow_scikit_learn() {
        let pairs = [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0), (2, 3)];
        let (acc, f1) = scores(&pairs);
        assert!((acc - 0.5714285714285714).abs() < 1e-12);
        assert!((f1 - 0.45).abs() < 1e-12, "{f1}");
    }
}
