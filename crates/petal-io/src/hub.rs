//! Resolving a `--model` argument: a local HF folder, a `.gguf` file, or a hub id
//! (`HuggingFaceTB/SmolLM2-135M`) fetched through hf-hub when online.

use petal_core::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum ModelSource {
    HfFolder(PathBuf),
    Gguf(PathBuf),
}

const HUB_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

pub fn resolve(spec: &str) -> Result<ModelSource> {
    let p = Path::new(spec);
    if p.is_file() && p.extension().is_some_and(|e| e == "gguf") {
        return Ok(ModelSource::Gguf(p.to_path_buf()));
    }
    if p.is_dir() {
        if !p.join("config.json").exists() {
            return Err(Error::msg(format!(
                "{}: folder has no config.json (not a Hugging Face model folder)",
                p.display()
            )));
        }
        return Ok(ModelSource::HfFolder(p.to_path_buf()));
    }
    if p.exists() {
        return Err(Error::msg(format!(
            "{}: not a .gguf file or a model folder",
            p.display()
        )));
    }
    let looks_like_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with(".gguf");
    if !looks_like_id {
        return Err(Error::msg(format!("{spec}: no such file or folder")));
    }
    download(spec)
}

fn download(id: &str) -> Result<ModelSource> {
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        return Err(Error::msg(format!(
            "{id}: not a local path, and HF_HUB_OFFLINE=1 forbids the hub"
        )));
    }
    let offline = |e: String| {
        Error::msg(format!(
            "{id}: not a local path and the Hugging Face hub is unreachable ({e}); pass a model folder or .gguf file (see `petal assets`)"
        ))
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .map_err(|e| offline(e.to_string()))?;
    let repo = api.model(id.to_string());
    let cfg = repo
        .get("config.json")
        .map_err(|e| offline(e.to_string()))?;
    let dir = cfg.parent().map(Path::to_path_buf).unwrap_or_default();
    for f in HUB_FILES.iter().skip(1) {
        let _ = repo.get(f); // optional files
    }
    if repo.get("model.safetensors").is_err() {
        let idx = repo
            .get("model.safetensors.index.json")
            .map_err(|e| offline(e.to_string()))?;
        let text = std::fs::read_to_string(&idx).map_err(|e| Error::io(&idx, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::msg(e.to_string()))?;
        let mut shards: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            repo.get(&s).map_err(|e| offline(e.to_string()))?;
        }
    }
    Ok(ModelSource::HfFolder(dir))
}
