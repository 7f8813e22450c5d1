//! The decoder run one layer at a time over whole sequences, for work that changes a layer
//! between passes (GPTQ's calibration: each layer is quantized on the inputs the layers before
//! it, already quantized, give).

use super::{Llama, Stage};
use candle_core::Tensor;
use petal_core::{Ctx, Error, Result};

impl Llama {
    /// The residual stream entering the first layer: the token embeddings of `ids (b, t)`,
    /// sequences starting at position 0. An error with an input-side adapter attached.
    pub fn layer_input(&self, ids: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if self.input.is_some() {
            return Err(Error::msg(
                "layer-by-layer passes take the model without an input adapter",
            ));
        }
        Ok(self.input_stage(ids, 0, &self.pass(ctx))?.x)
    }

    /// Decoder layer `i` alone on the residual stream `x (b, t, hidden)` of whole sequences
    /// (positions from 0, no cache): the stream entering layer `i + 1`.
    pub fn layer_alone(&self, i: usize, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let stage = Stage {
            x: x.clone(),
            kv_prefix: None,
            rope_from: 0,
            rope_span: 0,
            slots: None,
        };
        self.layer_forward(i, x, &stage, None, &self.pass(ctx))
    }

    /// Its decoder layers.
    pub fn num_decoder_layers(&self) -> usize {
        self.num_layers()
    }
}
