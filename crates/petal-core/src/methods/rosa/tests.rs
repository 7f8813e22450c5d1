//! RoSA's own tests: the schedule, bad input, loaded masks, and the oracle.

use super::*;
use crate::testing::{adapted, max_rel, rand_tensor, Toy};
use crate::Adaptable;

fn layers(t: &Toy) -> Vec<&RosaLayer> {
    [&t.fc1, &t.fc2]
        .iter()
        .map(|l| {
            l.layer("default")
                .and_then(|l| l.as_any())
                .and_then(|a| a.downcast_ref::<RosaLayer>())
                .unwrap()
        })
        .collect()
}

/// wl1 with two gradient steps: LoRA alone, then the mask from the mean squared weight
/// gradients (recomputed here with W as a variable), then the sparse part trains: its
/// values' gradient against finite differences, merged == unmerged, fused == composed.
#[test]
fn the_schedule_picks_the_top_squared_gradients_and_then_trains_s() {
    let mut c = conformance_config();
    c.set("schedule", "wl1").unwrap();
    c.set("spa_num_grads", 2).unwrap();
    let mut t = adapted(&c, false);
    let mut hook = Rosa.training(&t, "default", &c).unwrap().unwrap();
    let none = |_: &Var| None;
    let proj = rand_tensor(&[2, 3, 12], 7);
    let mut want = Tensor::zeros((12, 10), DType::F32, &Device::Cpu).unwrap();
    for step in 0..3 {
        let ctx = crate::Ctx::train(step as u64);
        let x = rand_tensor(&[2, 3, 10], 40 + step as u64);
        let y = t.fc1.forward(&x, &ctx).unwrap();
        let _ = (y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        if step >= 1 {
            // the weight gradient of (x W^T) . proj is proj^T x, summed over the batch
            let g = proj
                .reshape((6, 12))
                .unwrap()
                .t()
                .unwrap()
                .matmul(&x.reshape((6, 10)).unwrap())
                .unwrap();
            want = (want + g.sqr().unwrap()).unwrap();
        }
        hook.after_step(&t, step, &none).unwrap();
    }
    let l = layers(&t)[0];
    assert_eq!(l.phase.load(Ordering::Relaxed), SPARSE);
    let k = l.values.elem_count();
    assert_eq!(k, 12);
    let pos = l.positions().unwrap().unwrap().to_vec1::<i64>().unwrap();
    assert_eq!(
        pos,
        top_k(&want, k).unwrap(),
        "the mask is the top-k of mean G^2"
    );
    // train S a little, then the checks on the sparse path
    for layer in layers(&t) {
        let k = layer.values.elem_count();
        layer.values.set(&rand_tensor(&[k], 3)).unwrap();
        layer.b.set(&rand_tensor(layer.b.dims(), 4)).unwrap();
    }
    crate::testing::check_fused_equals_composed_on(&t);
    let x = Toy::input();
    let unmerged = t.forward(&x);
    for lin in t.linears_mut() {
        lin.merge("default", true).unwrap();
    }
    assert!(max_rel(&t.forward(&x), &unmerged) < 1e-5);
}

#[test]
fn bad_densities_schedules_and_short_runs_are_refused_naming_the_option() {
    for (key, v, want) in [
        ("d", serde_json::json!(0.0), "d"),
        ("d", serde_json::json!(1.5), "d"),
        ("schedule", serde_json::json!("warm64"), "schedule"),
        ("spa_num_grads", serde_json::json!(0), "spa_num_grads"),
        ("grad_acc_mode", serde_json::json!("mean"), "grad_acc_mode"),
    ] {
        let mut c = conformance_config();
        c.set(key, v).unwrap();
        let e = Rosa.validate(&c).unwrap_err().to_string();
        assert!(e.contains(want), "{key}: {e}");
    }
    let mut c = conformance_config();
    let new = crate::testing::new_adapter(50, &[], &[]);
    let e = Rosa.prepare(&mut c, &new).unwrap_err().to_string();
    assert!(e.contains("schedule") && e.contains("50 steps"), "{e}");
}

#[test]
fn a_loaded_mask_that_does_not_fit_the_module_is_refused() {
    let t = adapted(&conformance_config(), false);
    let l = layers(&t)[0]; // (12, 10), k = 12
    let offs: Vec<i64> = (0..=12).collect();
    l.row_offs
        .set(&Tensor::new(offs.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    l.col_idx
        .set(&Tensor::new(&[3i64; 12], &Device::Cpu).unwrap())
        .unwrap();
    l.check_loaded().unwrap();
    l.col_idx
        .set(&Tensor::new(&[10i64; 12], &Device::Cpu).unwrap())
        .unwrap();
    let e = l.check_loaded().unwrap_err().to_string();
    assert!(e.contains("col_idx") && e.contains("0..10"), "{e}");
    let mut bad = offs.clone();
    bad[5] = 2;
    l.row_offs
        .set(&Tensor::new(bad.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    let e = l.check_loaded().unwrap_err().to_string();
    assert!(e.contains("row_offs"), "{e}");
}

mod oracle {
    use super::*;

    /// The mask, the output, the gradients and the merged weight against
    /// `tools/golden/rosa_oracle.py`, a PyTorch transcription of the paper written apart from
    /// this file (W a torch parameter there, so its gradient is autograd's own).
    #[test]
    fn mask_output_gradients_and_merge_equal_the_transcription_of_the_paper() {
        let t = crate::testing::golden_fixture("rosa");
        let (out, inp) = (6, 8);
        let k = values_for(0.25, out, inp);
        let layer = RosaLayer {
            a: Var::from_tensor(&t["a"]).unwrap(),
            b: Var::from_tensor(&t["bb"]).unwrap(),
            lora: true,
            scale: 1.5,
            dropout: 0.0,
            values: Var::zeros(k, DType::F32, &Device::Cpu).unwrap(),
            row_offs: Var::zeros(out + 1, DType::I64, &Device::Cpu).unwrap(),
            col_idx: Var::zeros(k, DType::I64, &Device::Cpu).unwrap(),
            phase: Arc::new(AtomicU8::new(COLLECT)),
            grads: Arc::default(),
            positions: Arc::default(),
            out,
            inp,
        };
        let (w, b) = (&t["w"], &t["b"]);
        for kern in [petal_ops::Kernels::FUSED, petal_ops::Kernels::REFERENCE] {
            let ctx = crate::Ctx::train(1).with_kernels(kern);
            layer.phase.store(COLLECT, Ordering::Relaxed);
            for (x, p) in [("x1", "p1"), ("x2", "p2")] {
                let y = layer
                    .fused_forward(&t[x], w, Some(b), &ctx)
                    .unwrap()
                    .unwrap();
                let _ = (y * &t[p]).unwrap().sum_all().unwrap().backward().unwrap();
            }
            layer.handle().choose().unwrap();
            let pos = layer.positions().unwrap().unwrap();
            assert_eq!(
                pos.to_vec1::<i64>().unwrap(),
                t["mask"].to_vec1::<i64>().unwrap(),
                "{kern:?}: the mask"
            );
            layer.values.set(&t["values"]).unwrap();
            let x3 = Var::from_tensor(&t["x3"]).unwrap();
            let y = layer
                .fused_forward(x3.as_tensor(), w, Some(b), &ctx)
                .unwrap()
                .unwrap();
            let e = crate::testing::max_rel(&y, &t["y3"]);
            assert!(e < 1e-5, "{kern:?}: output {e:e}");
            let g = (y * &t["p3"])
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let e = crate::testing::max_rel(g.get(x3.as_tensor()).unwrap(), &t["dx3"]);
            assert!(e < 1e-5, "{kern:?}: dL/dx {e:e}");
            let e =
                crate::testing::max_rel(g.get(layer.values.as_tensor()).unwrap(), &t["dvalues"]);
            assert!(e < 1e-5, "{kern:?}: dL/dvalues {e:e}");
            let WeightUpdate::Add(dw) = layer.weight_update().unwrap() else {
                panic!("additive")
            };
            let e = crate::testing::max_rel(&(w + dw).unwrap(), &t["merged"]);
            assert!(e < 1e-6, "{kern:?}: merged {e:e}");
            layer
                .values
                .set(&Tensor::zeros(k, DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}
