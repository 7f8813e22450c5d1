#!/usr/bin/env bash
# KS-Lottery's claim, small: on English-to-French translation (BIG-bench multiemo's aligned
# sentences, tools/data/multiemo_translation.py), tuning only the embedding rows of a few dozen
# tokens a KS test picks recovers most of the gain of tuning the whole embedding, and as many
# random tokens do not. SmolLM2-135M, the input embedding only (its tied head stays pretrained):
#   full:   the whole embedding for STEPS steps (ks_lottery ending in stage 1);
#   ks:     KS-Lottery: the whole embedding for STEPS / 2 steps, the top K rows by KS statistic,
#           then those rows alone from their pretrained values for STEPS steps;
#   random: K random tokens of the training data's vocabulary, their rows alone for STEPS steps.
# Same data, lr and seed. Writes docs/papers/ks_lottery.md and docs/papers/ks_lottery.svg.
#
#   tools/papers/ks_lottery.sh [STEPS] [SEED] [K] [LR]   (default 100 steps, seed 0, K 50,
#   lr 1e-3: about 35 min on 2 cores)
set -euo pipefail
steps=${1:-100}
seed=${2:-0}
k=${3:-50}
lr=${4:-1e-3}
source "$(dirname "$0")/smollm2.sh"
src=$("$petal" assets multiemo | cut -f2)
python3 "$root/tools/data/multiemo_translation.py" "$src" "$work/mt" --seed "$seed" >&2
common=(--model asset:smollm2 --data "$work/mt/train.jsonl" --val-data "$work/mt/val.jsonl"
  --seq-len 128 --batch-size 4 --warmup-steps 10 --eval-every 100000 --save-every 100000
  --max-eval-examples 64 --seed "$seed" --lr "$lr" --method ks_lottery --json)
results=$work/results.jsonl
train() { # label flags...
  echo "== $1" >&2
  "$petal" train "${common[@]}" --out "$work/$1" "${@:2}" 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$1'; print(json.dumps(d))" >> "$results"
}
train full --max-steps "$steps" --set stage1_steps="$((steps + 1))"
train ks --max-steps "$((steps + steps / 2))" --set stage1_steps="$((steps / 2))" --set top_k="$k"
# K random ids among the tokens stage 1 changed (the data's tokens: others get no gradient)
tickets=$(python3 -c "import json,random,sys; c=json.load(open(sys.argv[1]))['candidates']; print(','.join(map(str, sorted(random.Random(int(sys.argv[3])).sample(c, int(sys.argv[2]))))))" \
  "$work/ks/adapter/tickets.json" "$k" "$seed")
train random --max-steps "$steps" --set tickets="$tickets"
cp "$work/ks/adapter/tickets.json" "$work/tickets.json"
python3 "$root/tools/papers/ks_lottery_report.py" "$results" "$work/tickets.json" "$steps" "$seed" "$k" "$lr" \
  "$root/docs/papers/ks_lottery.svg" > "$root/docs/papers/ks_lottery.md"
echo "wrote docs/papers/ks_lottery.md" >&2
