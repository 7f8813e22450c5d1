//! Differentiable building blocks, composed from candle primitives that all have a backward.

use candle_core::{DType, Device, Result, Tensor, D};

/// Softmax over the last dimension; the max is detached (it cancels in the gradient).
pub fn softmax_last_dim_reference(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`, computed in f32, returned in x's dtype.
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    y.to_dtype(dt)?.broadcast_mul(&w.to_dtype(dt)?)
}

/// cos/sin tables (max_pos, head_dim/2) from inverse frequencies.
pub fn rope_tables(inv_freq: &[f32], max_pos: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let inv = Tensor::from_slice(inv_freq, (1, half), device)?;
    let pos: Vec<f32> = (0..max_pos).map(|p| p as f32).collect();
    let pos = Tensor::from_vec(pos, (max_pos, 1), device)?;
    let freqs = pos.broadcast_mul(&inv)?; // (max_pos, half)
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Rotate-half RoPE (HF layout) on x (b, h, t, d) with cos/sin (t, d/2) already sliced to the
/// positions of x.
pub fn apply_rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?; // (t, d)
    let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)
}

/// Additive causal mask (q_len, kv_len) for queries at positions offset..offset+q_len.
pub fn causal_mask(q_len: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let kv = offset + q_len;
    let mut m = vec![0f32; q_len * kv];
    for i in 0..q_len {
        for j in (offset + i + 1)..kv {
            m[i * kv + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (q_len, kv), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_sum_to_one_and_match_closed_form() {
        let x = Tensor::new(&[[1f32, 2., 3.], [0., -1., 5.]], &Device::Cpu).unwrap();
        let s = softmax_last_dim_reference(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let z: f32 = [1f32, 2., 3.].iter().map(|v| v.exp()).sum();
        assert!((s[0][2] - 3f32.exp() / z).abs() < 1e-6);
        assert!((s[1].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_each_pair_by_position_times_frequency() {
        // d = 4: pairs (0,2) and (1,3) rotate by p*f0 and p*f1.
        let inv = [1.0f32, 0.1];
        let (cos, sin) = rope_tables(&inv, 4, &Device::Cpu).unwrap();
        let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let p = 3usize;
        let y = apply_rope_reference(
            &x,
            &cos.narrow(0, p, 1).unwrap(),
            &sin.narrow(0, p, 1).unwrap(),
        )
        .unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let a0 = 3.0f32 * 1.0;
        assert!((y[0] - (1.0 * a0.cos() - 3.0 * a0.sin())).abs() < 1e-5);
        assert!((y[2] - (3.0 * a0.cos() + 1.0 * a0.sin())).abs() < 1e-5);
        let a1 = 3.0f32 * 0.1;
        assert!((y[1] - (2.0 * a1.cos() - 4.0 * a1.sin())).abs() < 1e-5);
    }

    #[test]
    fn rms_norm_matches_its_formula() {
        let x = Tensor::new(&[[3f32, 4.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[2f32, 0.5], &Device::Cpu).unwrap();
        let y = rms_norm_reference(&x, &w, 0.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let rms = (12.5f32).sqrt();
        assert!((y[0][0] - 3.0 / rms * 2.0).abs() < 1e-6);
        assert!((y[0][1] - 4.0 / rms * 0.5).abs() < 1e-6);
    }
}
