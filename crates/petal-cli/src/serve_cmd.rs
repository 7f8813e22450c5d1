//! `petal serve`: the model and every `--adapter` behind an HTTP server (petal-serve's
//! `server.rs`), each request through the adapter its `model` field names.

use crate::gen_cmd::ModelArgs;
use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The base model's id in `/v1/models` and responses (default: the model file's or
    /// folder's name without extension, an asset's name, or the hub id as given)
    #[arg(long, default_value = "")]
    pub served_model_name: String,
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The most completions generated together (those waiting when the server turns to them)
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// The most tokens one request may ask for (`max_tokens` above it is refused with a 400)
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// Completions that may wait beyond the running batch (more get a 503 with Retry-After)
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// The largest request body in bytes (larger: a 413)
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Seconds a request's headers, then its body, may take to arrive (then the connection is
    /// closed, or a 408)
    #[arg(long, default_value_t = 10.0)]
    pub read_timeout: f64,
    /// On SIGTERM or SIGINT: seconds the running completions may take to finish before they
    /// are cancelled (waiting ones get a 503 at once)
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// The most prompt tokens prefilled between two decoding steps (a longer prompt is read
    /// this many a step while the others keep decoding)
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Megabytes of finished completions' KV caches kept so that a prompt beginning with the
    /// same tokens through the same adapter (a shared system prompt, earlier turns of a
    /// conversation) prefills only the rest (prefix caching; 0: off)
    #[arg(long, default_value_t = 1024)]
    pub prefix_cache_mb: usize,
    /// Request logs (one line per completion on stderr) as JSON objects instead of text
    #[arg(long)]
    pub log_json: bool,
    /// Load and unload adapters at run time from sub-folders of this folder (vLLM's
    /// POST /v1/load_lora_adapter and /v1/unload_lora_adapter; a request naming a sub-folder
    /// loads it on first use)
    #[arg(long)]
    pub adapter_dir: Option<std::path::PathBuf>,
    /// With --adapter-dir: the most adapters loaded at once, those given with --adapter
    /// included (to make room, the least recently used one not in use is unloaded)
    #[arg(long, default_value_t = 8)]
    pub max_loras: usize,
    /// With --adapter-dir: the highest rank an adapter loaded at run time may have
    #[arg(long, default_value_t = 64)]
    pub max_lora_rank: usize,
    /// With --adapter-dir: the largest weights file (bytes) an adapter loaded at run time may have
    #[arg(long, default_value_t = 1 << 30)]
    pub max_lora_bytes: u64,
}

pub fn run(a: ServeArgs) -> Result<()> {
    crate::common::at_least(
        1,
        &[
            ("max-batch", a.max_batch),
            ("max-tokens", a.max_tokens),
            ("max-body", a.max_body),
            ("prefill-chunk", a.prefill_chunk),
            ("max-loras", a.max_loras),
            ("max-lora-rank", a.max_lora_rank),
        ],
    )?;
    let secs = |flag: &str, v: f64| {
        if v.is_finite() && v > 0.0 && v <= 86_400.0 {
            Ok(std::time::Duration::from_secs_f64(v))
        } else {
            Err(anyhow::anyhow!(
                "--{flag} must be in (0, 86400] seconds, not {v}"
            ))
        }
    };
    let limits = petal_serve::Limits {
        max_body: a.max_body,
        header_timeout: secs("read-timeout", a.read_timeout)?,
        body_timeout: secs("read-timeout", a.read_timeout)?,
        max_queue: a.max_queue,
        grace: secs("shutdown-grace", a.shutdown_grace)?,
        signals: true,
        prefill_chunk: a.prefill_chunk,
        prefix_cache: a.prefix_cache_mb.saturating_mul(1 << 20),
    };
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false);
    // a second server in one process keeps the first one's logger
    let _ = if a.log_json {
        logs.json().try_init()
    } else {
        logs.try_init()
    };
    if let Some(dir) = a.adapter_dir.as_ref().filter(|d| !d.is_dir()) {
        anyhow::bail!("--adapter-dir {}: not a folder", dir.display());
    }
    let mut lm = a.model.load()?;
    let adapter_dir = match &a.adapter_dir {
        None => None,
        Some(dir) => {
            let pinned = petal_core::mixed::adapter_names(&lm.model).len();
            if pinned >= a.max_loras {
                anyhow::bail!(
                    "--max-loras {} leaves no room beside the {pinned} adapters given with \
                     --adapter (they stay loaded): raise it",
                    a.max_loras
                );
            }
            Some(petal_serve::adapters::AdapterDir {
                dir: dir.clone(),
                max_loras: a.max_loras,
                max_rank: a.max_lora_rank,
                max_bytes: a.max_lora_bytes,
            })
        }
    };
    let served = petal_serve::Served {
        model: &mut lm.model,
        tokenizer: &lm.tokenizer,
        model_id: if a.served_model_name.is_empty() {
            served_name(&a.model.model)
        } else {
            a.served_model_name.clone()
        },
        max_batch: a.max_batch,
        max_tokens: a.max_tokens,
        adapter_dir,
    };
    let addr = format!("{}:{}", a.host, a.port);
    let listener =
        std::net::TcpListener::bind(&addr).with_context(|| format!("listening on {addr}"))?;
    let bound = listener.local_addr().map(|s| s.to_string()).unwrap_or(addr);
    let adapters = served.adapters();
    eprintln!(
        "petal serve: http://{bound} (model `{}`; adapters: {}); POST /v1/completions, /v1/chat/completions",
        served.model_id,
        if adapters.is_empty() { "none".to_string() } else { adapters.join(", ") }
    );
    served.serve(listener, limits, petal_serve::Stop::default())?;
    eprintln!("petal serve: stopped");
    Ok(())
}

/// The default served name of a model argument: a path's stem (not the path, which would show
/// the server's file layout to its clients), an asset's name, a hub id as it is.
fn served_name(model: &str) -> String {
    if let Some(asset) = model.strip_prefix("asset:") {
        return asset.to_string();
    }
    let p = std::path::Path::new(model);
    match p.file_stem().and_then(|s| s.to_str()) {
        Some(stem) if p.exists() => stem.to_string(),
        _ => model.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_served_name_is_a_path_s_stem_an_asset_s_name_or_the_hub_id() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("SmolLM2-135M.Q4_1.gguf");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            super::served_name(file.to_str().unwrap()),
            "SmolLM2-135M.Q4_1"
        );
        assert_eq!(
            super::served_name(dir.path().to_str().unwrap()),
            dir.path().file_name().unwrap().to_str().unwrap()
        );
        assert_eq!(super::served_name("asset:smollm2"), "smollm2");
        assert_eq!(
            super::served_name("HuggingFaceTB/SmolLM2-135M"),
            "HuggingFaceTB/SmolLM2-135M"
        );
    }
}
