//! `AdaptableNorm`: a frozen norm weight that a selective method (LN tuning) may replace with a
//! trained copy. Models ask for `weight()`; they know nothing of the method.

use crate::{Error, Result};
use candle_core::{Tensor, Var};

#[derive(Debug)]
pub struct AdaptableNorm {
    path: String,
    weight: Tensor,
    /// (adapter, trained copy, the PEFT name it is saved under, relative to the module)
    tuned: Vec<(String, Var, &'static str)>,
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
    /// The weight in use: the active trained copy, else the frozen one.
    pub fn weight(&self) -> Tensor {
        self.active
            .as_ref()
            .and_then(|a| self.copy(a))
            .map(|v| v.as_tensor().clone())
            .unwrap_or_else(|| self.weight.clone())
    }
    pub fn copy(&self, name: &str) -> Option<&Var> {
        self.tuned
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| v)
    }
    pub fn names(&self) -> Vec<&str> {
        self.tuned.iter().map(|(n, _, _)| n.as_str()).collect()
    }
    /// Adapter `name`'s trained copy under its full PEFT key (`<module>.<tensor>`).
    pub fn copy_key(&self, name: &str) -> Option<(String, &Var)> {
        self.tuned
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, t)| (format!("{}.{t}", self.path), v))
    }
    /// Add a trainable copy of the weight as adapter `name`, saved as `tensor` (relative to
    /// the module), and make it active.
    pub fn add_copy(&mut self, name: &str, tensor: &'static str) -> Result<&Var> {
        if self.copy(name).is_some() {
            return Err(Error::msg(format!(
                "{}: adapter `{name}` already exists",
                self.path
            )));
        }
        let v = Var::from_tensor(&self.weight.to_dtype(candle_core::DType::F32)?)?;
        self.tuned.push((name.to_string(), v, tensor));
        self.active = Some(name.to_string());
        Ok(&self.tuned[self.tuned.len() - 1].1)
    }
    pub fn set_active(&mut self, names: &[&str]) {
        self.active = names
            .iter()
            .find(|n| self.copy(n).is_some())
            .map(|n| n.to_string());
    }
    pub fn is_active(&self, name: &str) -> bool {
        self.active.as_deref() == Some(name)
    }
    /// Make the active copy the weight and drop all copies.
    pub fn merge_and_unload(&mut self) -> Result<()> {
        self.weight = self.weight().to_dtype(self.weight.dtype())?;
        self.tuned.clear();
        self.active = None;
        Ok(())
    }
}
