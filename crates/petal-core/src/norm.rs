//! `AdaptableNorm`: a frozen norm weight that a method may adapt: LN tuning replaces it with a
//! trained copy; SSF scales it and adds a shift after the norm. Models ask for `weight()` and
//! `shift()`; they know nothing of the method.

use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};

/// What an adapter keeps on a norm.
#[derive(Debug)]
enum Tuned {
    /// A trained copy of the weight, saved as `<module>.<tensor>` (LN tuning).
    Copy { var: Var, tensor: &'static str },
    /// A scale γ of the weight and a shift β after the norm (SSF): `γ ⊙ norm(x) + β`.
    Affine {
        scale: Var,
        shift: Var,
        names: [&'static str; 2],
    },
}

#[derive(Debug)]
pub struct AdaptableNorm {
    path: String,
    weight: Tensor,
    tuned: Vec<(String, Tuned)>,
    active: Option<String>,
}

impl AdaptableNorm {
    pub fn new(path: impl Into<String>, weight: Tensor) -> Self {
        AdaptableNorm {
            path: path.into(),
            weight,
            tuned: Vec::new(),
            active: None,
        }
    }
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The frozen weight.
    pub fn base(&self) -> &Tensor {
        &self.weight
    }
    fn entry(&self, name: &str) -> Option<&Tuned> {
        self.tuned.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
    fn active_entry(&self) -> Option<&Tuned> {
        self.active.as_deref().and_then(|a| self.entry(a))
    }
    /// The weight in use: the active trained copy, the frozen weight scaled by the active γ,
    /// else the frozen weight.
    pub fn weight(&self) -> Result<Tensor> {
        Ok(match self.active_entry() {
            Some(Tuned::Copy { var, .. }) => var.as_tensor().clone(),
            Some(Tuned::Affine { scale, .. }) => self
                .weight
                .to_dtype(DType::F32)?
                .mul(scale.as_tensor())?
                .to_dtype(self.weight.dtype())?,
            None => self.weight.clone(),
        })
    }
    /// The shift to add after the norm, if the active adapter has one.
    pub fn shift(&self) -> Option<&Tensor> {
        match self.active_entry() {
            Some(Tuned::Affine { shift, .. }) => Some(shift.as_tensor()),
            _ => None,
        }
    }
    /// Whether adapter `name` adapts this norm.
    pub fn has(&self, name: &str) -> bool {
        self.entry(name).is_some()
    }
    pub fn names(&self) -> Vec<&str> {
        self.tuned.iter().map(|(n, _)| n.as_str()).collect()
    }
    /// Adapter `name`'s trained tensors under their full PEFT keys (`<module>.<tensor>`).
    pub fn keyed(&self, name: &str) -> Vec<(String, &Var)> {
        match self.entry(name) {
            Some(Tuned::Copy { var, tensor }) => vec![(format!("{}.{tensor}", self.path), var)],
            Some(Tuned::Affine {
                scale,
                shift,
                names,
            }) => vec![
                (format!("{}.{}", self.path, names[0]), scale),
                (format!("{}.{}", self.path, names[1]), shift),
            ],
            None => Vec::new(),
        }
    }
    fn add(&mut self, name: &str, t: Tuned) -> Result<()> {
        if self.has(name) {
            return Err(Error::msg(format!(
                "{}: adapter `{name}` already exists",
                self.path
            )));
        }
        self.tuned.push((name.to_string(), t));
        self.active = Some(name.to_string());
        Ok(())
    }
    /// Add a trainable copy of the weight as adapter `name`, saved as `tensor` (relative to
    /// the module), and make it active. Returns its number of values.
    pub fn add_copy(&mut self, name: &str, tensor: &'static str) -> Result<usize> {
        let var = Var::from_tensor(&self.weight.to_dtype(DType::F32)?)?;
        let n = var.as_tensor().elem_count();
        self.add(name, Tuned::Copy { var, tensor })?;
        Ok(n)
    }
    /// Add a trainable scale of the weight and shift after the norm as adapter `name` (f32,
    /// the norm's width each), saved as `names`, and make it active. Returns the number of values.
    pub fn add_affine(
        &mut self,
        name: &str,
        scale: Tensor,
        shift: Tensor,
        names: [&'static str; 2],
    ) -> Result<usize> {
        let width = self.weight.elem_count();
        if scale.elem_count() != width || shift.elem_count() != width {
            return Err(Error::msg(format!(
                "{}: a scale and shift of {} and {} values for a norm of {width}",
                self.path,
                scale.elem_count(),
                shift.elem_count()
            )));
        }
        self.add(
            name,
            Tuned::Affine {
                scale: Var::from_tensor(&scale.to_dtype(DType::F32)?)?,
                shift: Var::from_tensor(&shift.to_dtype(DType::F32)?)?,
                names,
            },
        )?;
        Ok(2 * width)
    }
    pub fn set_active(&mut self, names: &[&str]) {
        self.active = names.iter().find(|n| self.has(n)).map(|n| n.to_string());
    }
    pub fn is_active(&self, name: &str) -> bool {
        self.active.as_deref() == Some(name)
    }
    /// Make the active adapter part of the weight and drop all adapters. Returns the shift the
    /// active adapter adds after the norm (f32), which the caller folds into the biases of the
    /// linears the norm feeds.
    pub fn merge_and_unload(&mut self) -> Result<Option<Tensor>> {
        let shift = self.shift().cloned();
        self.weight = self.weight()?.to_dtype(self.weight.dtype())?.detach();
        self.tuned.clear();
        self.active = None;
        Ok(shift)
    }
}
