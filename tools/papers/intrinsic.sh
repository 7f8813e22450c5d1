#!/usr/bin/env bash
# Intrinsic dimension, small: the d90 curve of SmolLM2-135M on Shakespeare. q_proj and v_proj
# move in a random d-dimensional subspace (Fastfood) for each d of a sweep; full tuning of the
# same modules (their full copies through modules_to_save, next to an IA3 vector of 192 values on
# one k_proj, the smallest adapter that carries them) gives the full gain; d90 is the smallest d
# whose gain in held-out loss reaches 90% of it. With Adam every coordinate of θ moves about lr
# per step whatever d is, so the weights' change grows with sqrt(d) at one rate: each d runs at
# lr = c * sqrt(1000 / d) for each c of a small list, and the best c counts for that d. Writes
# docs/papers/intrinsic.md and docs/papers/intrinsic.svg (loss against d, log scale).
#
#   tools/papers/intrinsic.sh [STEPS] [SEED] [DS] [CS] [LR_FULL]
#   (default 40 steps, seed 0, d in "10 1000 10000 100000", c in "1e-2 3e-2", lr 3e-4 for full
#   tuning: about 30 min on 2 cores)
set -euo pipefail
steps=${1:-40}
seed=${2:-0}
ds=${3:-10 1000 10000 100000}
cs=${4:-1e-2 3e-2}
lr_full=${5:-3e-4}
lr= # passed per run
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
train() { # label lr flags...
  echo "== $1" >&2
  "$petal" train "${common[@]}" --seed "$seed" --lr "$2" --out "$work/$1" "${@:3}" 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$1'; print(json.dumps(d))" >> "$results"
}
train full "$lr_full" --method ia3 --target-modules 're:.*layers\.0\.self_attn\.k_proj' --feedforward-modules '' \
  --modules-to-save q_proj,v_proj
for d in $ds; do
  for c in $cs; do
    l=$(python3 -c "print(f'{$c * (1000 / $d) ** 0.5:.3g}')")
    train "d${d}_lr$l" "$l" --method intrinsic --target-modules q_proj,v_proj --set d="$d"
  done
done
python3 "$root/tools/papers/intrinsic_report.py" "$results" "$steps" "$seed" "$cs" "$lr_full" \
  "$root/docs/papers/intrinsic.svg" > "$root/docs/papers/intrinsic.md"
echo "wrote docs/papers/intrinsic.md" >&2
