#!/usr/bin/env bash
# petal's GGUF exports loaded by llama.cpp: a merged model (f32, q8_0) and a LoRA adapter in
# llama.cpp's layout, for the tiny qwen2 fixture and the real SmolLM2 (llama architecture: q/k
# rows permuted). Needs a release build and a venv with llama-cpp-python (made here if absent).
#   tools/gguf/check.sh [path/to/petal]
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${1:-target/release/petal}
VENV=${VENV:-.venv-llamacpp}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    CMAKE_BUILD_PARALLEL_LEVEL=2 "$VENV/bin/pip" install -q llama-cpp-python==0.3.36 gguf==0.19.0 \
        safetensors==0.8.0 numpy
fi
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
G=tests/fixtures/golden
# a case: name, base model, adapter, arch, heads, kv heads
run_case() {
    local name=$1 model=$2 adapter=$3 arch=$4 heads=$5 kv=$6 ids=$7
    "$P" merge --model "$model" --format gguf --quantize f32 --out "$W/$name-base.gguf" >/dev/null
    "$P" merge --model "$model" --adapter "$adapter" --format gguf --quantize f32 --out "$W/$name-f32.gguf" >/dev/null
    "$P" merge --model "$model" --adapter "$adapter" --format gguf --quantize q8_0 --out "$W/$name-q8.gguf" >/dev/null
    "$P" export --model "$model" --adapter "$adapter" --format gguf-lora --out "$W/$name-lora.gguf" >/dev/null
    "$P" forward --model "$model" --adapter "$adapter" --input-ids "$ids" --out "$W/$name-ref.safetensors" >/dev/null
    "$VENV/bin/python" tools/gguf/check_llama_cpp.py "{\"name\": \"$name\", \"ids\": [${ids}],
        \"reference\": \"$W/$name-ref.safetensors\", \"base\": \"$W/$name-base.gguf\",
        \"merged_f32\": \"$W/$name-f32.gguf\", \"merged_q8_0\": \"$W/$name-q8.gguf\",
        \"lora\": \"$W/$name-lora.gguf\", \"adapter\": \"$adapter\", \"arch\": \"$arch\",
        \"heads\": $heads, \"kv_heads\": $kv}" 2>/dev/null
}
run_case qwen2-tiny "$G/qwen2.gguf" "$G/adapters/qwen2_lora_all_linear" qwen2 4 2 "1,5,9,14,20,33,2,71"
# SmolLM2 with a LoRA trained for a few steps here (all linear layers, r 8)
"$P" train --model asset:smollm2 --data asset:shakespeare --max-steps 3 --r 8 --alpha 16 \
    --out "$W/run" >/dev/null 2>&1
run_case smollm2 asset:smollm2 "$W/run/adapter" llama 9 3 "1,504,3458,314,260,1234,28,5"
