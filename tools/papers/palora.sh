#!/usr/bin/env bash
# PaLoRA's claim, small: one model traces a Pareto front between two tasks that dominates or
# matches two separately trained per-task LoRAs mixed linearly. Two BIG-bench
# natural_instructions subtasks (chosen by the seed, tools/data/natural_instructions.py);
# SmolLM2-135M, every linear, rank 8 per task, sequences of 192, batch 4, the same steps, lr and
# seed for all:
#   palora:  PaLoRA on both tasks (task-balanced batches, 2 annealed rays per step);
#   lora A, lora B: LoRA r 8 on one task each; the linear mix at λ is λ ΔW_A + (1 - λ) ΔW_B
#   (both LoRAs written as one PaLoRA adapter, evaluated at preference (λ, 1 - λ)).
# Each model is scored on both tasks' validation examples at λ = 0, 0.1, ..., 1. Writes
# docs/papers/palora.md and docs/papers/palora.svg.
#
#   tools/papers/palora.sh [STEPS] [SEED]   (default 100 steps, seed 0: about 45 min on 2 cores)
set -euo pipefail
steps=${1:-100}
seed=${2:-0}
lr=1e-3
source "$(dirname "$0")/smollm2.sh"
src=$("$petal" assets natural_instructions | cut -f2)
python3 "$root/tools/data/natural_instructions.py" "$src" "$work/ni" --train-tasks 2 \
  --heldout-tasks 0 --per-task 400 --eval-per-task 32 --seed "$seed" >&2
read -r task_a task_b < <(python3 -c "import json,sys; print(*sorted(json.load(open(sys.argv[1]))['train']))" "$work/ni/tasks.json")
common=(--model asset:smollm2 --data "$work/ni/train.jsonl" --val-data "$work/ni/val.jsonl"
  --max-steps "$steps" --seq-len 192 --batch-size 4 --warmup-steps 10 --eval-every 100000
  --save-every 100000 --max-eval-examples 64 --seed "$seed" --lr "$lr" --json
  --r 8 --alpha 16 --target-modules all-linear)
run() { # label flags...
  echo "== $1" >&2
  "$petal" train "${common[@]}" --out "$work/$1" "${@:2}" 2>/dev/null > "$work/$1.json"
}
run palora --method palora --task-sampling balanced
run lora_a --method lora --tasks "$task_a"
run lora_b --method lora --tasks "$task_b"
python3 "$root/tools/papers/palora_mix.py" "$work/lora_a/adapter" "$work/lora_b/adapter" \
  "$task_a" "$task_b" "$work/mix"
score() { # label adapter preference
  "$petal" eval --model asset:smollm2 --data "$work/ni/val.jsonl" --seq-len 192 --json \
    ${2:+--adapter "$2"} ${3:+--preference "$3"} 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['label']=sys.argv[1]; d['preference']=sys.argv[2]; print(json.dumps(d))" "$1" "${3:-}" >> "$work/scores.jsonl"
}
score base "" ""
for i in 0 1 2 3 4 5 6 7 8 9 10; do
  l=$(python3 -c "print(f'{$i/10:g}')"); m=$(python3 -c "print(f'{1-$i/10:g}')")
  echo "== λ = $l" >&2
  score palora "$work/palora/adapter" "$l,$m"
  score mix "$work/mix" "$l,$m"
done
python3 "$root/tools/papers/palora_report.py" "$work/scores.jsonl" "$work/ni/tasks.json" \
  "$work/palora.json" "$work/lora_a.json" "$work/lora_b.json" "$steps" "$seed" \
  "$root/docs/papers/palora.svg" > "$root/docs/papers/palora.md"
echo "wrote docs/papers/palora.md" >&2
