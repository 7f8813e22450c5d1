//! With prompt tuning the loss skips the virtual positions: `batch_loss` equals cross-entropy
//! computed by hand from the full logits, shifted past the virtual tokens.

use candle_core::{DType, Device, Tensor};
use petal_core::config::Targets;
use petal_core::{inject_adapter, AdapterConfig};
use petal_data::Batch;
use std::path::PathBuf;

#[test]
fn the_loss_with_prompt_tuning_scores_only_the_real_tokens() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/llama");
    let mut m = petal_io::load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let mut cfg = AdapterConfig::for_method("PROMPT_TUNING", 1, 1.0, Targets::List(vec![]));
    cfg.set("num_virtual_tokens", Some(3)).unwrap();
    inject_adapter(&mut m, "default", &cfg, 2).unwrap();
    let ids: Vec<u32> = vec![1, 5, 9, 14, 20, 33, 2, 71, 7, 7, 3, 90, 45, 12, 60, 8];
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let b = Batch {
        ids: ids.clone(),
        labels: labels.clone(),
        rows: 2,
        len: 8,
    };
    let (sum, n) = petal_train::batch_loss(&m, &b, &petal_core::Ctx::eval()).unwrap();
    let logits = m
        .forward(
            &Tensor::from_vec(ids, (2, 8), &Device::Cpu).unwrap(),
            None,
            &petal_core::Ctx::eval(),
        )
        .unwrap(); // (2, 11, V)
    assert_eq!(logits.dims()[1], 11);
    let v = logits.dims()[2];
    let (mut want, mut count) = (0f64, 0);
    for r in 0..2 {
        for i in 0..7 {
            let row = logits
                .get(r)
                .unwrap()
                .get(3 + i)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = row.iter().copied().fold(f32::MIN, f32::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            want += (lse - row[labels[r * 8 + i + 1] as usize]) as f64;
            count += 1;
        }
    }
    assert_eq!(n, count);
    assert!(v > 0);
    let got = sum.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-4 * want.abs(), "{got} vs {want}");
}
