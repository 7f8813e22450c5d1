#!/usr/bin/env bash
# QuanTA's claim, small: it beats LoRA at an equal (small) parameter count. SmolLM2-135M on
# Shakespeare, q_proj and v_proj as in the paper's scripts; QuanTA with four axes (petal's
# choice for 576 features: 5 x 5 x 5 x 5, padded; 225,000 parameters) against LoRA of rank 4
# (230,400), each at two learning rates, the same steps, data and seed; writes
# docs/papers/quanta.md and docs/papers/quanta.svg.
#
#   tools/papers/quanta.sh [STEPS] [SEED] [LRS]   (default 100 steps, seed 0, lrs "1e-3 3e-3":
#   about 30 min on 2 cores)
set -euo pipefail
steps=${1:-100}
seed=${2:-0}
lrs=${3:-1e-3 3e-3}
lr= # passed per run
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
for l in $lrs; do
  for m in quanta lora; do
    echo "== $m lr $l" >&2
    extra=()
    [ "$m" = lora ] && extra=(--r 4 --alpha 8)
    "$petal" train "${common[@]}" --lr "$l" --method "$m" --target-modules q_proj,v_proj \
      --seed "$seed" --out "$work/$m-$l" "${extra[@]}" 2>/dev/null |
      python3 -c "import json,sys; d=json.load(sys.stdin); d['method']='$m'; d['lr']='$l'; print(json.dumps(d))" >> "$results"
  done
done
python3 "$root/tools/papers/quanta_report.py" "$results" "$steps" "$seed" "$lrs" \
  "$root/docs/papers/quanta.svg" > "$root/docs/papers/quanta.md"
echo "wrote docs/papers/quanta.md" >&2
