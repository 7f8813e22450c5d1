//! E2VPT's pruning of the input prompts and rewinding, as a training hook (see kv_prompt.rs).

use super::{Kept, KvPromptOptions, KV, PROMPT};
use crate::adapter::TrainingHook;
use crate::config::AdapterConfig;
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub(super) struct Pruning {
    pub state: Arc<RwLock<Kept>>,
    pub prompts: Var,
    pub slots: Var,
    pub initial: (Tensor, Tensor),
    /// Prune after this many steps.
    pub step: usize,
    pub o: KvPromptOptions,
    /// Per token, and per token and piece, the summed |∂L/∂gate| of the steps scored so far.
    pub token_score: Vec<f64>,
    pub segment_score: Vec<Vec<f64>>,
    pub seen: usize,
    pub report: Option<serde_json::Value>,
}

impl Pruning {
    /// Keep the most important tokens, zero the least important pieces among them, rewind.
    fn prune(&mut self) -> Result<()> {
        let n = self.token_score.len();
        let keep = ((n as f64 * (1.0 - self.o.token_prune)).round() as usize).clamp(1, n);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| self.token_score[b].total_cmp(&self.token_score[a]));
        let mut tokens: Vec<u32> = order[..keep].iter().map(|&i| i as u32).collect();
        tokens.sort_unstable();
        let seg = self.o.segments;
        // each kept token loses its `drop` least important pieces
        let drop = ((seg as f64 * self.o.segment_prune).round() as usize).min(seg - 1);
        let h = self.prompts.as_tensor().dim(1)?;
        let mut mask = vec![1f32; n * h];
        for &t in &tokens {
            let t = t as usize;
            let mut order: Vec<usize> = (0..seg).collect();
            order.sort_by(|&a, &b| self.segment_score[t][a].total_cmp(&self.segment_score[t][b]));
            for &k in &order[..drop] {
                (k..h).step_by(seg).for_each(|d| mask[t * h + d] = 0.0);
            }
        }
        let zero = drop * tokens.len();
        let dev = self.prompts.as_tensor().device().clone();
        let mask = Tensor::from_vec(mask, (n, h), &dev)?;
        if self.o.rewind {
            self.prompts.set(&self.initial.0)?;
            self.slots.set(&self.initial.1)?;
        }
        let steps = self.seen.max(1) as f64;
        self.report = Some(serde_json::json!({
            "pruned_after_step": self.step,
            "scored_steps": self.seen,
            "kept_tokens": tokens,
            "token_importance": self.token_score.iter().map(|s| s / steps).collect::<Vec<_>>(),
            "pieces_per_token": seg,
            "pieces_zeroed_per_kept_token": drop,
            "rewound": self.o.rewind,
        }));
        *self
            .state
            .write()
            .map_err(|_| Error::msg("prompt state lock"))? = Kept {
            tokens,
            mask: (zero > 0).then_some(mask),
        };
        Ok(())
    }

    fn pruned(&self) -> Result<Kept> {
        Ok(self
            .state
            .read()
            .map_err(|_| Error::msg("prompt state lock"))?
            .clone())
    }
}

impl TrainingHook for Pruning {
    fn after_step(
        &mut self,
        _model: &dyn crate::Adaptable,
        step: usize,
        grad_of: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        if step >= self.step {
            return Ok(());
        }
        if let Some(g) = grad_of(&self.prompts) {
            // a gate m_i on token i (or on one of its pieces): ∂L/∂m = Σ_d e_d g_d over it
            let eg = (self.prompts.as_tensor() * g)?;
            let per: Vec<Vec<f32>> = super::piece_sums(&eg, self.o.segments)?.to_vec2()?;
            for (i, row) in per.iter().enumerate() {
                self.token_score[i] += row.iter().map(|&v| v as f64).sum::<f64>().abs();
                for (s, &v) in row.iter().enumerate() {
                    self.segment_score[i][s] += (v as f64).abs();
                }
            }
            self.seen += 1;
        }
        if step + 1 == self.step {
            self.prune()?;
        }
        Ok(())
    }

    fn reset_optimizer_after(&self, step: usize) -> bool {
        step + 1 == self.step
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let dev = self.prompts.as_tensor().device().clone();
        let n = self.token_score.len();
        let seg = self.o.segments;
        let flat: Vec<f32> = self
            .segment_score
            .iter()
            .flatten()
            .map(|&v| v as f32)
            .collect();
        let k = self.pruned()?;
        let mut m = HashMap::from([
            (
                "kv_prompt.token_score".to_string(),
                Tensor::from_vec(
                    self.token_score.iter().map(|&v| v as f32).collect(),
                    n,
                    &dev,
                )?,
            ),
            (
                "kv_prompt.segment_score".to_string(),
                Tensor::from_vec(flat, (n, seg), &dev)?,
            ),
            (
                "kv_prompt.seen".to_string(),
                Tensor::new(&[self.seen as u32], &dev)?,
            ),
            (
                "kv_prompt.kept".to_string(),
                Tensor::new(k.tokens.as_slice(), &dev)?,
            ),
        ]);
        if let Some(mask) = k.mask {
            m.insert("kv_prompt.mask".into(), mask);
        }
        Ok(m)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            state
                .get(k)
                .ok_or_else(|| Error::msg(format!("checkpoint: `{k}` is missing")))
        };
        self.token_score = get("kv_prompt.token_score")?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        self.segment_score = get("kv_prompt.segment_score")?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|r| r.into_iter().map(f64::from).collect())
            .collect();
        self.seen = get("kv_prompt.seen")?.to_vec1::<u32>()?[0] as usize;
        *self
            .state
            .write()
            .map_err(|_| Error::msg("prompt state lock"))? = Kept {
            tokens: get("kv_prompt.kept")?.to_vec1()?,
            mask: state.get("kv_prompt.mask").cloned(),
        };
        Ok(())
    }

    /// The kept tokens alone (pruned pieces zeroed); nothing left to prune.
    fn export(&self, cfg: &mut AdapterConfig, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
        let k = self.pruned()?;
        let mut p = tensors
            .remove(PROMPT)
            .ok_or_else(|| Error::msg(format!("no `{PROMPT}` to export")))?;
        if let Some(m) = &k.mask {
            p = p.mul(m)?;
        }
        let idx = Tensor::new(k.tokens.as_slice(), p.device())?;
        tensors.insert(PROMPT.into(), p.index_select(&idx, 0)?);
        debug_assert!(tensors.contains_key(KV));
        cfg.set("num_virtual_tokens", k.tokens.len())?;
        cfg.set("prune_step", 0)?;
        Ok(())
    }

    fn files(&self) -> Result<Vec<(String, String)>> {
        Ok(match &self.report {
            Some(r) => vec![("pruning.json".into(), r.to_string())],
            None => Vec::new(),
        })
    }
}
