#!/usr/bin/env bash
# MoS's claim, small: LoRA's quality with several times fewer trainable parameters. SmolLM2-135M
# on Shakespeare, every linear layer: MoS of rank 8 whose pools and private shards hold what LoRA
# of rank 2 holds (4x fewer values than LoRA r 8), against LoRA r 8 and LoRA r 2; same steps,
# data, lr and seed. Writes docs/papers/mos.md and docs/papers/mos.svg.
#
#   tools/papers/mos.sh [STEPS] [SEED] [LR]   (default 100 steps, seed 0, lr 1e-3: about 25 min)
set -euo pipefail
steps=${1:-100}
seed=${2:-0}
lr=${3:-1e-3}
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
train() { # label flags...
  echo "== $1" >&2
  "$petal" train "${common[@]}" --seed "$seed" --out "$work/$1" "${@:2}" 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$1'; print(json.dumps(d))" >> "$results"
}
train mos --method mos --set r=8 --set lora_alpha=16 --set equivalent_rank=2 --set private_rank=1
train lora8 --method lora --r 8 --alpha 16
train lora2 --method lora --r 2 --alpha 4
python3 "$root/tools/papers/table_report.py" "$results" "$root/docs/papers/mos.svg" \
  "MoS against LoRA on SmolLM2" \
  "(Wang et al., ICLR 2025) LoRA assembled from shared shard pools reaches LoRA's quality with several times fewer trainable parameters." \
  "\`tools/papers/mos.sh $steps $seed $lr\`: SmolLM2-135M-Instruct, Shakespeare, sequences of 128, batch 4, $steps steps, AdamW at lr $lr with 10 warm-up steps and a cosine decay, seed $seed; held-out loss on 32 validation sequences; every linear layer. MoS: rank 8 per layer, alpha 16, pools and one private rank holding LoRA rank 2's values, shards of 64." \
  mos="MoS r 8 (values of r 2)" lora8="LoRA r 8" lora2="LoRA r 2" > "$root/docs/papers/mos.md"
echo "wrote docs/papers/mos.md" >&2
