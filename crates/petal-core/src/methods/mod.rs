//! One file per method; shared building blocks below.

pub mod bias;
pub mod boft;
pub mod dora;
pub mod ia3;
pub mod ln_tuning;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod modules_to_save;
pub mod oft;
pub mod p_tuning;
pub mod prefix_tuning;
pub mod prompt_tuning;
pub mod road;
pub mod vera;

use crate::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

/// torch's `kaiming_uniform_(a = sqrt(5))` on a (rows, cols) matrix: U(±1/sqrt(cols)).
pub(crate) fn kaiming_uniform(
    shape: (usize, usize),
    g: &mut impl Rng,
    dev: &Device,
) -> Result<Tensor> {
    let bound = 1.0 / (shape.1 as f64).sqrt();
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| g.gen_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// N(0, std^2) samples by Box-Muller (no extra dependency).
pub(crate) fn normal(
    shape: (usize, usize),
    std: f64,
    g: &mut impl Rng,
    dev: &Device,
) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            let (u1, u2): (f64, f64) = (g.gen::<f64>().max(1e-12), g.gen());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// A trainable matrix: kaiming-uniform, or zeros.
pub(crate) fn param(
    shape: (usize, usize),
    zero: bool,
    g: &mut impl Rng,
    dev: &Device,
) -> Result<Var> {
    let t = if zero {
        Tensor::zeros(shape, DType::F32, dev)?
    } else {
        kaiming_uniform(shape, g, dev)?
    };
    Ok(Var::from_tensor(&t)?)
}

/// `y + x dW^T` for methods that materialise dW (out, in) in f32, as PEFT's LyCORIS layers do.
pub(crate) fn add_dense_delta(x: &Tensor, y: Tensor, delta: &Tensor) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let inp = xf.dim(candle_core::D::Minus1)?;
    let x2 = xf.reshape((xf.elem_count() / inp, inp))?;
    let d = x2
        .matmul(&delta.t()?)?
        .reshape(y.shape())?
        .to_dtype(y.dtype())?;
    Ok((y + d)?)
}
