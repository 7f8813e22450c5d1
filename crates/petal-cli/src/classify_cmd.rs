//! `--task-type seq-cls`: sequence classification on a BERT encoder, as PEFT's `SEQ_CLS` task
//! type: the classification head (`classifier`) trained and saved in full next to the adapter
//! (`modules_to_save`), the labels' mapping saved beside it (`labels.json`), and evaluation by
//! accuracy and macro-F1.

use crate::adapter_opts::{adapter_config, Given};
use crate::common::{data_files, resolve_spec};
use crate::train_cmd::{run_training, train_config, TrainOpts};
use crate::train_report::print_report;
use anyhow::{bail, Context, Result};
use petal_core::adapter::InputShape;
use petal_core::{inject_adapter_within, AdapterMethod, ParamCount};
use petal_data::{labels_of, load_classification, split, Example, Labels};
use petal_io::{load_encoder, LoadedEncoder};
use petal_train::classify::ClsObjective;
use petal_train::Objective;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The file next to a classification adapter holding its labels' mapping.
pub const LABELS_FILE: &str = "labels.json";

/// `--task-type`: causal-lm (default) or seq-cls.
pub fn is_seq_cls(task_type: Option<&str>) -> Result<bool> {
    match task_type.unwrap_or("causal-lm") {
        "causal-lm" => Ok(false),
        "seq-cls" => Ok(true),
        t => bail!("--task-type {t:?} is not a task type: causal-lm or seq-cls"),
    }
}

/// Examples of every file of `spec` under one labels' mapping: `labels` when given, else the
/// files' labels together (their strings' sorted set, or numbers 0..=max).
fn read(
    spec: &str,
    tok: &petal_data::Tokenizer,
    max_len: usize,
    labels: Option<&Labels>,
) -> Result<(Vec<Example>, Labels)> {
    let files = data_files(spec)?;
    let labels = match labels {
        Some(l) => l.clone(),
        None => labels_of(&files)?,
    };
    let mut all = Vec::new();
    for f in &files {
        all.extend(load_classification(f, tok, max_len, Some(&labels))?.0);
    }
    Ok((all, labels))
}

fn encoder(spec: &str, classes: Option<usize>, seed: u64, dt: &str) -> Result<LoadedEncoder> {
    let precision = crate::common::precision(dt, false, "")?;
    if precision.weights != candle_core::DType::F32 {
        bail!("--task-type seq-cls runs in f32 (--dtype f32)");
    }
    Ok(load_encoder(
        &resolve_spec(spec)?,
        classes,
        seed,
        precision,
        &candle_core::Device::Cpu,
    )?)
}

/// `petal train --task-type seq-cls`.
pub fn train(
    o: &TrainOpts,
    m: &dyn AdapterMethod,
    preset: Vec<(String, Value)>,
    given: Given,
    method: &str,
    json: bool,
) -> Result<()> {
    if o.device.as_deref().is_some_and(|d| d != "cpu") {
        bail!("--task-type seq-cls runs on the CPU for now (--device cpu)");
    }
    if o.pack.unwrap_or(false) {
        bail!(
            "--pack with --task-type seq-cls: each sequence is one example with one label, and \
             packing several into a row would mix them; leave --pack out"
        );
    }
    let model_spec = o.model.clone().unwrap_or_else(|| "asset:minilm".into());
    let data_spec = o
        .data
        .clone()
        .context("--data is required (a classification .jsonl)")?;
    let out = o
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/latest"));
    let seed = o.seed.unwrap_or(0);
    let seq_len = o.seq_len.unwrap_or(128);
    // the tokenizer first (the data is read with it), then the model with a head of its size
    let tok = petal_io::encoder_tokenizer(&resolve_spec(&model_spec)?)?;
    // a warm start keeps its labels' mapping (a federated round: every client the same
    // classes, whichever labels its own data holds)
    let init_labels = match &o.init_adapter {
        Some(dir) => saved_labels(dir)?,
        None => None,
    };
    let (mut train_set, labels) = read(&data_spec, &tok, seq_len, init_labels.as_ref())?;
    let mut val_set = match &o.val_data {
        Some(v) => read(v, &tok, seq_len, Some(&labels))?.0,
        None => {
            let (t, v) = split(train_set, o.val_fraction.unwrap_or(0.05), seed);
            train_set = t;
            v
        }
    };
    val_set.truncate(o.max_eval_examples.unwrap_or(32));
    let mut enc = encoder(
        &model_spec,
        Some(labels.count),
        seed,
        o.dtype.as_deref().unwrap_or("f32"),
    )?;
    let mc = enc.model.cfg.clone();
    let shape = InputShape {
        hidden: mc.hidden_size,
        layers: mc.num_hidden_layers,
        kv_heads: mc.num_attention_heads,
        head_dim: mc.hidden_size / mc.num_attention_heads,
    };
    let tasks = petal_data::tasks(&train_set);
    let mut o = o.clone();
    if o.target_modules.is_none() {
        // the method's default targets, from Llama's module names to BERT's
        o.target_modules = m.default_targets().map(bert_names);
    }
    let o = &o;
    let specials = enc.tokenizer.special_ids_in(&train_set);
    let heads = mc.num_attention_heads;
    let mut acfg = adapter_config(o, m, preset, given, shape, heads, &tasks, &specials)?;
    acfg.base_model_name_or_path = Some(model_spec.clone());
    acfg.task_type = Some("SEQ_CLS".into());
    // PEFT's SEQ_CLS adds the head to modules_to_save
    let mut keep = acfg.modules_to_save.take().unwrap_or_default();
    for head in ["classifier", "score"] {
        if !keep.iter().any(|k| k == head) {
            keep.push(head.into());
        }
    }
    acfg.modules_to_save = Some(keep);
    crate::adapter_opts::merge_adapters(o, &mut enc.model)?;
    let limit = crate::common::memory_limit(crate::train_cmd::max_memory(o)?).for_training();
    let report = inject_adapter_within(&mut enc.model, "default", &acfg, seed, &limit)?;
    crate::adapter_opts::init_adapter(o, &enc.model, &candle_core::Device::Cpu, &acfg)?;
    let pc = ParamCount::of(&enc.model);
    eprintln!(
        "model {model_spec}: BERT encoder, {} layers, hidden {}, {} classes{}",
        mc.num_hidden_layers,
        mc.hidden_size,
        labels.count,
        labels
            .names
            .as_ref()
            .map(|n| format!(" ({})", n.join(", ")))
            .unwrap_or_default()
    );
    eprintln!("{method}: {} modules adapted; {pc}", report.modules.len());
    eprintln!(
        "data: {} train / {} validation examples of up to {seq_len} tokens",
        train_set.len(),
        val_set.len()
    );
    let obj = ClsObjective {
        model: &enc.model,
        pad: enc.pad_id,
        sep: enc.sep_id,
    };
    let bs = o.batch_size.unwrap_or(4);
    // data-parallel: rank 0 evaluates and reports; the others only train
    let group = crate::ranks::group()?;
    // the batch of all ranks: a run resumes with any ranks that make the same one
    let (leader, ranks) = (group.is_leader(), group.size());
    let before = (leader && !val_set.is_empty())
        .then(|| obj.evaluate(&val_set, bs))
        .transpose()?;
    let fingerprint = serde_json::json!({
        "model": model_spec, "task_type": "seq-cls", "adapter": acfg, "data": data_spec,
        "val_data": o.val_data, "val_fraction": o.val_fraction, "seq_len": seq_len,
        "batch_size": bs * ranks, "grad_accum": o.grad_accum.unwrap_or(1), "seed": seed, "labels": labels,
    })
    .to_string();
    let cfg = train_config(o, &out, enc.pad_id, fingerprint)?;
    let summary = run_training(&obj, &acfg, method, o, &cfg, &train_set, &val_set)?;
    if !leader {
        return Ok(());
    }
    save_labels(&summary.adapter_dir, &labels)?;
    let after = (!val_set.is_empty())
        .then(|| obj.evaluate(&val_set, bs))
        .transpose()?;
    print_report(&summary, pc, before, after, &[], &[], &[], &out, json)
}

/// A comma list of Llama module names as BERT's (PEFT's per-architecture defaults: q/k/v to
/// query/key/value, o_proj to attention.output.dense, gate/up to intermediate.dense, down_proj
/// to output.dense); other entries (all-linear, a regex) unchanged.
fn bert_names(targets: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for t in targets.split(',').map(str::trim) {
        let b = match t {
            "q_proj" => "query",
            "k_proj" => "key",
            "v_proj" => "value",
            "o_proj" => "attention.output.dense",
            "gate_proj" | "up_proj" => "intermediate.dense",
            "down_proj" => "output.dense",
            other => other,
        };
        if !out.contains(&b) {
            out.push(b);
        }
    }
    out.join(",")
}

fn save_labels(adapter: &Path, labels: &Labels) -> Result<()> {
    let text = serde_json::to_string_pretty(labels)?;
    petal_io::write_atomic(&adapter.join(LABELS_FILE), text.as_bytes())?;
    Ok(())
}

/// An adapter's saved labels' mapping, if it has one.
fn saved_labels(adapter: &Path) -> Result<Option<Labels>> {
    let p = adapter.join(LABELS_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}", p.display()))?;
    let labels: Labels = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a labels file", p.display()))?;
    labels
        .check()
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    Ok(Some(labels))
}

/// `petal eval --task-type seq-cls`: loss, accuracy and macro-F1 of the model with its
/// adapters (labels read through the first adapter's saved mapping, else as the data gives
/// them for the model's own head).
pub fn eval(
    model: &str,
    adapters: &[PathBuf],
    data: &str,
    seq_len: usize,
    batch: usize,
    max_examples: usize,
) -> Result<petal_train::EvalResult> {
    let labels = adapters
        .first()
        .map(|a| saved_labels(a))
        .transpose()?
        .flatten();
    let mut enc = encoder(model, labels.as_ref().map(|l| l.count), 0, "f32")?;
    for (i, a) in adapters.iter().enumerate() {
        let name = if i == 0 {
            "default".to_string()
        } else {
            format!("a{i}")
        };
        petal_io::attach_adapter(&mut enc.model, a, &name)?;
    }
    let labels = labels.unwrap_or(Labels {
        names: None,
        count: enc.model.num_labels(),
    });
    let (mut ex, _) = read(data, &enc.tokenizer, seq_len, Some(&labels))?;
    if max_examples > 0 {
        ex.truncate(max_examples);
    }
    let obj = ClsObjective {
        model: &enc.model,
        pad: enc.pad_id,
        sep: enc.sep_id,
    };
    Ok(obj.evaluate(&ex, batch)?)
}
