//! Biases: which linears a norm feeds (where SSF folds a shift), and, before export, the
//! biases a transformers config can express.

use super::Llama;
use petal_core::{AdaptableLinear, Error, Result};

impl Llama {
    /// The linears that read norm `norm`'s output (a shift after it folds into their biases):
    /// q, k, v after the input layernorm, gate and up after the post-attention one; none for
    /// the final norm, which feeds the head (no bias in transformers).
    pub(crate) fn linears_reading(&self, norm: &str) -> Vec<String> {
        let paths = |ls: &[&AdaptableLinear]| ls.iter().map(|l| l.path().to_string()).collect();
        for l in &self.layers {
            if l.ln1.path() == norm {
                return paths(&[&l.attn.q, &l.attn.k, &l.attn.v]);
            }
            if l.ln2.path() == norm {
                return paths(&[&l.mlp.gate, &l.mlp.up]);
            }
        }
        Vec::new()
    }

    /// Make the biases expressible in a transformers config before export: a Llama with any
    /// attention (MLP) bias gets zero biases on the rest of that block and `attention_bias`
    /// (`mlp_bias`) set; Qwen2 has q/k/v biases only and Mistral none, so other biases there
    /// are refused, naming the first.
    pub fn complete_bias_groups(&mut self) -> Result<()> {
        let mt = self.cfg.model_type.clone();
        let (mut attn, mut mlp) = (false, false);
        for l in &self.layers {
            let a = &l.attn;
            attn |= [&a.q, &a.k, &a.v, &a.o].iter().any(|x| x.bias().is_some());
            mlp |= [&l.mlp.gate, &l.mlp.up, &l.mlp.down]
                .iter()
                .any(|x| x.bias().is_some());
        }
        if mt != "llama" {
            let allowed = |p: &str| {
                mt == "qwen2"
                    && [".q_proj", ".k_proj", ".v_proj"]
                        .iter()
                        .any(|s| p.ends_with(s))
            };
            for l in &self.layers {
                let a = &l.attn;
                for x in [&a.q, &a.k, &a.v, &a.o, &l.mlp.gate, &l.mlp.up, &l.mlp.down] {
                    if x.bias().is_some() && !allowed(x.path()) {
                        return Err(Error::msg(format!(
                            "{}: a {mt} model in transformers has no bias there, so the merged \
                             model cannot be written as a {mt} folder (use the adapter unmerged)",
                            x.path()
                        )));
                    }
                }
            }
            return Ok(());
        }
        for l in &mut self.layers {
            let a = &mut l.attn;
            if attn {
                for x in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
                    x.add_zero_bias()?;
                }
            }
            if mlp {
                for x in [&mut l.mlp.gate, &mut l.mlp.up, &mut l.mlp.down] {
                    x.add_zero_bias()?;
                }
            }
        }
        self.cfg.attention_bias |= attn;
        self.cfg.mlp_bias |= mlp;
        Ok(())
    }
}
