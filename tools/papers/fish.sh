#!/usr/bin/env bash
# FISH's claim, small: a Fisher mask beats a random mask of the same density and approaches full
# tuning of the same modules. SmolLM2-135M on Shakespeare, q_proj and v_proj: FISH at density
# 0.5% (the paper's) with the Fisher from 128 sequences (the first 32 steps), a random mask of
# the same density chosen at the same step, and full tuning of q_proj and v_proj (their full
# copies trained through modules_to_save, next to an IA3 vector on one k_proj of 192 values, the
# smallest adapter that carries them). All train the raw weights, so one learning rate; same
# steps, data and seed. Writes docs/papers/fish.md and docs/papers/fish.svg.
#
#   tools/papers/fish.sh [STEPS] [SEED] [LR] [SAMPLES]   (default 150 steps, seed 0, lr 3e-4, 128
#   Fisher samples: about 35 min on 2 cores)
set -euo pipefail
steps=${1:-150}
seed=${2:-0}
lr=${3:-3e-4}
samples=${4:-128}
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
train() { # label flags...
  echo "== $1" >&2
  "$petal" train "${common[@]}" --seed "$seed" --out "$work/$1" "${@:2}" \
    2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$1'; print(json.dumps(d))" >> "$results"
}
train fisher --method fish --target-modules q_proj,v_proj --set density=0.005 --set fisher_samples=$samples
train random --method fish --target-modules q_proj,v_proj --set density=0.005 --set fisher_samples=$samples --set mask=random
train full --method ia3 --target-modules 're:.*layers\.0\.self_attn\.k_proj' --feedforward-modules '' \
  --modules-to-save q_proj,v_proj
python3 "$root/tools/papers/fish_report.py" "$results" "$steps" "$seed" "$lr" "$samples" \
  "$root/docs/papers/fish.svg" > "$root/docs/papers/fish.md"
echo "wrote docs/papers/fish.md" >&2
