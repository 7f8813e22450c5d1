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
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The most completions generated together (those waiting when the server turns to them)
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// The most tokens one request may ask for (`max_tokens` above it is refused with a 400)
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
}

pub fn run(a: ServeArgs) -> Result<()> {
    crate::common::at_least(
        1,
        &[("max-batch", a.max_batch), ("max-tokens", a.max_tokens)],
    )?;
    let lm = a.model.load()?;
    let served = petal_serve::Served {
        model: &lm.model,
        tokenizer: &lm.tokenizer,
        model_id: a.model.model.clone(),
        max_batch: a.max_batch,
        max_tokens: a.max_tokens,
    };
    let addr = format!("{}:{}", a.host, a.port);
    let http = tiny_http::Server::http(&addr)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("listening on {addr}"))?;
    let bound = http
        .server_addr()
        .to_ip()
        .map(|s| s.to_string())
        .unwrap_or(addr);
    let adapters = served.adapters();
    eprintln!(
        "petal serve: http://{bound} (model `{}`; adapters: {}); POST /v1/completions, /v1/chat/completions",
        served.model_id,
        if adapters.is_empty() { "none".to_string() } else { adapters.join(", ") }
    );
    served.serve(&http)?;
    Ok(())
}
