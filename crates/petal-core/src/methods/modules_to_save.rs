//! PEFT's `modules_to_save`: a module trained in full next to any method, e.g. the output head
//! or a freshly initialised classifier. Mirrors PEFT `utils/other.py` (`ModulesToSaveWrapper`)
//! for linear modules.
//!
//! A listed module (PEFT matches `key.endswith(entry)`) gets a trainable copy of its weight
//! (and bias) that replaces it while the adapter is active: `y = x W_c^T + b_c`. The copy is
//! saved under the module's own names (`base_model.model.lm_head.weight`), as PEFT does. Merge
//! puts the copy in place of W (and b); unmerge restores them. A tied output head gets its own
//! copy (the tie is broken, as in PEFT); `petal merge` then writes the head separately. A listed
//! token embedding gets a trained copy of its table; a head tied to it keeps the original table,
//! as in PEFT without `ensure_weight_tying`.

use crate::adapter::{AdapterLayer, NamedTensor, WeightUpdate};
use crate::config::AdapterConfig;
use crate::Result;
use candle_core::{DType, Tensor, Var};

#[derive(Debug)]
pub struct ModuleCopy {
    weight: Var,
    bias: Option<Var>,
    base_weight: Tensor,
    base_bias: Option<Tensor>,
    /// A token embedding: the copy is a table looked up by ids.
    embedding: bool,
}

/// Whether `path` is listed in `modules_to_save` (PEFT: the key ends with an entry).
pub fn is_listed(cfg: &AdapterConfig, path: &str) -> bool {
    cfg.modules_to_save
        .as_ref()
        .is_some_and(|l| l.iter().any(|e| path.ends_with(e.as_str())))
}

impl ModuleCopy {
    /// A copy of a token embedding's table (vocab, hidden).
    pub fn embedding(table: &Tensor) -> Result<Self> {
        let mut c = Self::new(table, None)?;
        c.embedding = true;
        Ok(c)
    }

    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let copy =
            |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.copy()?)?) };
        Ok(ModuleCopy {
            weight: copy(weight)?,
            bias: bias.map(copy).transpose()?,
            base_weight: weight.clone(),
            base_bias: bias.cloned(),
            embedding: false,
        })
    }
}

impl AdapterLayer for ModuleCopy {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        // the copy replaces the module: its output does not depend on y
        if self.embedding {
            let rows = self.weight.as_tensor().index_select(&x.flatten_all()?, 0)?;
            return Ok(rows.reshape(y.shape())?.to_dtype(y.dtype())?);
        }
        let xf = crate::methods::flat_input(x)?;
        let mut out = xf.matmul(&self.weight.as_tensor().t()?)?;
        if let Some(b) = &self.bias {
            out = out.broadcast_add(b.as_tensor())?;
        }
        Ok(out.reshape(y.shape())?.to_dtype(y.dtype())?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::Replace {
            w: self.weight.as_tensor().clone(),
            b: self.bias.as_ref().map(|b| b.as_tensor().clone()),
            old_w: self.base_weight.clone(),
            old_b: self.base_bias.clone(),
        })
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let mut v = vec![NamedTensor {
            name: "weight",
            var: &self.weight,
        }];
        if let Some(b) = &self.bias {
            v.push(NamedTensor {
                name: "bias",
                var: b,
            });
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Targets;
    use crate::testing::{max_rel, rand_tensor, Toy};
    use crate::{inject_adapter, Adaptable, ParamCount};

    fn cfg() -> AdapterConfig {
        let mut c = AdapterConfig::lora(2, 4.0, Targets::List(vec!["fc1".into()]));
        c.set("init_lora_weights", crate::config::InitWeights::Flag(false))
            .unwrap();
        c.modules_to_save = Some(vec!["fc2".into()]);
        c
    }

    #[test]
    fn a_listed_module_trains_a_full_copy_that_merges_in_place_and_unmerges_exactly() {
        let mut t = Toy::new();
        let report = inject_adapter(&mut t, "default", &cfg(), 3).unwrap();
        assert_eq!(report.modules.len(), 2);
        // move the copy away from W so it matters
        let copy = &t.fc2.layer("default").unwrap().tensors()[0];
        copy.var
            .set(&(copy.var.as_tensor() + rand_tensor(&[6, 12], 5)).unwrap())
            .unwrap();
        let x = Toy::input();
        let unmerged = t.forward(&x);
        let w0 = t.fc2.weight().clone();
        t.fc2.merge("default", true).unwrap();
        assert!(max_rel(&t.forward(&x), &unmerged) < 1e-5);
        t.fc2.unmerge().unwrap();
        assert_eq!(max_rel(t.fc2.weight(), &w0), 0.0);
        // trainable: LoRA on fc1 (2 x (10 + 12)) + the whole of fc2 (6 x 12, no bias)
        let c = ParamCount::of(&t);
        assert_eq!(c.trainable, 2 * (10 + 12) + 6 * 12);
    }

    #[test]
    fn the_copy_gets_gradients_and_the_frozen_weight_none() {
        let mut t = Toy::new();
        inject_adapter(&mut t, "default", &cfg(), 3).unwrap();
        let x = Toy::input();
        let y = t.forward(&x);
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let copy = t.fc2.layer("default").unwrap().tensors()[0]
            .var
            .as_tensor()
            .clone();
        // d Σ y² / d W' = 2 Σ_rows y ⊗ h for y = h W'^T, h = silu(fc1(x)): by loops in f64
        let h = t
            .fc1
            .forward(&x, &crate::Ctx::eval())
            .unwrap()
            .silu()
            .unwrap();
        let (h, y): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
            h.flatten_to(1).unwrap().to_vec2().unwrap(),
            y.flatten_to(1).unwrap().to_vec2().unwrap(),
        );
        let got: Vec<Vec<f32>> = g.get(&copy).unwrap().to_vec2().unwrap();
        for (o, row) in got.iter().enumerate() {
            for (i, &gi) in row.iter().enumerate() {
                let want: f64 = y
                    .iter()
                    .zip(&h)
                    .map(|(y, h)| 2.0 * y[o] as f64 * h[i] as f64)
                    .sum();
                assert!(
                    (gi as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "[{o}, {i}]: {gi} vs {want}"
                );
            }
        }
        for l in t.linears() {
            assert!(g.get(l.weight()).is_none(), "{}", l.path());
        }
    }

    #[test]
    fn a_module_both_targeted_and_listed_is_refused() {
        let mut c = cfg();
        c.modules_to_save = Some(vec!["fc1".into()]);
        let e = inject_adapter(&mut Toy::new(), "default", &c, 3).unwrap_err();
        assert!(e.to_string().contains("both targeted"), "{e}");
    }
}
