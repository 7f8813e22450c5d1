//! `petal generate` and `petal chat`.

use crate::common::load;
use anyhow::{bail, Context, Result};
use petal_data::template::Message;
use petal_data::Tokenizer;
use petal_models::Llama;
use petal_serve::{generate, SamplingParams};
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// HF folder, .gguf file, hub id, or asset:NAME
    #[arg(long, default_value = "asset:smollm2")]
    pub model: String,
    /// PEFT adapter folder(s), as FOLDER or NAME=FOLDER (unnamed: "default", "a1", "a2", …);
    /// all are active
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// f32 | bf16 | f16 | quantized (a GGUF file's quantized weights kept in their blocks)
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Quantize the model's linears at load (nf4, int4, or a GGML block type: q4_0, q4_1,
    /// q5_0, q5_1, q8_0, q2_k .. q6_k) and run over them as --dtype quantized does; with
    /// `merge --format gguf` and `export`: the file's tensor type
    #[arg(long, default_value = "")]
    pub quantize: String,
    /// With --dtype bf16 on the CPU: keep activations (and the KV cache) in bf16 too
    #[arg(long)]
    pub bf16_activations: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Load adapters whose tensors hold NaN or infinite values (with a warning) instead of
    /// refusing them
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// The most memory an adapter may take, checked from its config before loading (bytes, or
    /// with K, M, G, T: 8G); default: half of this machine's memory
    #[arg(long, value_parser = petal_core::memory::parse_bytes)]
    pub max_memory: Option<u64>,
    /// PaLoRA adapters: run at this preference (one weight >= 0 per task in the adapter's
    /// `tasks` order, summing to 1: a point of the Pareto front) instead of the saved one
    #[arg(long, value_delimiter = ',')]
    pub preference: Vec<f64>,
}

impl ModelArgs {
    /// The model with every `--adapter` attached.
    pub fn load(&self) -> Result<petal_io::LoadedModel> {
        let p = crate::common::precision(&self.dtype, self.bf16_activations, &self.quantize)?;
        let opts = petal_io::AttachOptions {
            allow_nonfinite: self.allow_nonfinite,
            limit: crate::common::memory_limit(self.max_memory),
        };
        let lm = load(&self.model, &self.adapter, p, &self.device, &opts)?;
        if !self.preference.is_empty() {
            petal_core::methods::palora::set_preference(&lm.model, None, &self.preference)
                .context("--preference")?;
        }
        Ok(lm)
    }
}

#[derive(clap::Args, Debug)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Stop when this text appears (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The sampling parameters, refused out of range (naming the flag) before any work.
    fn params(&self) -> Result<SamplingParams> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            bail!("--temperature {t} is out of range: must be finite and >= 0 (0 = greedy)");
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            bail!("--top-p {p} is out of range: must be in (0, 1]");
        }
        if self.top_k == Some(0) {
            bail!("--top-k 0 is out of range: must be at least 1");
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            bail!("--repetition-penalty {r} is out of range: must be finite and > 0");
        }
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens 0 is out of range: must be at least 1");
        }
        if self.stop.iter().any(String::is_empty) {
            bail!("--stop '' is out of range: an empty stop string would end every answer at once");
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
            seed: self.seed,
            ..Default::default()
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The prompt
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template
    #[arg(long)]
    pub chat: bool,
    /// Print one JSON object instead of streaming text
    #[arg(long)]
    pub json: bool,
}

/// Greedy completion of plain text (used for before/after samples).
pub fn complete(model: &Llama, tok: &Tokenizer, prompt: &str, n: usize) -> Result<String> {
    let ids = tok.encode(prompt, true)?;
    let p = SamplingParams {
        max_new_tokens: n,
        repetition_penalty: 1.1,
        ..Default::default()
    };
    Ok(generate(model, tok, &ids, &p, &mut |_| {})?.text)
}

fn chat_ids(tok: &Tokenizer, msgs: &[Message]) -> Result<Vec<u32>> {
    let t = tok
        .chat_template
        .as_ref()
        .context("this model has no chat template")?;
    Ok(tok.encode(&t.render(msgs, true)?, true)?)
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let lm = a.model.load()?;
    let ids = if a.chat {
        chat_ids(
            &lm.tokenizer,
            &[Message {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
        )?
    } else {
        lm.tokenizer.encode(&a.prompt, true)?
    };
    let t = std::time::Instant::now();
    let mut out = std::io::stdout();
    let stream = !a.json;
    let g = generate(&lm.model, &lm.tokenizer, &ids, &params, &mut |s| {
        if stream {
            let _ = write!(out, "{s}");
            let _ = out.flush();
        }
    })?;
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"text": g.text, "tokens": g.ids.len(), "stop": g.stop, "seconds": secs, "tokens_per_s": g.ids.len() as f64 / secs})
        );
    } else {
        println!();
        eprintln!(
            "[{} tokens, {:.1} tok/s, stop: {:?}]",
            g.ids.len(),
            g.ids.len() as f64 / secs,
            g.stop
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Optional system message
    #[arg(long)]
    pub system: Option<String>,
}

/// A conversation on stdin/stdout; `/reset` starts over, `/quit` or end of input leaves.
/// Drops the rest of a line from `r` without keeping it.
fn skip_line(r: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = r.fill_buf()?;
        let (n, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), buf.is_empty()),
        };
        r.consume(n);
        if end {
            return Ok(());
        }
    }
}

/// The longest line `petal chat` takes as one turn, in bytes.
const MAX_TURN: u64 = 1 << 20;

pub fn run_chat(a: ChatArgs) -> Result<()> {
    let params = a.sampling.params()?;
    let lm = a.model.load()?;
    if lm.tokenizer.chat_template.is_none() {
        bail!(
            "{}: this model has no chat template (petal generate runs it on plain text)",
            a.model.model
        );
    }
    let mut msgs: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    let keep = msgs.len();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("chat with {} (/reset, /quit)", a.model.model);
    loop {
        eprint!("> ");
        // a turn is one line of at most MAX_TURN bytes, in UTF-8
        let mut raw = Vec::new();
        let mut input = stdin.lock();
        if (&mut input)
            .take(MAX_TURN + 1)
            .read_until(b'\n', &mut raw)?
            == 0
        {
            break;
        }
        if raw.len() as u64 > MAX_TURN && !raw.ends_with(b"\n") {
            skip_line(&mut input)?; // the rest of the line goes too, unread
            eprintln!("(a turn is at most {MAX_TURN} bytes: this one was not sent)");
            continue;
        }
        drop(input);
        let Ok(line) = String::from_utf8(raw) else {
            eprintln!("(not UTF-8 text: this turn was not sent)");
            continue;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" => break,
            "/reset" => {
                msgs.truncate(keep);
                continue;
            }
            _ => {}
        }
        msgs.push(Message {
            role: "user".into(),
            content: line.to_string(),
        });
        let turn = chat_ids(&lm.tokenizer, &msgs).and_then(|ids| {
            Ok(generate(
                &lm.model,
                &lm.tokenizer,
                &ids,
                &params,
                &mut |s| {
                    let _ = write!(out, "{s}");
                    let _ = out.flush();
                },
            )?)
        });
        let g = match turn {
            Ok(g) => g,
            Err(e) => {
                // the conversation stays: this turn is dropped, the next may fit
                msgs.pop();
                eprintln!("(this turn was not answered: {e:#}; /reset starts over)");
                continue;
            }
        };
        println!();
        msgs.push(Message {
            role: "assistant".into(),
            content: g.text,
        });
    }
    Ok(())
}
