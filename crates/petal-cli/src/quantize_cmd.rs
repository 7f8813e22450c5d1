//! `petal quantize`: a model's decoder linears to 4 bits in groups, written as a GPTQ folder
//! (AutoGPTQ's `gptq` layout: `qweight`, `qzeros`, `scales`, `g_idx`) that petal, transformers
//! with a GPTQ backend and vLLM load. `--method gptq` runs GPTQ's error-compensating quantizer
//! (`petal_ops::quant::gptq`) layer by layer over calibration text, each layer on the inputs that
//! the layers before it, already quantized, give; `--method rtn` rounds to nearest on the same
//! grid (the baseline, and what `--quantize int4` does at load).

use crate::common::{check_out_folder, check_seq_len, data_files, input_paths};
use crate::gen_cmd::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use petal_core::adapter::{AdapterLayer, NamedTensor, WeightUpdate};
use petal_core::{Adaptable, Ctx};
use petal_data::{load_examples, DataOptions};
use petal_ops::quant::gptq::{gptq, rtn, GptqOptions, GptqWeight};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// The model to quantize (`--dtype f32`; no adapter: merge it first with `petal merge`)
    #[command(flatten)]
    pub model: ModelArgs,
    /// gptq (error-compensating, over --calibration) or rtn (round to nearest)
    #[arg(long, default_value = "gptq")]
    pub method: String,
    /// Inputs per group: 32, 64 or 128 (a divisor of every linear's input size)
    #[arg(long, default_value_t = 128)]
    pub group: usize,
    /// GPTQ: quantize the columns in order of decreasing Hessian diagonal (`desc_act`)
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ: the calibration text (files, folders or asset:NAME, as `petal train --data`)
    #[arg(long, default_value = "")]
    pub calibration: String,
    /// GPTQ: calibration sequences (taken at random, seeded, from the text cut into --seq-len)
    #[arg(long, default_value_t = 32)]
    pub samples: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// GPTQ: dampening of the Hessian's diagonal, a fraction of its mean (0 < damp < 1)
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The folder written (whole, or not at all)
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// An adapter layer that only watches: it adds `x^T x` of every input it sees to a shared
/// Hessian and leaves the output as it is.
#[derive(Debug)]
struct Probe(Arc<Mutex<Vec<f64>>>);

impl AdapterLayer for Probe {
    fn forward(&self, x: &Tensor, y: Tensor, _ctx: &Ctx) -> petal_core::Result<Tensor> {
        let k = x.dim(candle_core::D::Minus1)?;
        let x = x.to_dtype(DType::F32)?.reshape(((), k))?;
        let g = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let mut h = self.0.lock().expect("probe lock");
        h.iter_mut().zip(g).for_each(|(h, g)| *h += g as f64);
        Ok(y)
    }
    fn weight_update(&self) -> petal_core::Result<WeightUpdate> {
        Err(petal_core::Error::msg(
            "a calibration probe has no weight update",
        ))
    }
    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        Vec::new()
    }
}

const PROBE: &str = "petal-gptq-probe";

/// The linears of a decoder layer that read the same input: the first of each is probed.
const SHARED_INPUT: [&[&str]; 4] = [
    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    &["self_attn.o_proj"],
    &["mlp.gate_proj", "mlp.up_proj"],
    &["mlp.down_proj"],
];

pub fn run(a: QuantizeArgs) -> Result<()> {
    let gptq_method = match a.method.as_str() {
        "gptq" => true,
        "rtn" => false,
        m => bail!("--method `{m}` is not one of gptq, rtn"),
    };
    if ![32, 64, 128].contains(&a.group) {
        bail!("--group {}: one of 32, 64, 128", a.group);
    }
    if a.model.dtype != "f32" || !a.model.quantize.is_empty() || !a.model.adapter.is_empty() {
        bail!(
            "petal quantize reads the model in --dtype f32, without --quantize or --adapter \
             (merge an adapter first with `petal merge`)"
        );
    }
    if gptq_method {
        if a.calibration.is_empty() {
            bail!("--method gptq needs --calibration (text the model reads, as --data)");
        }
        if a.samples == 0 {
            bail!("--samples 0: give at least 1");
        }
        if !(a.damp > 0.0 && a.damp < 1.0) {
            bail!("--damp {}: between 0 and 1, exclusive", a.damp);
        }
        check_seq_len(a.seq_len)?;
    } else if a.act_order || !a.calibration.is_empty() {
        bail!("--act-order and --calibration are GPTQ's: give --method gptq");
    }
    check_out_folder(&a.out, &input_paths(&a.model.model, &[]))?;
    let started = Instant::now();
    let mut lm = a.model.load()?;
    if let Some(held) = already_quantized(&lm.source)? {
        bail!("{held}: the model is already quantized; quantize its f32, f16 or bf16 weights");
    }
    let layers = lm.model.num_decoder_layers();
    for l in lm.model.linears() {
        if is_target(l.path()) && l.in_features() % a.group != 0 {
            let fits: Vec<String> = [128, 64, 32]
                .iter()
                .filter(|g| l.in_features() % **g == 0)
                .map(|g| g.to_string())
                .collect();
            bail!(
                "{}: {} inputs are not whole groups of {} (--group: {} divide it)",
                l.path(),
                l.in_features(),
                a.group,
                match fits.is_empty() {
                    true => "none of 32, 64, 128".to_string(),
                    false => fits.join(", "),
                }
            );
        }
    }
    let opts = GptqOptions {
        group: a.group,
        act_order: a.act_order,
        damp: a.damp,
    };
    let mut done: HashMap<String, GptqWeight> = HashMap::new();
    let mut tokens = 0;
    if gptq_method {
        let batches = calibration(&a, &lm)?;
        tokens = batches.iter().map(|b| b.elem_count()).sum::<usize>();
        let ctx = Ctx::eval();
        let mut xs = batches
            .iter()
            .map(|b| lm.model.layer_input(b, &ctx))
            .collect::<petal_core::Result<Vec<_>>>()?;
        let bar = crate::common::progress(layers as u64, "layers");
        for i in 0..layers {
            let probes = attach_probes(&mut lm.model, i)?;
            for x in &xs {
                lm.model.layer_alone(i, x, &ctx)?;
            }
            for l in lm.model.linears_mut() {
                if l.adapter_names().contains(&PROBE) {
                    l.delete_adapter(PROBE)?;
                }
            }
            for (group, h) in SHARED_INPUT.iter().zip(probes) {
                let h = Arc::try_unwrap(h).expect("probes detached").into_inner()?;
                for name in *group {
                    let path = format!("model.layers.{i}.{name}");
                    let q = quantize_one(&mut lm.model, &path, |w, rows, cols| {
                        gptq(w, rows, cols, &h, opts)
                    })?;
                    done.insert(path, q);
                }
            }
            xs = xs
                .iter()
                .map(|x| lm.model.layer_alone(i, x, &ctx))
                .collect::<petal_core::Result<Vec<_>>>()?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    } else {
        let paths: Vec<String> = lm
            .model
            .linears()
            .iter()
            .map(|l| l.path().to_string())
            .filter(|p| is_target(p))
            .collect();
        for path in paths {
            let q = quantize_one(&mut lm.model, &path, |w, rows, cols| {
                rtn(w, rows, cols, a.group)
            })?;
            done.insert(path, q);
        }
    }
    let zero_less_one = done.values().all(|q| q.zeros.iter().all(|&z| z >= 1));
    petal_io::gptq_out::write(&a.out, &lm, &done, a.act_order, zero_less_one)?;
    let secs = started.elapsed().as_secs_f64();
    let bits = 4.0 + 32.0 / a.group as f64; // codes, and an f16 scale and packed zero a group
    if a.json {
        let j = serde_json::json!({"method": a.method, "group": a.group, "act_order": a.act_order,
            "linears": done.len(), "calibration_tokens": tokens, "seconds": secs,
            "checkpoint_format": if zero_less_one {"gptq"} else {"gptq_v2"}, "out": a.out});
        println!("{j}");
    } else {
        println!(
            "wrote {} ({} linears, 4-bit {} in groups of {}{}, about {bits:.2} bits a weight; \
             {tokens} calibration tokens; {secs:.0} s)",
            a.out.display(),
            done.len(),
            a.method,
            a.group,
            if a.act_order { ", act-order" } else { "" },
        );
    }
    Ok(())
}

/// Where the model's weights are already quantized: a folder with a `quantization_config`, a
/// GGUF file with block-quantized matrices.
fn already_quantized(source: &petal_io::hub::ModelSource) -> Result<Option<String>> {
    use petal_io::hub::ModelSource;
    match source {
        ModelSource::HfFolder(dir) => {
            let p = dir.join("config.json");
            let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
            let cfg: serde_json::Value = serde_json::from_str(&text)?;
            Ok(cfg
                .get("quantization_config")
                .map(|_| format!("{}: quantization_config", p.display())))
        }
        ModelSource::Gguf(path) => {
            let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
            let c = candle_core::quantized::gguf_file::Content::read(&mut f)
                .with_context(|| path.display().to_string())?;
            use candle_core::quantized::GgmlDType as T;
            Ok(c.tensor_infos
                .iter()
                .find(|(_, i)| {
                    i.shape.rank() == 2 && ![T::F32, T::F16, T::BF16].contains(&i.ggml_dtype)
                })
                .map(|(n, i)| format!("{}: tensor {n} is {:?}", path.display(), i.ggml_dtype)))
        }
    }
}

/// A decoder linear GPTQ quantizes (not the embedding, not the head).
fn is_target(path: &str) -> bool {
    path.starts_with("model.layers.")
        && SHARED_INPUT
            .iter()
            .flat_map(|g| g.iter())
            .any(|n| path.ends_with(n))
}

/// Probes on the first linear of each shared-input group of layer `i`; their Hessians.
fn attach_probes(model: &mut petal_models::Llama, i: usize) -> Result<Vec<Arc<Mutex<Vec<f64>>>>> {
    let mut hs = Vec::new();
    for group in SHARED_INPUT {
        let l = linear_mut(model, &format!("model.layers.{i}.{}", group[0]))?;
        let n = l.in_features();
        let h = Arc::new(Mutex::new(vec![0f64; n * n]));
        l.add_adapter(PROBE, Box::new(Probe(h.clone())))?;
        l.set_active(&[PROBE]);
        hs.push(h);
    }
    Ok(hs)
}

/// The linear at `path` (`model.layers.3.mlp.up_proj`).
fn linear_mut<'a>(
    model: &'a mut petal_models::Llama,
    path: &str,
) -> Result<&'a mut petal_core::AdaptableLinear> {
    model
        .linears_mut()
        .into_iter()
        .find(|l| l.path() == path)
        .with_context(|| format!("{path}: no such linear in the model"))
}

/// Quantize the linear at `path` by `f` (its f32 weight, rows, cols) and put the quantized
/// values (scales rounded to f16, as stored) in place of its weight.
fn quantize_one(
    model: &mut petal_models::Llama,
    path: &str,
    f: impl FnOnce(&[f32], usize, usize) -> std::result::Result<GptqWeight, String>,
) -> Result<GptqWeight> {
    let l = linear_mut(model, path)?;
    let w = l.weight().to_dtype(DType::F32)?;
    let (rows, cols) = w.dims2()?;
    let mut q = f(&w.flatten_all()?.to_vec1::<f32>()?, rows, cols)
        .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    for s in q.scales.iter_mut() {
        *s = half::f16::from_f32(*s).to_f32();
    }
    let deq = Tensor::from_vec(q.dequantize(), (rows, cols), &Device::Cpu)?;
    l.subtract_from_base(&(&w - &deq)?.to_dtype(l.weight().dtype())?)?;
    Ok(q)
}

/// `samples` sequences of `seq_len` tokens from the calibration text, picked at random with
/// the seed, in batches of 4.
fn calibration(a: &QuantizeArgs, lm: &petal_io::LoadedModel) -> Result<Vec<Tensor>> {
    let opts = DataOptions {
        max_seq_len: a.seq_len,
        pack: true,
    };
    let mut ex = Vec::new();
    for f in data_files(&a.calibration)? {
        ex.extend(load_examples(&f, &lm.tokenizer, &opts)?);
    }
    let mut whole: Vec<Vec<u32>> = ex
        .into_iter()
        .map(|e| e.ids)
        .filter(|ids| ids.len() == a.seq_len)
        .collect();
    if whole.len() < a.samples {
        bail!(
            "--calibration {}: {} sequences of {} tokens, --samples asks {}",
            a.calibration,
            whole.len(),
            a.seq_len,
            a.samples
        );
    }
    use rand::{seq::SliceRandom, SeedableRng};
    whole.shuffle(&mut rand::rngs::StdRng::seed_from_u64(a.seed));
    whole.truncate(a.samples);
    whole
        .chunks(4)
        .map(|c| {
            let flat: Vec<u32> = c.concat();
            Ok(Tensor::from_vec(flat, (c.len(), a.seq_len), &Device::Cpu)?)
        })
        .collect()
}
