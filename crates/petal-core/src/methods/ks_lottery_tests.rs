use super::*;

/// tools/golden/ks_oracle.py: SciPy's `ks_2samp` statistic and `kstwobign.sf` p-value on
/// samples with shifts, tiny changes, ties and none.
#[test]
fn the_ks_statistic_and_p_value_equal_scipys() {
    let t = crate::testing::golden_fixture("ks");
    for name in ["small_shift", "tiny_change", "large_change", "ties", "same"] {
        let v = |k: &str| t[&format!("{name}.{k}")].to_vec1::<f32>().unwrap();
        let want = t[&format!("{name}.stat_p")].to_vec1::<f64>().unwrap();
        let (d, p) = ks_2samp(&v("a"), &v("b"));
        assert!((d - want[0]).abs() < 1e-12, "{name}: D {d} vs {}", want[0]);
        assert!(
            (p - want[1]).abs() <= 1e-9 + 1e-6 * want[1],
            "{name}: p {p} vs {}",
            want[1]
        );
    }
}

/// Stage 2 on a hand-made stage 1: rows never looked up are no candidates, the tickets are
/// the `top_k` rows of largest D (brute force over the pooled values, ties to the lower
/// token) or those with p < max_p_value; only they train from their pretrained values.
#[test]
fn the_tickets_are_the_rows_of_largest_ks_statistic() {
    let (vocab, hidden) = (9, 32);
    let table = crate::testing::rand_tensor(&[vocab, hidden], 1);
    let noise: Vec<Vec<f32>> = crate::testing::rand_tensor(&[vocab, hidden], 2)
        .to_vec2()
        .unwrap();
    // row i shifted by (i + 1) / 5 plus a little noise, rows 2 and 6 never looked up
    let moved = |i: usize, v: f32| match i {
        2 | 6 => 0.0,
        _ => v * 0.05 + (i + 1) as f32 / 5.0,
    };
    let delta: Vec<f32> = (0..vocab)
        .flat_map(|i| noise[i].iter().map(move |&v| moved(i, v)))
        .collect();
    let brute_d = |a: &[f32], b: &[f32]| -> f64 {
        let cdf = |s: &[f32], v: f32| s.iter().filter(|&&x| x <= v).count() as f64 / s.len() as f64;
        a.iter()
            .chain(b)
            .map(|&v| (cdf(a, v) - cdf(b, v)).abs())
            .fold(0.0, f64::max)
    };
    let rows: Vec<Vec<f32>> = table.to_vec2().unwrap();
    let mut want: Vec<(f64, usize)> = (0..vocab)
        .filter(|&i| i != 2 && i != 6)
        .map(|i| {
            let after: Vec<f32> = rows[i]
                .iter()
                .zip(&delta[i * hidden..])
                .map(|(a, d)| a + d)
                .collect();
            (brute_d(&rows[i], &after), i)
        })
        .collect();
    want.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (top_k, max_p) in [(3, 0.05), (0, 0.05)] {
        let dev = candle_core::Device::Cpu;
        let layer = Lottery {
            delta: Var::from_tensor(
                &Tensor::from_vec(delta.clone(), (vocab, hidden), &dev).unwrap(),
            )
            .unwrap(),
            mask: Var::from_tensor(&Tensor::ones((vocab, 1), DType::F32, &dev).unwrap()).unwrap(),
            table: table.clone(),
        };
        let mut k = KsTraining {
            name: "default".into(),
            path: "embed_tokens".into(),
            table: table.clone(),
            stage1: 1,
            max_p,
            top_k,
            chosen: Mutex::new(None),
            tickets: Vec::new(),
            candidates: Vec::new(),
        };
        k.choose(&layer).unwrap();
        assert_eq!(k.candidates, vec![0, 1, 3, 4, 5, 7, 8]);
        for (t, (d, i)) in k.tickets.iter().zip(&want) {
            assert_eq!(
                t.token,
                *i,
                "{:?}",
                k.tickets.iter().map(|t| t.token).collect::<Vec<_>>()
            );
            assert!((t.ks_statistic - d).abs() < 1e-12);
        }
        let expect = match top_k {
            0 => want
                .iter()
                .filter(|(d, _)| {
                    let en = (hidden * hidden) as f64 / (2 * hidden) as f64;
                    kolmogorov_sf(en.sqrt() * d) < max_p
                })
                .count(),
            k => k,
        };
        assert!(
            expect > 0 && expect < want.len(),
            "the case must split the rows: {expect}"
        );
        assert_eq!(k.tickets.len(), expect);
        let mask: Vec<f32> = layer
            .mask
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, m) in mask.iter().enumerate() {
            let ticket = k.tickets.iter().any(|t| t.token == i);
            assert_eq!(*m, ticket as u8 as f32, "row {i}");
        }
        let left: f32 = layer
            .delta
            .as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(left, 0.0, "stage 3 starts from the pretrained rows");
    }
}

#[test]
fn bad_options_are_refused_naming_the_key() {
    for (k, v) in [
        ("max_p_value", serde_json::json!(0.0)),
        ("max_p_value", 1.into()),
        ("tickets", serde_json::json!([3, 3])),
    ] {
        let mut c = AdapterConfig::for_method("ks_lottery", 1, 1.0, crate::testing::toy_targets());
        c.set(k, v).unwrap();
        let e = c.validate("adapter_config.json").unwrap_err().to_string();
        assert!(e.contains(&format!("`{k}`")), "{k}: {e}");
    }
}
