#!/usr/bin/env bash
# L4Q's claim, small: quantization-aware LoRA (the quantizer in the loop, its grid learned) ends
# with a lower held-out loss than LoRA trained first and its merged model quantized afterwards
# (QLoRA-then-PTQ), at 4 and 3 bits. SmolLM2-135M on Shakespeare, the same steps, data, lr and
# seed for every run; both quantize every linear layer in groups of 32 input columns (4 bits:
# GGUF's Q4_1 blocks). The post-training quantization is L4Q's own quantizer left untrained (one
# step at lr 1e-30: nothing moves), i.e. round to nearest on each group's min-max grid. Writes
# docs/papers/l4q.md (table, SVG plot, command, CPU).
#
#   tools/papers/l4q.sh [STEPS] [SEED]   (default 60 steps, seed 0: about 20 min on 2 cores)
set -euo pipefail
steps=${1:-60}
seed=${2:-0}
lr=2e-3
source "$(dirname "$0")/smollm2.sh"
results=$work/results.jsonl
run() { # label, then petal train flags
  local label=$1
  shift
  echo "== $label" >&2
  "$petal" train "${common[@]}" --seed "$seed" "$@" 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$label'; print(json.dumps(d))" >> "$results"
}
lora=(--method lora --r 8 --alpha 16 --target-modules all-linear)
l4q=(--method l4q --r 8 --alpha 16 --set group_size=32)
run lora "${lora[@]}" --out "$work/lora"
"$petal" merge --model asset:smollm2 --adapter "$work/lora/adapter" --out "$work/merged" >/dev/null
for bits in 4 3; do
  # the base quantized as it is, LoRA then quantized, and L4Q
  run "rtn$bits" "${l4q[@]}" --set bits=$bits --max-steps 1 --lr 1e-30 --out "$work/rtn$bits"
  run "lora_ptq$bits" --model "$work/merged" "${l4q[@]}" --set bits=$bits --max-steps 1 --lr 1e-30 \
    --out "$work/ptq$bits"
  run "l4q$bits" "${l4q[@]}" --set bits=$bits --out "$work/l4q$bits"
done
python3 "$root/tools/papers/table_report.py" "$results" "$work/plot.svg" \
  "L4Q: quantization-aware LoRA against LoRA then post-training quantization" \
  "L4Q (Jeon et al., ACL 2025) learns the LoRA update and the quantization grid together, so the fully quantized model it ends with is better than quantizing a merged LoRA model after training (QLoRA/QA-LoRA-style pipelines), most of all at 3-4 bits." \
  "\`tools/papers/l4q.sh $steps $seed\`: SmolLM2-135M-Instruct (its GGUF file's Q4_1 weights in f32), Shakespeare, $steps steps of 4 x 128 tokens, lr $lr (cosine, 10 warm-up steps), seed $seed, LoRA r 8 alpha 16 on every linear layer for both, groups of 32 input columns, held-out loss on 32 sequences. The one-step runs at lr 1e-30 only quantize (their 'before' and 'after' are the same model)." \
  lora="LoRA, f32 (not quantized)" \
  rtn4="base, 4-bit RTN" lora_ptq4="LoRA, then 4-bit RTN of the merge" l4q4="L4Q, 4-bit" \
  rtn3="base, 3-bit RTN" lora_ptq3="LoRA, then 3-bit RTN of the merge" l4q3="L4Q, 3-bit" \
  > "$root/docs/papers/l4q.md"
cp "$work/plot.svg" "$root/docs/papers/l4q.svg"
echo "wrote docs/papers/l4q.md" >&2
