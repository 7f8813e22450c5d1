#!/usr/bin/env bash
# RPS's claim, small: at a fixed tiny budget, one hashed shared array beats a LoRA of the same
# size. SmolLM2-135M on Shakespeare, q_proj and v_proj: LoRA r 1 (57,600 values) against RPS with
# a budget of 57,600 (tiles of 64), each at two learning rates (RPS moves every weight through
# few values); same steps, data and seed. Writes docs/papers/rps.md and docs/papers/rps.svg.
#
#   tools/papers/rps.sh [STEPS] [SEED] [LRS]   (default 100 steps, seed 0, lrs "1e-3 1e-4": about
#   30 min)
set -euo pipefail
steps=${1:-100}
seed=${2:-0}
lrs=${3:-1e-3 1e-4}
lr= # passed per run
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
train() { # label lr flags...
  echo "== $1" >&2
  "$petal" train "${common[@]}" --seed "$seed" --lr "$2" --target-modules q_proj,v_proj --out "$work/$1" "${@:3}" \
    2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$1'; print(json.dumps(d))" >> "$results"
}
for l in $lrs; do
  train "lora-$l" "$l" --method lora --r 1 --alpha 2
  train "rps-$l" "$l" --method rps --set budget=57600
done
python3 "$root/tools/papers/table_report.py" "$results" "$root/docs/papers/rps.svg" \
  "RPS against LoRA at a tiny budget on SmolLM2" \
  "(ROAST; STABLE-RPS, ICLR 2024) at a fixed small number of values, randomised parameter sharing beats a low-rank update of the same size." \
  "\`tools/papers/rps.sh $steps $seed \"$lrs\"\`: SmolLM2-135M-Instruct, Shakespeare, sequences of 128, batch 4, $steps steps, AdamW with 10 warm-up steps and a cosine decay, seed $seed; held-out loss on 32 validation sequences; q_proj and v_proj; 57,600 values each; learning rates $lrs." \
  lora-1e-3="LoRA r 1, lr 1e-3" lora-1e-4="LoRA r 1, lr 1e-4" rps-1e-3="RPS 57,600, lr 1e-3" rps-1e-4="RPS 57,600, lr 1e-4" > "$root/docs/papers/rps.md"
echo "wrote docs/papers/rps.md" >&2
