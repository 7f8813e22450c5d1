#!/usr/bin/env bash
# The mixtures' claims, small, on multi-task data (BIG-bench natural_instructions: 8 instruction
# subtasks trained with task-balanced sampling, 4 others held out, tools/data/natural_instructions.py):
#   mov:    MoV (10 IA3 experts) against IA3, at IA3's placements (k, v, down), lr 1e-2;
#   molora: MoLoRA (10 experts of rank 4) against LoRA r 4 and LoRA r 40 (MoLoRA's per-token
#           cost: all ten experts run), every linear, lr 1e-3;
#   sira:   SiRA (8 experts of rank 4, top 2, capacity 1.25, gate dropout 0.1) against MoLoRA
#           with 2 experts and LoRA r 8 (the same active rank per token), every linear, lr 1e-3.
# SmolLM2-135M, sequences of 192, batch 4, the same steps, data and seed for all; held-out loss
# on the training subtasks' validation examples and on the held-out subtasks. Writes
# docs/papers/mixtures.md and docs/papers/mixtures.svg.
#
#   tools/papers/mixtures.sh [STEPS] [SEED] [GROUPS]   (default 100 steps, seed 0,
#   groups "mov molora sira": about 80 min on 2 cores)
set -euo pipefail
steps=${1:-100}
seed=${2:-0}
groups=${3:-mov molora sira}
lr= # per group
source "$(dirname "$0")/smollm2.sh"
src=$("$petal" assets natural_instructions | cut -f2)
python3 "$root/tools/data/natural_instructions.py" "$src" "$work/ni" --seed "$seed" >&2
common=(--model asset:smollm2 --data "$work/ni/train.jsonl" --val-data "$work/ni/val.jsonl"
  --task-sampling balanced --max-steps "$steps" --seq-len 192 --batch-size 4 --warmup-steps 10
  --eval-every 100000 --save-every 100000 --max-eval-examples 64 --seed "$seed" --json)
results=$work/results.jsonl
heldout() { # [adapter folder]
  "$petal" eval --model asset:smollm2 --data "$work/ni/heldout.jsonl" --seq-len 192 --json \
    ${1:+--adapter "$1"} 2>/dev/null
}
heldout > "$work/heldout_base.json"
train() { # group label lr flags...
  echo "== $1 $2" >&2
  "$petal" train "${common[@]}" --lr "$3" --out "$work/$2" "${@:4}" 2>/dev/null > "$work/$2.json"
  heldout "$work/$2/adapter" > "$work/$2.heldout.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['group']=sys.argv[3]; d['label']=sys.argv[4]; d['lr']=sys.argv[5]; d['heldout']=json.load(open(sys.argv[2])); print(json.dumps(d))" \
    "$work/$2.json" "$work/$2.heldout.json" "$1" "$2" "$3" >> "$results"
}
for g in $groups; do
  case $g in
    mov)
      train mov ia3 1e-2 --method ia3
      train mov mov 1e-2 --method mov --set num_experts=10 ;;
    molora)
      train molora molora 1e-3 --method molora --r 4 --alpha 16 --set num_experts=10
      train molora lora4 1e-3 --method lora --r 4 --alpha 16 --target-modules all-linear
      train molora lora40 1e-3 --method lora --r 40 --alpha 160 --target-modules all-linear ;;
    sira)
      train sira sira 1e-3 --method sira --r 4 --alpha 16
      train sira molora2 1e-3 --method molora --r 4 --alpha 16 --set num_experts=2
      train sira lora8 1e-3 --method lora --r 8 --alpha 32 --target-modules all-linear ;;
    *) echo "unknown group $g (mov, molora, sira)" >&2; exit 2 ;;
  esac
done
python3 "$root/tools/papers/mixtures_report.py" "$results" "$work/heldout_base.json" "$work/ni/tasks.json" \
  "$steps" "$seed" "$groups" "$root/docs/papers/mixtures.svg" > "$root/docs/papers/mixtures.md"
echo "wrote docs/papers/mixtures.md" >&2
