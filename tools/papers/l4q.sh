#!/usr/bin/env bash
# L4Q's claim, small: quantization-aware LoRA (the quantizer in the loop, its grid learned) ends
# with a lower held-out loss than LoRA trained first and its merged model quantized afterwards
# (QLoRA-then-PTQ), at 4 and 3 bits; LR-QAT (its low-rank term in the grid's integer domain)
# beside it. SmolLM2-135M on Shakespeare, the same steps, data, lr and
# seed for every run; both quantize every linear layer in groups of 32 input columns (4 bits:
# GGUF's Q4_1 blocks). The post-training quantization is L4Q's own quantizer left untrained (one
# step at lr 1e-30: nothing moves), i.e. round to nearest on each group's min-max grid. Writes
# docs/papers/l4q.md (table, SVG plot, command, CPU).
#
#   tools/papers/l4q.sh [STEPS] [SEED]   (default 60 steps, seed 0: about 30 min on 2 cores)
#   MODEL=qwen2.5-coder-0.5b tools/papers/l4q.sh STEPS SEED   (another asset: docs/papers/l4q_MODEL.md)
set -euo pipefail
model=${MODEL:-smollm2}
name=l4q${MODEL:+_$MODEL}
case $model in
smollm2) desc="SmolLM2-135M-Instruct (its GGUF file's Q4_1 weights in f32)" kept=Q4_1 ;;
qwen2.5-coder-0.5b) desc="Qwen2.5-Coder-0.5B-Instruct (its GGUF file's Q4_K_M weights, Q4_K and Q6_K blocks, in f32)" kept=Q4_K_M ;;
*) desc="the asset $model" kept="its GGUF blocks" ;;
esac
steps=${1:-60}
seed=${2:-0}
lr=2e-3
train_steps=$steps
steps=1 # smollm2.sh's flags; --lr is left out (lr empty) and given per run
lr_=$lr
lr=
source "$(dirname "$0")/smollm2.sh"
lr=$lr_
without --model --max-steps # each run gives its own
results=$work/results.jsonl
run() { # label, then petal train flags
  local label=$1
  shift
  echo "== $label" >&2
  "$petal" train "${shared[@]}" --seed "$seed" "$@" |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['label']='$label'; print(json.dumps(d))" >> "$results"
}
trained=(--model "asset:$model" --max-steps "$train_steps" --lr "$lr")
quantize_only=(--max-steps 1 --lr 1e-30)
base=(--model "asset:$model")
lora=(--method lora --r 8 --alpha 16 --target-modules all-linear)
l4q=(--method l4q --r 8 --alpha 16 --set group_size=32)
run lora "${lora[@]}" "${trained[@]}" --out "$work/lora"
"$petal" assets "$model" >/dev/null
"$petal" merge --model "asset:$model" --adapter "$work/lora/adapter" --out "$work/merged" >/dev/null
for bits in 4 3; do
  # the base quantized as it is, LoRA then quantized, L4Q, and LR-QAT (over the base kept in
  # the GGUF file's Q4_1 blocks: it needs only W's 8-bit codes)
  run "rtn$bits" "${base[@]}" "${l4q[@]}" --set bits=$bits "${quantize_only[@]}" --out "$work/rtn$bits"
  run "lora_ptq$bits" --model "$work/merged" "${l4q[@]}" --set bits=$bits "${quantize_only[@]}" \
    --out "$work/ptq$bits"
  run "l4q$bits" "${l4q[@]}" --set bits=$bits "${trained[@]}" --out "$work/l4q$bits"
  run "lrqat$bits" "${l4q[@]}" --set bits=$bits --set variant=lr_qat --dtype quantized \
    "${trained[@]}" --out "$work/lrqat$bits"
done
python3 "$root/tools/papers/table_report.py" "$results" "$root/docs/papers/$name.svg" \
  "L4Q: quantization-aware LoRA against LoRA then post-training quantization" \
  "L4Q (Jeon et al., ACL 2025) learns the LoRA update and the quantization grid together, so the fully quantized model it ends with is better than quantizing a merged LoRA model after training (QLoRA/QA-LoRA-style pipelines), most of all at 3-4 bits." \
  "\`${MODEL:+MODEL=$MODEL }tools/papers/l4q.sh $train_steps $seed\`: $desc, Shakespeare, $train_steps steps of 4 x 128 tokens, lr $lr (cosine, 10 warm-up steps), seed $seed, LoRA r 8 alpha 16 on every linear layer for both, groups of 32 input columns, held-out loss on 32 sequences. The one-step runs at lr 1e-30 only quantize (their 'before' and 'after' are the same model)." \
  lora="LoRA, f32 (not quantized)" \
  rtn4="base, 4-bit RTN" lora_ptq4="LoRA, then 4-bit RTN of the merge" l4q4="L4Q, 4-bit" \
  rtn3="base, 3-bit RTN" lora_ptq3="LoRA, then 3-bit RTN of the merge" l4q3="L4Q, 3-bit" \
  lrqat4="LR-QAT, 4-bit (base kept in $kept)" lrqat3="LR-QAT, 3-bit (base kept in $kept)" \
  > "$root/docs/papers/$name.md"
echo "wrote docs/papers/$name.md" >&2
