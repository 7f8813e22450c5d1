//! Pieces every subcommand shares: resolving `asset:` specs, loading a model with adapters,
//! devices and dtypes.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use petal_io::{load_model, LoadedModel};
use std::path::{Path, PathBuf};

/// `asset:NAME[/sub/path]` -> the cached asset path; anything else unchanged.
pub fn resolve_spec(spec: &str) -> Result<String> {
    let Some(rest) = spec.strip_prefix("asset:") else {
        return Ok(spec.to_string());
    };
    let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
    let mut p: PathBuf = crate::assets::ensure(name)?;
    if !sub.is_empty() {
        p = p.join(sub);
        if !p.exists() {
            bail!("{}: not found inside asset `{name}`", p.display());
        }
    }
    Ok(p.to_string_lossy().into_owned())
}

pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let explicit = s
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()
                .context("device index")?;
            // under several ranks, `cuda` is each rank's own GPU (its local rank)
            let idx = crate::ranks::cuda_ordinal(explicit);
            let hint = if cfg!(feature = "cuda") {
                "no usable CUDA device"
            } else {
                "this build has no CUDA: build with --features cuda"
            };
            Device::new_cuda(idx).with_context(|| format!("device `{s}`: {hint}"))
        }
        o => bail!("device `{o}` is not cpu, cuda or cuda:N"),
    }
}

pub fn dtype(s: &str) -> Result<DType> {
    Ok(petal_io::parse_dtype(s)?)
}

/// `--dtype` with `--bf16-activations` (bf16 activations on the CPU); an error unless the
/// weights are bf16. The kernels come from the environment: `PETAL_FUSED=0` candle's composed
/// ops everywhere instead of petal's fused CPU kernels (the path a GPU takes; the reference
/// the kernels are tested against), `PETAL_CUDA_KERNELS` petal's CUDA kernel families.
///
/// `quantized` keeps a GGUF file's quantized linears in their blocks (f32 everywhere else).
///
/// `quantize` (`--quantize TYPE`, empty for none) quantizes the weights at load.
pub fn precision(
    dt: &str,
    bf16_activations: bool,
    quantize: &str,
) -> Result<petal_models::Precision> {
    let quantized = dt == "quantized";
    let weights = if quantized {
        DType::F32
    } else {
        dtype(dt).map_err(|e| anyhow::anyhow!("--dtype: {e} or quantized"))?
    };
    if bf16_activations && weights != DType::BF16 {
        anyhow::bail!("--bf16-activations needs --dtype bf16 (the weights' dtype is {weights:?})");
    }
    Ok(petal_models::Precision {
        weights,
        quantized,
        quantize: quantize_type(quantize, quantized)?,
        bf16_activations,
        kernels: petal_ops::Kernels::from_env(),
    })
}

/// `--quantize TYPE`: a quantizer by name (llama.cpp's GGML types q4_0 ... q6_k, nf4, int4).
fn quantize_type(
    s: &str,
    quantized: bool,
) -> Result<Option<&'static dyn petal_ops::quant::Quantizer>> {
    if s.is_empty() {
        return Ok(None);
    }
    if quantized {
        bail!("--quantize {s} with --dtype quantized: the first quantizes f32/bf16 weights at load, the second keeps a GGUF file's blocks; give one");
    }
    petal_ops::quant::quantizer(s)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("--quantize {e}"))
}

/// Checks before any work that `--out PATH` can be written: its nearest existing ancestor is a
/// folder this process can create files in (nothing is created). The error names the path and
/// why.
pub fn check_out(path: &Path) -> Result<()> {
    check_path("--out", path)
}

/// `check_out` for the output `flag` names (`--samples FILE`, say).
pub fn check_path(flag: &str, path: &Path) -> Result<()> {
    let mut at = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    if at.is_dir() {
        return writable(flag, path, &at);
    }
    if at.exists() && path.extension().is_some() {
        // an output file that exists is replaced: its folder must take the new one
        at.pop();
        return writable(flag, path, &at);
    }
    while !at.exists() {
        if !at.pop() {
            bail!("{flag} {}: no existing folder above it", path.display());
        }
    }
    if !at.is_dir() {
        bail!(
            "{flag} {}: {} is a file, not a folder",
            path.display(),
            at.display()
        );
    }
    writable(flag, path, &at)
}

/// The files of a model folder petal writes (`merge`, `quantize`): an `--out` folder holding
/// only these is an earlier output, replaced whole; anything else in it is refused.
fn model_folder_file(name: &str) -> bool {
    const NAMES: [&str; 12] = [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
    ];
    NAMES.contains(&name) || (name.starts_with("model") && name.ends_with(".safetensors"))
}

/// `check_out` for a command that writes a whole model folder at `path` (replacing what is
/// there): refused where `path` is a file, is or holds one of the command's `inputs` (the
/// model, the adapters), or is not empty and not an earlier output of petal's (its
/// `OUTPUT_MARKER` and a model folder's files, nothing else), since replacing it would delete
/// what it holds.
pub fn check_out_folder(path: &Path, inputs: &[PathBuf]) -> Result<()> {
    if path.file_name().is_none() {
        bail!(
            "--out {}: give the output folder's own name",
            path.display()
        );
    }
    check_out(path)?;
    if !path.exists() {
        return Ok(());
    }
    if !path.is_dir() {
        bail!(
            "--out {}: a file is there, and this writes a folder: remove it or choose another path",
            path.display()
        );
    }
    check_not_input(path, inputs)?;
    let entries: Vec<_> = std::fs::read_dir(path)
        .with_context(|| format!("--out {}", path.display()))?
        .flatten()
        .collect();
    let marker = petal_io::OUTPUT_MARKER;
    if !entries.is_empty() && !path.join(marker).is_file() {
        bail!(
            "--out {}: it holds files petal did not write (no {marker} there), and the output \
             replaces the whole folder: choose another --out, or empty it",
            path.display()
        );
    }
    for e in entries {
        let name = e.file_name().to_string_lossy().to_string();
        let file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !file || !(model_folder_file(&name) || name == marker) {
            bail!(
                "--out {}: it holds {name}, which is not part of a model folder, and the output \
                 replaces the whole folder: choose another --out, or remove {name}",
                path.display()
            );
        }
    }
    Ok(())
}

/// `check_out` for a command that writes one file at `path`: refused where that file is one
/// of `inputs` or lies inside an input folder (an adapter's own weights, say).
pub fn check_out_file(path: &Path, inputs: &[PathBuf]) -> Result<()> {
    check_out(path)?;
    if path.is_dir() {
        bail!(
            "--out {}: a folder is there, and this writes a file: give the file's path",
            path.display()
        );
    }
    if path.exists() {
        check_not_input(path, inputs)?;
    }
    Ok(())
}

/// Refuses an existing `out` that is one of `inputs` or holds one (compared as canonical
/// paths), or an existing file of an input folder that the input reads (its weights, config).
fn check_not_input(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    let Ok(at) = out.canonicalize() else {
        return Ok(());
    };
    for input in inputs {
        let Ok(inp) = input.canonicalize() else {
            continue;
        };
        let name = at.file_name().unwrap_or_default().to_string_lossy();
        let read = name.starts_with("adapter_") || model_folder_file(&name);
        let inside = at.is_file() && inp.is_dir() && at.starts_with(&inp) && read;
        if inp == at || inp.starts_with(&at) || inside {
            bail!(
                "--out {}: it is or holds this command's input {}, which writing the output \
                 would replace: choose another --out",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// The paths a model command reads: the model (where it is a path) and each `--adapter`
/// folder, for `check_out_folder` and `check_out_file`.
pub fn input_paths(model: &str, adapters: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| adapter_name(i, a).1)
        .collect();
    if Path::new(model).exists() {
        v.push(PathBuf::from(model));
    }
    v
}

/// The run folder `--out` (default: the `--resume` run's own, else runs/latest), checked
/// before anything is written: a `--resume` that names no checkpoint, or a folder holding
/// another run's checkpoints or adapter without `--resume` or `--overwrite true`, is refused.
/// Without `--out`, `--resume RUN` or `RUN/checkpoints/step-N` continues in RUN, from its
/// latest checkpoint only (an earlier one would overwrite the steps after it) unless
/// `--overwrite true`; a checkpoint outside a run folder needs `--out`.
pub fn run_folder(
    out: Option<PathBuf>,
    resume: Option<&Path>,
    overwrite: Option<bool>,
) -> Result<PathBuf> {
    let overwrite = overwrite.unwrap_or(false);
    let resumed = match resume {
        None => None,
        Some(r) => {
            let ck =
                petal_train::checkpoint::resolve(r).map_err(|e| anyhow::anyhow!("--resume {e}"))?;
            if !ck.exists() {
                bail!(
                    "--resume {}: its latest checkpoint {} is missing",
                    r.display(),
                    ck.display()
                );
            }
            let up = r
                .parent()
                .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"));
            match (r.join("checkpoints").exists(), up.and_then(Path::parent)) {
                (true, _) => Some(r.to_path_buf()),
                (false, Some(run)) if out.is_none() => {
                    let latest = petal_train::checkpoint::resolve(run)?;
                    if latest.canonicalize()? != ck.canonicalize()? && !overwrite {
                        bail!("--resume {}: not {}'s latest checkpoint ({}), and continuing in {1} would overwrite the steps after it: give --out for a new run folder, or --overwrite true", r.display(), run.display(), latest.display());
                    }
                    Some(run.to_path_buf())
                }
                _ if out.is_none() => bail!(
                    "--resume {}: a checkpoint outside a run folder: give --out for the run",
                    r.display()
                ),
                _ => None,
            }
        }
    };
    let out = out
        .or(resumed)
        .unwrap_or_else(|| PathBuf::from("runs/latest"));
    check_out(&out)?;
    let has = |part: &str| out.join(part).exists();
    if resume.is_none() && !overwrite {
        if has("checkpoints") {
            bail!("{}: run folder already has checkpoints; pass --resume {0} to continue or --overwrite true to start over", out.display());
        }
        if has("adapter") {
            bail!("{}: the folder already holds an adapter (a finished run?); pass --overwrite true to replace it, or choose another --out", out.display());
        }
    }
    Ok(out)
}

/// Refuses a training batch whose activations cannot fit before any step allocates them (on
/// the CPU): a lower bound of what the backward pass keeps against `--max-memory`, or this
/// machine's memory where none was given. Per token (`batch` sequences of up to `seq`): with
/// `checkpointing`, every decoder layer's input; without, from the first layer holding an
/// adapted module on (the layers before it record nothing), the layer's input, the attention
/// output and the MLP's gate, up and product.
pub fn check_activations(
    model: &petal_models::Llama,
    (batch, seq): (usize, usize),
    first_adapted: Option<usize>,
    checkpointing: bool,
    limit: &petal_core::MemoryLimit,
) -> Result<()> {
    let cfg = &model.cfg;
    if !model.device().is_cpu() {
        return Ok(()); // the device's memory is another matter
    }
    let (h, inter, layers) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
    );
    let (per_token, kept) = match (checkpointing, first_adapted) {
        (true, _) => (h, layers),
        (false, Some(first)) => (2 * h + 3 * inter, layers.saturating_sub(first)),
        (false, None) => (0, 0),
    };
    let tokens = (batch as u64).saturating_mul(seq as u64);
    let floor = tokens
        .saturating_mul((kept * per_token) as u64)
        .saturating_mul(model.act_dtype().size_in_bytes() as u64);
    let (cap, whose) = match limit.default {
        true => (
            petal_core::memory::physical_memory(),
            "this machine's memory",
        ),
        false => (Some(limit.bytes), "--max-memory"),
    };
    let Some(cap) = cap.filter(|&c| floor > c) else {
        return Ok(());
    };
    let human = petal_core::memory::human_bytes;
    bail!(
        "a micro-batch of {batch} sequences of up to {seq} tokens: its activations need at \
         least {} ({tokens} tokens x {kept} layers), above {whose} ({}): lower --batch-size \
         (--grad-accum keeps the batch) or --seq-len{}",
        human(floor),
        human(cap),
        if checkpointing {
            ""
        } else {
            ", or add --grad-checkpointing"
        }
    )
}

/// The decoder layer a module path lies in (`model.layers.N.…`).
pub fn layer_of(path: &str) -> Option<usize> {
    path.split("layers.")
        .nth(1)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A data spec as its file's full path where it names one (a run's fingerprint: a resume from
/// another folder names the same file), else as given (`asset:…`).
pub fn full_path(spec: &str) -> String {
    std::fs::canonicalize(spec).map_or(spec.to_string(), |p| p.display().to_string())
}

/// Whether files can be made in `dir` (a probe file, removed at once), for `check_out`.
fn writable(flag: &str, path: &Path, dir: &Path) -> Result<()> {
    tempfile::NamedTempFile::new_in(dir).map(drop).map_err(|e| {
        anyhow::anyhow!(
            "{flag} {}: cannot write in {}: {e}",
            path.display(),
            dir.display()
        )
    })
}

/// Refuses the first `(flag, value)` below `min` before any work, naming the flag:
/// "--batch-size 0 is out of range: must be at least 1".
pub fn at_least(min: usize, flags: &[(&str, usize)]) -> Result<()> {
    match flags.iter().find(|(_, v)| *v < min) {
        Some((flag, v)) => bail!("--{flag} {v} is out of range: must be at least {min}"),
        None => Ok(()),
    }
}

/// `--seq-len` of a command that scores next tokens: at least a token and its successor.
pub fn check_seq_len(n: usize) -> Result<()> {
    if n < 2 {
        bail!("--seq-len {n} is out of range: must be at least 2 (a token and its successor)");
    }
    Ok(())
}

/// `--max-memory`: the limit an adapter is held to (default: half of this machine's memory).
pub fn memory_limit(max_memory: Option<u64>) -> petal_core::MemoryLimit {
    max_memory.map_or_else(Default::default, petal_core::MemoryLimit::bytes)
}

/// An `--adapter` argument: `NAME=FOLDER`, or a folder named after its position ("default",
/// "a1", "a2", …).
pub fn adapter_name(i: usize, arg: &Path) -> (String, PathBuf) {
    let s = arg.to_string_lossy();
    if let Some((name, dir)) = s.split_once('=') {
        let word = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if word && !arg.exists() {
            return (name.to_string(), PathBuf::from(dir));
        }
    }
    let name = if i == 0 {
        "default".to_string()
    } else {
        format!("a{i}")
    };
    (name, arg.to_path_buf())
}

/// Load `model` in `precision` and attach each adapter folder (see [`adapter_name`]), all
/// active, under `opts` (non-finite tensors, the memory limit).
pub fn load(
    model: &str,
    adapters: &[PathBuf],
    precision: petal_models::Precision,
    dev: &str,
    opts: &petal_io::AttachOptions,
) -> Result<LoadedModel> {
    let spec = resolve_spec(model)?;
    let mut lm = load_model(&spec, precision, &device(dev)?)
        .with_context(|| format!("loading model {spec}"))?;
    let mut names: Vec<String> = Vec::new();
    for (i, a) in adapters.iter().enumerate() {
        let (name, dir) = adapter_name(i, a);
        if name == petal_core::mixed::BASE || names.contains(&name) {
            bail!("--adapter {}: the name `{name}` is taken", a.display());
        }
        let (_, _, nonfinite) = petal_io::attach_adapter_with(&mut lm.model, &dir, &name, opts)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        for key in nonfinite {
            eprintln!(
                "warning: adapter {}: tensor `{key}` holds NaN or infinite values",
                dir.display()
            );
        }
        names.push(name);
    }
    Ok(lm)
}

/// Read one data file, or every .txt/.jsonl file of a folder (sorted).
pub fn data_files(spec: &str) -> Result<Vec<PathBuf>> {
    let p = PathBuf::from(resolve_spec(spec)?);
    if p.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.extension().is_some_and(|x| x == "txt" || x == "jsonl"))
            .collect();
        v.sort();
        if v.is_empty() {
            bail!("{}: folder has no .txt or .jsonl files", p.display());
        }
        return Ok(v);
    }
    if !p.exists() {
        bail!("{}: no such file", p.display());
    }
    Ok(vec![p])
}

/// A progress bar over `len` units of `what` (`examples`, `layers`), with elapsed time and ETA.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
