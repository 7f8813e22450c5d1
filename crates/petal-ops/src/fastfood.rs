//! The Fastfood transform (Le, Sarlós and Smola, ICML 2013), as the intrinsic-dimension paper
//! (Li et al., ICLR 2018) and its official code (jgamper/intrinsic-dimensionality,
//! `intrinsic/fastfood.py`) use it: a random projection R^d -> R^D without a D x d matrix.
//!
//! `P v = c (H G Π H B pad(v))[:D]`, L the power of two at least D, `pad` zero-pads (or cuts) v to
//! L, B random signs, H the unnormalised Walsh-Hadamard transform, Π a random permutation
//! (`(Π z)[i] = z[perm[i]]`), G a Gaussian diagonal, `c = 1 / (sqrt(L Σ G²) sqrt(D / L))`. Its
//! transpose, the backward pass, is `pad^T B H Π^T G H c pad_L(g)` (H is symmetric). The fused op
//! runs both in place on the CPU, `L log L` additions each; the readable twin composes tensor ops
//! as the official code does (any device, differentiable by autograd).

use crate::Kernels;
use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;

/// One Fastfood projection R^d -> R^D: its random signs, permutation and diagonal.
#[derive(Debug, Clone)]
pub struct Fastfood {
    pub signs: Vec<f32>,
    pub perm: Vec<u32>,
    pub gauss: Vec<f32>,
    pub numel: usize,
}

impl Fastfood {
    /// A projection onto `numel` values drawn from `g` (B, then Π, then G).
    pub fn draw(numel: usize, g: &mut impl Rng) -> Self {
        let l = numel.max(1).next_power_of_two();
        let signs = (0..l)
            .map(|_| if g.gen::<bool>() { 1.0 } else { -1.0 })
            .collect();
        let mut perm: Vec<u32> = (0..l as u32).collect();
        rand::seq::SliceRandom::shuffle(perm.as_mut_slice(), g);
        let gauss = (0..l)
            .map(|_| {
                let (u1, u2): (f64, f64) = (g.gen::<f64>().max(1e-12), g.gen());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect();
        Fastfood {
            signs,
            perm,
            gauss,
            numel,
        }
    }

    /// L, the padded length.
    pub fn len(&self) -> usize {
        self.signs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.signs.is_empty()
    }

    /// c = 1 / (sqrt(L Σ G²) sqrt(D / L)).
    fn scale(&self) -> f32 {
        let l = self.len() as f64;
        let g2: f64 = self.gauss.iter().map(|&v| (v as f64) * (v as f64)).sum();
        (1.0 / ((l * g2).sqrt() * (self.numel as f64 / l).sqrt())) as f32
    }

    /// P v (D values).
    pub fn apply(&self, v: &[f32]) -> Vec<f32> {
        let l = self.len();
        let mut z = vec![0f32; l];
        for (i, (&x, &b)) in v.iter().zip(&self.signs).enumerate().take(l) {
            z[i] = x * b;
        }
        fwht(&mut z);
        let c = self.scale();
        let mut u: Vec<f32> = self
            .perm
            .iter()
            .zip(&self.gauss)
            .map(|(&p, &g)| z[p as usize] * g)
            .collect();
        fwht(&mut u);
        u.truncate(self.numel);
        u.iter_mut().for_each(|x| *x *= c);
        u
    }

    /// P^T g (d values) for g of D values.
    pub fn apply_t(&self, g: &[f32], d: usize) -> Vec<f32> {
        let l = self.len();
        let c = self.scale();
        let mut u = vec![0f32; l];
        for (i, &x) in g.iter().enumerate().take(self.numel) {
            u[i] = x * c;
        }
        fwht(&mut u);
        let mut z = vec![0f32; l];
        for ((&p, &gg), &x) in self.perm.iter().zip(&self.gauss).zip(&u) {
            z[p as usize] += x * gg;
        }
        fwht(&mut z);
        (0..d)
            .map(|i| if i < l { z[i] * self.signs[i] } else { 0.0 })
            .collect()
    }
}

/// The unnormalised Walsh-Hadamard transform in place (length a power of two): the official
/// order, `(a + b, a - b)` over halves at every scale.
pub fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for block in x.chunks_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (p, q) in a.iter_mut().zip(b.iter_mut()) {
                let (s, t) = (*p + *q, *p - *q);
                *p = s;
                *q = t;
            }
        }
        h *= 2;
    }
}

/// `P v` for v (d,) f32 -> (D,), the gradient to v by the transpose. The fused op computes on
/// the CPU (a vector on another device makes the round trip); `Kernels::reference()`: the twin.
pub fn fastfood(k: Kernels, v: &Tensor, ff: &std::sync::Arc<Fastfood>) -> Result<Tensor> {
    if !k.fused() {
        return fastfood_reference(v, ff);
    }
    let dev = v.device().clone();
    let d = v.elem_count();
    let (f, b) = (ff.clone(), ff.clone());
    crate::lean::lean(
        v,
        |v| {
            let out = f.apply(
                &v.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
            Tensor::from_vec(out, f.numel, &Device::Cpu)?.to_device(&dev)
        },
        move |v, _, dy| {
            let g = dy
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            Tensor::from_vec(b.apply_t(&g, d), d, &Device::Cpu)?
                .to_device(v.device())?
                .to_dtype(v.dtype())
        },
    )
}

/// The readable twin: the official algorithm in tensor ops (pad, signs, the Walsh-Hadamard
/// transform as `log L` rounds of `cat(a + b, a - b)`, gather, diagonal, again, cut, scale).
pub fn fastfood_reference(v: &Tensor, ff: &Fastfood) -> Result<Tensor> {
    let l = ff.len();
    let dev = v.device();
    let d = v.elem_count();
    let v = if d >= l {
        v.narrow(0, 0, l)?
    } else {
        v.pad_with_zeros(0, 0, l - d)?
    };
    let signs = Tensor::from_slice(&ff.signs, l, dev)?;
    let perm = Tensor::from_slice(&ff.perm, l, dev)?;
    let gauss = Tensor::from_slice(&ff.gauss, l, dev)?;
    let h = |x: Tensor| -> Result<Tensor> {
        let steps = l.trailing_zeros() as usize;
        let mut shape = vec![2usize; steps];
        if shape.is_empty() {
            shape.push(1);
        }
        let mut r = x.reshape(shape.as_slice())?;
        for dim in 0..steps {
            let (a, b) = (r.narrow(dim, 0, 1)?, r.narrow(dim, 1, 1)?);
            r = Tensor::cat(&[(&a + &b)?, (a - b)?], dim)?;
        }
        r.reshape(l)
    };
    let z = h((v * signs)?)?;
    let u = h((z.index_select(&perm, 0)? * gauss)?)?;
    u.narrow(0, 0, ff.numel)? * ff.scale() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel, rand};
    use candle_core::Var;
    use rand::SeedableRng;

    #[test]
    fn the_fast_transform_equals_its_twin_in_value_and_gradient() {
        let mut g = rand::rngs::StdRng::seed_from_u64(3);
        for (d, numel) in [(5, 120), (7, 64), (300, 100), (1, 1)] {
            let ff = std::sync::Arc::new(Fastfood::draw(numel, &mut g));
            let v = Var::from_tensor(&rand(&[d], d as u64)).unwrap();
            let fast = fastfood(Kernels::FUSED, v.as_tensor(), &ff).unwrap();
            let twin = fastfood_reference(v.as_tensor(), &ff).unwrap();
            assert_eq!(fast.dims(), &[numel]);
            assert!(max_rel(&fast, &twin) < 1e-5, "{d} -> {numel}");
            let proj = rand(&[numel], 9);
            let gf = (fast * &proj)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gt = (twin * &proj)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (a, b) = (
                gf.get(v.as_tensor()).unwrap(),
                gt.get(v.as_tensor()).unwrap(),
            );
            assert!(max_rel(a, b) < 1e-5, "{d} -> {numel}: gradient");
        }
    }

    #[test]
    fn the_walsh_hadamard_transform_is_its_own_inverse_up_to_l() {
        let mut x: Vec<f32> = (0..16).map(|i| (i * i % 7) as f32 - 3.0).collect();
        let x0 = x.clone();
        fwht(&mut x);
        fwht(&mut x);
        assert!(x.iter().zip(&x0).all(|(a, b)| (a - 16.0 * b).abs() < 1e-4));
    }
}
