//! Gradient checkpointing per decoder layer: the forward pass keeps only each layer's input,
//! and the backward pass recomputes one layer at a time (with the dropout masks it drew) to
//! push the gradient through it. Activations inside a layer (attention probabilities, MLP
//! intermediates, adapter temporaries) live for one layer instead of the whole model, for one
//! more forward pass of compute. Plain safe Rust over candle's autograd: one backward per layer,
//! each layer's parameter gradients in its own `GradStore`, to be summed by the caller.

use crate::llama::Llama;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use petal_core::{rng, Error, Result};

impl Llama {
    /// The value of `objective(hidden_states(ids))` (a scalar, from the final normed hidden
    /// states) and the gradient stores whose sum is its gradient: as `objective.backward()`
    /// gives without checkpointing, up to summation order. Training mode (dropout on).
    pub fn checkpointed_backward(
        &self,
        ids: &Tensor,
        objective: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<GradStore>)> {
        let at_input = rng::snapshot();
        let stage = self.input_stage(ids, 0, true)?;
        let mut x = stage.x.detach();
        let mut saved = Vec::with_capacity(self.num_layers());
        for i in 0..self.num_layers() {
            let state = rng::snapshot();
            let y = self.layer_forward(i, &x, &stage, None, true)?.detach();
            saved.push((std::mem::replace(&mut x, y), state));
        }
        let after = rng::snapshot();
        let last = Var::from_tensor(&x)?;
        let value = objective(&self.final_norm(last.as_tensor())?)?;
        let head = value.backward()?;
        let mut g = grad_of(&head, &last)?;
        let mut stores = vec![head];
        for (i, (xi, state)) in saved.iter().enumerate().rev() {
            rng::restore(*state);
            let v = Var::from_tensor(xi)?;
            let y = self.layer_forward(i, v.as_tensor(), &stage, None, true)?;
            let s = (y * &g)?.sum_all()?.backward()?;
            g = grad_of(&s, &v)?;
            stores.push(s);
        }
        // the input side, where something there trains (prompt tuning, embedding adapters);
        // prefix keys/values got theirs through the layers above
        rng::restore(at_input);
        let x0 = self.input_stage(ids, 0, true)?.x;
        if x0.track_op() {
            stores.push((x0 * g)?.sum_all()?.backward()?);
        }
        rng::restore(after);
        Ok((value, stores))
    }
}

fn grad_of(s: &GradStore, v: &Var) -> Result<Tensor> {
    match s.get(v.as_tensor()) {
        Some(g) => Ok(g.clone()),
        // the objective does not depend on the hidden states (cannot happen for a loss)
        None => Err(Error::msg(
            "gradient checkpointing: no gradient reached a layer input",
        )),
    }
}
