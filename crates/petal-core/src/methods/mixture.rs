//! What the mixtures of experts (MoV, MoLoRA, SiRA) share: the per-token router, top-k routing
//! with an expert capacity, and the router's load, kept from training forwards for the metrics.
//!
//! Router (the official MoV/MoLoRA code, for-ai/parameter-efficient-moe `src/routing.py`): a
//! dense map without bias from the activation the experts act on to E logits, kernel drawn
//! N(0, 0.02²), softmax over the experts in f32, per token.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use std::sync::Mutex;

/// The router's kernel (in, E), N(0, 0.02²).
pub(crate) fn router_init(inp: usize, experts: usize, seed: u64, dev: &Device) -> Result<Tensor> {
    let mut g = rand::rngs::StdRng::seed_from_u64(seed ^ 0x726f75746572);
    crate::methods::normal((inp, experts), 0.02, &mut g, dev)
}

/// softmax(x W_r) over the experts: x (rows, in) f32, W_r (in, E); (rows, E) f32.
pub(crate) fn probs(x: &Tensor, w: &Tensor, k: petal_ops::Kernels) -> Result<Tensor> {
    Ok(petal_ops::softmax_last_dim(k, &x.matmul(w)?)?)
}

/// Which (token, expert) pairs top-k routing with an expert capacity keeps: each token's k
/// largest probabilities (ties to the lower expert), then, per expert, the first `capacity`
/// tokens in batch order that chose it (later ones are dropped for that expert: they get the
/// base path and their other experts). A (rows, E) 0/1 mask and the number of dropped pairs.
pub(crate) fn top_k_capacity(p: &Tensor, k: usize, capacity: usize) -> Result<(Tensor, usize)> {
    let (rows, e) = p.dims2()?;
    let v: Vec<Vec<f32>> = p.to_vec2()?;
    let mut mask = vec![0f32; rows * e];
    let mut taken = vec![0usize; e];
    let mut dropped = 0;
    for (i, row) in v.iter().enumerate() {
        let mut order: Vec<usize> = (0..e).collect();
        // stable: equal probabilities keep the lower expert first
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &j in order.iter().take(k) {
            if taken[j] < capacity {
                taken[j] += 1;
                mask[i * e + j] = 1.0;
            } else {
                dropped += 1;
            }
        }
    }
    Ok((Tensor::from_vec(mask, (rows, e), p.device())?, dropped))
}

/// The capacity of each expert for `rows` tokens: ceil(factor k rows / E), at least 1.
pub(crate) fn capacity(factor: f64, k: usize, rows: usize, experts: usize) -> usize {
    ((factor * (k * rows) as f64 / experts as f64).ceil() as usize).max(1)
}

/// Gates (rows, E) repeated over each expert's `r` ranks: (rows, E r).
pub(crate) fn per_rank(g: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    let (rows, e) = g.dims2()?;
    g.unsqueeze(2)?
        .broadcast_as((rows, e, r))?
        .reshape((rows, e * r))
}

/// The router's load over the training forwards since it was last read: the mean gate weight
/// each expert received per token, and the share of top-k choices dropped for capacity.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RouterLoad {
    pub load: Vec<f64>,
    pub dropped: f64,
}

/// Sums since the last read: per-expert gate sums, tokens, dropped and chosen pairs.
type LoadSums = (Vec<f64>, usize, usize, usize);

#[derive(Debug, Default)]
pub(crate) struct LoadMeter(Mutex<Option<LoadSums>>);

impl LoadMeter {
    /// Record one forward's gates (rows, E) and its dropped and chosen pairs (training only).
    pub(crate) fn record(&self, gates: &Tensor, dropped: usize, chosen: usize) -> Result<()> {
        let (rows, _) = gates.dims2()?;
        let sums: Vec<f32> = gates.detach().sum(0)?.to_dtype(DType::F32)?.to_vec1()?;
        let mut m = self
            .0
            .lock()
            .map_err(|_| Error::msg("router meter poisoned"))?;
        let (acc, n, d, c) = m.get_or_insert_with(|| (vec![0.0; sums.len()], 0, 0, 0));
        acc.iter_mut().zip(&sums).for_each(|(a, s)| *a += *s as f64);
        *n += rows;
        *d += dropped;
        *c += chosen;
        Ok(())
    }

    /// What was recorded since the last call, and reset.
    pub(crate) fn take(&self) -> Option<RouterLoad> {
        let (acc, n, d, c) = self.0.lock().ok()?.take()?;
        Some(RouterLoad {
            load: acc.iter().map(|a| a / n.max(1) as f64).collect(),
            dropped: d as f64 / c.max(1) as f64,
        })
    }
}

/// The mean over layers of each expert's load (layers with the same expert count).
pub fn mean_load(loads: &[RouterLoad]) -> Option<RouterLoad> {
    let first = loads.first()?;
    let e = first.load.len();
    let same: Vec<&RouterLoad> = loads.iter().filter(|l| l.load.len() == e).collect();
    let n = same.len() as f64;
    Some(RouterLoad {
        load: (0..e)
            .map(|j| same.iter().map(|l| l.load[j]).sum::<f64>() / n)
            .collect(),
        dropped: same.iter().map(|l| l.dropped).sum::<f64>() / n,
    })
}

/// The refusal every mixture gives to a merge.
pub(crate) fn unmergeable(method: &str) -> Error {
    Error::Unsupported(format!(
        "{method} mixes its experts per token by a router that reads the input: the update \
         depends on each token and cannot be merged into the weights (serve it unmerged; \
         mixed-adapter batches work)"
    ))
}

/// The load a layer's router should report for one training forward of `x` (tests): each
/// token's softmax(x W_r) in f64 from the router tensor named `router`, its `k` largest
/// probabilities kept (all when `k` is the expert count), averaged over the tokens.
#[cfg(test)]
pub(crate) fn load_written_out(
    layer: &dyn crate::AdapterLayer,
    router: &str,
    x: &Tensor,
    k: usize,
) -> Vec<f64> {
    let t = layer
        .tensors()
        .into_iter()
        .find(|n| n.name == router)
        .unwrap();
    let w: Vec<Vec<f32>> = t.var.as_tensor().to_vec2().unwrap(); // (in, E)
    let e = w[0].len();
    let rows: Vec<Vec<f32>> = x.flatten_to(x.rank() - 2).unwrap().to_vec2().unwrap();
    let mut load = vec![0f64; e];
    for row in &rows {
        let logits: Vec<f64> = (0..e)
            .map(|j| {
                row.iter()
                    .zip(&w)
                    .map(|(&a, wr)| a as f64 * wr[j] as f64)
                    .sum()
            })
            .collect();
        let top = logits.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = logits.iter().map(|l| (l - top).exp()).sum();
        let p: Vec<f64> = logits.iter().map(|l| (l - top).exp() / z).collect();
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        for &j in &order[..k] {
            load[j] += p[j] / rows.len() as f64;
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_each_tokens_largest_and_drops_tokens_over_an_experts_capacity_in_order() {
        let p = Tensor::new(
            &[
                [0.5f32, 0.3, 0.2],
                [0.6, 0.1, 0.3],
                [0.7, 0.2, 0.1],
                [0.1, 0.1, 0.8],
            ],
            &Device::Cpu,
        )
        .unwrap();
        // k = 2, capacity 2: expert 0 is chosen by tokens 0, 1, 2: token 2 is dropped there
        let (m, dropped) = top_k_capacity(&p, 2, 2).unwrap();
        let m: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(
            m,
            vec![
                vec![1.0, 1.0, 0.0],
                vec![1.0, 0.0, 1.0],
                vec![0.0, 1.0, 0.0],
                vec![0.0, 0.0, 1.0],
            ]
        );
        // token 3's choices: expert 2 (0.8) and expert 0 (tie with 1, the lower index), full
        assert_eq!(dropped, 2);
        assert_eq!(capacity(1.0, 2, 4, 3), 3);
        assert_eq!(capacity(1.25, 1, 3, 8), 1);
    }

    #[test]
    fn the_meter_averages_gates_per_token_over_forwards_and_resets_when_read() {
        let m = LoadMeter::default();
        let g = Tensor::new(&[[1.0f32, 0.0], [0.5, 0.5]], &Device::Cpu).unwrap();
        m.record(&g, 1, 4).unwrap();
        m.record(&g, 0, 4).unwrap();
        let l = m.take().unwrap();
        assert_eq!(l.load, vec![0.75, 0.25]);
        assert_eq!(l.dropped, 1.0 / 8.0);
        assert!(m.take().is_none());
    }
}
