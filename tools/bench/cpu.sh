#!/usr/bin/env bash
# The README's CPU ratio tables in one run: every workload and method of issue 4's table,
# `petal bench --vs-pytorch` each (petal and PyTorch + PEFT alternating round by round), then
# the two tables as markdown. Run from the repo root on a quiet machine (nothing else
# compiling), after `cargo build --release -p petal-cli`:
#
#     tools/bench/cpu.sh PYTHON OUT_DIR
#
# PYTHON has torch, transformers and peft. OUT_DIR gets bench.jsonl (one `petal bench --json`
# result per line), log.txt and table.md. ROUNDS (default 3) and STEPS (3) set each bench's
# size: medians of ROUNDS x STEPS steps a side. ONLY=methods runs the per-method rows alone,
# ONLY=workloads the workload rows alone, ONLY=table remakes table.md from bench.jsonl. About
# 20 minutes on 2 cores.
set -u
PY=$1
OUT=$2
P=${PETAL:-target/release/petal}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
THREADS=${THREADS:-2}
export PYTHONWARNINGS=ignore # transformers' deprecations, torch's "no CUDA driver"
echo "$(date -u +%FT%TZ) petal $(git rev-parse --short HEAD 2>/dev/null), $THREADS threads, $(nproc) cores"
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' ||
    { echo "$PY lacks torch, transformers or peft"; exit 1; }

bench() {
    echo "== petal bench $*"
    local t0=$SECONDS
    "$P" bench --threads "$THREADS" --steps "${STEPS:-3}" --rounds "${ROUNDS:-3}" --vs-pytorch \
        --python "$PY" "$@" --json >"$OUT/one.json"
    local rc=$?
    [ $rc -eq 0 ] && cat "$OUT/one.json" >>"$OUT/bench.jsonl" || echo "exit $rc"
    echo "   ($((SECONDS - t0)) s)"
    rm -f "$OUT/one.json"
}

if [ -z "${ONLY:-}" ] || [ "$ONLY" = workloads ]; then
    for w in synthetic-35m smollm2; do
        bench --workload $w
        bench --workload $w --dtype bf16
        bench --workload $w --dtype bf16 --bf16-activations
        bench --workload $w --grad-checkpointing
        bench --workload $w --mode forward
        bench --workload $w --mode generate
    done
fi
if [ -z "${ONLY:-}" ] || [ "$ONLY" = methods ]; then
    for m in lora dora loha lokr ia3 oft boft road vera; do
        bench --workload synthetic-35m --method $m
    done
fi

python3 - "$OUT/bench.jsonl" >"$OUT/table.md" <<'EOF'
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1])]


def what(r):
    mode = {"train": "training", "forward": "forward", "generate": "greedy generation (KV cache)"}
    w = {"synthetic-35m": "synthetic 35M", "smollm2": "SmolLM2-135M"}.get(r["workload"], r["workload"])
    s = f"{w}, {mode[r['mode']]}"
    if r["mode"] == "train":
        s += ", " + ("bf16 weights and activations" if r.get("bf16_activations")
                     else "bf16 weights" if r["dtype"] == "bf16" else "f32")
        if r.get("grad_checkpointing"):
            s += ", gradient checkpointing"
    return s


def mem(p, t):
    return f"{p['peak_rss_mb'] / t['peak_rss_mb']:.2f}x ({p['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} MB)"


print("| workload | petal tokens/s (min..max) | PyTorch tokens/s | speed ratio | peak RSS ratio |")
print("|---|---|---|---|---|")
done = set()
for r in rows:
    if r["method"] != "lora" or not r.get("pytorch") or what(r) in done:
        continue  # the per-method LoRA row repeats the first: shown below
    done.add(what(r))
    p, t, a = r["petal"], r["pytorch"], r.get("pytorch_autocast")
    tps = f"{p['tokens_per_s']:.0f} ({p['min']:.0f}..{p['max']:.0f})"
    if a:
        print(f"| {what(r)} | {tps} | f32 {t['tokens_per_s']:.0f}; autocast {a['tokens_per_s']:.0f} | "
              f"{p['tokens_per_s'] / t['tokens_per_s']:.2f}x of f32; {p['tokens_per_s'] / a['tokens_per_s']:.2f}x of autocast | "
              f"{mem(p, a)} of autocast |")
    else:
        print(f"| {what(r)} | {tps} | {t['tokens_per_s']:.0f} | {p['tokens_per_s'] / t['tokens_per_s']:.2f}x | {mem(p, t)} |")
print()
print("| method | petal tokens/s | PyTorch + PEFT tokens/s | speed ratio | peak RSS ratio |")
print("|---|---|---|---|---|")
last = {}  # the newest row of each method (synthetic model, f32 training)
for r in rows:
    if r["workload"] == "synthetic-35m" and r["mode"] == "train" and r["dtype"] == "f32" \
            and not r.get("grad_checkpointing") and r.get("pytorch"):
        last[r["method"]] = r
for m, r in last.items():
    p, t = r["petal"], r["pytorch"]
    print(f"| {m} | {p['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | "
          f"{p['tokens_per_s'] / t['tokens_per_s']:.2f}x | {mem(p, t)} |")
EOF
cat "$OUT/table.md"
