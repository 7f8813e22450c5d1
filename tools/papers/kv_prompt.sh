#!/usr/bin/env bash
# The E2VPT claim, small, transcribed to a language model: key-value slots plus input prompts
# beat prompt tuning and prefix tuning at the same parameter count (23,040 values on
# SmolLM2-135M: 40 prompt tokens x 576; 2 prefix tokens x 2 x 30 layers x 192; 10 input prompts
# x 576 + 3 shared slots x 30 layers x 192), and pruning half the input prompts (and a quarter of
# the kept ones' pieces) after half the run, then rewinding, keeps the score with fewer prompts.
# Shakespeare, sequences of 128, batch 4, the same steps, lr and seed for all.
# Writes docs/papers/kv_prompt.md and docs/papers/kv_prompt.svg.
#
#   tools/papers/kv_prompt.sh [STEPS] [SEED] [LR]   (default 100 steps, seed 0, lr 3e-2:
#   about 40 min on 2 cores)
set -euo pipefail
steps=${1:-100}
seed=${2:-0}
lr=${3:-3e-2}
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
train() { # label flags...
  echo "== $1" >&2
  "$petal" train "${common[@]}" --seed "$seed" --out "$work/$1" "${@:2}" 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$1'; print(json.dumps(d))" >> "$results"
}
train prompt --method prompt_tuning --num-virtual-tokens 40
train prefix --method prefix_tuning --num-virtual-tokens 2
train kv --method kv_prompt --set num_virtual_tokens=10 --set num_kv_tokens=3 --set prune_step=0
train kv_pruned --method kv_prompt --set num_virtual_tokens=10 --set num_kv_tokens=3 \
  --set token_prune=0.5 --set segments=16 --set segment_prune=0.25
python3 "$root/tools/papers/table_report.py" "$results" "$root/docs/papers/kv_prompt.svg" \
  "E2VPT-style prompts against prompt and prefix tuning on SmolLM2" \
  "(Han et al., ICCV 2023; a visual method, here on a language model) key-value prompts together with input prompts outperform prompt tuning and other prompt methods at a small parameter count, and pruning the input prompts (token- and segment-wise, then rewinding) keeps the quality with fewer prompts." \
  "\`tools/papers/kv_prompt.sh $steps $seed $lr\`: SmolLM2-135M-Instruct, Shakespeare, sequences of 128, batch 4, $steps steps, AdamW at lr $lr with 10 warm-up steps and a cosine decay, seed $seed; held-out loss on 32 validation sequences. Every method holds 23,040 trainable values. kv pruned: after $((steps / 2)) steps, 5 of the 10 input prompts and a quarter of the kept prompts' 16 pieces pruned by the gate-gradient score, prompts and slots rewound to their initial values, trained again for the rest of the run." \
  prompt="prompt tuning, 40 tokens" prefix="prefix tuning, 2 tokens" kv="kv_prompt, 10 prompts + 3 shared slots" \
  kv_pruned="kv_prompt pruned to 5 prompts" > "$root/docs/papers/kv_prompt.md"
echo "wrote docs/papers/kv_prompt.md" >&2
