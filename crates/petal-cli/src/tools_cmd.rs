//! `petal eval`, `merge`, `inspect`, `forward`, `assets`.

use crate::common::data_files;
use crate::gen_cmd::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use petal_core::{Adaptable, ParamCount};
use petal_data::{load_examples, DataOptions};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// .jsonl / .txt file, folder, or asset:NAME[/file]: loss and perplexity
    #[arg(long, default_value = "")]
    pub data: String,
    /// Accuracy on a task instead: a built-in (gsm8k, elementary_math_qa, multiemo,
    /// spamassassin, mmlu) or a JSONL file of `{"prompt", "choices", "answer": INDEX}` (multiple
    /// choice) or `{"prompt", "answer"}` (generation, exact match) examples, each with an
    /// optional `"task"`
    #[arg(long, default_value = "")]
    pub task: String,
    /// Generation tasks: how answers are read before matching: whole (trimmed), last-number,
    /// or a regex whose first group is the answer (gsm8k: last-number)
    #[arg(long, default_value = "")]
    pub extract: String,
    /// With --task: ask each prompt through the model's chat template, as lm-evaluation-harness's
    /// --apply_chat_template does (the task's description a system turn, the prompt a user
    /// turn, the answer the assistant's; choices without their leading space; no blank-line stop)
    #[arg(long)]
    pub chat: bool,
    /// Generation tasks: stop strings (repeatable; default: a blank line, gsm8k's "Question:")
    #[arg(long)]
    pub stop: Vec<String>,
    /// Generation tasks: the most tokens generated per example
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// With --task: write one JSON line an example here (the choices' log-likelihoods, or the
    /// generated text and what the extractor read; whether it was right)
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// With --task: write the task's examples (after --tasks and --max-examples) here in the
    /// task-file form, generation examples with their extractor and stops, and stop without
    /// loading a model (to split a built-in task, or train on one)
    #[arg(long)]
    pub dump_task: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Score at most this many sequences (0 = all)
    #[arg(long, default_value_t = 0)]
    pub max_examples: usize,
    /// Multi-task data: score only these tasks (comma-separated `task` values)
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// causal-lm (loss and perplexity) | seq-cls (a BERT encoder's classifier on `{"text",
    /// "label"}` data: loss, accuracy and macro-F1)
    #[arg(long, default_value = "causal-lm")]
    pub task_type: String,
    #[arg(long)]
    pub json: bool,
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    crate::common::at_least(1, &[("batch-size", a.batch_size)])?;
    match (a.data.is_empty(), a.task.is_empty()) {
        (true, true) => bail!("petal eval: give --data (loss, perplexity) or --task (accuracy)"),
        (false, false) => bail!("petal eval: --data and --task: give one"),
        (true, false) => return run_task(&a),
        (false, true) => {}
    }
    crate::common::check_seq_len(a.seq_len)?;
    if crate::classify_cmd::is_seq_cls(Some(&a.task_type))? {
        let r = crate::classify_cmd::eval(
            &a.model.model,
            &a.model.adapter,
            &a.data,
            a.seq_len,
            a.batch_size,
            a.max_examples,
        )?;
        let (acc, f1) = (r.accuracy.unwrap_or(0.0), r.macro_f1.unwrap_or(0.0));
        if a.json {
            let j = serde_json::json!({"loss": r.loss, "accuracy": acc, "macro_f1": f1, "examples": r.tokens});
            println!("{j}");
        } else {
            println!(
                "loss {:.4}  accuracy {acc:.4}  macro-F1 {f1:.4}  over {} examples",
                r.loss, r.tokens
            );
        }
        return Ok(());
    }
    let lm = a.model.load()?;
    let opts = DataOptions {
        max_seq_len: a.seq_len,
        pack: false,
    };
    let mut ex = Vec::new();
    for f in data_files(&a.data)? {
        ex.extend(load_examples(&f, &lm.tokenizer, &opts)?);
    }
    if !a.tasks.is_empty() {
        ex = petal_data::select_tasks(ex, &a.tasks, "--tasks")?;
    }
    if a.max_examples > 0 {
        ex.truncate(a.max_examples);
    }
    let r = petal_train::evaluate(
        &lm.model,
        &ex,
        a.batch_size,
        lm.tokenizer.eos_id.unwrap_or(0),
    )?;
    if a.json {
        let mut j = serde_json::json!({"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens, "sequences": ex.len()});
        if !r.tasks.is_empty() {
            j["tasks"] = serde_json::to_value(&r.tasks)?;
        }
        println!("{j}");
    } else {
        println!(
            "loss {:.4}  perplexity {:.2}  over {} tokens in {} sequences",
            r.loss,
            r.perplexity,
            r.tokens,
            ex.len()
        );
        for (t, l) in &r.tasks {
            println!("  task {t}: loss {:.4} over {} tokens", l.loss, l.tokens);
        }
    }
    Ok(())
}

/// `petal eval --task`: accuracy, per task, with a progress bar.
fn run_task(a: &EvalArgs) -> Result<()> {
    crate::common::at_least(1, &[("max-new-tokens", a.max_new_tokens)])?;
    for (flag, p) in [("--samples", &a.samples), ("--dump-task", &a.dump_task)] {
        if let Some(p) = p {
            crate::common::check_path(flag, p)?;
            if p.is_dir() {
                bail!(
                    "{flag} {}: a folder is there; give a file's path",
                    p.display()
                );
            }
        }
    }
    // a dump keeps the task's stops whole: `--chat` drops the blank-line one when it is asked
    let chat = a.chat && a.dump_task.is_none();
    let (mut ex, scoring) =
        crate::task_cmd::load(&a.task, &a.extract, &a.stop, a.max_new_tokens, chat)?;
    if !a.tasks.is_empty() {
        let known: std::collections::BTreeSet<&str> = ex.iter().map(|e| e.task.as_str()).collect();
        if let Some(t) = a.tasks.iter().find(|t| !known.contains(t.as_str())) {
            let known: Vec<&str> = known.into_iter().collect();
            bail!(
                "--tasks: no task `{t}` in {} (tasks: {})",
                a.task,
                known.join(", ")
            );
        }
        ex.retain(|e| a.tasks.contains(&e.task));
    }
    if a.max_examples > 0 {
        ex.truncate(a.max_examples);
    }
    if let Some(p) = &a.dump_task {
        crate::task_cmd::dumpable(&ex, &scoring)?;
        let text: String = ex
            .iter()
            .map(|e| format!("{}\n", crate::task_cmd::as_json(e, &scoring)))
            .collect();
        petal_io::write_atomic(p, text.as_bytes())?;
        eprintln!("{} examples of {} -> {}", ex.len(), a.task, p.display());
        return Ok(());
    }
    let lm = a.model.load()?;
    if a.chat {
        let t = lm
            .tokenizer
            .chat_template
            .as_ref()
            .with_context(|| format!("--chat: {} has no chat template", a.model.model))?;
        ex = ex
            .iter()
            .map(|e| petal_data::tasks::chatted(e, t))
            .collect::<petal_data::Result<_>>()?;
    }
    let bar = crate::common::progress(ex.len() as u64, "examples");
    let (r, samples) =
        crate::task_cmd::evaluate(&lm.model, &lm.tokenizer, &ex, &scoring, a.batch_size, &bar)?;
    bar.finish_and_clear();
    if let Some(p) = &a.samples {
        let text: String = samples.iter().map(|s| format!("{s}\n")).collect();
        petal_io::write_atomic(p, text.as_bytes())?;
    }
    if a.json {
        println!("{r}");
        return Ok(());
    }
    let line = |name: &str, v: &serde_json::Value| {
        let mut s = format!(
            "{name}: accuracy {:.4} over {} examples",
            v["accuracy"].as_f64().unwrap_or(0.0),
            v["examples"]
        );
        if let Some(n) = v["acc_norm"].as_f64() {
            s += &format!("  acc_norm {n:.4}");
        }
        if let Some(u) = v["unmatched"].as_u64().filter(|&u| u > 0) {
            s += &format!("  ({u} answers the extractor did not find)");
        }
        s
    };
    println!("{}", line(&a.task, &r));
    if let Some(tasks) = r["tasks"].as_object() {
        for (t, v) in tasks {
            println!("  {}", line(t, v));
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output: a Hugging Face model folder (config, safetensors, tokenizer), or with
    /// `--format gguf` a GGUF file llama.cpp loads (with no --adapter: the model converted)
    #[arg(long)]
    pub out: PathBuf,
    /// hf | gguf (2-D tensors in --quantize's type: f16 by default, f32, bf16, q8_0, q4_k, ...)
    #[arg(long, default_value = "hf")]
    pub format: String,
}

pub fn run_merge(a: MergeArgs) -> Result<()> {
    if a.model.dtype == "quantized" {
        bail!(
            "--dtype quantized: merging rewrites the weights, which stay quantized under it; \
             merge with --dtype f32 or bf16 (an adapter trained over the quantized base merges \
             into its dequantized weights)"
        );
    }
    let gguf_type = match a.format.as_str() {
        "hf" if !a.model.quantize.is_empty() => bail!(
            "--quantize {} with --format hf: a merged HF folder is written in --dtype; \
             quantized merges are GGUF files (--format gguf)",
            a.model.quantize
        ),
        "hf" => None,
        "gguf" => Some(petal_io::gguf_out::out_type(
            match a.model.quantize.as_str() {
                "" => "f16",
                q => q,
            },
        )?),
        other => bail!("--format `{other}` is not one of hf, gguf"),
    };
    let inputs = crate::common::input_paths(&a.model.model, &a.model.adapter);
    match gguf_type {
        Some(_) => crate::common::check_out_file(&a.out, &inputs)?,
        None => crate::common::check_out_folder(&a.out, &inputs)?,
    }
    let model = ModelArgs {
        quantize: String::new(), // the output's type here, not the load's
        ..a.model.clone()
    };
    let mut lm = model.load()?;
    // an L4Q adapter's codes, to store as they are where the GGUF type is its grid's
    let grids = match gguf_type {
        Some(_) => quant_grids(&lm.model)?,
        None => HashMap::new(),
    };
    petal_core::inject::merge_and_unload_all(&mut lm.model)?;
    match gguf_type {
        Some(ty) => export_gguf(&mut lm, &a.out, ty, grids)?,
        None => export_hf(&mut lm, &a.out)?,
    }
    match a.model.adapter.len() {
        0 => println!("wrote the model, no adapter merged, to {}", a.out.display()),
        n => println!("merged {n} adapter(s) into {}", a.out.display()),
    }
    Ok(())
}

/// The quantization grids of the adapter layers that quantize (L4Q) and are their module's only
/// adapter (with others, the merge is quantized again), by the HF name of the weight they make.
fn quant_grids(m: &petal_models::Llama) -> Result<HashMap<String, petal_core::QuantGrid>> {
    let mut grids = HashMap::new();
    for l in m.linears() {
        // only where the L4Q layer is the module's one adapter: its codes are then the merge
        if let [name] = &l.adapter_names()[..] {
            if let Some(g) = l
                .layer(name)
                .map(|layer| layer.grid())
                .transpose()?
                .flatten()
            {
                grids.insert(format!("{}.weight", l.path()), g);
            }
        }
    }
    Ok(grids)
}

/// Write the (merged) model as one GGUF file llama.cpp loads, 2-D tensors in `ty` (the weights
/// in `grids`, L4Q's, as their own codes where `ty` is their grid's type: Q4_1).
pub fn export_gguf(
    lm: &mut petal_io::LoadedModel,
    out: &std::path::Path,
    ty: petal_ops::quant::GgmlDType,
    grids: HashMap<String, petal_core::QuantGrid>,
) -> Result<()> {
    settle_for_export(&mut lm.model)?;
    let tok = lm
        .tokenizer
        .to_bpe_parts()
        .with_context(|| format!("{}: the tokenizer", out.display()))?;
    let tensors = lm.model.named_base_tensors()?;
    let f16 = petal_io::gguf_out::write_model(out, &lm.model.cfg, tensors, grids, &tok, ty)?;
    note_f16(&f16, ty);
    Ok(())
}

/// A line on stderr for tensors written in f16 rather than `ty` (rows not whole blocks).
pub fn note_f16(names: &[String], ty: petal_ops::quant::GgmlDType) {
    if let Some(first) = names.first() {
        eprintln!(
            "note: {} tensor(s) ({first}, ...) have rows that are not whole {} blocks: written \
             in f16, as llama.cpp's tools do",
            names.len(),
            petal_ops::quant::type_name(ty)
        );
    }
}

/// The model's config and biases as a file must state them: q/k/v biases all or none, and the
/// head untied where merging gave it its own weight.
fn settle_for_export(m: &mut petal_models::Llama) -> Result<()> {
    m.complete_bias_groups()?;
    if !m.head_is_tied() {
        m.cfg.tie_word_embeddings = false;
    }
    Ok(())
}

/// Write the (merged) model as a Hugging Face folder: config.json, model.safetensors,
/// tokenizer, built whole beside `out` and moved into place (never half-written).
pub fn export_hf(lm: &mut petal_io::LoadedModel, out: &std::path::Path) -> Result<()> {
    settle_for_export(&mut lm.model)?;
    let tensors: HashMap<String, Tensor> = lm.model.named_base_tensors()?.into_iter().collect();
    let dt = match lm.model.dtype() {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    let cfg = serde_json::to_string_pretty(&lm.model.cfg.to_hf_json(dt))?;
    let tokenizer = &lm.tokenizer;
    petal_io::write_dir_atomic(out, |tmp| {
        petal_io::write_safetensors_atomic(&tmp.join("model.safetensors"), &tensors)?;
        petal_io::write_atomic(&tmp.join("config.json"), cfg.as_bytes())?;
        petal_io::mark_output(tmp, "merge")?;
        tokenizer
            .save(tmp)
            .map_err(|e| petal_core::Error::msg(format!("{}: {e}", out.display())))
    })?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run_inspect(a: InspectArgs) -> Result<()> {
    let lm = a.model.load()?;
    let m = &lm.model;
    let pc = ParamCount::of(m);
    let mut modules = Vec::new();
    for l in m.linears() {
        for n in l.adapter_names() {
            let layer = l.layer(n).context("adapter vanished")?;
            let shapes: Vec<_> = layer
                .tensors()
                .iter()
                .map(|t| (t.name, t.var.as_tensor().dims().to_vec()))
                .collect();
            let params: usize = layer
                .tensors()
                .iter()
                .map(|t| t.var.as_tensor().elem_count())
                .sum();
            modules.push(serde_json::json!({"module": l.path(), "adapter": n, "base": [l.out_features(), l.in_features()], "params": params, "tensors": shapes}));
        }
    }
    if a.json {
        let v = serde_json::json!({
            "architecture": m.cfg.model_type, "layers": m.cfg.num_hidden_layers, "hidden": m.cfg.hidden_size,
            "heads": m.cfg.num_attention_heads, "kv_heads": m.cfg.num_key_value_heads, "vocab": m.cfg.vocab_size,
            "tied_head": m.cfg.tie_word_embeddings, "params": pc, "adapted_modules": modules,
        });
        println!("{v}");
        return Ok(());
    }
    let c = &m.cfg;
    println!("architecture {} | {} layers | hidden {} | heads {} (kv {}) | head_dim {} | vocab {} | rope_theta {} | tied head {}",
        c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size, c.rope_theta, c.tie_word_embeddings);
    println!("{pc}");
    for md in &modules {
        println!(
            "  {} [{}] base {} params {} {}",
            md["module"].as_str().unwrap_or(""),
            md["adapter"].as_str().unwrap_or(""),
            md["base"],
            md["params"],
            md["tensors"]
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token ids: rows separated by `;`, ids by `,` (rows of equal length)
    #[arg(long)]
    pub input_ids: String,
    /// Output safetensors file with key `logits` [batch, seq, vocab] (f32)
    #[arg(long)]
    pub out: PathBuf,
    /// A mixed-adapter batch: the adapter of each row, comma-separated (`__base__`: none), as
    /// PEFT's `adapter_names`
    #[arg(long, value_delimiter = ',')]
    pub adapter_names: Vec<String>,
}

pub fn parse_ids(s: &str) -> Result<(Vec<u32>, usize, usize)> {
    let rows: Vec<Vec<u32>> = s
        .split(';')
        .map(|r| {
            r.split(',')
                .map(|x| {
                    x.trim()
                        .parse::<u32>()
                        .with_context(|| format!("bad token id `{x}`"))
                })
                .collect()
        })
        .collect::<Result<_>>()?;
    let len = rows.first().map(Vec::len).unwrap_or(0);
    if len == 0 || rows.iter().any(|r| r.len() != len) {
        bail!("--input-ids: every row must hold the same, non-zero number of ids");
    }
    let n = rows.len();
    Ok((rows.into_iter().flatten().collect(), n, len))
}

pub fn run_forward(a: ForwardArgs) -> Result<()> {
    let inputs = crate::common::input_paths(&a.model.model, &a.model.adapter);
    crate::common::check_out_file(&a.out, &inputs)?;
    let lm = a.model.load()?;
    let (ids, b, t) = parse_ids(&a.input_ids)?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= lm.model.vocab_size()) {
        bail!(
            "token id {bad} is outside the vocabulary of {}",
            lm.model.vocab_size()
        );
    }
    let x = Tensor::from_vec(ids, (b, t), lm.model.device())?;
    let ctx = if a.adapter_names.is_empty() {
        petal_core::Ctx::eval()
    } else {
        let rows: Vec<&str> = a.adapter_names.iter().map(String::as_str).collect();
        petal_core::rows_ctx(&lm.model, &rows)?
    };
    let logits = lm.model.forward(&x, None, &ctx)?.to_dtype(DType::F32)?;
    let mut m = HashMap::new();
    m.insert("logits".to_string(), logits);
    petal_io::write_safetensors_atomic(&a.out, &m)?;
    println!(
        "wrote logits [{b}, {t}, {}] to {}",
        lm.model.vocab_size(),
        a.out.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct AssetsArgs {
    /// Assets to fetch (default: all)
    pub names: Vec<String>,
    /// List the assets without fetching
    #[arg(long)]
    pub list: bool,
}

pub fn run_assets(a: AssetsArgs) -> Result<()> {
    use crate::assets::{ensure, ASSETS};
    if a.list {
        for x in ASSETS {
            println!("{:<12} {} ({})", x.name, x.what, x.package);
        }
        return Ok(());
    }
    let names: Vec<String> = if a.names.is_empty() {
        ASSETS.iter().map(|x| x.name.to_string()).collect()
    } else {
        a.names
    };
    // each one tried (a registry without one package leaves the others fetched), the failures
    // said and counted at the end
    let mut failed = Vec::new();
    for n in &names {
        match ensure(n) {
            Ok(p) => println!("{n}\t{}", p.display()),
            Err(e) => {
                eprintln!("{n}: {e:#}");
                failed.push(n.as_str());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} assets could not be fetched: {}",
            failed.len(),
            names.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
