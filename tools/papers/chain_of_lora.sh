#!/usr/bin/env bash
# Chain of LoRA's claim, small: a chain of M LoRA links beats a single LoRA of the same rank
# trained for the same steps. SmolLM2-135M on Shakespeare, q_proj and v_proj; three links of
# rank 8 (knots after a third and two thirds of the steps) against LoRA of rank 8, and, as a
# check on what the chain's extra capacity alone buys, LoRA of rank 24 (the saved chain's rank);
# same data, lr and seed. Writes docs/papers/chain_of_lora.md and docs/papers/chain_of_lora.svg.
#
#   tools/papers/chain_of_lora.sh [STEPS] [SEED] [LR]   (default 150 steps, seed 0, lr 1e-3:
#   about 30 min on 2 cores)
set -euo pipefail
steps=${1:-150}
seed=${2:-0}
lr=${3:-1e-3}
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
train() { # label flags...
  echo "== $1" >&2
  "$petal" train "${common[@]}" --seed "$seed" --target-modules q_proj,v_proj --out "$work/$1" "${@:2}" \
    2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$1'; print(json.dumps(d))" >> "$results"
}
train chain --method chain_of_lora --r 8 --alpha 16 --set links=3
train lora8 --method lora --r 8 --alpha 16
train lora24 --method lora --r 24 --alpha 48
python3 "$root/tools/papers/chain_of_lora_report.py" "$results" "$steps" "$seed" "$lr" \
  "$root/docs/papers/chain_of_lora.svg" > "$root/docs/papers/chain_of_lora.md"
echo "wrote docs/papers/chain_of_lora.md" >&2
