use super::*;
use crate::testing::{golden_fixture, max_rel};
use crate::Adaptable;
use candle_core::{DType, Device};

/// The layer of the fixture's case `sfx` ("" for two tasks, "3" for three) with its ray.
fn fixture_layer(
    t: &std::collections::HashMap<String, Tensor>,
    sfx: &str,
) -> (PaloraLayer, Var, Tensor) {
    let get = |k: &str| t[&format!("{k}{sfx}")].clone();
    let scalar = |k: &str| get(k).to_vec1::<f32>().unwrap()[0] as f64;
    let r = scalar("r") as usize;
    let ray: Vec<f64> = get("ray")
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let layer = PaloraLayer {
        a: Var::from_tensor(&get("A")).unwrap(),
        b: Var::from_tensor(&get("B")).unwrap(),
        r,
        scale: scalar("alpha") / r as f64,
        ray: RwLock::new(ray),
    };
    let x = Var::from_tensor(&get("x")).unwrap();
    let y = petal_ops::frozen_linear(
        Default::default(),
        x.as_tensor(),
        &get("weight"),
        Some(&get("bias")),
    )
    .unwrap();
    (layer, x, y)
}

/// tools/golden/palora_oracle.py runs the official `PaLinear` (nik-dim/palora) on the same
/// weights, input and ray: its output, the gradients of x and of every task's A and B, and the
/// merged update for that ray.
#[test]
fn the_layer_equals_the_official_palinear_in_value_gradients_and_merged_update() {
    let t = golden_fixture("palora");
    for sfx in ["", "3"] {
        let (layer, x, y) = fixture_layer(&t, sfx);
        let out = layer
            .forward(x.as_tensor(), y, &crate::Ctx::eval())
            .unwrap();
        let e = max_rel(&out, &t[&format!("y{sfx}")]);
        assert!(e < 1e-5, "case {sfx:?}: output {e:e}");
        let g = (&out * &t[&format!("proj{sfx}")])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, key) in [(&x, "grad_x"), (&layer.a, "grad_A"), (&layer.b, "grad_B")] {
            let e = max_rel(g.get(v.as_tensor()).unwrap(), &t[&format!("{key}{sfx}")]);
            assert!(e < 1e-5, "case {sfx:?}: {key} {e:e}");
        }
        let WeightUpdate::Add(d) = layer.weight_update().unwrap() else {
            panic!("PaLoRA merges as an added dW")
        };
        let e = max_rel(&d, &t[&format!("delta{sfx}")]);
        assert!(e < 1e-5, "case {sfx:?}: merged update {e:e}");
    }
}

/// The official `AnnealingSampler`'s rays at several points of training, two tasks (and three
/// where the fixture has them).
#[test]
fn annealed_rays_equal_the_official_sampler() {
    let t = golden_fixture("palora");
    let ts = t["ts"].to_vec1::<f32>().unwrap();
    for (key, k, n) in [("rays2", 2, 4), ("rays2_3", 2, 3), ("rays3", 3, 6)] {
        let Some(want) = t.get(key) else {
            assert_eq!(key, "rays3", "the fixture lacks {key}");
            continue;
        };
        let want = want.to_vec3::<f32>().unwrap();
        for (i, &ti) in ts.iter().enumerate() {
            let got = rays(k, n, 5.0, 0.01, ti as f64);
            assert_eq!(got.len(), want[i].len(), "{key} at t = {ti}: ray count");
            for (g, w) in got.iter().zip(&want[i]) {
                for (a, b) in g.iter().zip(w) {
                    assert!(
                        (a - *b as f64).abs() < 1e-6,
                        "{key} at t = {ti}: {g:?} vs {w:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn three_task_base_rays_are_the_triangle_mesh_in_meshzoos_order() {
    // meshzoo.triangle(2) (reported by tools/golden/palora_oracle.py's author; the fixture has
    // no three-task rays, as no openly licensed meshzoo installs)
    let want = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.0],
        [0.0, 1.0, 0.0],
        [0.5, 0.0, 0.5],
        [0.0, 0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    assert_eq!(lattice(3, 6), want.map(|r| r.to_vec()).to_vec());
    assert_eq!(
        lattice(3, 9).len(),
        6,
        "level 2 is the largest with at most 9 points"
    );
}

#[test]
fn rays_start_uniform_stay_on_the_simplex_and_end_near_the_vertices() {
    for k in [2, 3, 4] {
        let start = rays(k, 6, 5.0, 0.01, 0.0);
        for ray in &start {
            assert!(
                ray.iter().all(|w| (w - 1.0 / k as f64).abs() < 1e-12),
                "{ray:?}"
            );
        }
        let end = rays(k, 6, 5.0, 0.01, 1.0);
        assert!(end.len() >= k && end.len() <= 6, "{k}: {}", end.len());
        for ray in &end {
            assert!((ray.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let corner = end.iter().map(|r| r[0]).fold(0.0, f64::max);
        assert!(
            corner > 0.99,
            "{k}: the first task's largest weight {corner}"
        );
    }
}

#[test]
fn a_preference_set_on_the_model_moves_the_output_and_a_bad_one_names_the_key() {
    let mut c = conformance_config();
    c.set("init_weights", false).unwrap();
    let t = crate::testing::adapted(&c, true);
    let x = crate::testing::Toy::input();
    let before = t.forward(&x);
    set_preference(&t, Some("default"), &[1.0, 0.0, 0.0]).unwrap();
    let first = t.forward(&x);
    assert!(max_rel(&first, &before) > 1e-3, "the output did not move");
    for (ray, want) in [
        (vec![0.5, 0.5], "2 weights for 3 tasks"),
        (vec![0.5, 0.6, -0.1], "finite and >= 0"),
        (vec![0.2, 0.2, 0.2], "sum to"),
    ] {
        let e = set_preference(&t, Some("default"), &ray)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`preference`") && e.contains(want), "{e}");
    }
    let e = set_preference(&t, Some("other"), &[1.0, 0.0, 0.0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no PaLoRA layer"), "{e}");
    set_preference(&t, None, &[1.0, 0.0, 0.0]).unwrap();
    assert_eq!(
        max_rel(&t.forward(&x), &first),
        0.0,
        "every adapter: the same ray"
    );
    // every layer holds the ray in the tasks' order, and mixes its tasks' adapters by it
    let ray = [0.2, 0.5, 0.3];
    set_preference(&t, Some("default"), &ray).unwrap();
    for lin in t.linears() {
        let l = lin.layer("default").unwrap();
        let p = l.as_any().unwrap().downcast_ref::<PaloraLayer>().unwrap();
        assert_eq!(*p.ray.read().unwrap(), ray.to_vec(), "{}", lin.path());
        let xin = crate::testing::rand_tensor(&[2, lin.in_features()], 4);
        let zero = Tensor::zeros((2, lin.out_features()), DType::F32, &Device::Cpu).unwrap();
        let got = l.forward(&xin, zero, &crate::Ctx::eval()).unwrap();
        let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
        // x (Σ_k ω_k s B_k A_k)^T, the tasks' blocks of A's rows and B's columns by hand
        let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
            p.a.as_tensor().to_vec2().unwrap(),
            p.b.as_tensor().to_vec2().unwrap(),
        );
        let xv: Vec<Vec<f32>> = xin.to_vec2().unwrap();
        for (i, row) in xv.iter().enumerate() {
            for o in 0..lin.out_features() {
                let mut want = 0f64;
                for (k, w) in ray.iter().enumerate() {
                    for j in k * p.r..(k + 1) * p.r {
                        let ax: f64 = a[j].iter().zip(row).map(|(&a, &x)| (a * x) as f64).sum();
                        want += w * p.scale * b[o][j] as f64 * ax;
                    }
                }
                let g = got[i][o] as f64;
                assert!(
                    (g - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{g} vs {want}"
                );
            }
        }
    }
}

#[test]
fn bad_options_are_refused_naming_the_key() {
    for (key, v, want) in [
        ("r", serde_json::json!(0), "r >= 1"),
        ("tasks", serde_json::json!(["a"]), "at least two tasks"),
        ("tasks", serde_json::json!(["a", "a"]), "listed twice"),
        (
            "preference",
            serde_json::json!([0.5, 0.5]),
            "2 weights for 3 tasks",
        ),
        ("window", serde_json::json!(1), "window >= 2"),
        ("epsilon", serde_json::json!(0.5), "[0, 0.5)"),
    ] {
        let mut c = conformance_config();
        c.set(key, v).unwrap();
        let e = c.validate("adapter_config.json").unwrap_err().to_string();
        assert!(
            e.contains(&format!("`{key}`")) && e.contains(want),
            "{key}: {e}"
        );
    }
}

#[test]
fn the_tasks_come_from_the_data_unless_given_and_given_ones_must_be_in_it() {
    let new = |given: &[&str]| crate::testing::new_adapter(10, given, &["math", "poems"]);
    let mut c = AdapterConfig::for_method("palora", 2, 4.0, crate::testing::toy_targets());
    Palora.prepare(&mut c, &new(&[])).unwrap();
    assert_eq!(
        c.options::<PaloraOptions>().unwrap().tasks,
        ["math", "poems"]
    );
    c.set("tasks", ["poems", "code"]).unwrap();
    let e = Palora
        .prepare(&mut c, &new(&["tasks"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"code\" is not in the training data"), "{e}");
}
