#!/usr/bin/env python3
"""A QLoRA checkpoint made by transformers + bitsandbytes, for petal's loader of 4-bit HF folders.

A tiny random Llama (hidden 64 and 32 key/value features, so every linear's rows are whole NF4 blocks of 64) is loaded
with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)` on the CPU and saved with
`save_pretrained`, as the `*-bnb-4bit` models on the hub are. The 4-bit model's own logits on
fixed ids (bitsandbytes' f32 path: dequantize, then an f32 product, as in training) are the
reference petal must reproduce from the saved folder.

    /root/pyref/bin/python tools/golden/make_bnb4bit.py

Writes tests/fixtures/golden/llama_bnb4bit/ (config.json with its quantization_config,
model.safetensors with `weight`, `weight.absmax`, `weight.nested_absmax`,
`weight.nested_quant_map`, `weight.quant_map`, `weight.quant_state.bitsandbytes__nf4` per
linear, the tokenizer of the tiny golden Llama) and logits.safetensors (`input_ids`, `logits`).

Versions: tools/golden/requirements.txt (torch 2.15.0, transformers 5.24.0,
bitsandbytes 0.50.2).
"""
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests/fixtures/golden"
OUT = GOLDEN / "llama_bnb4bit"
IDS = torch.tensor([[1, 5, 9, 14, 20, 33, 2, 71], [7, 7, 3, 90, 45, 12, 60, 8]])


def main():
    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
        rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        q = LlamaForCausalLM.from_pretrained(tmp, quantization_config=bnb, device_map="cpu",
                                             dtype=torch.float32).eval()
    if OUT.exists():
        shutil.rmtree(OUT)
    q.save_pretrained(OUT)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(GOLDEN / "llama" / name, OUT / name)
    # on a CPU with AVX512-BF16, bitsandbytes' inference path repacks the weights for a bf16
    # kernel; its training path (dequantize, then an f32 product) is the one petal matches
    import bitsandbytes as bnb
    for m in q.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        logits = q(IDS).logits.float().contiguous()
    meta = {k: version(k) for k in ("torch", "transformers", "bitsandbytes")}
    save_file({"input_ids": IDS.to(torch.int64), "logits": logits}, str(OUT / "logits.safetensors"),
              metadata=meta)
    qc = json.loads((OUT / "config.json").read_text())["quantization_config"]
    print(f"wrote {OUT} ({meta}); quantization_config: {qc}")


if __name__ == "__main__":
    main()
