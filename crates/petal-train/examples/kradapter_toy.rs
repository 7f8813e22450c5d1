//! KRAdapter's toy claim (Albert et al., ICCV 2025, `approximate_weight.py` of the official
//! code): fit a target matrix T (1024, 768) with an update dW from equal parameter budgets,
//! KRAdapter against LoRA, and compare the error and the effective rank of dW. The claim: on
//! targets with a flat spectrum (random, sparse and whitened noise) KRAdapter gets far lower
//! error and higher effective rank than LoRA; LoRA only wins on genuinely low-rank targets.
//!
//! Both methods run through petal's own layers (`petal_core::methods`), trained by petal's
//! AdamW (lr 0.1, weight decay 0.01, 300 steps, the official toy's settings) on
//! `||dW - T||_F^2`. Prints one JSON line per (target, method); `tools/papers/kradapter.sh`
//! turns them into docs/papers/kradapter.md.
//!
//!   cargo run --release -p petal-train --example kradapter_toy [SEED] [STEPS]

use candle_core::{DType, Device, Tensor};
use petal_core::adapter::WeightUpdate;
use petal_core::config::Targets;
use petal_core::{Adaptable, AdaptableLinear, AdapterConfig};
use petal_ops::linalg::{svd_top, Mat};
use petal_train::optim::{AdamW, AdamWParams};
use rand::{Rng, SeedableRng};

const OUT: usize = 1024;
const IN: usize = 768;

/// A model of one frozen zero linear: its adapter's update is the whole product.
struct One(AdaptableLinear);

impl Adaptable for One {
    fn linears(&self) -> Vec<&AdaptableLinear> {
        vec![&self.0]
    }
    fn linears_mut(&mut self) -> Vec<&mut AdaptableLinear> {
        vec![&mut self.0]
    }
    fn output_head(&self) -> Option<&str> {
        None
    }
    fn base_param_count(&self) -> usize {
        OUT * IN
    }
}

fn randn(rows: usize, cols: usize, g: &mut impl Rng) -> Vec<f64> {
    (0..rows * cols)
        .map(|_| {
            // Box-Muller
            let (u1, u2): (f64, f64) = (g.gen_range(1e-12..1.0), g.gen_range(0.0..1.0));
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

fn mat(rows: usize, cols: usize, data: Vec<f64>) -> Mat {
    Mat { rows, cols, data }
}

/// `U diag(s) V^T` from an SVD's parts, keeping the first `k` triplets.
fn rebuild(u: &Mat, s: &[f64], vt: &Mat, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; u.rows * vt.cols];
    for (j, sj) in s.iter().enumerate().take(k) {
        for i in 0..u.rows {
            let a = u.data[i * u.cols + j] * sj;
            let row = &mut out[i * vt.cols..(i + 1) * vt.cols];
            for (c, o) in row.iter_mut().enumerate() {
                *o += a * vt.data[j * vt.cols + c];
            }
        }
    }
    out
}

/// The official toy's targets, seeded: random noise, sparse noise (90% zeros), PCA-whitened
/// noise (every singular value equal), and low rank (noise cut to rank 0.25 n).
fn targets(seed: u64) -> Vec<(&'static str, Vec<f64>)> {
    let mut g = rand::rngs::StdRng::seed_from_u64(seed);
    let noise = randn(OUT, IN, &mut g);
    let sparse: Vec<f64> = noise
        .iter()
        .map(|&v| if g.gen_range(0.0..1.0) < 0.9 { 0.0 } else { v })
        .collect();
    let (u, s, vt) = svd_top(&mat(OUT, IN, noise.clone()), IN);
    // whitened: U V^T, scaled to the noise's Frobenius norm
    let ones = vec![(OUT as f64 * IN as f64 / IN as f64).sqrt(); IN];
    let whitened = rebuild(&u, &ones, &vt, IN);
    let low = rebuild(&u, &s, &vt, IN / 4);
    vec![
        ("random noise", noise),
        ("sparse noise", sparse),
        ("whitened noise", whitened),
        ("low rank (0.25 n)", low),
    ]
}

/// exp of the entropy of the normalised singular values (Roy and Vetterli's effective rank).
fn effective_rank(s: &[f64]) -> f64 {
    let total: f64 = s.iter().sum();
    let h: f64 = s
        .iter()
        .map(|&v| v / total)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    h.exp()
}

fn fit(
    cfg: &AdapterConfig,
    target: &Tensor,
    steps: usize,
    seed: u64,
) -> anyhow::Result<serde_json::Value> {
    let dev = Device::Cpu;
    let mut m = One(AdaptableLinear::new(
        "w",
        Tensor::zeros((OUT, IN), DType::F32, &dev)?,
        None,
    ));
    let report = petal_core::inject_adapter(&mut m, "default", cfg, seed)?;
    let vars = petal_core::inject::adapter_vars(&m, "default");
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let delta = |m: &One| -> anyhow::Result<Tensor> {
        match m.0.layer("default").expect("attached").weight_update()? {
            WeightUpdate::Add(d) => Ok(d),
            other => anyhow::bail!("an additive update was expected, got {other:?}"),
        }
    };
    let t0 = std::time::Instant::now();
    for _ in 0..steps {
        let loss = (delta(&m)? - target)?.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        let g: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        opt.step(&g, 0.1)?;
    }
    let d = delta(&m)?;
    let err = ((&d - target)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt()
        / (target.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt();
    let data: Vec<f64> = d
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|&v| v as f64)
        .collect();
    let (_, s, _) = svd_top(&mat(OUT, IN, data), IN);
    Ok(serde_json::json!({
        "params": report.params(),
        "relative_error": err,
        "effective_rank": effective_rank(&s),
        "seconds": t0.elapsed().as_secs_f64(),
    }))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seed: u64 = args.get(1).map_or(Ok(0), |s| s.parse())?;
    let steps: usize = args.get(2).map_or(Ok(300), |s| s.parse())?;
    let (n, r, d) = petal_core::methods::kradapter::shape(OUT, IN);
    let budget = n * (2 * r + d);
    // the official toy's LoRA rank at an equal budget: budget / (in + out) + 1
    let lora_r = budget / (IN + OUT) + 1;
    let all = Targets::Regex("all-linear".into());
    let kr = AdapterConfig::for_method("kradapter", 1, 1.0, all.clone());
    let mut lora = AdapterConfig::for_method("lora", lora_r, lora_r as f64, all);
    lora.set_init_nonzero(); // both factors kaiming-uniform, as the official toy's LoRA
    for (name, t) in targets(seed) {
        let dev = Device::Cpu;
        let target = Tensor::from_vec(
            t.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (OUT, IN),
            &dev,
        )?;
        let (_, s, _) = svd_top(&mat(OUT, IN, t), IN);
        for (method, cfg) in [("KRAdapter", &kr), ("LoRA", &lora)] {
            let mut row = fit(cfg, &target, steps, seed)?;
            row["target"] = name.into();
            row["method"] = method.into();
            row["target_effective_rank"] = effective_rank(&s).into();
            row["seed"] = seed.into();
            row["steps"] = steps.into();
            if method == "LoRA" {
                row["lora_r"] = lora_r.into();
            }
            println!("{row}");
        }
    }
    Ok(())
}
