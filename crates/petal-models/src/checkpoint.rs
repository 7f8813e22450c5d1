//! Gradient checkpointing per decoder layer: the forward pass keeps only each layer's input,
//! and the backward pass recomputes one layer at a time (with the dropout masks it drew) to
//! push the gradient through it. Activations inside a layer (attention probabilities, MLP
//! intermediates, adapter temporaries) live for one layer instead of the whole model, for one
//! more forward pass of compute. Plain safe Rust over candle's autograd: one backward per layer,
//! the parameter gradients summed into detached `Grads` as they come (a `GradStore`'s leaf
//! gradients keep their backward graph, and with it the layer's activations, alive).

use crate::llama::Llama;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use petal_core::{Ctx, Error, Result};
use std::collections::HashMap;

/// Gradients by tensor id, detached: unlike a `GradStore`, whose leaf gradients keep the
/// backward graph (and so the forward activations) alive, these hold only their own buffers.
#[derive(Debug, Default)]
pub struct Grads(HashMap<TensorId, Tensor>);

impl Grads {
    /// Add every gradient of `store` (detached) to the ones held.
    pub fn absorb(&mut self, store: GradStore) -> Result<()> {
        let ids: Vec<TensorId> = store.get_ids().copied().collect();
        for id in ids {
            let Some(g) = store.get_id(id) else { continue };
            let g = g.detach();
            let sum = match self.0.remove(&id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            self.0.insert(id, sum);
        }
        Ok(())
    }

    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }

    /// Absorb `store` and return (without keeping) the gradient of the layer input `v`.
    fn take_input(&mut self, mut store: GradStore, v: &Var) -> Result<Tensor> {
        let g = store
            .remove(v.as_tensor())
            // the objective does not depend on the hidden states (cannot happen for a loss)
            .ok_or_else(|| Error::msg("gradient checkpointing: no gradient reached a layer input"))?
            .detach();
        self.absorb(store)?;
        Ok(g)
    }
}

impl Llama {
    /// `hidden_states(ids, None, ctx)` with no gradient to take: each layer's output detached,
    /// so one layer's activations live at a time, not the whole model's (an adapter's trainable
    /// tensors would otherwise keep every op's inputs alive until the result is dropped: 0.6 GB
    /// a 256-token sequence on Qwen2.5-1.5B). For evaluation.
    pub fn hidden_states_no_grad(&self, ids: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let ctx = &self.pass(ctx);
        let stage = self.input_stage(ids, 0, ctx)?;
        let mut x = stage.x.detach();
        for i in 0..self.num_layers() {
            x = self.layer_forward(i, &x, &stage, None, ctx)?.detach();
        }
        Ok(self.final_norm(&x)?.detach())
    }

    /// The value of `objective(hidden_states(ids))` (a scalar, from the final normed hidden
    /// states) and its gradients, as `objective.backward()` gives them without checkpointing
    /// (up to summation order). Training mode (dropout on, drawn from `ctx`).
    pub fn checkpointed_backward(
        &self,
        ids: &Tensor,
        ctx: &Ctx,
        objective: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Grads)> {
        let ctx = &self.pass(ctx);
        let at_input = ctx.rng_snapshot();
        let stage = self.input_stage(ids, 0, ctx)?;
        let mut x = stage.x.detach();
        let mut saved = Vec::with_capacity(self.num_layers());
        for i in 0..self.num_layers() {
            let state = ctx.rng_snapshot();
            let y = self.layer_forward(i, &x, &stage, None, ctx)?.detach();
            saved.push((std::mem::replace(&mut x, y), state));
        }
        let after = ctx.rng_snapshot();
        let last = Var::from_tensor(&x)?;
        let value = objective(&self.final_norm(last.as_tensor())?)?;
        let mut grads = Grads::default();
        let mut g = grads.take_input(value.backward()?, &last)?;
        for (i, (xi, state)) in saved.into_iter().enumerate().rev() {
            ctx.rng_restore(state);
            let v = Var::from_tensor(&xi)?;
            let y = self.layer_forward(i, v.as_tensor(), &stage, None, ctx)?;
            g = grads.take_input((y * &g)?.sum_all()?.backward()?, &v)?;
        }
        // the input side, where something there trains (prompt tuning, embedding adapters);
        // prefix keys/values got theirs through the layers above
        ctx.rng_restore(at_input);
        let x0 = self.input_stage(ids, 0, ctx)?.x;
        if x0.track_op() {
            grads.absorb((x0 * g)?.sum_all()?.backward()?)?;
        }
        ctx.rng_restore(after);
        Ok((value, grads))
    }
}
