//! PiSSA and OLoRA initialisation: A and B from the base weight's SVD or QR.

use crate::config::pissa_niter;
use crate::{rng, Error, Result};
use candle_core::{DType, Tensor};

/// PiSSA (Meng et al., 2024) and OLoRA (Büyükakyüz, 2024) start A and B from the base weight,
/// as PEFT's `pissa_init` / `olora_init`:
/// - PiSSA: `W = U S V^T`; `A = sqrt(S_r / s) V_r^T`, `B = U_r sqrt(S_r / s)`, so
///   `s B A = U_r S_r V_r^T` (exact SVD, or randomised with `pissa_niter_K`);
/// - OLoRA: `W = Q R`; `A = R[:r]`, `B = Q[:, :r]`.
///
/// The base keeps `W - s B A` (see `AdapterLayer::base_offset`). Both are computed on the host in
/// f64; singular vectors and QR factors are unique up to signs that cancel in `B A`.
pub(super) fn structured_init(
    init: &str,
    w: &Tensor,
    r: usize,
    scaling: f64,
    path: &str,
) -> Result<(Tensor, Tensor)> {
    use petal_ops::linalg::{qr, svd_lowrank, svd_top, Mat};
    let (out, inp) = w.dims2()?;
    if r > out.min(inp) {
        return Err(Error::msg(format!(
            "{path}: {init} needs r ({r}) <= min(out, in) = {}",
            out.min(inp)
        )));
    }
    let data: Vec<f64> = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let m = Mat {
        rows: out,
        cols: inp,
        data,
    };
    let (a, b): (Vec<f64>, Vec<f64>) = if init == "olora" {
        let (q, rr) = qr(&m);
        let a = rr.data[..r * inp].to_vec();
        let b = (0..out)
            .flat_map(|i| q.data[i * q.cols..i * q.cols + r].to_vec())
            .collect();
        (a, b)
    } else {
        let (u, s, vt) = match pissa_niter(init) {
            // a seed from the module path: reloading the adapter rebuilds the same residual
            Some(niter) => svd_lowrank(&m, r, niter, rng::splitmix(fnv(path))),
            None => svd_top(&m, r),
        };
        let root: Vec<f64> = s.iter().map(|v| (v / scaling).sqrt()).collect();
        let a = (0..r)
            .flat_map(|i| {
                let k = root[i];
                vt.data[i * inp..(i + 1) * inp].iter().map(move |v| v * k)
            })
            .collect();
        let b = (0..out)
            .flat_map(|i| {
                (0..r)
                    .map(|j| u.data[i * r + j] * root[j])
                    .collect::<Vec<_>>()
            })
            .collect();
        (a, b)
    };
    let dev = w.device();
    let t = |v: Vec<f64>, shape: (usize, usize)| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(DType::F32)?)
    };
    Ok((t(a, (r, inp))?, t(b, (out, r))?))
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod structured_tests {
    use super::*;
    use crate::config::{AdapterConfig, InitWeights};
    use crate::testing::{max_rel, Toy};
    use crate::Adaptable;

    fn attached(init: &str) -> Toy {
        let mut c = AdapterConfig::lora(3, 6.0, crate::testing::toy_targets());
        c.init_lora_weights = InitWeights::Named(init.into());
        let mut t = Toy::new();
        crate::inject_adapter(&mut t, "default", &c, 1).unwrap();
        t
    }

    #[test]
    fn pissa_and_olora_attach_without_changing_the_output_and_merge_back_to_w() {
        for init in ["pissa", "pissa_niter_4", "olora"] {
            let mut t = attached(init);
            let x = Toy::input();
            let base = Toy::new().forward(&x);
            let e = max_rel(&t.forward(&x), &base);
            assert!(e < 1e-5, "{init}: output moved by {e}");
            // the base holds a residual, not W
            assert!(
                max_rel(t.fc1.weight(), Toy::new().fc1.weight()) > 1e-2,
                "{init}"
            );
            for l in t.linears_mut() {
                l.merge_and_unload(&["default"]).unwrap();
            }
            let w = Toy::new();
            assert!(max_rel(t.fc1.weight(), w.fc1.weight()) < 1e-5, "{init}");
            assert!(max_rel(t.fc2.weight(), w.fc2.weight()) < 1e-5, "{init}");
        }
    }

    #[test]
    fn pissa_starts_from_the_best_rank_r_approximation_of_w() {
        // s B A = U_r S_r V_r^T: no rank-r matrix is closer to W (Eckart-Young), so the residual
        // norm must equal the norm of the discarded singular values
        let t = attached("pissa");
        let w0 = Toy::new().fc1.weight().to_dtype(DType::F64).unwrap();
        let data = w0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (_, s, _) = petal_ops::linalg::svd_top(
            &petal_ops::linalg::Mat {
                rows: 12,
                cols: 10,
                data,
            },
            10,
        );
        let tail: f64 = s[3..].iter().map(|v| v * v).sum::<f64>().sqrt();
        let res = t
            .fc1
            .weight()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            ((res as f64).sqrt() - tail).abs() < 1e-4 * tail,
            "{} vs {tail}",
            res.sqrt()
        );
    }
}
