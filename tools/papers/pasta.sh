#!/usr/bin/env bash
# PASTA's claim, small: on sentence classification with all-MiniLM-L6-v2, the special-token
# vectors alone (about 0.03% of the parameters, plus the classification head every run trains)
# come close to LoRA and to full fine-tuning. English multiemo sentiment (4 classes,
# tools/data/multiemo_sentiment.py: 2,000 training and 500 validation sentences); sequences of
# 64, batch 16, the same steps and seed for all; two learning rates per method, both reported:
#   pasta: a vector per layer for [CLS] and [SEP] (occurrence slots, as the official code);
#   lora:  LoRA r 8 on every encoder linear;
#   full:  every encoder linear trained in full (modules_to_save; the method's own part is a
#          rank-1 LoRA on the pooler, which the run also trains); embeddings and LayerNorms frozen.
# Writes docs/papers/pasta.md and docs/papers/pasta.svg.
#
#   tools/papers/pasta.sh [STEPS] [SEED]   (default 250 steps, seed 0: about 25 min on 2 cores)
set -euo pipefail
steps=${1:-250}
seed=${2:-0}
root=$(cd "$(dirname "$0")/../.." && pwd)
petal=${PETAL:-$root/target/release/petal}
[ -x "$petal" ] || (cd "$root" && cargo build --release -p petal-cli)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$petal" assets minilm >/dev/null
src=$("$petal" assets multiemo | cut -f2)
python3 "$root/tools/data/multiemo_sentiment.py" "$src" "$work/me" --seed "$seed" >&2
common=(--task-type seq-cls --model asset:minilm --data "$work/me/train.jsonl"
  --val-data "$work/me/val.jsonl" --max-eval-examples 500 --max-steps "$steps" --seq-len 64
  --batch-size 16 --warmup-steps 20 --eval-every 100000 --save-every 100000 --seed "$seed" --json)
results=$work/results.jsonl
run() { # label lr flags...
  echo "== $1 lr $2" >&2
  "$petal" train "${common[@]}" --lr "$2" --out "$work/$1-$2" "${@:3}" 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['label']=sys.argv[1]; d['lr']=float(sys.argv[2]); print(json.dumps(d))" "$1" "$2" >> "$results"
}
for lr in 1e-2 3e-2; do run pasta $lr --method pasta --set slots=occurrence --set num_slots=2; done
for lr in 3e-4 1e-3; do run lora $lr --method lora --r 8 --alpha 16 --target-modules all-linear; done
for lr in 3e-5 1e-4; do
  run full $lr --method lora --r 1 --alpha 1 --target-modules pooler.dense \
    --modules-to-save query,key,value,intermediate.dense,output.dense
done
python3 "$root/tools/papers/pasta_report.py" "$results" "$steps" "$seed" \
  "$root/docs/papers/pasta.svg" > "$root/docs/papers/pasta.md"
echo "wrote docs/papers/pasta.md" >&2
