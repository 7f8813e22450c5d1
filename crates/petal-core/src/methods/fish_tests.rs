use super::*;
use crate::testing::{adapted, rand_tensor, Toy};

fn layer(t: &Toy, i: usize) -> &FishLayer {
    [&t.fc1, &t.fc2][i]
        .layer("default")
        .and_then(|l| l.as_any())
        .and_then(|a| a.downcast_ref::<FishLayer>())
        .unwrap()
}

/// The mask is the global top K of the per-sequence empirical Fisher over both linears,
/// recomputed here with W1 and W2 as variables and one backward per sequence; then only
/// the K values train and the optimizer is asked to start afresh.
#[test]
fn the_mask_is_the_global_top_k_of_the_per_sequence_fisher() {
    let mut c = conformance_config();
    c.set("fisher_samples", 4).unwrap();
    let t = adapted(&c, false);
    let mut hook = Fish.training(&t, "default", &c).unwrap().unwrap();
    let none = |_: &Var| None;
    let proj = rand_tensor(&[2, 3, 6], 7);
    let (w1, b1, w2) = (
        Var::from_tensor(t.fc1.weight()).unwrap(),
        t.fc1.bias().unwrap().clone(),
        Var::from_tensor(t.fc2.weight()).unwrap(),
    );
    let mut f1 = Tensor::zeros((12, 10), DType::F32, &Device::Cpu).unwrap();
    let mut f2 = Tensor::zeros((6, 12), DType::F32, &Device::Cpu).unwrap();
    for step in 0..2 {
        let x = rand_tensor(&[2, 3, 10], 30 + step as u64);
        let ctx = crate::Ctx::train(step as u64);
        let h = t.fc1.forward(&x, &ctx).unwrap().silu().unwrap();
        let y = t.fc2.forward(&h, &ctx).unwrap();
        let _ = (y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(!hook.reset_optimizer_after(step));
        hook.after_step(&t, step, &none).unwrap();
        for n in 0..2 {
            let xn = x.get(n).unwrap();
            let h = xn
                .matmul(&w1.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(&b1)
                .unwrap()
                .silu()
                .unwrap();
            let y = h.matmul(&w2.as_tensor().t().unwrap()).unwrap();
            let g = (y * proj.get(n).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            f1 = (f1 + g.get(w1.as_tensor()).unwrap().sqr().unwrap()).unwrap();
            f2 = (f2 + g.get(w2.as_tensor()).unwrap().sqr().unwrap()).unwrap();
        }
    }
    assert!(
        hook.reset_optimizer_after(1),
        "the optimizer restarts at the mask"
    );
    let all = Tensor::cat(&[f1.flatten_all().unwrap(), f2.flatten_all().unwrap()], 0).unwrap();
    let want = crate::methods::grad_mask::top_k(&all, 19).unwrap();
    let got = layer(&t, 0).indices.as_tensor().to_vec1::<i64>().unwrap();
    assert_eq!(got, want);
    // both linears found their share, and the values (only they) now get gradients
    let x = Toy::input();
    let ctx = crate::Ctx::train(9);
    let h = t.fc1.forward(&x, &ctx).unwrap().silu().unwrap();
    let y = t.fc2.forward(&h, &ctx).unwrap();
    let g = (y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
    let gv = g.get(layer(&t, 0).values.as_tensor()).unwrap();
    assert_eq!(gv.dims(), &[19]);
    let (s1, s2) = (
        layer(&t, 0).share().unwrap().unwrap(),
        layer(&t, 1).share().unwrap().unwrap(),
    );
    assert_eq!((s1.0, s1.1 - s1.0 + s2.1 - s2.0, s2.1), (0, 19, 19));
}

#[test]
fn bad_densities_and_a_mask_that_does_not_fit_are_refused() {
    for (key, v) in [
        ("density", serde_json::json!(0.0)),
        ("density", serde_json::json!(1.01)),
        ("fisher_samples", serde_json::json!(0)),
    ] {
        let mut c = conformance_config();
        c.set(key, v).unwrap();
        let e = Fish.validate(&c).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
    let t = adapted(&conformance_config(), false);
    let l = layer(&t, 0);
    let mut bad: Vec<i64> = (0..19).collect();
    bad[18] = 192; // one past the targeted weights
    l.indices
        .set(&Tensor::new(bad.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    let e = l.check_loaded().unwrap_err().to_string();
    assert!(e.contains("fish_indices") && e.contains("0..192"), "{e}");
}

#[test]
fn a_run_that_ends_while_estimating_says_so_instead_of_saving_nothing() {
    let c = conformance_config();
    let t = adapted(&c, false);
    let hook = Fish.training(&t, "default", &c).unwrap().unwrap();
    let e = hook
        .export(&mut c.clone(), &mut HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fisher_samples") && e.contains("--max-steps"),
        "{e}"
    );
}

mod random_mask {
    use super::*;
    use crate::testing::{adapted, rand_tensor};

    #[test]
    fn a_random_mask_has_the_same_count_distinct_and_in_range() {
        let mut c = conformance_config();
        c.set("fisher_samples", 2).unwrap();
        c.set("mask", "random").unwrap();
        let t = adapted(&c, false);
        let mut hook = Fish.training(&t, "default", &c).unwrap().unwrap();
        let ctx = crate::Ctx::train(0);
        let y = t.fc1.forward(&rand_tensor(&[2, 3, 10], 1), &ctx).unwrap();
        let _ = y.sum_all().unwrap().backward().unwrap();
        hook.after_step(&t, 0, &|_: &Var| None).unwrap();
        let l = t.fc1.layer("default").unwrap().as_any().unwrap();
        let idx = l
            .downcast_ref::<FishLayer>()
            .unwrap()
            .indices
            .as_tensor()
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(idx.len(), 19);
        assert!(idx.windows(2).all(|w| w[0] < w[1]) && idx[18] < 192);
        c.set("mask", "top").unwrap();
        assert!(Fish.validate(&c).unwrap_err().to_string().contains("mask"));
    }
}
