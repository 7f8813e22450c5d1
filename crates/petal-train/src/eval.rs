//! Loss of a batch and mean loss / perplexity over a dataset.

use candle_core::{Tensor, D};
use petal_core::{Ctx, Result};
use petal_data::{batches, Batch, Example};
use petal_models::{Grads, Llama};
use petal_ops::{head_cross_entropy, masked_cross_entropy, IGNORE_INDEX};

/// Summed next-token loss of a batch and the number of scored tokens. With no adapter on the
/// output head, the head and the loss run fused (petal-ops `head_cross_entropy`).
pub fn batch_loss(model: &Llama, b: &Batch, ctx: &Ctx) -> Result<(Tensor, usize)> {
    let ids = Tensor::from_slice(&b.ids, (b.rows, b.len), model.device())?;
    let hidden = model.hidden_states(&ids, None, ctx)?; // (rows, len, hidden)
    loss_from_hidden(model, &hidden, b, ctx)
}

/// The summed loss of a training micro-batch divided by `scale`, and its gradients (detached):
/// one backward, or with `checkpointing` one per decoder layer (see
/// `Llama::checkpointed_backward`), in training mode with dropout drawn from `seed`. Returns
/// the summed (unscaled) loss.
pub fn backward_batch(
    model: &Llama,
    b: &Batch,
    scale: f64,
    checkpointing: bool,
    seed: u64,
) -> Result<(f64, Grads)> {
    let ctx = Ctx::train(seed);
    if !checkpointing {
        let (sum, _) = batch_loss(model, b, &ctx)?;
        let mut grads = Grads::default();
        grads.absorb((&sum / scale)?.backward()?)?;
        return Ok((sum.to_scalar::<f32>()? as f64, grads));
    }
    let ids = Tensor::from_slice(&b.ids, (b.rows, b.len), model.device())?;
    let (value, grads) = model.checkpointed_backward(&ids, &ctx, &|h| {
        Ok((loss_from_hidden(model, h, b, &ctx)?.0 / scale)?)
    })?;
    Ok((value.to_scalar::<f32>()? as f64 * scale, grads))
}

/// Summed cross-entropy of next-token prediction from the final hidden states.
fn loss_from_hidden(
    model: &Llama,
    hidden: &Tensor,
    b: &Batch,
    ctx: &Ctx,
) -> Result<(Tensor, usize)> {
    let dev = model.device();
    let d = hidden.dim(D::Minus1)?;
    let h = hidden
        .narrow(1, model.num_virtual_tokens(), b.len - 1)? // virtual positions carry no loss
        .reshape((b.rows * (b.len - 1), d))?;
    let labels: Vec<i64> = (0..b.rows)
        .flat_map(|r| b.labels[r * b.len + 1..(r + 1) * b.len].iter().copied())
        .collect();
    // Only the scored rows go through the head: a prompt's tokens and the padding carry no
    // loss, and the head is about a quarter of a small model's products (Qwen2.5-0.5B: 136M
    // of 494M multiply-adds a token). The gather's backward scatters into zeros.
    let kept: Vec<u32> = (0..labels.len() as u32)
        .filter(|&i| labels[i as usize] != IGNORE_INDEX)
        .collect();
    let (h, labels) = if kept.is_empty() || kept.len() == labels.len() {
        (h, labels)
    } else {
        let picked = kept.iter().map(|&i| labels[i as usize]).collect();
        let n = kept.len();
        (h.index_select(&Tensor::from_vec(kept, n, dev)?, 0)?, picked)
    };
    match model.plain_head(ctx) {
        Some((w, None)) => return Ok(head_cross_entropy(model.kernels(), &h, w, &labels)?),
        Some((w, Some(fmt))) => {
            let k = model.kernels();
            return Ok(petal_ops::head_loss::head_cross_entropy_quant(
                k, &h, w, fmt, &labels,
            )?);
        }
        None => {}
    }
    let logits = model.head(&h, ctx)?.to_dtype(candle_core::DType::F32)?;
    let n = labels.len();
    let labels = Tensor::from_vec(labels, n, dev)?;
    Ok(masked_cross_entropy(model.kernels(), &logits, &labels)?)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    /// Multi-task data: each task's token-weighted loss and scored tokens.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tasks: std::collections::BTreeMap<String, TaskLoss>,
    /// Classification: the share of examples whose highest logit is their label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Classification: the mean over classes of F1 (classes among the labels or predictions,
    /// as scikit-learn's `f1_score(average="macro")`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TaskLoss {
    pub loss: f64,
    pub tokens: usize,
}

/// Token-weighted mean loss over `examples`; with tasks, also each task's (its examples batched
/// on their own).
pub fn evaluate(
    model: &Llama,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
) -> Result<EvalResult> {
    // (loss sum, scored tokens) over some examples, batched among themselves
    let score = |group: &[Example]| -> Result<(f64, usize)> {
        let (mut sum, mut n) = (0f64, 0usize);
        for b in batches(group, batch_size, pad) {
            let ids = Tensor::from_slice(&b.ids, (b.rows, b.len), model.device())?;
            let hidden = model.hidden_states_no_grad(&ids, &Ctx::eval())?;
            let (s, c) = loss_from_hidden(model, &hidden, &b, &Ctx::eval())?;
            sum += s.to_scalar::<f32>()? as f64;
            n += c;
        }
        Ok((sum, n))
    };
    let mut tasks = std::collections::BTreeMap::new();
    let (mut sum, mut n) = (0f64, 0usize);
    let names = petal_data::tasks(examples);
    if names.is_empty() {
        (sum, n) = score(examples)?;
    }
    for t in names {
        let group: Vec<Example> = examples
            .iter()
            .filter(|e| e.task.as_deref() == Some(t.as_str()))
            .cloned()
            .collect();
        let (ts, tn) = score(&group)?;
        if tn > 0 {
            let loss = ts / tn as f64;
            tasks.insert(t, TaskLoss { loss, tokens: tn });
        }
        sum += ts;
        n += tn;
    }
    if n == 0 {
        return Err(petal_core::Error::msg(
            "evaluation data has no tokens to score",
        ));
    }
    let loss = sum / n as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens: n,
        tasks,
        accuracy: None,
        macro_f1: None,
    })
}
