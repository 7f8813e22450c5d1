//! FedIns on the toy model with queries given: the choice and the mean by loops in f64, the
//! gradients by finite differences, the surrogate by its formula. (The whole method on BERT
//! against a transcription of the official code: petal-io's tests/fedins.rs.)

use super::*;
use crate::testing::{adapted, central_differences, rand_tensor, Toy};
use crate::Ctx;

const P: usize = 5;
const K: usize = 2;
const D: usize = 4;

fn config() -> AdapterConfig {
    let mut c = AdapterConfig::for_method("fedins", 1, 1.0, crate::testing::toy_targets());
    c.set("pool_size", P).unwrap();
    c.set("top_k", K).unwrap();
    c.set("query_dim", D).unwrap();
    c.set("init_weights", false).unwrap(); // far from the identity
    c.set("init_std", 0.5).unwrap();
    c
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let v: Vec<Vec<f32>> = t.flatten_to(t.rank() - 2).unwrap().to_vec2().unwrap();
    v.iter()
        .map(|r| r.iter().map(|&x| x as f64).collect())
        .collect()
}

/// Row i's k best keys by cosine, in f64 loops.
fn best(q: &[f64], keys: &[Vec<f64>], k: usize) -> Vec<usize> {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cos: Vec<f64> = keys
        .iter()
        .map(|key| q.iter().zip(key).map(|(a, b)| a * b).sum::<f64>() / (norm(q) * norm(key)))
        .collect();
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by(|&a, &b| cos[b].partial_cmp(&cos[a]).unwrap());
    idx.truncate(k);
    idx
}

fn layer(t: &Toy) -> &FedInsLayer {
    t.fc1
        .layer("default")
        .unwrap()
        .as_any()
        .unwrap()
        .downcast_ref::<FedInsLayer>()
        .unwrap()
}

#[test]
fn each_row_takes_the_mean_scale_and_shift_of_its_k_best_matching_entries() {
    let t = adapted(&config(), false);
    let x = Toy::input(); // (2, 3, 10)
    let q = rand_tensor(&[2, D], 5);
    let y = t
        .fc1
        .forward(&x, &Ctx::eval().with_query(q.clone()))
        .unwrap();
    let y0 = Toy::new().fc1.forward(&x, &Ctx::eval()).unwrap();
    let l = layer(&t);
    let (keys, scale, shift) = (
        rows(l.pick.keys.as_tensor()),
        rows(l.scale.as_tensor()),
        rows(l.shift.as_tensor()),
    );
    let (y, y0) = (rows(&y), rows(&y0)); // (2 * 3, 12)
    for (b, qb) in rows(&q).iter().enumerate() {
        let chosen = best(qb, &keys, K);
        for t_ in 0..3 {
            let (got, base) = (&y[b * 3 + t_], &y0[b * 3 + t_]);
            for j in 0..12 {
                let g: f64 = chosen.iter().map(|&e| scale[e][j]).sum::<f64>() / K as f64;
                let s: f64 = chosen.iter().map(|&e| shift[e][j]).sum::<f64>() / K as f64;
                let want = g * base[j] + s;
                assert!(
                    (got[j] - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{} vs {want}",
                    got[j]
                );
            }
        }
    }
    // the two rows match different entries here, so the choice is per row
    let (c0, c1) = (best(&rows(&q)[0], &keys, K), best(&rows(&q)[1], &keys, K));
    assert_ne!(c0, c1, "the test's queries should pick different entries");
}

#[test]
fn without_a_query_the_forward_is_refused_in_one_line() {
    let mut t = adapted(&config(), false);
    let e = t
        .fc1
        .forward(&Toy::input(), &Ctx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("seq-cls") && !e.contains('\n'), "{e}");
    let e = t.fc1.merge("default", true).unwrap_err().to_string();
    assert!(e.contains("cannot be merged"), "{e}");
}

#[test]
fn the_pool_gets_gradients_that_match_finite_differences_and_the_keys_none() {
    let t = adapted(&config(), false);
    let x = Toy::input();
    let ctx = Ctx::eval().with_query(rand_tensor(&[2, D], 5));
    let w = rand_tensor(&[2, 3, 6], 11);
    let loss = || (t.forward_ctx(&x, &ctx) * &w).unwrap().sum_all().unwrap();
    let g = loss().backward().unwrap();
    let l = layer(&t);
    assert!(
        g.get(l.pick.keys.as_tensor()).is_none(),
        "the choice is hard"
    );
    for v in [&l.scale, &l.shift] {
        let grad: Vec<f32> = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let idx: Vec<usize> = (0..grad.len()).step_by(7).collect();
        let f = || {
            loss()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for (&i, fd) in idx.iter().zip(central_differences(v, &idx, 1e-2, f)) {
            assert!(
                (fd as f32 - grad[i]).abs() < 2e-2 * (1.0 + fd.abs() as f32),
                "d/d[{i}]: {fd} vs {}",
                grad[i]
            );
        }
    }
}

#[test]
fn the_surrogate_is_one_minus_the_summed_cosines_of_the_chosen_keys_and_trains_them() {
    let t = adapted(&config(), false);
    let q = rand_tensor(&[2, D], 5);
    assert!(
        surrogate(&t, "default", 0.1).unwrap().is_none(),
        "no forward yet"
    );
    t.forward_ctx(&Toy::input(), &Ctx::train(0).with_query(q.clone()));
    let l = layer(&t);
    let keys = rows(l.pick.keys.as_tensor());
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut sum = 0.0;
    for qb in rows(&q) {
        for e in best(&qb, &keys, K) {
            sum += qb.iter().zip(&keys[e]).map(|(a, b)| a * b).sum::<f64>()
                / (norm(&qb) * norm(&keys[e]));
        }
    }
    let want = 0.1 * (1.0 - sum / 2.0);
    let s = surrogate(&t, "default", 0.1).unwrap().unwrap();
    let got = s.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    let g = s.backward().unwrap();
    let grad: Vec<f32> = g
        .get(l.pick.keys.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // finite differences on every key value (the choice does not move for small steps)
    let idx: Vec<usize> = (0..P * D).collect();
    let f = || {
        *l.last_query.lock().unwrap() = Some(q.clone());
        surrogate(&t, "default", 0.1)
            .unwrap()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for (&i, fd) in idx
        .iter()
        .zip(central_differences(&l.pick.keys, &idx, 1e-3, f))
    {
        assert!(
            (fd as f32 - grad[i]).abs() < 1e-3,
            "d/dkey[{i}]: {fd} vs {}",
            grad[i]
        );
    }
    assert!(
        surrogate(&t, "default", 0.1).unwrap().is_none(),
        "one per forward"
    );
}

#[test]
fn a_pool_or_top_k_out_of_range_is_refused_naming_the_key() {
    for (k, v) in [("pool_size", 0usize), ("top_k", 0), ("top_k", P + 1)] {
        let mut c = config();
        c.set(k, v).unwrap();
        let e = c.validate("adapter_config.json").unwrap_err().to_string();
        assert!(e.contains(&format!("`{k}`")), "{e}");
    }
    let mut c = config();
    c.set("mix", "row").unwrap();
    let e = c.validate("adapter_config.json").unwrap_err().to_string();
    assert!(
        e.contains("`mix`") && e.contains("instance or batch"),
        "{e}"
    );
}

/// FedIns on fc1 with fc2 as the head (`modules_to_save`), its pool of heads moved apart.
fn with_head(pool_heads: bool) -> Toy {
    let mut c = config();
    c.target_modules = Some(crate::config::Targets::List(vec!["fc1".into()]));
    c.modules_to_save = Some(vec!["fc2".into()]);
    c.set("pool_heads", pool_heads).unwrap();
    let t = adapted(&c, false);
    for v in t.fc2.layer("default").unwrap().tensors() {
        let dims = v.var.as_tensor().dims().to_vec();
        v.var
            .set(&(v.var.as_tensor() + rand_tensor(&dims, 17)).unwrap())
            .unwrap();
    }
    t
}

#[test]
fn the_head_pool_gives_each_row_the_mean_head_of_its_chosen_entries() {
    let t = with_head(true);
    let head = t.fc2.layer("default").unwrap();
    let names: Vec<&str> = head.tensors().iter().map(|v| v.name).collect();
    assert_eq!(names, ["fedins_head_weight", "fedins_head_bias"]);
    let (w, bias) = (
        head.tensors()[0].var.as_tensor(),
        head.tensors()[1].var.as_tensor(),
    );
    assert_eq!(w.dims(), [P, 6, 12]);
    let w = rows(&w.reshape((P, 6 * 12)).unwrap());
    let bias = rows(bias);
    let keys = rows(layer(&t).pick.keys.as_tensor());
    let x = rand_tensor(&[2, 3, 12], 23);
    let q = rand_tensor(&[2, D], 5);
    let y = rows(
        &t.fc2
            .forward(&x, &Ctx::eval().with_query(q.clone()))
            .unwrap(),
    );
    let xs = rows(&x);
    for (b, qb) in rows(&q).iter().enumerate() {
        let chosen = best(qb, &keys, K);
        for t_ in 0..3 {
            for c in 0..6 {
                let mut want = chosen.iter().map(|&e| bias[e][c]).sum::<f64>() / K as f64;
                for h in 0..12 {
                    let mean = chosen.iter().map(|&e| w[e][c * 12 + h]).sum::<f64>() / K as f64;
                    want += xs[b * 3 + t_][h] * mean;
                }
                let got = y[b * 3 + t_][c];
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }
    // the head's pool travels with the keys the linears use, and trains
    assert!(head.wants_query());
    let loss = t
        .fc2
        .forward(&x, &Ctx::eval().with_query(q))
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    assert!(g.get(head.tensors()[0].var.as_tensor()).is_some());
    // without pool_heads, the head is PEFT's one trained copy
    let one = with_head(false);
    let names: Vec<&str> = one
        .fc2
        .layer("default")
        .unwrap()
        .tensors()
        .iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["weight"]);
}

#[test]
fn with_mix_batch_every_row_takes_the_mean_over_the_batchs_choices() {
    // the official code's averaging: over each row's k entries, then over the batch
    let mut c = config();
    c.set("mix", "batch").unwrap();
    let t = adapted(&c, false);
    let x = Toy::input();
    let q = rand_tensor(&[2, D], 5);
    let y = rows(
        &t.fc1
            .forward(&x, &Ctx::eval().with_query(q.clone()))
            .unwrap(),
    );
    let y0 = rows(&Toy::new().fc1.forward(&x, &Ctx::eval()).unwrap());
    let l = layer(&t);
    let (keys, scale, shift) = (
        rows(l.pick.keys.as_tensor()),
        rows(l.scale.as_tensor()),
        rows(l.shift.as_tensor()),
    );
    let chosen: Vec<usize> = rows(&q).iter().flat_map(|qb| best(qb, &keys, K)).collect();
    let n = chosen.len() as f64;
    for (got, base) in y.iter().zip(&y0) {
        for j in 0..12 {
            let g = chosen.iter().map(|&e| scale[e][j]).sum::<f64>() / n;
            let s = chosen.iter().map(|&e| shift[e][j]).sum::<f64>() / n;
            let want = g * base[j] + s;
            assert!(
                (got[j] - want).abs() < 1e-5 * (1.0 + want.abs()),
                "{} vs {want}",
                got[j]
            );
        }
    }
}
