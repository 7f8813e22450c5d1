//! P-tuning (Liu et al., 2021, "GPT Understands, Too"): virtual token embeddings produced by a
//! small trained encoder, prepended like prompt tuning. Mirrors PEFT `tuners/p_tuning`
//! (`PromptEncoder`).
//!
//! Training: `E (n, d)` through one of PEFT's two encoders (`h = encoder_hidden_size`, PEFT's
//! default d):
//! - `MLP`: `Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)`;
//! - `LSTM`: a bidirectional LSTM of `encoder_num_layers` layers (hidden h per direction, torch's
//!   gate order i, f, g, o and its two biases), then `Linear(2h, 2h) → ReLU → Linear(2h, d)`.
//!
//! The prefix is the encoder's output. PEFT saves only that output, as `prompt_embeddings (n, d)`
//! at the top level with `inference_mode = true`, and an adapter loaded that way is a fixed
//! prefix (as in PEFT). petal's checkpoints keep E and the encoder (under PEFT's module names)
//! so a resumed run continues exactly. Init as torch's: E ~ N(0, 1), linear weights and biases
//! U(±1/sqrt(fan_in)), LSTM tensors U(±1/sqrt(h)). The LSTM's inter-layer `encoder_dropout` is
//! refused (PEFT's default is 0). Cannot be merged into weights.

use crate::adapter::{AdapterMethod, Flag, InputAdapter, InputShape, NamedTensor, NewAdapter};
use crate::config::{spec, AdapterConfig, Spec};
use crate::methods::prompt_tuning::{
    prepare_prompt, prompt_values, virtual_tokens, PromptEmbedding, PromptShape, EMBEDDINGS,
};
use crate::methods::{kaiming_uniform, normal};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};

pub struct PTuning;

crate::method_options! {
    /// P-tuning's options (PEFT `PromptEncoderConfig`).
    pub struct PTuningOptions {
        flatten shape: PromptShape;
        /// The encoder: MLP | LSTM (bidirectional, then a two-layer MLP)
        [crate::config::parse_upper]
        pub encoder_reparameterization_type: String = "MLP".into(),
        /// Hidden width of the encoder (default: the model's hidden size)
        pub encoder_hidden_size: Option<usize> = None,
        /// LSTM layers
        pub encoder_num_layers: usize = 2,
        /// LSTM dropout between layers (only 0)
        pub encoder_dropout: f64 = 0.0,
    }
}

#[derive(Debug)]
pub struct PromptEncoder {
    emb: Var,
    /// LSTM encoder: per layer, the forward and the reverse direction.
    lstm: Vec<[LstmDirection; 2]>,
    /// (weight (out, in), bias (out)) of the MLP head's linears, ReLU between them.
    mlp: Vec<(Var, Var)>,
}

/// One direction of one LSTM layer, as torch lays it out: `w_ih (4h, in)`, `w_hh (4h, h)`,
/// `b_ih`, `b_hh (4h)`, gates stacked as i, f, g, o.
#[derive(Debug)]
struct LstmDirection {
    w_ih: Var,
    w_hh: Var,
    b_ih: Var,
    b_hh: Var,
}

const NAMES: [&str; 7] = [
    "prompt_encoder.embedding.weight",
    "prompt_encoder.mlp_head.0.weight",
    "prompt_encoder.mlp_head.0.bias",
    "prompt_encoder.mlp_head.2.weight",
    "prompt_encoder.mlp_head.2.bias",
    "prompt_encoder.mlp_head.4.weight",
    "prompt_encoder.mlp_head.4.bias",
];

/// torch's LSTM parameter names (`lstm_head.weight_ih_l{k}[_reverse]`, ...), layers 0..4.
const LSTM_LAYERS: usize = 4;
macro_rules! lstm_names {
    ($($l:literal),*) => {
        [$([
            [
                concat!("prompt_encoder.lstm_head.weight_ih_l", $l),
                concat!("prompt_encoder.lstm_head.weight_hh_l", $l),
                concat!("prompt_encoder.lstm_head.bias_ih_l", $l),
                concat!("prompt_encoder.lstm_head.bias_hh_l", $l),
            ],
            [
                concat!("prompt_encoder.lstm_head.weight_ih_l", $l, "_reverse"),
                concat!("prompt_encoder.lstm_head.weight_hh_l", $l, "_reverse"),
                concat!("prompt_encoder.lstm_head.bias_ih_l", $l, "_reverse"),
                concat!("prompt_encoder.lstm_head.bias_hh_l", $l, "_reverse"),
            ],
        ]),*]
    };
}
const LSTM_NAMES: [[[&str; 4]; 2]; LSTM_LAYERS] = lstm_names!("0", "1", "2", "3");

fn uniform(shape: (usize, usize), bound: f64, g: &mut impl Rng, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| g.gen_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// nn.Linear's init: weight and bias U(±1/sqrt(in)).
fn linear(inp: usize, out: usize, g: &mut impl Rng, dev: &Device) -> Result<(Var, Var)> {
    let w = kaiming_uniform((out, inp), g, dev)?;
    let bound = 1.0 / (inp as f64).sqrt();
    let b = uniform((1, out), bound, g, dev)?.flatten_all()?;
    Ok((Var::from_tensor(&w)?, Var::from_tensor(&b)?))
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

impl LstmDirection {
    fn new(inp: usize, h: usize, g: &mut impl Rng, dev: &Device) -> Result<Self> {
        let k = 1.0 / (h as f64).sqrt();
        let mut t = |shape| -> Result<Var> { Ok(Var::from_tensor(&uniform(shape, k, g, dev)?)?) };
        Ok(LstmDirection {
            w_ih: t((4 * h, inp))?,
            w_hh: t((4 * h, h))?,
            b_ih: Var::from_tensor(&t((1, 4 * h))?.as_tensor().flatten_all()?)?,
            b_hh: Var::from_tensor(&t((1, 4 * h))?.as_tensor().flatten_all()?)?,
        })
    }

    fn vars(&self) -> [&Var; 4] {
        [&self.w_ih, &self.w_hh, &self.b_ih, &self.b_hh]
    }

    /// The hidden states (n, h) over the sequence `x (n, in)`, read backwards with `reverse`.
    fn run(&self, x: &Tensor, reverse: bool) -> Result<Tensor> {
        let n = x.dim(0)?;
        let h = self.w_hh.as_tensor().dim(1)?;
        // input terms of every step at once
        let pre = x
            .matmul(&self.w_ih.as_tensor().t()?)?
            .broadcast_add(self.b_ih.as_tensor())?
            .broadcast_add(self.b_hh.as_tensor())?;
        let w_hh_t = self.w_hh.as_tensor().t()?;
        let mut ht = Tensor::zeros((1, h), x.dtype(), x.device())?;
        let mut ct = ht.clone();
        let mut out: Vec<Option<Tensor>> = vec![None; n];
        let steps: Vec<usize> = if reverse {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for t in steps {
            let gates = (pre.narrow(0, t, 1)? + ht.matmul(&w_hh_t)?)?;
            let i = sigmoid(&gates.narrow(1, 0, h)?)?;
            let f = sigmoid(&gates.narrow(1, h, h)?)?;
            let gg = gates.narrow(1, 2 * h, h)?.tanh()?;
            let o = sigmoid(&gates.narrow(1, 3 * h, h)?)?;
            ct = ((f * &ct)? + (i * gg)?)?;
            ht = (o * ct.tanh()?)?;
            out[t] = Some(ht.clone());
        }
        let rows: Vec<Tensor> = out.into_iter().flatten().collect();
        Ok(Tensor::cat(&rows, 0)?)
    }
}

impl AdapterMethod for PTuning {
    fn input_values(&self, cfg: &AdapterConfig, shape: &InputShape) -> Result<u64> {
        let o: PTuningOptions = cfg.options()?;
        let d = shape.hidden as u64;
        let h = o.encoder_hidden_size.unwrap_or(shape.hidden) as u64;
        // the virtual tokens and the encoder: an MLP (d-h-h-d), or LSTM layers (four gates of
        // h per direction over inputs of up to max(d, 2h) plus h) and a 2h-2h-d head; the
        // larger of the two bounds either
        let mlp = h.saturating_mul(2 * d).saturating_add(h.saturating_mul(h));
        let per_layer = h
            .saturating_mul(16)
            .saturating_mul(d.max(h.saturating_mul(3)));
        let lstm = (o.encoder_num_layers as u64)
            .saturating_mul(per_layer)
            .saturating_add(h.saturating_mul(4 * h.min(u32::MAX as u64) + 2 * d));
        Ok(prompt_values(&o.shape, shape.hidden).saturating_add(mlp.max(lstm)))
    }
    fn peft_type(&self) -> &'static str {
        "P_TUNING"
    }

    fn options(&self) -> Spec {
        spec::<PTuningOptions>()
    }

    fn validate(&self, cfg: &AdapterConfig) -> Result<()> {
        let t = cfg
            .options::<PTuningOptions>()?
            .encoder_reparameterization_type;
        if t != "MLP" && t != "LSTM" {
            return Err(Error::config(
                "adapter config",
                "encoder_reparameterization_type",
                format!("{t:?}: P-tuning's encoders are MLP and LSTM"),
            ));
        }
        Ok(())
    }

    fn flags(&self) -> Vec<Flag> {
        vec![
            Flag::new("num-virtual-tokens", "num_virtual_tokens"),
            Flag::new("encoder-hidden-size", "encoder_hidden_size"),
            Flag::new("encoder", "encoder_reparameterization_type"),
            Flag::new("encoder-num-layers", "encoder_num_layers"),
        ]
    }

    fn default_targets(&self) -> Option<&'static str> {
        None
    }

    fn prepare(&self, cfg: &mut AdapterConfig, new: &NewAdapter) -> Result<()> {
        prepare_prompt(cfg, new, new.shape.hidden, new.attention_heads)?;
        if !new.given("encoder_hidden_size") {
            cfg.set("encoder_hidden_size", new.shape.hidden)?;
        }
        Ok(())
    }

    fn build_input(
        &self,
        cfg: &AdapterConfig,
        shape: &InputShape,
        seed: u64,
        dev: &Device,
    ) -> Result<Option<Box<dyn InputAdapter>>> {
        let d = shape.hidden;
        let o: PTuningOptions = cfg.options()?;
        let n = virtual_tokens(&o.shape, d)?;
        let mut g = rand::rngs::StdRng::seed_from_u64(seed);
        let emb = normal((n, d), 1.0, &mut g, dev)?;
        if cfg.inference_mode {
            // a saved adapter: the encoder's output, used as it is
            return Ok(Some(Box::new(PromptEmbedding::new(&emb)?)));
        }
        let h = o.encoder_hidden_size.unwrap_or(d);
        let (mut lstm, mut mlp) = (Vec::new(), Vec::new());
        match o.encoder_reparameterization_type.as_str() {
            "MLP" => {
                for (inp, out) in [(d, h), (h, h), (h, d)] {
                    mlp.push(linear(inp, out, &mut g, dev)?);
                }
            }
            "LSTM" => {
                let layers = o.encoder_num_layers;
                if layers == 0 || layers > LSTM_LAYERS {
                    return Err(Error::Unsupported(format!(
                        "P-tuning LSTM with encoder_num_layers = {layers}: petal builds 1 to \
                         {LSTM_LAYERS} layers"
                    )));
                }
                if o.encoder_dropout > 0.0 {
                    return Err(Error::Unsupported(
                        "P-tuning LSTM with encoder_dropout > 0 is not supported (PEFT's default is 0)"
                            .into(),
                    ));
                }
                for l in 0..layers {
                    let inp = if l == 0 { d } else { 2 * h };
                    lstm.push([
                        LstmDirection::new(inp, h, &mut g, dev)?,
                        LstmDirection::new(inp, h, &mut g, dev)?,
                    ]);
                }
                mlp.push(linear(2 * h, 2 * h, &mut g, dev)?);
                mlp.push(linear(2 * h, d, &mut g, dev)?);
            }
            t => {
                return Err(Error::Unsupported(format!(
                    "P-tuning encoder_reparameterization_type {t:?}: PEFT's are MLP and LSTM"
                )))
            }
        }
        Ok(Some(Box::new(PromptEncoder {
            emb: Var::from_tensor(&emb)?,
            lstm,
            mlp,
        })))
    }
}

impl PromptEncoder {
    fn encode(&self) -> Result<Tensor> {
        let mut x = self.emb.as_tensor().clone();
        for [fwd, bwd] in &self.lstm {
            x = Tensor::cat(&[fwd.run(&x, false)?, bwd.run(&x, true)?], 1)?;
        }
        for (i, (w, b)) in self.mlp.iter().enumerate() {
            x = x
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            if i + 1 < self.mlp.len() {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}

impl InputAdapter for PromptEncoder {
    fn embeddings(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.encode()?))
    }

    fn num_virtual_tokens(&self) -> usize {
        self.emb.as_tensor().dims()[0]
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let mut v = vec![NamedTensor {
            name: NAMES[0],
            var: &self.emb,
        }];
        for (l, dirs) in self.lstm.iter().enumerate() {
            for (k, dir) in dirs.iter().enumerate() {
                for (name, var) in LSTM_NAMES[l][k].iter().zip(dir.vars()) {
                    v.push(NamedTensor { name, var });
                }
            }
        }
        for (i, (w, b)) in self.mlp.iter().enumerate() {
            v.push(NamedTensor {
                name: NAMES[1 + 2 * i],
                var: w,
            });
            v.push(NamedTensor {
                name: NAMES[2 + 2 * i],
                var: b,
            });
        }
        v
    }

    fn export(&self) -> Result<Option<Vec<(&'static str, Tensor)>>> {
        Ok(Some(vec![(EMBEDDINGS, self.encode()?.detach())]))
    }

    fn set_prefix(&self, _t: &Tensor) -> Result<()> {
        Err(Error::Unsupported(
            "P-tuning's prefix comes from its encoder; it cannot be set directly".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Targets;
    use petal_ops::testing::{central_differences, rand};

    fn lstm_encoder(layers: usize) -> Box<dyn InputAdapter> {
        let mut cfg = AdapterConfig::for_method("P_TUNING", 1, 1.0, Targets::List(vec![]));
        cfg.set("num_virtual_tokens", 3).unwrap();
        cfg.set("encoder_hidden_size", 3).unwrap();
        cfg.set("encoder_reparameterization_type", "LSTM").unwrap();
        cfg.set("encoder_num_layers", layers).unwrap();
        let shape = InputShape {
            hidden: 4,
            layers: 1,
            kv_heads: 1,
            head_dim: 4,
        };
        PTuning
            .build_input(&cfg, &shape, 3, &Device::Cpu)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn lstm_encoder_gradients_match_finite_differences_through_both_directions_and_layers() {
        let enc = lstm_encoder(2);
        let w = rand(&[3, 4], 9);
        let loss = || -> Tensor {
            (enc.embeddings().unwrap().unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss().backward().unwrap();
        let tensors = enc.tensors();
        for want in [
            "prompt_encoder.embedding.weight",
            "prompt_encoder.lstm_head.weight_hh_l0",
            "prompt_encoder.lstm_head.bias_ih_l0_reverse",
            "prompt_encoder.lstm_head.weight_ih_l1_reverse",
            "prompt_encoder.lstm_head.weight_hh_l1",
            "prompt_encoder.mlp_head.0.weight",
        ] {
            let t = tensors.iter().find(|t| t.name == want).unwrap();
            let g = grads.get(t.var.as_tensor()).unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let idx = [0, g.len() / 2, g.len() - 1];
            let fd = central_differences(t.var, &idx, 1e-2, || {
                loss().to_scalar::<f32>().unwrap() as f64
            });
            for (k, &i) in idx.iter().enumerate() {
                let e = (g[i] as f64 - fd[k]).abs();
                assert!(
                    e < 2e-3 * (1.0 + fd[k].abs()),
                    "{want}[{i}]: {} vs {}",
                    g[i],
                    fd[k]
                );
            }
        }
    }

    #[test]
    fn lstm_encoder_has_torchs_parameter_count() {
        // per direction 4h (in + h + 2); layer 0 in = d, later 2h; head 2h*2h + 2h + 2h*d + d
        let (d, h, n) = (4, 3, 3);
        let dir = |inp: usize| 4 * h * (inp + h + 2);
        let want = n * d + 2 * dir(d) + 2 * dir(2 * h) + (2 * h * 2 * h + 2 * h) + (2 * h * d + d);
        let got: usize = lstm_encoder(2)
            .tensors()
            .iter()
            .map(|t| t.var.as_tensor().elem_count())
            .sum();
        assert_eq!(got, want);
    }
}
