//! `petal bench`: tokens/s, time split, peak RSS and achieved GFLOP/s of a named workload,
//! next to this machine's matmul rate measured in the same run; `--vs-pytorch` runs the
//! PyTorch + PEFT baseline (tools/bench/pytorch_baseline.py) on the same workload, interleaved
//! round by round, and prints the ratios. Results also as JSON and an SVG chart.

mod gpu;
mod report;
mod torch;

use crate::common::device;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use petal_core::config::Targets;
use petal_core::Ctx;
use petal_core::{inject_adapter, Adaptable, AdapterConfig};
use petal_models::{random_weights, Llama, LlamaConfig};
use petal_train::optim::{AdamW, AdamWParams};
use report::{chart, print_table, summarize};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use torch::{start_torch, Torch};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// synthetic-35m | smollm2 | smollm2-shape (SmolLM2-135M's architecture with random weights,
    /// for machines the model file cannot reach: speed does not depend on the weights' values) |
    /// qwen2.5-1.5b-shape (Qwen2.5-1.5B's architecture with random weights) | qwen2.5-coder-0.5b | qwen2.5-coder-1.5b (the real GGUF files; PyTorch gets their weights
    /// dequantized to f32)
    #[arg(long, default_value = "synthetic-35m")]
    pub workload: String,
    /// train | forward | generate
    #[arg(long, default_value = "train")]
    pub mode: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// LoRA rank on all linear layers (train mode)
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// Adapter method trained (train mode): the methods with bench settings (lora, dora, loha,
    /// lokr, ia3, oft, boft, road, vera, and petal's own ssf, kradapter, quanta and paca, which
    /// PEFT lacks; `--r` is PaCA's column count);
    /// PyTorch + PEFT gets the same adapter_config
    #[arg(long, default_value = "lora")]
    pub method: String,
    /// Train mode: the first FRACTION of each sequence's tokens carry no loss, as an
    /// instruction's prompt does (labels -100, for petal and PyTorch alike) [0 <= FRACTION < 1]
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    pub prompt_fraction: f64,
    /// Measured steps per round
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Rounds (petal and PyTorch alternate round by round)
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Generation: new tokens after a prompt of --seq tokens
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Quantize the linears at load (nf4, int4, q8_0, q4_k, ...) and train or decode over them:
    /// the smollm2 workload then starts from its f32 HF export; PyTorch gets bitsandbytes' NF4
    /// with double quantization (QLoRA) for nf4, and runs no baseline for the others
    #[arg(long, default_value = "")]
    pub quantize: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Threads for petal and PyTorch alike (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Train mode: recompute each decoder layer in backward (petal) / transformers' gradient
    /// checkpointing (PyTorch); forward and backward then show as one
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// With --dtype bf16 on the CPU: keep activations in bf16 too (less memory, slower; the
    /// default keeps them in f32)
    #[arg(long)]
    pub bf16_activations: bool,
    /// Also run PyTorch + PEFT on the same workload
    #[arg(long)]
    pub vs_pytorch: bool,
    /// Python with torch, transformers and peft [default: $PETAL_PYTHON or python3]
    #[arg(long)]
    pub python: Option<String>,
    /// Write an SVG bar chart of the results here
    #[arg(long)]
    pub chart: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn synthetic() -> LlamaConfig {
    LlamaConfig {
        model_type: "llama".into(),
        vocab_size: 32000,
        hidden_size: 384,
        intermediate_size: 1024,
        num_hidden_layers: 6,
        num_attention_heads: 6,
        num_key_value_heads: 6,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

/// SmolLM2-135M's architecture, as its config.json gives it.
fn smollm2_shape() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        rope_theta: 100000.0,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        ..synthetic()
    }
}

/// Qwen2.5-1.5B's architecture (and Qwen2.5-Coder-1.5B's), as its config.json gives it: q, k
/// and v biases, two key-value heads of 128.
fn qwen2_5_1_5b_shape() -> LlamaConfig {
    LlamaConfig {
        model_type: "qwen2".into(),
        vocab_size: 151936,
        hidden_size: 1536,
        intermediate_size: 8960,
        num_hidden_layers: 28,
        num_attention_heads: 12,
        num_key_value_heads: 2,
        head_dim: 128,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        max_position_embeddings: 32768,
        tie_word_embeddings: true,
        attention_bias: true,
        bos_token_id: None,
        eos_token_id: Some(151643),
        ..synthetic()
    }
}

pub fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// This machine's matmul rate (GFLOP/s) on a 1024^3 product (4096^3 on a GPU) with weights in
/// `dt`, median of 5, through the linear petal's layers use (bf16 weights take f32 activations
/// on the CPU).
pub fn matmul_peak(dt: DType, dev: &Device) -> Result<f64> {
    let n = if dev.is_cpu() { 1024 } else { 4096 };
    let act = petal_models::act_dtype(dt, dev);
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(act)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dt)?;
    let kernels = petal_ops::Kernels::from_env(); // as the models here are loaded
    petal_ops::frozen_linear(kernels, &a, &b, None)?; // warm-up
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            let c = petal_ops::frozen_linear(kernels, &a, &b, None)
                .and_then(|c| c.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>());
            c.map(|_| s.elapsed().as_secs_f64())
        })
        .collect::<candle_core::Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(2.0 * (n * n * n) as f64 / t[2] / 1e9)
}

/// FLOPs of one step per token: linears 2*in*out forward (+2*in*out backward input gradient),
/// attention 4*T*d*heads forward (+8*T*d*heads backward). The token embedding is a lookup.
fn flops_per_token(m: &Llama, seq: usize, train: bool) -> f64 {
    let lin: f64 = m
        .linears()
        .iter()
        .filter(|l| !l.is_embedding())
        .map(|l| (l.in_features() * l.out_features()) as f64)
        .sum();
    let c = &m.cfg;
    let attn = (4 * seq * c.head_dim * c.num_attention_heads * c.num_hidden_layers) as f64;
    if train {
        4.0 * lin + 3.0 * attn
    } else {
        2.0 * lin + attn
    }
}

struct Petal {
    model: Llama,
    opt: Option<AdamW>,
    batch: petal_data::Batch, // the same ids every step (host side)
    ids: Tensor,              // and on the device, for forward mode
}

impl Petal {
    fn step(&mut self, a: &BenchArgs) -> Result<Value> {
        let t0 = Instant::now();
        match a.mode.as_str() {
            "train" => {
                let n = self.batch.target_tokens() as f64;
                // with checkpointing, forward and backward interleave: reported as one
                let (t1, g) = if a.grad_checkpointing {
                    let (_, g) = petal_train::backward_batch(&self.model, &self.batch, n, true, 0)?;
                    (None, g)
                } else {
                    let (sum, _) =
                        petal_train::batch_loss(&self.model, &self.batch, &Ctx::train(0))?;
                    let loss = (sum / n)?;
                    loss.to_scalar::<f32>()?;
                    let t1 = Instant::now();
                    let mut g = petal_models::Grads::default();
                    g.absorb(loss.backward()?)?;
                    (Some(t1), g)
                };
                let dev = self.model.device().clone();
                dev.synchronize()?; // a GPU runs the backward asynchronously
                let t2 = Instant::now();
                let opt = self.opt.as_mut().context("optimizer")?;
                let grads: Vec<Option<Tensor>> = opt
                    .vars()
                    .iter()
                    .map(|v| g.get(v.as_tensor()).cloned())
                    .collect();
                opt.step(&grads, 1e-4)?;
                dev.synchronize()?;
                let t3 = Instant::now();
                let s = |x: Instant, y: Instant| y.duration_since(x).as_secs_f64();
                let mut m = json!({"backward": s(t1.unwrap_or(t0), t2), "optimizer": s(t2, t3), "total": s(t0, t3)});
                if let Some(t1) = t1 {
                    m["forward"] = json!(s(t0, t1));
                }
                Ok(m)
            }
            "forward" => {
                self.model
                    .forward(&self.ids, None, &Ctx::eval())?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                let t = t0.elapsed().as_secs_f64();
                Ok(json!({"forward": t, "total": t}))
            }
            _ => {
                let prompt = &self.batch.ids[..a.seq];
                let mut cache = self.model.new_cache();
                let dev = self.model.device().clone();
                let mut logits = self.model.forward(
                    &Tensor::new(prompt, &dev)?.unsqueeze(0)?,
                    Some(&mut cache),
                    &Ctx::eval(),
                )?;
                for _ in 0..a.new_tokens {
                    let next = logits
                        .squeeze(0)?
                        .get(logits.dim(1)? - 1)?
                        .argmax(0)?
                        .to_scalar::<u32>()?;
                    logits = self.model.forward(
                        &Tensor::new(&[next], &dev)?.unsqueeze(0)?,
                        Some(&mut cache),
                        &Ctx::eval(),
                    )?;
                }
                Ok(json!({"total": t0.elapsed().as_secs_f64()}))
            }
        }
    }
}

fn gguf_path(p: &std::path::Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn build_petal(a: &BenchArgs, dev: &Device) -> Result<(Petal, Value)> {
    let dt = crate::common::precision(&a.dtype, a.bf16_activations, &a.quantize)?;
    let (model, wl) = match a.workload.as_str() {
        "synthetic-35m" | "smollm2-shape" | "qwen2.5-1.5b-shape" => {
            let cfg = match a.workload.as_str() {
                "synthetic-35m" => synthetic(),
                "qwen2.5-1.5b-shape" => qwen2_5_1_5b_shape(),
                _ => smollm2_shape(),
            };
            let w = random_weights(&cfg, 0)?;
            let c = json!({"model_type": cfg.model_type, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size, "inter": cfg.intermediate_size,
                "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                "ctx": cfg.max_position_embeddings, "tied": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta, "eps": cfg.rms_norm_eps});
            (
                Llama::load(cfg, &w, dt, dev)?,
                json!({"model": "synthetic", "config": c}),
            )
        }
        name @ ("smollm2" | "qwen2.5-coder-0.5b" | "qwen2.5-coder-1.5b") => {
            let gguf = crate::assets::ensure(name)?;
            let hf = crate::assets::cache_dir().join(format!("{name}-hf"));
            let export =
                (a.vs_pytorch || dt.quantize.is_some()) && !hf.join("config.json").exists();
            if export {
                // the file's own weights in f32, exported once: PyTorch's model, and the one
                // `--quantize` quantizes at load
                let mut f32s = petal_io::load_model(gguf_path(&gguf), DType::F32, dev)?;
                crate::tools_cmd::export_hf(&mut f32s, &hf)?;
            }
            let lm = match dt.quantize {
                Some(_) => petal_io::load_model(hf.to_str().unwrap_or_default(), dt, dev)?,
                None => petal_io::load_model(gguf_path(&gguf), dt, dev)?,
            };
            (lm.model, json!({"model": hf}))
        }
        o => bail!(
            "unknown workload `{o}` (synthetic-35m, smollm2, smollm2-shape, qwen2.5-1.5b-shape, \
             qwen2.5-coder-0.5b, qwen2.5-coder-1.5b)"
        ),
    };
    // a prompt of --seq tokens (and, generating, the new ones after it) fits the context
    let need = a.seq
        + if a.mode == "generate" {
            a.new_tokens
        } else {
            0
        };
    let ctx = model.cfg.max_position_embeddings;
    if need > ctx {
        bail!("--seq {} (+ --new-tokens when generating) is out of range: the model's context is {ctx} tokens", a.seq);
    }
    let mut model = model;
    let mut opt = None;
    let mut adapter = None;
    if a.mode == "train" {
        let cfg = bench_adapter(&a.method, a.r, a.vs_pytorch)?;
        inject_adapter(&mut model, "default", &cfg, 0)?;
        let mut peft: Value = serde_json::from_str(&cfg.to_json()?)?;
        if let Some(o) = peft.as_object_mut() {
            o.remove("peft_version");
            o.insert("inference_mode".into(), json!(false));
        }
        adapter = Some(peft);
        opt = Some(
            AdamW::new(
                petal_core::inject::adapter_vars(&model, "default"),
                AdamWParams {
                    lr: 1e-4,
                    ..Default::default()
                },
            )?
            .with_kernels(model.kernels()),
        );
    }
    let vocab = model.cfg.vocab_size;
    // random ids, each row opening with id 1 as a BOS would (PASTA's bench shifts it)
    let ids: Vec<u32> = (0..a.batch * a.seq)
        .map(|i| match i % a.seq {
            0 => 1,
            _ => (petal_core::rng::splitmix(i as u64) % vocab as u64) as u32,
        })
        .collect();
    // an instruction's prompt: its tokens are read, not scored
    let unscored = unscored(a);
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &x)| match i % a.seq < unscored {
            true => petal_data::IGNORE,
            false => x as i64,
        })
        .collect();
    let batch = petal_data::Batch {
        ids: ids.clone(),
        labels,
        rows: a.batch,
        len: a.seq,
    };
    let ids = Tensor::from_vec(ids, (a.batch, a.seq), dev)?;
    let mut wl = wl;
    let o = wl.as_object_mut().context("workload")?;
    for (k, v) in [
        ("mode", json!(a.mode)),
        ("batch", json!(a.batch)),
        ("seq", json!(a.seq)),
        ("r", json!(a.r)),
        ("method", json!(a.method)),
        ("adapter", json!(adapter)),
        ("dtype", json!(a.dtype)),
        ("device", json!(a.device)),
        ("threads", json!(a.threads.unwrap_or_else(num_threads))),
        ("vocab", json!(vocab)),
        ("prompt", json!(a.seq)),
        ("unscored", json!(unscored)),
        ("new_tokens", json!(a.new_tokens)),
        ("grad_checkpointing", json!(a.grad_checkpointing)),
        ("bf16_activations", json!(a.bf16_activations)),
    ] {
        o.insert(k.into(), v);
    }
    Ok((
        Petal {
            model,
            opt,
            batch,
            ids,
        },
        wl,
    ))
}

/// The benchmarked adapter: rank r (alpha 2r) on all linear layers, each method with the
/// settings of its docs page (`AdapterMethod::bench_settings`).
fn bench_adapter(method: &str, r: usize, vs_pytorch: bool) -> Result<AdapterConfig> {
    let benched = || -> Vec<String> {
        petal_core::registry::METHODS
            .iter()
            .filter(|m| m.bench_settings().is_some())
            .flat_map(|m| {
                let name = crate::adapter_opts::method_name(*m);
                std::iter::once(name).chain(m.variants().iter().map(|v| v.0.to_string()))
            })
            .collect()
    };
    let (m, preset) = crate::adapter_opts::resolve_method(method)?;
    let Some(settings) = m.bench_settings() else {
        bail!("--method {method}: bench trains {}", benched().join(", "));
    };
    let all = Targets::Regex("all-linear".into());
    if vs_pytorch && !m.in_peft() {
        bail!("--vs-pytorch: PEFT has no {method} (petal's own adapter type); bench it alone");
    }
    let mut c = AdapterConfig::for_method(m.peft_type(), r, 2.0 * r as f64, all);
    for (k, v) in preset {
        c.set(&k, v)?;
    }
    for (k, json) in settings {
        c.set(k, serde_json::from_str::<Value>(json)?)?;
    }
    c.validate("--method")?;
    Ok(c)
}

fn num_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Leading tokens of each training sequence without a loss (`--prompt-fraction`).
fn unscored(a: &BenchArgs) -> usize {
    (a.prompt_fraction * a.seq as f64) as usize
}

pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(t) = a.threads {
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    if !["train", "forward", "generate"].contains(&a.mode.as_str()) {
        bail!("--mode must be train, forward or generate");
    }
    let counts = [
        ("threads", a.threads.unwrap_or(1)),
        ("batch", a.batch),
        ("seq", a.seq),
        ("steps", a.steps),
        ("rounds", a.rounds),
        ("new-tokens", a.new_tokens),
    ];
    crate::common::at_least(1, &counts)?;
    if !(0.0..1.0).contains(&a.prompt_fraction) {
        bail!(
            "--prompt-fraction {}: out of range (at least 0, below 1)",
            a.prompt_fraction
        );
    }
    if let Some(p) = &a.chart {
        crate::common::check_path("--chart", p)?; // before the runs, not after
    }
    let dev = device(&a.device)?;
    // device memory already taken (the CUDA context, library handles) before petal's own
    let base = gpu::used(&dev);
    let (mut petal, wl) = build_petal(&a, &dev)?;
    // warm-up, with the device memory it peaks at (it runs the step every measured step runs)
    let (warm, gpu_peak) = gpu::peak_during(&dev, || petal.step(&a));
    warm?;
    let gpu_peak_mb = gpu_peak
        .zip(base)
        .map(|(p, b)| p.saturating_sub(b) as f64 / 1048576.0);
    let peak32 = matmul_peak(DType::F32, &dev)?;
    let peak16 = matmul_peak(DType::BF16, &dev).ok();
    let tokens = match a.mode.as_str() {
        "generate" => a.new_tokens as f64,
        _ => (a.batch * a.seq) as f64,
    };
    let flops = flops_per_token(&petal.model, a.seq, a.mode == "train");
    // PyTorch runs in f32; with petal in bf16 also under its own bf16 autocast
    let mut torches: Vec<(&str, Torch)> = Vec::new();
    let torch_has = a.quantize.is_empty() || a.quantize == "nf4";
    if a.vs_pytorch && !torch_has {
        eprintln!(
            "--quantize {}: no PyTorch baseline (bitsandbytes' NF4 is the one compared)",
            a.quantize
        );
    }
    if a.vs_pytorch && torch_has {
        let mut base = wl.clone();
        base["dtype"] = json!("f32");
        base["quantize"] = json!(a.quantize);
        if let Some(t) = start_torch(&a, &base)? {
            torches.push(("pytorch", t));
            if a.dtype == "bf16" {
                base["autocast_bf16"] = json!(true);
                let t = start_torch(&a, &base)?.context("PyTorch autocast baseline")?;
                torches.push(("pytorch_autocast", t));
            }
        }
    }
    let mut ps = Vec::new();
    let mut ts: Vec<Vec<Value>> = vec![Vec::new(); torches.len()];
    let bar = indicatif::ProgressBar::new((a.rounds * a.steps * (1 + torches.len())) as u64);
    // a pause before each side's round: thread pools (rayon's, OpenMP's) spin for a while
    // after their last task and would take the cores from the next side's first step
    let settle = || std::thread::sleep(std::time::Duration::from_millis(400));
    for _ in 0..a.rounds {
        settle();
        for _ in 0..a.steps {
            ps.push(petal.step(&a)?);
            bar.inc(1);
        }
        for ((_, t), out) in torches.iter_mut().zip(ts.iter_mut()) {
            settle();
            out.extend(t.round(a.steps)?);
            bar.inc(a.steps as u64);
        }
    }
    bar.finish_and_clear();
    for (_, t) in torches.iter_mut() {
        let _ = writeln!(t.child.stdin.as_mut().context("stdin")?, "quit");
        let _ = t.child.wait();
    }
    let mut pv = summarize(&ps, tokens, flops);
    pv["peak_rss_mb"] = json!(peak_rss_mb());
    pv["gpu_peak_mb"] = json!(gpu_peak_mb);
    let mut result = json!({
        "workload": a.workload, "mode": a.mode, "method": a.method, "batch": a.batch, "seq": a.seq, "dtype": a.dtype, "quantize": a.quantize,
        "device": a.device, "cuda_kernels": if a.device.starts_with("cuda") { petal.model.kernels().cuda_families() } else { vec![] }, "threads": wl["threads"], "matmul_peak_gflops": {"f32": peak32, "bf16": peak16},
        "cpu_features": petal_ops::cpu::features(), "frozen_quantized_products": petal_ops::quant::arithmetic(petal.model.kernels()),
        "grad_checkpointing": a.grad_checkpointing, "bf16_activations": a.bf16_activations, "unscored": wl["unscored"],
        "petal_build": env!("PETAL_BUILD"), "mflop_per_token": flops / 1e6, "petal": pv, "pytorch": null, "ratio": null,
    });
    let ratio =
        |p: &Value, t: &Value, k: &str| p[k].as_f64().unwrap_or(0.0) / t[k].as_f64().unwrap_or(1.0);
    for ((name, _), steps) in torches.iter().zip(&ts) {
        let mut v = summarize(steps, tokens, flops);
        let most = |k: &str| {
            let m = steps
                .iter()
                .filter_map(|s| s[k].as_f64())
                .fold(f64::NAN, f64::max);
            json!((!m.is_nan()).then_some(m))
        };
        v["peak_rss_mb"] = most("peak_rss_mb");
        v["gpu_peak_mb"] = most("gpu_peak_mb");
        let key = if *name == "pytorch" {
            "ratio".to_string()
        } else {
            format!("ratio_{}", name.trim_start_matches("pytorch_"))
        };
        let mut r = json!({
            "tokens_per_s": ratio(&pv, &v, "tokens_per_s"),
            "peak_rss": ratio(&pv, &v, "peak_rss_mb"),
        });
        if v["gpu_peak_mb"].is_f64() && pv["gpu_peak_mb"].is_f64() {
            r["gpu_memory"] = json!(ratio(&pv, &v, "gpu_peak_mb"));
        }
        result[key] = r;
        result[*name] = v;
    }
    if let Some(p) = &a.chart {
        petal_io::write_atomic(p, chart(&result).as_bytes())?;
    }
    if a.json {
        println!("{result}");
    } else {
        print_table(&result);
    }
    Ok(())
}
