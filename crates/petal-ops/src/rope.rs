//! RoPE (rotate-half, the HF layout) as a fused CPU kernel whose backward is the inverse
//! rotation, on the heads-first (b, h, t, d) and the token-major (b, t, h * d) layouts; other
//! devices and dtypes take the composed rotation as one lean graph node.

use crate::cpu::fast_act_ok;
use crate::kernels::map_rows;
use crate::nn;
use crate::Kernels;
use candle_core::backend::BackendStorage as _;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Rotates pairs (j, j + d/2) of each head's `d` values by the angles in cos/sin (t, d/2) of
/// the head's position `(head index / per_pos) % t`: x (b, h, t, d) has one head per position
/// (`per_pos` 1), x (b, t, h, d) or (b, t, h * d) `h`. With `inverse` by the opposite angles,
/// which is also the backward pass.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    t: usize,
    d: usize,
    per_pos: usize,
    inverse: bool,
}

/// One head's values rotated in place, pairs (j, j + d/2) by the angles whose cosines and sines
/// are `c`, `s` (d/2 each); `sign` -1 rotates by the opposite angles.
pub(crate) fn rotate_half(v: &mut [f32], c: &[f32], s: &[f32], sign: f32) {
    let half = c.len();
    for j in 0..half {
        let (a, b) = (v[j], v[j + half]);
        v[j] = a * c[j] - sign * b * s[j];
        v[j + half] = b * c[j] + sign * a * s[j];
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "petal-rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let half = self.d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        // one row per head
        let heads = Layout::contiguous_with_offset(
            (l.shape().elem_count() / self.d, self.d),
            l.start_offset(),
        );
        let (y, _) = map_rows(s, &heads, s.dtype(), |row, x, y| {
            let p = (row / self.per_pos) % self.t;
            let (c, s) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            y.copy_from_slice(x);
            rotate_half(y, c, s, sign);
        })?;
        Ok((y, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            t: self.t,
            d: self.d,
            per_pos: self.per_pos,
            inverse: !self.inverse,
        };
        Ok(Some(g.contiguous()?.apply_op1(op)?))
    }
}

pub fn apply_rope(k: Kernels, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::cuda::usable(k, x, crate::cuda::Family::Rope) && x.rank() == 4 {
        return crate::cuda::rope(x, cos, sin, x.dim(2)?, 1);
    }
    if !fast_act_ok(k, x) || x.rank() != 4 {
        // a rotation: its gradient turns back by the opposite angle
        let (c, s) = (cos.clone(), sin.neg()?);
        return crate::lean::lean(
            x,
            |x| nn::apply_rope_reference(x, cos, sin),
            move |_, _, dy| nn::apply_rope_reference(dy, &c, &s),
        );
    }
    rope_op(x, cos, sin, x.dim(2)?, 1)
}

fn rope_op(x: &Tensor, cos: &Tensor, sin: &Tensor, t: usize, per_pos: usize) -> Result<Tensor> {
    let f32s = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1();
    let op = Rope {
        cos: f32s(cos)?,
        sin: f32s(sin)?,
        t,
        d: 2 * cos.dim(1)?,
        per_pos,
        inverse: false,
    };
    x.contiguous()?.apply_op1(op)
}

/// The composed token-major RoPE: turned heads-first, rotated, turned back.
fn rope_bthd_reference(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    d: usize,
) -> Result<Tensor> {
    let (b, t) = (x.dim(0)?, x.dim(1)?);
    let heads_first = x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()?;
    let y = nn::apply_rope_reference(&heads_first, cos, sin)?;
    y.transpose(1, 2)?.contiguous()?.reshape(x.shape())
}

/// RoPE on the token-major layout the projections produce, x (b, t, heads, d) or
/// (b, t, heads * d) (d from cos/sin (t, d/2), as for `apply_rope`), so no transposed copy and
/// no reshape is needed; returns x's shape.
pub fn apply_rope_bthd(k: Kernels, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = 2 * cos.dim(1)?;
    let t = x.dim(1)?;
    let width: usize = x.dims().iter().skip(2).product();
    if !(3..=4).contains(&x.rank()) || d == 0 || !width.is_multiple_of(d) {
        candle_core::bail!("rope: {:?} is not token-major with heads of {d}", x.dims())
    }
    if crate::cuda::usable(k, x, crate::cuda::Family::Rope) {
        return crate::cuda::rope(x, cos, sin, t, width / d);
    }
    if !fast_act_ok(k, x) {
        // a rotation: its gradient turns back by the opposite angle
        let (c, s, heads) = (cos.clone(), sin.neg()?, width / d);
        return crate::lean::lean(
            x,
            |x| rope_bthd_reference(x, cos, sin, heads, d),
            move |_, _, dy| rope_bthd_reference(dy, &c, &s, heads, d),
        );
    }
    rope_op(x, cos, sin, t, width / d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rand, same};

    /// RoPE tables (d = 8) for positions 3..8.
    fn rope_rows_3_to_8() -> (Tensor, Tensor) {
        let inv: Vec<f32> = (0..4)
            .map(|i| 1.0 / 10000f32.powf(i as f32 / 4.0))
            .collect();
        let (cos, sin) = nn::rope_tables(&inv, 16, &candle_core::Device::Cpu).unwrap();
        (cos.narrow(0, 3, 5).unwrap(), sin.narrow(0, 3, 5).unwrap())
    }

    #[test]
    fn token_major_rope_matches_the_reference_on_transposed_heads() {
        let (c, s) = rope_rows_3_to_8();
        same(
            &[rand(&[2, 5, 3, 8], 6)], // (b, t, heads, d)
            |t| apply_rope_bthd(Kernels::FUSED, &t[0], &c, &s).unwrap(),
            |t| {
                let x = t[0].transpose(1, 2).unwrap().contiguous().unwrap();
                let y = nn::apply_rope_reference(&x, &c, &s).unwrap();
                y.transpose(1, 2).unwrap().contiguous().unwrap()
            },
        );
        // heads and d merged, as a projection writes them
        same(
            &[rand(&[2, 5, 24], 7)],
            |t| apply_rope_bthd(Kernels::FUSED, &t[0], &c, &s).unwrap(),
            |t| {
                let x = t[0].reshape((2, 5, 3, 8)).unwrap();
                let x = x.transpose(1, 2).unwrap().contiguous().unwrap();
                let y = nn::apply_rope_reference(&x, &c, &s).unwrap();
                let y = y.transpose(1, 2).unwrap().contiguous().unwrap();
                y.reshape((2, 5, 24)).unwrap()
            },
        );
    }

    #[test]
    fn fused_rope_matches_the_composed_reference_in_value_and_gradient() {
        let (c, s) = rope_rows_3_to_8();
        same(
            &[rand(&[2, 3, 5, 8], 6)],
            |t| apply_rope(Kernels::FUSED, &t[0], &c, &s).unwrap(),
            |t| nn::apply_rope_reference(&t[0], &c, &s).unwrap(),
        );
    }
}
