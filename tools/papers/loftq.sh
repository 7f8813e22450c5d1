#!/usr/bin/env bash
# LoftQ's claim, small: LoRA started from LoftQ (the base replaced by its 4-bit quantization Q,
# A and B by the rank-r part of W - Q, alternating T times) ends with a lower held-out loss
# than QLoRA (LoRA, B = 0, over the same 4-bit NF4 base), and starts nearer the
# full-precision model. SmolLM2-135M on Shakespeare; every run the same steps, data, lr, seed
# and LoRA r = alpha = 8 on every linear layer (LoftQ, as PEFT, does not scale B A by
# alpha / r). W is the SmolLM2 GGUF file's Q4_1 weights in f32 (`petal merge` with no adapter
# writes them as an HF folder, which `--quantize nf4` takes). Writes docs/papers/loftq.md.
#
#   tools/papers/loftq.sh [STEPS] [SEED]   (default 60 steps, seed 0: about an hour on 2 cores,
#                                           most of it the SVDs of LoftQ's 5 steps)
set -euo pipefail
steps=${1:-60}
seed=${2:-0}
lr=2e-3
source "$(dirname "$0")/smollm2.sh"
without --model # the runs take the f32 folder
results=$work/results.jsonl
run() { # label, then petal train flags
  local label=$1
  shift
  echo "== $label" >&2
  "$petal" train "${shared[@]}" --model "$work/f32" --seed "$seed" --method lora --r 8 --alpha 8 \
    --target-modules all-linear "$@" |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$label'; print(json.dumps(d))" >> "$results"
}
"$petal" merge --model asset:smollm2 --out "$work/f32" >/dev/null
run lora --out "$work/lora"
run qlora --quantize nf4 --out "$work/qlora"
run loftq1 --init loftq --set 'loftq_config={"loftq_bits":4,"loftq_iter":1}' --out "$work/loftq1"
run loftq5 --init loftq --set 'loftq_config={"loftq_bits":4,"loftq_iter":5}' --out "$work/loftq5"
python3 "$root/tools/papers/table_report.py" "$results" "$root/docs/papers/loftq.svg" \
  "LoftQ: LoRA started from the quantization's error against QLoRA" \
  "LoftQ (Li et al., ICLR 2024) quantizes W and starts LoRA from the rank-r part of what the quantization lost, alternating the two, so fine-tuning over the quantized base starts near the full-precision model and ends better than QLoRA (LoRA with B = 0 over the same quantized base), most of all at 2-4 bits." \
  "\`tools/papers/loftq.sh $steps $seed\`: SmolLM2-135M-Instruct (its GGUF file's Q4_1 weights in f32, as an HF folder), Shakespeare, $steps steps of 4 x 128 tokens, lr $lr (cosine, 10 warm-up steps), seed $seed, LoRA r 8 alpha 8 on every linear layer, held-out loss on 32 sequences. QLoRA: \`--quantize nf4\` (QLoRA's NF4, blocks of 64, double-quantized scales, kept in its blocks); LoftQ: \`--init loftq\` at 4 bits (bitsandbytes' NF4, blocks of 64, f32 scales, as PEFT's LoftQ; the base dequantized in f32) with 1 and 5 alternating steps." \
  lora="LoRA, f32 (not quantized)" qlora="QLoRA, NF4" loftq1="LoftQ, NF4, 1 step" \
  loftq5="LoftQ, NF4, 5 steps" > "$root/docs/papers/loftq.md"
echo "wrote docs/papers/loftq.md" >&2
