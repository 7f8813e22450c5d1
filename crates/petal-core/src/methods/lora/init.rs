//! PiSSA and OLoRA initialisation: A and B from the base weight's SVD or QR.

use super::{LoraLayer, LORA_A, LORA_B};
use crate::config::{pissa_niter, AdapterConfig, InitWeights, RankValue};
use crate::{rng, Adaptable, Error, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

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
    let (out, inp) = rank_fits(init, w, r, path)?;
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

/// W's `(out, in)`, or why an initialisation that factors W cannot take rank `r` from it.
pub(super) fn rank_fits(init: &str, w: &Tensor, r: usize, path: &str) -> Result<(usize, usize)> {
    let (out, inp) = w.dims2()?;
    if r > out.min(inp) {
        return Err(Error::msg(format!(
            "{path}: {init} needs r ({r}) <= min(out, in) = {}",
            out.min(inp)
        )));
    }
    Ok((out, inp))
}

/// PEFT's `orthogonal` init: with `Q` the orthogonal factor of a random (r, r) Gaussian,
/// `A = (X_A Q[0::2])^T / 10` and `B = X_B^T Q[1::2] / 10` for Gaussian `X_A (in, r/2)`,
/// `X_B (r/2, out)`: both nonzero, with `B A = X_B^T Q[1::2] Q[0::2]^T X_A^T / 100 = 0` (the rows
/// of Q are orthonormal), so training starts from the base model. r must be even.
pub(super) fn orthogonal_init(
    (out, inp): (usize, usize),
    r: usize,
    g: &mut impl rand::Rng,
    (dev, path): (&candle_core::Device, &str),
) -> Result<(Tensor, Tensor)> {
    if !r.is_multiple_of(2) {
        return Err(Error::msg(format!(
            "{path}: init_lora_weights \"orthogonal\" needs an even r (got {r})"
        )));
    }
    let x: Vec<f64> = crate::methods::normal((r, r), 1.0, g, dev)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let (q, _) = petal_ops::linalg::qr(&petal_ops::linalg::Mat {
        rows: r,
        cols: r,
        data: x,
    });
    let q = Tensor::from_vec(q.data, (r / 2, 2, r), dev)?.to_dtype(DType::F32)?;
    let (odd, even) = (
        q.narrow(1, 0, 1)?.squeeze(1)?,
        q.narrow(1, 1, 1)?.squeeze(1)?,
    );
    let xa = crate::methods::normal((inp, r / 2), 1.0, g, dev)?;
    let xb = crate::methods::normal((r / 2, out), 1.0, g, dev)?;
    Ok((
        (xa.matmul(&odd)?.t()?.contiguous()? / 10.0)?,
        (xb.t()?.matmul(&even)? / 10.0)?,
    ))
}

/// A PiSSA / OLoRA adapter as plain LoRA for the original base W, as PEFT's `save_pretrained`
/// with `path_initial_model_for_weight_conversion` writes it: the trained `s B A` over the
/// residual `W - s B0 A0` equals `W + s (B A - B0 A0)`, which is LoRA of rank 2r with
/// `A' = [A; A0]`, `B' = [B, -B0]` and the same scaling (alpha doubled, or times sqrt 2 with
/// rsLoRA). Rewrites `tensors` (module-relative names, as `adapter_tensors` gives them) and
/// returns the config to save with them.
pub fn as_plain_lora(
    model: &dyn Adaptable,
    name: &str,
    cfg: &AdapterConfig,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<AdapterConfig> {
    let o: super::LoraOptions = cfg.options()?;
    if super::is_init(&o.core.init, "loftq") {
        return Err(Error::msg(
            "a LoftQ adapter is relative to W's quantization, not to W: it has no plain-LoRA \
             form; save it as it is (petal, as PEFT, rebuilds the quantized base from W at load)",
        ));
    }
    if o.rslora && !(o.core.rank_pattern.is_empty() && o.alpha_pattern.is_empty()) {
        return Err(Error::msg(
            "saving as plain LoRA with use_rslora and a rank_pattern / alpha_pattern is not \
             possible: the doubled ranks would need other alphas (PEFT refuses it too)",
        ));
    }
    let mut converted = 0;
    for lin in model.linears() {
        let Some(l) = lin
            .layer(name)
            .and_then(|l| l.as_any())
            .and_then(|l| l.downcast_ref::<LoraLayer>())
        else {
            continue;
        };
        let Some((a0, b0)) = &l.initial else { continue };
        if l.dora.is_some() {
            return Err(Error::msg(format!(
                "{}: a DoRA magnitude is relative to the residual base and has no plain-LoRA \
                 form; save the adapter as it is",
                lin.path()
            )));
        }
        let a = Tensor::cat(&[l.a.as_tensor(), a0], 0)?;
        let b = Tensor::cat(&[l.b.as_tensor(), &b0.neg()?], 1)?;
        tensors.insert(format!("{}.{LORA_A}", lin.path()), a);
        tensors.insert(format!("{}.{LORA_B}", lin.path()), b);
        converted += 1;
    }
    if converted == 0 {
        return Err(Error::msg(format!(
            "adapter {name:?} was not initialised with PiSSA or OLoRA (init_lora_weights = \
             {:?}): it is plain LoRA already",
            o.core.init
        )));
    }
    let mut p = o.clone();
    p.core.init = InitWeights::Flag(true);
    p.core.r *= 2;
    p.core.alpha *= if p.rslora { 2f64.sqrt() } else { 2.0 };
    for v in p.core.rank_pattern.values_mut() {
        *v = RankValue::Rank(2 * v.rank());
    }
    for v in p.alpha_pattern.values_mut() {
        *v *= 2.0;
    }
    let mut c = cfg.clone();
    c.options = match serde_json::to_value(p) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => return Err(Error::msg("LoRA options did not serialise")),
    };
    Ok(c)
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
        c.set("init_lora_weights", InitWeights::Named(init.into()))
            .unwrap();
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

    fn tensors_of(t: &Toy) -> HashMap<String, Tensor> {
        let mut map = HashMap::new();
        for l in t.linears() {
            for nt in l.layer("default").unwrap().tensors() {
                map.insert(
                    format!("{}.{}", l.path(), nt.name),
                    nt.var.as_tensor().clone(),
                );
            }
        }
        map
    }

    #[test]
    fn a_trained_pissa_or_olora_adapter_saved_as_plain_lora_gives_the_same_output_on_w() {
        for (init, rslora) in [("pissa", false), ("olora", true), ("pissa_niter_2", false)] {
            let mut c = AdapterConfig::lora(3, 6.0, crate::testing::toy_targets());
            c.set("init_lora_weights", InitWeights::Named(init.into()))
                .unwrap();
            c.set("use_rslora", rslora).unwrap();
            let mut t = Toy::new();
            crate::inject_adapter(&mut t, "default", &c, 1).unwrap();
            // move A and B away from their init, as training does
            for (i, l) in t.linears().iter().enumerate() {
                for nt in l.layer("default").unwrap().tensors() {
                    let v = nt.var.as_tensor();
                    let noise = crate::testing::rand_tensor(v.dims(), 30 + i as u64);
                    nt.var.set(&(v + (noise * 0.1).unwrap()).unwrap()).unwrap();
                }
            }
            let x = Toy::input();
            let trained = t.forward(&x);
            let mut map = tensors_of(&t);
            let plain = as_plain_lora(&t, "default", &c, &mut map).unwrap();
            let (po, co) = (
                plain
                    .options::<crate::methods::lora::LoraOptions>()
                    .unwrap(),
                c.options::<crate::methods::lora::LoraOptions>().unwrap(),
            );
            assert_eq!(po.core.r, 6);
            assert_eq!(po.core.init, InitWeights::Flag(true));
            // same scaling: alpha / r (or / sqrt r) unchanged with the rank doubled
            assert!((po.scaling_for("fc1") - co.scaling_for("fc1")).abs() < 1e-12);
            let mut fresh = Toy::new(); // the original W, no residual
            crate::inject_adapter(&mut fresh, "default", &plain, 5).unwrap();
            for l in fresh.linears() {
                for nt in l.layer("default").unwrap().tensors() {
                    nt.var
                        .set(&map[&format!("{}.{}", l.path(), nt.name)])
                        .unwrap();
                }
            }
            let e = max_rel(&fresh.forward(&x), &trained);
            assert!(e < 1e-5, "{init}: plain LoRA output off by {e}");
        }
    }

    #[test]
    fn saving_plain_lora_is_refused_for_dora_and_for_an_adapter_that_is_plain_already() {
        let mut c = AdapterConfig::lora(3, 6.0, crate::testing::toy_targets());
        let t = crate::testing::adapted(&c, true);
        let e = as_plain_lora(&t, "default", &c, &mut tensors_of(&t)).unwrap_err();
        assert!(e.to_string().contains("plain LoRA already"), "{e}");
        c.set("init_lora_weights", InitWeights::Named("pissa".into()))
            .unwrap();
        c.set("use_dora", true).unwrap();
        let t = attached_with(&c);
        let e = as_plain_lora(&t, "default", &c, &mut tensors_of(&t)).unwrap_err();
        assert!(e.to_string().contains("DoRA"), "{e}");
    }

    fn attached_with(c: &AdapterConfig) -> Toy {
        let mut t = Toy::new();
        crate::inject_adapter(&mut t, "default", c, 1).unwrap();
        t
    }

    #[test]
    fn pissa_with_dora_starts_with_the_magnitude_of_w_and_leaves_the_output_unchanged() {
        let mut c = AdapterConfig::lora(3, 6.0, crate::testing::toy_targets());
        c.set("init_lora_weights", InitWeights::Named("pissa".into()))
            .unwrap();
        c.set("use_dora", true).unwrap();
        let t = attached_with(&c);
        let x = Toy::input();
        let e = max_rel(&t.forward(&x), &Toy::new().forward(&x));
        assert!(e < 1e-5, "output moved by {e}");
        let m = t.fc1.layer("default").unwrap().tensors()[2]
            .var
            .as_tensor()
            .clone();
        let norms = Toy::new()
            .fc1
            .weight()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap();
        assert!(max_rel(&m, &norms) < 1e-5);
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
