//! `petal export`: an adapter in another tool's format. Today llama.cpp's LoRA GGUF layout
//! (`--format gguf-lora`), which `llama-cli --lora FILE` and `llama-server --lora FILE` load
//! over the base model's GGUF, and which petal reads back as `--adapter FILE.gguf`.

use crate::gen_cmd::ModelArgs;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The base model and the one LoRA adapter to export (`--adapter`); `--quantize` is the
    /// file's tensor type: f32 (default), f16, bf16, q8_0
    #[command(flatten)]
    pub model: ModelArgs,
    /// gguf-lora
    #[arg(long, default_value = "gguf-lora")]
    pub format: String,
    /// The file written (`.gguf`)
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_export(a: ExportArgs) -> Result<()> {
    if a.format != "gguf-lora" {
        bail!("--format `{}` is not one of gguf-lora", a.format);
    }
    let [adapter] = &a.model.adapter[..] else {
        bail!(
            "--adapter: give exactly one LoRA adapter to export ({} given)",
            a.model.adapter.len()
        );
    };
    let ty = petal_io::gguf_out::out_type(match a.model.quantize.as_str() {
        "" => "f32",
        q => q,
    })?;
    let inputs = crate::common::input_paths(&a.model.model, &a.model.adapter);
    crate::common::check_out_file(&a.out, &inputs)?;
    let model = ModelArgs {
        quantize: String::new(), // the file's type here, not the load's
        adapter: vec![],
        ..a.model.clone()
    };
    let mut lm = model.load()?;
    let dir = adapter.clone();
    let (cfg, _) = petal_io::attach_adapter(&mut lm.model, &dir, "default")
        .with_context(|| format!("loading adapter {}", dir.display()))?;
    let tensors = petal_io::adapter_tensors(&lm.model, "default");
    let f16 = petal_io::gguf_out::write_lora(&a.out, &lm.model.cfg, &cfg, &tensors, ty)?;
    crate::tools_cmd::note_f16(&f16, ty);
    println!(
        "wrote {} ({} tensors, llama.cpp LoRA layout)",
        a.out.display(),
        tensors.len()
    );
    Ok(())
}
