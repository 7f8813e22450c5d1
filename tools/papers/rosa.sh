#!/usr/bin/env bash
# RoSA's claim, small: LoRA + sparse beats LoRA alone and sparse alone at the same parameter
# budget. SmolLM2-135M on Shakespeare, q_proj and v_proj, 460,800 trainable parameters each:
# LoRA r 8; RoSA = LoRA r 4 + a sparse part of 230,400 values (d = 0.01736112), its mask chosen
# after a 64-step LoRA warm-up (the paper's wl64); the sparse part alone, 460,800 values
# (r 0, d = 0.03472224; its mask from the first step's gradients, the paper's SpA). Same steps,
# data, lr and seed. Writes docs/papers/rosa.md and docs/papers/rosa.svg.
#
#   tools/papers/rosa.sh [STEPS] [SEED] [LR] [SCHEDULE]   (default 150 steps, seed 0, lr 1e-3,
#   wl64: about 35 min on 2 cores)
set -euo pipefail
steps=${1:-150}
seed=${2:-0}
lr=${3:-1e-3}
schedule=${4:-wl64}
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
train() { # label flags...
  echo "== $1" >&2
  "$petal" train "${common[@]}" --seed "$seed" --target-modules q_proj,v_proj --out "$work/$1" "${@:2}" \
    2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$1'; print(json.dumps(d))" >> "$results"
}
train rosa --method rosa --r 4 --alpha 8 --set d=0.01736112 --set schedule=$schedule
train lora --method lora --r 8 --alpha 16
train sparse --method rosa --r 0 --set d=0.03472224 --set schedule=spa_only
python3 "$root/tools/papers/rosa_report.py" "$results" "$steps" "$seed" "$lr" "$schedule" \
  "$root/docs/papers/rosa.svg" > "$root/docs/papers/rosa.md"
echo "wrote docs/papers/rosa.md" >&2
