//! KS-Lottery (Yuan et al., 2024, arXiv 2402.02801, "KS-Lottery: Finding Certified Lottery
//! Tickets for Multilingual Language Models"): which embedding rows matter for a task, found by a
//! Kolmogorov-Smirnov test, then only those rows tuned.
//!
//! One `petal train --method ks_lottery` run, in three stages through the method's training hook:
//! 1. for `stage1_steps` steps the whole token embedding is tuned: `E' = E + Δ`, Δ (vocab,
//!    hidden) from zero;
//! 2. per row i, a two-sample KS test between the `hidden` values of E[i] and of E'[i]: the
//!    statistic D = sup |F_before - F_after| and its p-value; the winning tokens (the tickets) are
//!    those with p < `max_p_value`, or the `top_k` of largest D;
//! 3. Δ is reset to zero (the pretrained values) and the optimizer state with it, and only the
//!    tickets' rows train for the rest of the run (Δ masked in the forward, and set back to the
//!    mask after every step, so nothing else ever moves).
//!
//! With `stage1_steps` at or past the run's steps, the run is stage 1 alone: the whole
//! embedding tuned and saved as such (the paper's reference). Otherwise the saved adapter is the
//! tickets' rows alone, as petal's trainable tokens
//! (`<embedding>.token_adapter.trainable_tokens_delta` (k, hidden), the new rows), with the
//! tickets in the config (`tickets`) and `tickets.json` (statistic and p-value of each) next to
//! it. An adapter whose config lists `tickets` is that final form (stage 3 alone when trained).
//!
//! Decisions (docs/methods/ks_lottery.md): the p-value is the Kolmogorov limiting distribution at
//! `sqrt(n m / (n + m)) D` (scipy's `kstwobign`; scipy's `ks_2samp` default is exact for these
//! sizes, and since every row has the same n, p is a monotone function of D, so the ranking is the
//! same); the input embedding only: a tied output head keeps the pretrained table (the paper tunes
//! the embedding of untied models). petal's own `peft_type: "KS_LOTTERY"`.

use crate::adapter::{
    AdapterLayer, AdapterMethod, BaseLinear, ModuleDims, NamedTensor, NewAdapter, TrainingHook,
    WeightUpdate,
};
use crate::config::{spec, AdapterConfig, Spec};
use crate::methods::trainable_tokens::{TrainableTokens, DELTA};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::sync::Mutex;

pub struct KsLottery;

crate::method_options! {
    /// KS-Lottery's options.
    pub struct KsLotteryOptions {
        /// Steps of stage 1 (the whole embedding tuned); 0: half of the run's steps
        pub stage1_steps: usize = 0,
        /// Stage 2 keeps the tokens whose KS p-value is below this, in (0, 1)
        pub max_p_value: f64 = 0.05,
        /// Keep the k tokens of largest KS statistic instead (0: by alpha)
        pub top_k: usize = 0,
        /// The winning token ids (set when stage 2 chooses them; given: only these rows train)
        [crate::config::parse_list]
        pub tickets: Vec<usize> = Vec::new(),
    }
}

const MASK: &str = "ks_lottery_mask";
const FULL: &str = "ks_lottery_delta";

impl AdapterMethod for KsLottery {
    fn in_peft(&self) -> bool {
        false
    }

    fn peft_type(&self) -> &'static str {
        "KS_LOTTERY"
    }

    fn options(&self) -> Spec {
        spec::<KsLotteryOptions>()
    }

    fn default_targets(&self) -> Option<&'static str> {
        Some("embed_tokens")
    }

    fn adapts_embeddings(&self) -> bool {
        true
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        let o: KsLotteryOptions = cfg.options()?;
        if o.stage1_steps == 0 && o.tickets.is_empty() {
            cfg.set("stage1_steps", (new.max_steps / 2).max(1))?;
        }
        Ok(())
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let o: KsLotteryOptions = cfg.options()?;
        if o.max_p_value <= 0.0 || o.max_p_value >= 1.0 || o.max_p_value.is_nan() {
            return Err(Error::config(
                "adapter config",
                "max_p_value",
                format!("{} is out of range: must be in (0, 1)", o.max_p_value),
            ));
        }
        let mut seen = o.tickets.clone();
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::config(
                "adapter config",
                "tickets",
                "a token is listed twice",
            ));
        }
        Ok(())
    }

    fn layer_values(&self, cfg: &AdapterConfig, _path: &str, dims: &ModuleDims) -> Result<u64> {
        let o: KsLotteryOptions = cfg.options()?;
        // the embedding is (vocab = in, hidden = out): the full Δ and its mask, or the tickets
        Ok(match o.tickets.len() {
            0 => (dims.inp * (dims.out + 1)) as u64,
            k => (k * dims.out) as u64,
        })
    }

    fn build(
        &self,
        cfg: &AdapterConfig,
        path: &str,
        base: &BaseLinear,
        _seed: u64,
    ) -> Result<Box<dyn AdapterLayer>> {
        if !base.embedding {
            return Err(Error::config(
                "adapter config",
                "target_modules",
                format!(
                    "KS-Lottery tunes the token embedding; {path} is not one (target embed_tokens)"
                ),
            ));
        }
        let o: KsLotteryOptions = cfg.options()?;
        let vocab = base.in_features;
        if let Some(&bad) = o.tickets.iter().find(|&&t| t >= vocab) {
            return Err(Error::config(
                "adapter config",
                "tickets",
                format!("token {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        if !o.tickets.is_empty() {
            let ids: Vec<u32> = o.tickets.iter().map(|&t| t as u32).collect();
            return Ok(Box::new(TrainableTokens::new(
                base.weight,
                &ids,
                base.shared,
                false,
            )?));
        }
        let dev = base.weight.device();
        Ok(Box::new(Lottery {
            delta: Var::from_tensor(&Tensor::zeros((vocab, base.out_features), DType::F32, dev)?)?,
            mask: Var::from_tensor(&Tensor::ones((vocab, 1), DType::F32, dev)?)?,
            table: base.weight.clone(),
        }))
    }

    fn training(
        &self,
        model: &dyn crate::Adaptable,
        name: &str,
        cfg: &AdapterConfig,
    ) -> Result<Option<Box<dyn TrainingHook>>> {
        let o: KsLotteryOptions = cfg.options()?;
        if !o.tickets.is_empty() {
            return Ok(None); // stage 3 alone on the given rows
        }
        let (path, table) = model
            .linears()
            .into_iter()
            .find_map(|l| {
                let t = lottery(l.layer(name)?)?.table.clone();
                Some((l.path().to_string(), t))
            })
            .ok_or_else(|| Error::msg("KS-Lottery: no embedding carries the adapter"))?;
        Ok(Some(Box::new(KsTraining {
            name: name.to_string(),
            path,
            table,
            stage1: o.stage1_steps.max(1),
            max_p: o.max_p_value,
            top_k: o.top_k,
            chosen: Mutex::new(None),
            tickets: Vec::new(),
            candidates: Vec::new(),
        })))
    }
}

/// The full form's layer, if `layer` is one.
fn lottery(layer: &dyn AdapterLayer) -> Option<&Lottery> {
    layer.as_any()?.downcast_ref::<Lottery>()
}

/// Stages 1 and 3: the whole table's change Δ, masked per row.
#[derive(Debug)]
struct Lottery {
    delta: Var,    // (vocab, hidden)
    mask: Var,     // (vocab, 1): 1 for rows that train (all in stage 1, the tickets in stage 3)
    table: Tensor, // the frozen embedding
}

impl Lottery {
    fn masked(&self) -> Result<Tensor> {
        Ok(self
            .delta
            .as_tensor()
            .broadcast_mul(self.mask.as_tensor())?)
    }
}

impl AdapterLayer for Lottery {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        let ids = x.flatten_all()?.to_dtype(DType::U32)?;
        // only the looked-up rows: Δ[ids] ⊙ M[ids]
        let d = self
            .delta
            .as_tensor()
            .index_select(&ids, 0)?
            .broadcast_mul(&self.mask.as_tensor().index_select(&ids, 0)?)?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Add(self.masked()?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: FULL,
            var: &self.delta,
        }]
    }

    fn buffers(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: MASK,
            var: &self.mask,
        }]
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// One winning token: its id, KS statistic and p-value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ticket {
    pub token: usize,
    pub ks_statistic: f64,
    pub p_value: f64,
}

struct KsTraining {
    name: String,
    path: String,
    table: Tensor, // the frozen embedding
    stage1: usize,
    max_p: f64,
    top_k: usize,
    /// The step after which the tickets were chosen.
    chosen: Mutex<Option<usize>>,
    tickets: Vec<Ticket>,
    /// Every token stage 1 changed (the tickets' candidates), by id.
    candidates: Vec<usize>,
}

impl KsTraining {
    fn layer<'a>(&self, model: &'a dyn crate::Adaptable) -> Result<&'a Lottery> {
        model
            .linears()
            .into_iter()
            .find(|l| l.path() == self.path)
            .and_then(|l| l.layer(&self.name))
            .and_then(lottery)
            .ok_or_else(|| Error::msg("KS-Lottery: the embedding's adapter vanished"))
    }

    fn chosen(&self) -> Option<usize> {
        *self.chosen.lock().expect("ks-lottery state")
    }

    /// Stage 2: the KS test per changed row, the tickets, then Δ reset and the mask set.
    fn choose(&mut self, layer: &Lottery) -> Result<()> {
        let before: Vec<Vec<f32>> = layer.table.to_dtype(DType::F32)?.to_vec2()?;
        let delta: Vec<Vec<f32>> = layer.delta.as_tensor().to_vec2()?;
        let mut scored: Vec<Ticket> = Vec::new();
        for (i, (e, d)) in before.iter().zip(&delta).enumerate() {
            if d.iter().all(|&v| v == 0.0) {
                continue; // never looked up in stage 1
            }
            let after: Vec<f32> = e.iter().zip(d).map(|(a, b)| a + b).collect();
            let (stat, p) = ks_2samp(e, &after);
            scored.push(Ticket {
                token: i,
                ks_statistic: stat,
                p_value: p,
            });
        }
        self.candidates = scored.iter().map(|t| t.token).collect();
        scored.sort_by(|a, b| {
            b.ks_statistic
                .total_cmp(&a.ks_statistic)
                .then(a.token.cmp(&b.token))
        });
        let winners: Vec<Ticket> = if self.top_k > 0 {
            scored.into_iter().take(self.top_k).collect()
        } else {
            scored
                .into_iter()
                .filter(|t| t.p_value < self.max_p)
                .collect()
        };
        if winners.is_empty() {
            return Err(Error::msg(format!(
                "KS-Lottery: no token's embedding changed enough after {} steps of stage 1 \
                 (max_p_value = {}): raise stage1_steps or max_p_value, or set top_k",
                self.stage1, self.max_p
            )));
        }
        let (vocab, _) = layer.delta.as_tensor().dims2()?;
        let mut m = vec![0f32; vocab];
        winners.iter().for_each(|t| m[t.token] = 1.0);
        let dev = layer.delta.as_tensor().device().clone();
        layer.mask.set(&Tensor::from_vec(m, (vocab, 1), &dev)?)?;
        layer.delta.set(&layer.delta.as_tensor().zeros_like()?)?;
        self.tickets = winners;
        Ok(())
    }
}

impl TrainingHook for KsTraining {
    fn after_step(
        &mut self,
        model: &dyn crate::Adaptable,
        step: usize,
        _grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        let layer = self.layer(model)?;
        match self.chosen() {
            None if step + 1 == self.stage1 => {
                self.choose(layer)?;
                *self.chosen.lock().expect("ks-lottery state") = Some(step);
            }
            // stage 3: rows outside the tickets never move
            Some(_) => layer.delta.set(&layer.masked()?)?,
            None => {}
        }
        Ok(())
    }

    fn reset_optimizer_after(&self, step: usize) -> bool {
        self.chosen() == Some(step)
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let c = self.chosen().map(|s| s as i64 + 1).unwrap_or(0);
        Ok(HashMap::from([(
            "ks_lottery.chosen_after".to_string(),
            Tensor::new(&[c], &Device::Cpu)?,
        )]))
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let c = state
            .get("ks_lottery.chosen_after")
            .ok_or_else(|| Error::msg("checkpoint lacks `ks_lottery.chosen_after`"))?
            .to_vec1::<i64>()?[0];
        *self.chosen.lock().expect("ks-lottery state") = (c > 0).then(|| c as usize - 1);
        Ok(())
    }

    fn export(&self, cfg: &mut AdapterConfig, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
        if self.chosen().is_none() {
            // stage1_steps >= the run's steps: the whole embedding's change, saved as is
            return Ok(());
        }
        let take = |tensors: &mut HashMap<String, Tensor>, n: &str| {
            tensors
                .remove(&format!("{}.{n}", self.path))
                .ok_or_else(|| Error::msg(format!("{}: no `{n}` to export", self.path)))
        };
        let delta = take(tensors, FULL)?;
        let mask: Vec<f32> = take(tensors, MASK)?.flatten_all()?.to_vec1()?;
        let ids: Vec<u32> = (0..mask.len() as u32)
            .filter(|&i| mask[i as usize] > 0.0)
            .collect();
        let idx = Tensor::new(ids.as_slice(), delta.device())?;
        // the new rows: the tickets' pretrained rows plus their change (trainable tokens' form)
        let table = self.table_rows(&idx)?;
        let rows = (table + delta.index_select(&idx, 0)?)?;
        tensors.insert(format!("{}.{DELTA}", self.path), rows);
        cfg.set("tickets", ids.iter().map(|&i| i as u64).collect::<Vec<_>>())?;
        Ok(())
    }

    fn files(&self) -> Result<Vec<(String, String)>> {
        // (after a resume past stage 2 the statistics are not at hand: the config lists the ids)
        let stage = match self.chosen() {
            Some(_) => "3: the tickets' rows alone",
            None => "1: the whole embedding (stage1_steps >= the run's steps)",
        };
        let j = serde_json::json!({
            "max_p_value": self.max_p, "top_k": self.top_k, "stage1_steps": self.stage1,
            "ended_in_stage": stage, "tickets": self.tickets, "candidates": self.candidates,
        });
        Ok(vec![(
            "tickets.json".into(),
            serde_json::to_string_pretty(&j).map_err(|e| Error::msg(e.to_string()))?,
        )])
    }
}

impl KsTraining {
    fn table_rows(&self, idx: &Tensor) -> Result<Tensor> {
        Ok(self.table.index_select(idx, 0)?.to_dtype(DType::F32)?)
    }
}

/// The two-sample Kolmogorov-Smirnov statistic of `a` and `b` and its p-value from the
/// limiting Kolmogorov distribution at `sqrt(n m / (n + m)) D`.
pub fn ks_2samp(a: &[f32], b: &[f32]) -> (f64, f64) {
    let sorted = |v: &[f32]| {
        let mut s: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        s.sort_by(f64::total_cmp);
        s
    };
    let (a, b) = (sorted(a), sorted(b));
    let (n, m) = (a.len(), b.len());
    let (mut i, mut j, mut d) = (0, 0, 0f64);
    while i < n && j < m {
        // step past every value equal to the smaller one in both samples
        let x = a[i].min(b[j]);
        while i < n && a[i] <= x {
            i += 1;
        }
        while j < m && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n as f64 - j as f64 / m as f64).abs());
    }
    let en = (n * m) as f64 / (n + m) as f64;
    (d, kolmogorov_sf(en.sqrt() * d))
}

/// P(K > x) for the Kolmogorov distribution (scipy's `kstwobign.sf`).
pub fn kolmogorov_sf(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if x < 1.0 {
        // P(K <= x) = sqrt(2 pi) / x Σ_k exp(-(2k - 1)² pi² / (8 x²))
        let s: f64 = (1..=20)
            .map(|k| {
                let t = (2 * k - 1) as f64 * std::f64::consts::PI;
                (-(t * t) / (8.0 * x * x)).exp()
            })
            .sum();
        return 1.0 - (2.0 * std::f64::consts::PI).sqrt() / x * s;
    }
    // P(K > x) = 2 Σ_k (-1)^(k-1) exp(-2 k² x²)
    let s: f64 = (1..=100)
        .map(|k| {
            let sign = if k % 2 == 1 { 1.0 } else { -1.0 };
            sign * (-2.0 * (k * k) as f64 * x * x).exp()
        })
        .sum();
    (2.0 * s).clamp(0.0, 1.0)
}

#[cfg(test)]
#[path = "ks_lottery_tests.rs"]
mod tests;
