use super::*;

#[test]
fn gates_follow_the_official_pair_order_and_names() {
    let got: Vec<_> = pairs(4).collect();
    // (-1,-2), (-1,-3), (-1,-4), (-2,-3), (-2,-4), (-3,-4) as positions in 0..4
    assert_eq!(got, [(3, 2), (3, 1), (3, 0), (2, 1), (2, 0), (1, 0)]);
    assert_eq!(gate_name(false, 1, 2), "quanta_weights.-1 -2");
    assert_eq!(gate_name(true, 7, 8), "quanta_weights2.-7 -8");
    // the digest's count for LLaMA's (16, 8, 8, 4)
    assert_eq!(gate_values(&[16, 8, 8, 4]), 43_008);
}

#[test]
fn petal_picks_the_factorisation_with_the_fewest_gate_values() {
    let o = |d| QuantaOptions {
        d,
        ..Default::default()
    };
    // SmolLM2's 576: with four axes the official rule (5^4 = 625, padded; 3,750 values)
    // beats the best exact 6 6 4 4 (3,856); with three, the exact 9 8 8 (14,464) beats 9^3
    assert_eq!(axes(&o(4), 576, 576).unwrap(), [5, 5, 5, 5]);
    assert_eq!(axes(&o(3), 192, 576).unwrap(), [9, 8, 8]);
    // a prime pads as the official rule does: ceil(577^(1/2)) = 25
    assert_eq!(axes(&o(2), 577, 10).unwrap(), [25, 25]);
    let given = QuantaOptions {
        per_dim_features: vec![4, 4],
        ..Default::default()
    };
    let e = axes(&given, 20, 10).unwrap_err().to_string();
    assert!(e.contains("per_dim_features") && e.contains("20"), "{e}");
}

#[test]
fn bad_axis_counts_are_refused_naming_the_option() {
    for (key, v, want) in [
        ("d", serde_json::json!(1), "d"),
        ("d", serde_json::json!(9), "d"),
        (
            "per_dim_features",
            serde_json::json!([12]),
            "per_dim_features",
        ),
        (
            "per_dim_features",
            serde_json::json!([3, 0]),
            "per_dim_features",
        ),
    ] {
        let mut c = conformance_config();
        c.options.remove("per_dim_features");
        c.set(key, v).unwrap();
        let e = Quanta.validate(&c).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn the_dense_update_equals_the_chain_on_activations() {
    let c = conformance_three_axes();
    let t = crate::testing::adapted(&c, true);
    let l = t.fc1.layer("default").unwrap();
    let layer: &QuantaLayer = quanta_layer(l);
    let x = crate::testing::rand_tensor(&[5, 10], 3);
    let via_delta = x.matmul(&layer.delta().unwrap().t().unwrap()).unwrap();
    let direct = layer.apply(&x).unwrap();
    assert!(crate::testing::max_rel(&via_delta, &direct) < 1e-5);
}

#[test]
fn inference_keeps_the_update_while_the_gates_hold_and_follows_them_when_they_move() {
    let mut c = conformance_config();
    c.set("init_weights", false).unwrap();
    crate::testing::check_inference_follows_the_values(&c, "quanta_weights.-1 -2");
    // a training forward keeps nothing; an inference one keeps dW
    let t = crate::testing::adapted(&c, false);
    let x = crate::testing::Toy::input();
    let layer = quanta_layer(t.fc1.layer("default").unwrap());
    t.forward_ctx(&x, &crate::Ctx::train(0));
    assert!(!layer.kept.holds());
    t.forward_ctx(&x, &crate::Ctx::eval());
    assert!(layer.kept.holds());
}

#[test]
fn the_chain_on_rows_has_the_gradients_autograd_gives_the_composed_chains() {
    let c = conformance_three_axes();
    let t = crate::testing::adapted(&c, false);
    let layer = quanta_layer(t.fc1.layer("default").unwrap());
    let x = Var::from_tensor(&crate::testing::rand_tensor(&[5, 10], 4)).unwrap();
    let proj = crate::testing::rand_tensor(&[5, 12], 6);
    let lean = layer.apply(&x).unwrap();
    let xp = x.pad_with_zeros(1, 0, layer.width() - 10).unwrap();
    let gates: Vec<Tensor> = layer.gates.iter().map(|g| g.as_tensor().clone()).collect();
    let frozen: Vec<Tensor> = layer
        .frozen
        .iter()
        .map(|g| g.as_tensor().detach())
        .collect();
    let composed = (chain(&layer.n, &xp, &gates, false).unwrap()
        - chain(&layer.n, &xp, &frozen, false).unwrap())
    .unwrap()
    .narrow(1, 0, 12)
    .unwrap();
    assert!(crate::testing::max_rel(&lean, &composed) < 1e-6);
    let grads = |y: Tensor| (y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
    let (a, b) = (grads(lean), grads(composed));
    for v in std::iter::once(&x).chain(&layer.gates) {
        let (ga, gb) = (a.get(v).unwrap(), b.get(v).unwrap());
        assert!(crate::testing::max_rel(ga, gb) < 1e-5);
    }
}

fn quanta_layer(l: &dyn AdapterLayer) -> &QuantaLayer {
    l.as_any()
        .and_then(|a| a.downcast_ref::<QuantaLayer>())
        .expect("a QuanTA layer")
}

mod oracle {
    use super::*;

    /// The layer against the official `quanta.tuners.quanta.Linear`, run by
    /// `tools/golden/quanta_oracle.py` on a zero base weight: its output is the update alone,
    /// and its merged weight is dW.
    #[test]
    fn the_update_and_its_output_equal_the_official_layer() {
        let t = crate::testing::golden_fixture("quanta");
        for (name, out, inp, n) in [
            ("square", 12, 12, vec![3, 4]),
            ("padded", 12, 10, vec![2, 2, 3]),
            ("cut", 6, 12, vec![3, 4]),
            ("four", 24, 24, vec![2, 3, 2, 2]),
        ] {
            let d = n.len();
            let pick = |kind: &str| -> Vec<Var> {
                (1..=d)
                    .flat_map(|i| (i + 1..=d).map(move |j| (i, j)))
                    .map(|(i, j)| {
                        Var::from_tensor(&t[&format!("{name}.{kind}.-{i}_-{j}")]).unwrap()
                    })
                    .collect()
            };
            let layer = QuantaLayer {
                gates: pick("g"),
                frozen: pick("f"),
                n,
                out,
                inp,
                dropout: 0.0,
                kept: KeptDelta::default(),
            };
            let y = layer.apply(&t[&format!("{name}.x")]).unwrap();
            let e = crate::testing::max_rel(&y, &t[&format!("{name}.y")]);
            assert!(e < 1e-5, "{name}: output, relative error {e:e}");
            let e = crate::testing::max_rel(&layer.delta().unwrap(), &t[&format!("{name}.delta")]);
            assert!(e < 1e-5, "{name}: dW, relative error {e:e}");
        }
    }
}
