//! Trained biases (BitFit, Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient
//! Fine-tuning for Transformer-based Masked Language-models"), as LoRA's `bias` option:
//! `"lora_only"` trains the biases of the LoRA-adapted linears (the LoRA layer owns them,
//! saved as `<module>.base_layer.bias`), `"all"` also those of every other linear, through this
//! layer (saved as `<module>.bias`): PEFT's names, since PEFT trains the base biases in place
//! and saves them with the adapter. petal trains a copy, so W and b stay frozen and disabling
//! the adapter gives the base model back. Merge adds `b' - b`.

use crate::adapter::{AdapterLayer, NamedTensor, WeightUpdate};
use crate::Result;
use candle_core::{DType, Tensor, Var};

#[derive(Debug)]
pub struct BiasCopy {
    trained: Var,
    frozen: Tensor,
}

impl BiasCopy {
    pub fn new(b: &Tensor) -> Result<Self> {
        let frozen = b.to_dtype(DType::F32)?;
        Self::starting_at(frozen.copy()?, frozen)
    }

    /// A trained bias starting at `start` rather than at the frozen `b`.
    pub fn starting_at(start: Tensor, b: Tensor) -> Result<Self> {
        Ok(BiasCopy {
            trained: Var::from_tensor(&start.to_dtype(DType::F32)?)?,
            frozen: b.to_dtype(DType::F32)?,
        })
    }

    fn delta(&self) -> Result<Tensor> {
        Ok((self.trained.as_tensor() - &self.frozen)?)
    }
}

impl AdapterLayer for BiasCopy {
    fn forward(&self, _x: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        let d = self.delta()?.to_dtype(y.dtype())?;
        Ok(y.broadcast_add(&d)?)
    }

    /// With the frozen linear: `x W^T + b'` in one op, the trained copy in place of the frozen
    /// bias (the frozen one plus the delta), so no (n, out) product is kept for backward.
    fn fused_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: Option<&Tensor>,
        ctx: &crate::Ctx,
    ) -> Option<Result<Tensor>> {
        let b = self.trained.as_tensor();
        Some(petal_ops::frozen_linear(ctx.kernels(), x, w, Some(b)).map_err(Into::into))
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        Ok(WeightUpdate::AddBias {
            dw: None,
            db: self.delta()?,
        })
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![NamedTensor {
            name: "bias",
            var: &self.trained,
        }]
    }
}
