//! `petal train`: fine-tune a model with an adapter, from flags and/or a TOML config.

use crate::adapter_opts::{
    adapter_config, given_options, method_name, resolve_method, MethodFlags,
};
use crate::common::{data_files, load};
use crate::train_report::{print_report, write_loss_chart};
use crate::{config_file, gen_cmd};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::ProgressBar;
use petal_core::{inject_adapter_within, Adaptable, ParamCount};
use petal_data::{load_examples, split, DataOptions, Example};
use petal_train::optim::AdamWParams;
use petal_train::{
    evaluate, train_objective, LmObjective, Objective, Observer, StepMetrics, TrainConfig,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

mod checks;
pub(crate) use checks::max_memory;
use checks::{check_ranges, task_sampling};

macro_rules! train_opts {
    ($($(#[$m:meta])* $name:ident : $ty:ty),* $(,)?) => {
        /// Every option is also a key of the `--config` TOML file.
        #[derive(clap::Args, Deserialize, Serialize, Default, Debug, Clone)]
        #[serde(default)]
        pub struct TrainOpts {
            $($(#[$m])* #[arg(long)] pub $name: Option<$ty>,)*
        }
        impl TrainOpts {
            pub const KEYS: &'static [&'static str] = &[$(stringify!($name)),*];
            /// Fill options not given here from `o`.
            pub fn or(self, o: TrainOpts) -> TrainOpts {
                TrainOpts { $($name: self.$name.or(o.$name),)* }
            }
        }
    };
}

train_opts! {
    /// Model: HF folder, .gguf file, hub id, or asset:NAME [default: asset:smollm2]
    model: String,
    /// Training data: .jsonl, .txt, a folder of them, or asset:NAME[/file]
    data: String,
    /// Separate validation file (else --val-fraction of --data is held out)
    val_data: String,
    /// Fraction held out for validation [default: 0.05]
    val_fraction: f64,
    /// Cap on validation examples, to keep evaluation quick [default: 32]
    max_eval_examples: usize,
    /// Multi-task data (a `task` field on each example): proportional (draw examples as they
    /// come, so large tasks dominate) | balanced (draw the tasks in turn) [default: proportional]
    task_sampling: String,
    /// Put examples of similar lengths in the same micro-batch (transformers' group_by_length:
    /// mega-batches of up to 50 steps' examples, each sorted by length): less padding, so faster
    /// on data of mixed lengths; not with --task-sampling balanced [default: false]
    group_by_length: bool,
    /// Multi-task data: train only on these tasks (comma-separated `task` values; the
    /// validation data keeps all of its tasks, so held-out tasks can be scored)
    tasks: Vec<String>,
    /// causal-lm (next-token prediction on a decoder) | seq-cls (sequence classification on a
    /// BERT encoder: data `{"text", "label"}` or `{"text", "text_pair", "label"}`) [default:
    /// causal-lm]
    task_type: String,
    /// Adapter method [default: lora]
    method: String,
    /// Rank of the method (LoRA's r; each method maps it to its own key) [default: the method's]
    r: usize,
    /// Alpha of the method (LoRA's lora_alpha, LoHa's alpha, …) [default: 16]
    alpha: f64,
    /// Dropout of the method's input (LoRA's lora_dropout, VeRA's vera_dropout, …) [default: 0.0]
    dropout: f64,
    /// An option of the chosen method under its PEFT key, KEY=VALUE (repeatable; `petal
    /// methods NAME` lists them); in a TOML file, a table named after the method
    set: Vec<String>,
    /// PiSSA / OLoRA: save the trained adapter as plain LoRA of rank 2r that applies to the
    /// original model, as PEFT's `path_initial_model_for_weight_conversion` [default: false]
    save_as_lora: bool,
    /// Target modules: comma list of names, `all-linear`, or `re:REGEX` [default: the method's]
    target_modules: String,
    /// Modules to exclude: comma list or `re:REGEX`
    exclude_modules: String,
    /// Adapt only these decoder layers: comma list of indices (PEFT's `layers_to_transform`)
    layers_to_transform: String,
    /// Linears trained in full next to the adapter and saved with it (e.g. lm_head): comma list
    modules_to_save: String,
    /// Token ids whose embedding rows are trained in full (new special tokens): comma list
    trainable_tokens: String,
    /// Optimizer steps (0: write the freshly initialised adapter, untrained) [default: 100]
    max_steps: usize,
    /// Peak learning rate [default: 1e-3]
    lr: f64,
    /// AdamW weight decay [default: 0.0]
    weight_decay: f64,
    /// Warmup steps [default: 0]
    warmup_steps: usize,
    /// constant | linear | cosine [default: cosine]
    schedule: String,
    /// Keep only each decoder layer's input and recompute the layer in backward: less memory,
    /// one more forward pass of compute [default: false]
    grad_checkpointing: bool,
    /// Sequences per micro-batch [default: 4]
    batch_size: usize,
    /// Micro-batches per optimizer step [default: 1]
    grad_accum: usize,
    /// Clip the global gradient norm to this [default: 1.0]
    max_grad_norm: f64,
    /// Maximum tokens per sequence [default: 128]
    seq_len: usize,
    /// Pack short JSONL examples into full windows [default: false]
    pack: bool,
    /// Seed for init, shuffling and dropout [default: 0]
    seed: u64,
    /// Evaluate every N steps (and at the end) [default: 25]
    eval_every: usize,
    /// Checkpoint every N steps (and at the end) [default: 25]
    save_every: usize,
    /// Run folder [default: runs/latest]
    out: PathBuf,
    /// f32 | bf16 | f16 | quantized (a GGUF file's quantized linears kept in their blocks, as
    /// QLoRA keeps its base) [default: f32]
    dtype: String,
    /// With --dtype bf16 on the CPU: keep activations in bf16 too, about half their memory, at
    /// some speed (the default keeps them in f32) [default: false]
    bf16_activations: bool,
    /// Quantize the model's linears at load into a GGML block type (q4_0, q8_0, q4_k, ...) and
    /// train over the blocks as --dtype quantized does
    quantize: String,
    /// cpu | cuda | cuda:N [default: cpu]
    device: String,
    /// The most memory the adapter may take with its gradients and optimizer state, and the
    /// batch's activations (a lower bound), checked before anything is allocated (bytes, or
    /// with K, M, G, T: 8G) [default: half of this machine's memory for the adapter, all of it
    /// for the activations]
    max_memory: String,
    /// Prompts to complete before and after training (repeatable)
    sample_prompt: Vec<String>,
    /// Tokens per sample [default: 40]
    sample_tokens: usize,
    /// Continue from a checkpoint folder or a run folder's latest checkpoint
    resume: PathBuf,
    /// Start the adapter from this adapter folder's weights (its tensors must be the ones the
    /// method's options make, same names and shapes), with a fresh optimizer: a federated
    /// round's local training from the global adapter
    init_adapter: PathBuf,
    /// Merge these adapter folders into the base weights first (each attached, merged and
    /// unloaded, PEFT's merge_and_unload), then make the trained adapter: it learns on top of
    /// their updates, and is saved without them (it belongs to base + these; a federated client
    /// training some layers over the global adapter of the others)
    merge_adapter: Vec<PathBuf>,
    /// FedProx's proximal term: `prox_mu / 2 * ||w - w0||^2`, w0 the adapter training starts
    /// from (`--init-adapter`) [default: 0, none]
    prox_mu: f64,
    /// Replace an existing run folder [default: false]
    overwrite: bool,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML file with any of the options below (flags override it)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the summary as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub opts: TrainOpts,
    #[command(flatten)]
    pub method_flags: MethodFlags,
}

struct Bar(ProgressBar);

impl Observer for Bar {
    fn on_start(&mut self, first: usize, max: usize) {
        self.0.set_length(max as u64);
        self.0.set_position(first as u64);
    }
    fn on_step(&mut self, m: &StepMetrics) {
        self.0.set_position(m.step as u64);
        let ev = m
            .eval_loss
            .map(|e| format!(" eval {e:.4}"))
            .unwrap_or_default();
        self.0.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s{ev}",
            m.loss, m.lr, m.tokens_per_s
        ));
        if m.eval_loss.is_some() {
            self.0.println(format!(
                "step {:>5}  loss {:.4}  eval loss {:.4}",
                m.step,
                m.loss,
                m.eval_loss.unwrap_or(f64::NAN)
            ));
        }
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut o = args.opts;
    let mut flags = args.method_flags.given;
    let mut tables = toml::Table::new();
    if let Some(c) = &args.config {
        let (top, tables_known) = crate::adapter_opts::toml_names();
        let mut known: Vec<&str> = TrainOpts::KEYS.to_vec();
        known.extend(top.iter().map(String::as_str));
        let mut table = config_file::read(c, &known, &tables_known)?;
        for key in &top {
            let name = key.replace('_', "-");
            let on_command_line = flags.iter().any(|(f, _)| *f == name);
            if let Some(v) = table.remove(key).filter(|_| !on_command_line) {
                let text = match v {
                    toml::Value::String(s) => s,
                    v => v.to_string(),
                };
                flags.push((name, text));
            }
        }
        for name in &tables_known {
            if let Some(toml::Value::Table(t)) = table.remove(name) {
                tables.insert(name.clone(), toml::Value::Table(t));
            }
        }
        let file: TrainOpts = table.try_into().map_err(|e: toml::de::Error| {
            // toml names the key on a line of its own after the message: one line instead
            let text = e.to_string();
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("in `")?.strip_suffix('`'));
            let first = text.lines().next().unwrap_or_default();
            match key {
                Some(k) => anyhow!("{}: field `{k}`: {first}", c.display()),
                None => anyhow!("{}: {}", c.display(), text.replace('\n', " ")),
            }
        })?;
        o = o.or(file);
    }
    check_ranges(&o)?;
    let model_spec = o.model.clone().unwrap_or_else(|| "asset:smollm2".into());
    let data_spec = o
        .data
        .clone()
        .context("--data is required (a .jsonl/.txt file, a folder, or asset:shakespeare)")?;
    let out = crate::common::run_folder(o.out.clone(), o.resume.as_deref(), o.overwrite)?;
    o.out = Some(out.clone()); // the resumed run's own folder where --out is not given
    let (m, preset) = resolve_method(o.method.as_deref().unwrap_or("lora"))?;
    let method = method_name(m);
    if let Some(t) = tables.keys().find(|t| **t != method) {
        bail!("the run file has a [{t}] table but --method is {method}");
    }
    let table = match tables.get(&method) {
        Some(toml::Value::Table(t)) => Some(t),
        _ => None,
    };
    let given = given_options(m, &o, &flags, table)?;
    if crate::classify_cmd::is_seq_cls(o.task_type.as_deref())? {
        return crate::classify_cmd::train(&o, m, preset, given, &method, args.json);
    }
    let dt = o.dtype.clone().unwrap_or_else(|| "f32".into());
    let dev = o.device.clone().unwrap_or_else(|| "cpu".into());
    let quantize = o.quantize.clone().unwrap_or_default();
    let precision = crate::common::precision(&dt, o.bf16_activations.unwrap_or(false), &quantize)?;
    let lm = load(&model_spec, &[], precision, &dev, &Default::default())?;
    let tok = &lm.tokenizer;
    let seq_len = o.seq_len.unwrap_or(128);
    if seq_len > lm.model.cfg.max_position_embeddings {
        bail!(
            "--seq-len {seq_len} exceeds the model's context of {}",
            lm.model.cfg.max_position_embeddings
        );
    }
    let dopts = DataOptions {
        max_seq_len: seq_len,
        pack: o.pack.unwrap_or(false),
    };
    let read = |spec: &str| -> Result<Vec<Example>> {
        let mut v = Vec::new();
        for f in data_files(spec)? {
            v.extend(load_examples(&f, tok, &dopts)?);
        }
        Ok(v)
    };
    let seed = o.seed.unwrap_or(0);
    // `--tasks a,b` or repeated `--tasks a --tasks b` (a TOML list too)
    let wanted: Vec<String> = o
        .tasks
        .iter()
        .flatten()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let chosen = |v: Vec<Example>| -> Result<Vec<Example>> {
        match wanted.is_empty() {
            false => Ok(petal_data::select_tasks(v, &wanted, "--tasks")?),
            true => Ok(v),
        }
    };
    let (train_set, mut val_set) = match &o.val_data {
        Some(v) => (chosen(read(&data_spec)?)?, read(v)?),
        None => split(
            chosen(read(&data_spec)?)?,
            o.val_fraction.unwrap_or(0.05),
            seed,
        ),
    };
    val_set.truncate(o.max_eval_examples.unwrap_or(32));
    let mc = &lm.model.cfg;
    let shape = petal_core::adapter::InputShape {
        hidden: mc.hidden_size,
        layers: mc.num_hidden_layers,
        kv_heads: mc.num_key_value_heads,
        head_dim: mc.head_dim,
    };
    let tasks = petal_data::tasks(&train_set);
    let heads = mc.num_attention_heads;
    let specials = tok.special_ids_in(&train_set);
    let mut acfg = adapter_config(&o, m, preset, given, shape, heads, &tasks, &specials)?;
    acfg.base_model_name_or_path = Some(model_spec.clone());
    let mut model = lm.model;
    crate::adapter_opts::merge_adapters(&o, &mut model)?;
    let limit = crate::common::memory_limit(max_memory(&o)?).for_training();
    let report = inject_adapter_within(&mut model, "default", &acfg, seed, &limit)?;
    let longest = train_set.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let micro = o.batch_size.unwrap_or(4).min(train_set.len()); // a micro-batch's sequences
    let first = report
        .modules
        .iter()
        .filter_map(|m| crate::common::layer_of(&m.path))
        .min();
    let ckpt = o.grad_checkpointing.unwrap_or(false);
    let batch = (micro, longest.min(seq_len));
    crate::common::check_activations(&model, batch, first, ckpt, &limit)?;
    crate::adapter_opts::init_adapter(&o, &model, model.device(), &acfg)?;
    let init_text = acfg.get("prompt_tuning_init_text").and_then(|v| v.as_str());
    if let (Some(text), Some((_, input))) = (init_text, model.input_adapter()) {
        // PEFT's TEXT init: the text's token embeddings, cut or repeated to the length.
        let ids = tok.encode(text, false)?;
        let n = input
            .embeddings()?
            .context("a prompt init text needs a method with virtual token embeddings")?
            .dim(0)?;
        if ids.is_empty() {
            bail!("the prompt init text {text:?} tokenizes to nothing");
        }
        let ids: Vec<u32> = ids.iter().copied().cycle().take(n).collect();
        let rows = model.embed_rows(&candle_core::Tensor::new(ids.as_slice(), model.device())?)?;
        input.set_prefix(&rows)?;
    }
    let pc = ParamCount::of(&model);
    eprintln!(
        "model {model_spec}: {} layers, hidden {}, vocab {}",
        model.cfg.num_hidden_layers, model.cfg.hidden_size, model.cfg.vocab_size
    );
    eprintln!("{method}: {} modules adapted; {pc}", report.modules.len());
    eprintln!(
        "data: {} train / {} validation sequences of up to {seq_len} tokens",
        train_set.len(),
        val_set.len()
    );
    let pad = tok.eos_id.unwrap_or(0);
    let bs = o.batch_size.unwrap_or(4);
    // data-parallel: rank 0 evaluates, samples and reports; the others only train
    let group = crate::ranks::group()?;
    // the batch of all ranks: a run resumes with any ranks that make the same one
    let (leader, ranks) = (group.is_leader(), group.size());
    let prompts = match leader {
        true => o.sample_prompt.clone().unwrap_or_default(),
        false => Vec::new(),
    };
    let sample_tokens = o.sample_tokens.unwrap_or(40);
    let before = if val_set.is_empty() || !leader {
        None
    } else {
        Some(evaluate(&model, &val_set, bs, pad)?)
    };
    if let Some(b) = &before {
        eprintln!(
            "before training: validation loss {:.4} (perplexity {:.2})",
            b.loss, b.perplexity
        );
    }
    let before_samples = samples(&model, tok, &prompts, sample_tokens)?;
    let fingerprint = serde_json::json!({
        "model": model_spec, "arch": format!("{:?}", model.cfg), "adapter": acfg, "data": crate::common::full_path(&data_spec),
        "val_data": o.val_data.as_deref().map(crate::common::full_path), "val_fraction": o.val_fraction, "seq_len": seq_len, "pack": dopts.pack,
        "batch_size": bs * ranks, "grad_accum": o.grad_accum.unwrap_or(1), "seed": seed, "dtype": dt,
    });
    let mut fingerprint = fingerprint;
    if !quantize.is_empty() {
        fingerprint["quantize"] = quantize.clone().into();
    }
    if o.bf16_activations.unwrap_or(false) {
        // only when on, so runs from before the option still resume
        fingerprint["bf16_activations"] = true.into();
    }
    let fingerprint = fingerprint.to_string();
    let cfg = train_config(&o, &out, pad, fingerprint)?;
    let lm = LmObjective {
        model: &model,
        pad,
        checkpointing: cfg.grad_checkpointing,
    };
    let summary = run_training(&lm, &acfg, &method, &o, &cfg, &train_set, &val_set)?;
    if !leader {
        return Ok(());
    }
    let after = if val_set.is_empty() {
        None
    } else {
        Some(evaluate(&model, &val_set, bs, pad)?)
    };
    let after_samples = samples(&model, tok, &prompts, sample_tokens)?;
    print_report(
        &summary,
        pc,
        before,
        after,
        &prompts,
        &before_samples,
        &after_samples,
        &out,
        args.json,
    )
}

/// A run: its options as `run.toml` in the run folder, training with a progress bar, the loss
/// chart.
pub(crate) fn run_training(
    obj: &dyn Objective,
    acfg: &petal_core::AdapterConfig,
    method: &str,
    o: &TrainOpts,
    cfg: &TrainConfig,
    train_set: &[Example],
    val_set: &[Example],
) -> Result<petal_train::TrainSummary> {
    let out = &cfg.out_dir;
    let leader = cfg.group.is_leader();
    if leader {
        std::fs::create_dir_all(out).with_context(|| format!("--out {}", out.display()))?;
        petal_io::write_atomic(&out.join("run.toml"), run_toml(o, method, acfg).as_bytes())?;
    }
    let bar = match leader {
        true => Bar::new(cfg.max_steps),
        false => ProgressBar::hidden(),
    };
    let summary = train_objective(
        obj,
        acfg,
        train_set,
        val_set,
        cfg,
        o.resume.as_deref(),
        &mut Bar(bar.clone()),
    )?;
    bar.finish();
    if leader {
        write_loss_chart(out)?;
    }
    Ok(summary)
}

impl Bar {
    /// A progress bar of `steps` steps in the trainer's style.
    fn new(steps: usize) -> ProgressBar {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    }
}

/// The trainer's settings from the options (defaults as the flags' help says).
pub(crate) fn train_config(
    o: &TrainOpts,
    out: &Path,
    pad: u32,
    fingerprint: String,
) -> Result<TrainConfig> {
    Ok(TrainConfig {
        optim: AdamWParams {
            lr: o.lr.unwrap_or(1e-3),
            weight_decay: o.weight_decay.unwrap_or(0.0),
            ..Default::default()
        },
        schedule: o
            .schedule
            .as_deref()
            .unwrap_or("cosine")
            .parse()
            .map_err(anyhow::Error::msg)?,
        warmup_steps: o.warmup_steps.unwrap_or(0),
        max_steps: o.max_steps.unwrap_or(100),
        batch_size: o.batch_size.unwrap_or(4),
        grad_accum: o.grad_accum.unwrap_or(1).max(1),
        max_grad_norm: Some(o.max_grad_norm.unwrap_or(1.0)).filter(|&x| x > 0.0),
        seed: o.seed.unwrap_or(0),
        eval_every: o.eval_every.unwrap_or(25),
        save_every: o.save_every.unwrap_or(25),
        out_dir: out.to_path_buf(),
        adapter_name: "default".into(),
        pad_id: pad,
        fingerprint,
        save_converted: o.save_as_lora.unwrap_or(false),
        grad_checkpointing: o.grad_checkpointing.unwrap_or(false),
        balanced_tasks: task_sampling(o)? == "balanced",
        group_by_length: o.group_by_length.unwrap_or(false),
        prox_mu: o.prox_mu.unwrap_or(0.0),
        group: crate::ranks::group()?,
    })
}

fn samples(
    model: &petal_models::Llama,
    tok: &petal_data::Tokenizer,
    prompts: &[String],
    n: usize,
) -> Result<Vec<String>> {
    prompts
        .iter()
        .map(|p| gen_cmd::complete(model, tok, p, n))
        .collect()
}

/// The run's options as a TOML run file: the flags, and the adapter's options as the method's
/// table (so `--config run.toml` repeats the run).
pub(crate) fn run_toml(o: &TrainOpts, method: &str, acfg: &petal_core::AdapterConfig) -> String {
    let mut o = o.clone();
    o.set = None;
    let mut t = toml::Table::try_from(&o).unwrap_or_default();
    let opts: toml::Table = acfg
        .options
        .iter()
        .filter(|(_, v)| !v.is_null())
        .filter_map(|(k, v)| Some((k.clone(), toml::Value::try_from(v).ok()?)))
        .collect();
    t.insert(method.to_string(), toml::Value::Table(opts));
    toml::to_string(&t).unwrap_or_default()
}
