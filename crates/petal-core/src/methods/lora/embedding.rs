//! LoRA on a token embedding (PEFT's `lora.Embedding`).

use crate::adapter::{AdapterLayer, BaseLinear, NamedTensor, WeightUpdate};
use crate::config::InitWeights;
use crate::methods::normal;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};

/// LoRA on a token embedding (PEFT's `lora.Embedding`): `y = E[ids] + s A^T[ids] B^T` with
/// `lora_embedding_A (r, vocab)`, `lora_embedding_B (hidden, r)`; `dW = s (B A)^T` in the
/// table's (vocab, hidden) layout. Init: A = 0, B ~ N(0, 1) (the reverse of linears);
/// `false`: both N(0, 1). No dropout, as in PEFT. Saved as `lora_embedding_A`/`_B`.
#[derive(Debug)]
pub struct LoraEmbedding {
    a: Var, // (r, vocab)
    b: Var, // (hidden, r)
    scaling: f64,
}

impl LoraEmbedding {
    pub(super) fn build(
        o: &super::LoraOptions,
        path: &str,
        base: &BaseLinear,
        g: &mut rand::rngs::StdRng,
    ) -> Result<Box<dyn AdapterLayer>> {
        if o.dora || !matches!(o.core.init, InitWeights::Flag(_)) {
            return Err(Error::Unsupported(format!(
                "{path}: LoRA on an embedding supports the default init only (no DoRA, PiSSA, ...)"
            )));
        }
        let r = o.rank_for(path);
        let (vocab, hidden) = (base.in_features, base.out_features);
        let dev = base.weight.device();
        let a = if o.core.init == InitWeights::Flag(false) {
            normal((r, vocab), 1.0, g, dev)?
        } else {
            Tensor::zeros((r, vocab), DType::F32, dev)?
        };
        let b = normal((hidden, r), 1.0, g, dev)?;
        Ok(Box::new(LoraEmbedding {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling: o.scaling_for(path),
        }))
    }
}

impl AdapterLayer for LoraEmbedding {
    fn forward(&self, ids: &Tensor, y: Tensor, _ctx: &crate::Ctx) -> Result<Tensor> {
        // rows of A^T for the ids: (n, r), then through B
        let h = self
            .a
            .as_tensor()
            .index_select(&ids.flatten_all()?, 1)? // (r, n)
            .t()?;
        let d = (h.matmul(&self.b.as_tensor().t()?)? * self.scaling)?;
        let d = d.reshape(y.shape())?.to_dtype(y.dtype())?;
        Ok((y + d)?)
    }

    fn weight_update(&self) -> Result<WeightUpdate> {
        let ba = self.b.as_tensor().matmul(self.a.as_tensor())?; // (hidden, vocab)
        Ok(WeightUpdate::Add((ba.t()? * self.scaling)?))
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        vec![
            NamedTensor {
                name: "lora_embedding_A",
                var: &self.a,
            },
            NamedTensor {
                name: "lora_embedding_B",
                var: &self.b,
            },
        ]
    }
}
