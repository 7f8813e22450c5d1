#!/usr/bin/env bash
# EleutherAI's lm-evaluation-harness (its `local-completions` model, offline) scores a model
# served by `petal serve`, on the examples `petal eval --task` scores itself: acc, acc_norm and
# each choice's log-likelihood must agree. Not part of `cargo test` (it needs torch and lm_eval
# in a venv: VENV, default .venv, made from tools/golden/requirements.txt, gets
# tools/eval/requirements.txt here).
#   [TASK=spamassassin] [CHAT=1] tools/eval/lm_eval_check.sh [path/to/petal] [examples]
# CHAT=1: every prompt through the model's chat template (`petal eval --chat` against the
# harness's --apply_chat_template).
# TASK: a multiple-choice built-in (mmlu, spamassassin), TASK/SUBTASK for one sub-task (elementary_math_qa/question_only
# needs bigbench==1.0.0, which not every registry holds; spamassassin comes from npm).
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${1:-target/release/petal}
N=${2:-50}
TASK=${TASK:-spamassassin}
VENV=${VENV:-.venv}
PORT=${PORT:-8795}
"$VENV/bin/python" -c "import lm_eval, tenacity" 2>/dev/null || "$VENV/bin/pip" install -q -r tools/eval/requirements.txt
W=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$W"' EXIT
# a tokenizer folder for the harness: the model converted to an HF folder by petal merge
"$P" merge --model asset:smollm2 --out "$W/smollm2-hf" >/dev/null
SUB=()
[[ $TASK == */* ]] && SUB=(--tasks "$TASK")
CHATS=() DUMP=() LM_CHAT=()
if [[ ${CHAT:-0} == 1 ]]; then
    CHATS=(--chat) DUMP=(--dump "$W/dump.jsonl") LM_CHAT=(--apply_chat_template)
    "$P" eval --task "${TASK%%/*}" "${SUB[@]}" --max-examples "$N" --dump-task "$W/dump.jsonl"
fi
"$P" eval --task "${TASK%%/*}" "${SUB[@]}" --max-examples "$N" "${CHATS[@]}" \
    --samples "$W/samples.jsonl" --json > "$W/petal.json"
python3 tools/eval/to_lm_eval.py "$W/samples.jsonl" "$W/task" "${DUMP[@]}"
"$P" serve --model asset:smollm2 --served-model-name smollm2 --port "$PORT" 2>"$W/serve.log" &
SERVER=$!
for _ in $(seq 300); do
    curl -s "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.2
done
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$VENV/bin/lm_eval" --model local-completions \
    --model_args "model=smollm2,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer=$W/smollm2-hf,tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1" \
    --tasks petal_mc --include_path "$W/task" --output_path "$W/out" --log_samples "${LM_CHAT[@]}"
python3 tools/eval/compare.py "$W/petal.json" "$W/samples.jsonl" "$W/out"
