#!/usr/bin/env bash
# PaCA's claim, small: LoRA's held-out loss at equal trainable parameters, with lower peak memory
# and faster steps. SmolLM2-135M on Shakespeare, every linear layer: PaCA with 16 columns per
# module (2,488,320 parameters) against LoRA of rank 8 (2,442,240), the same steps, data and
# seed; PaCA at two learning rates (it moves W's columns themselves, LoRA a zero-started
# product), LoRA at petal's usual 1e-3. Then speed and memory with nothing else running:
# `petal bench` on the synthetic 35M model, both methods in one invocation each, alternating.
# Writes docs/papers/paca.md and docs/papers/paca.svg.
#
#   tools/papers/paca.sh [STEPS] [SEED] [PACA_LRS]   (default 100 steps, seed 0, "1e-4 1e-3":
#   about 30 min on 2 cores)
set -euo pipefail
steps=${1:-100}
seed=${2:-0}
paca_lrs=${3:-1e-4 1e-3}
lr= # passed per run
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
train() { # method lr flags...
  echo "== $1 lr $2" >&2
  "$petal" train "${common[@]}" --method "$1" --lr "$2" --seed "$seed" --out "$work/$1-$2" "${@:3}" \
    2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); d['method']='$1'; d['lr']='$2'; print(json.dumps(d))" >> "$results"
}
for l in $paca_lrs; do train paca "$l" --r 16 --alpha 16; done
train lora 1e-3 --r 8 --alpha 16
bench=$work/bench.jsonl
for round in 1 2 3; do
  for m in paca:16 lora:8; do
    echo "== bench ${m%%:*} $round" >&2
    "$petal" bench --workload synthetic-35m --mode train --method "${m%%:*}" --r "${m##*:}" --rounds 3 --json 2>/dev/null |
      python3 -c "import json,sys; d=json.load(sys.stdin); d['method']='${m%%:*}'; print(json.dumps(d))" >> "$bench"
  done
done
python3 "$root/tools/papers/paca_report.py" "$results" "$bench" "$steps" "$seed" "$paca_lrs" \
  "$root/docs/papers/paca.svg" > "$root/docs/papers/paca.md"
echo "wrote docs/papers/paca.md" >&2
