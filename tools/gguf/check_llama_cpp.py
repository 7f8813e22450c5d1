#!/usr/bin/env python3
"""petal's GGUF exports checked by llama.cpp itself (llama-cpp-python, built from its PyPI
source) and by llama.cpp's own Python reader (gguf-py):

    tools/gguf/check.sh              # makes the files with petal, then runs this script

For each case (a base model GGUF, an adapter, the token ids):
- `petal merge --format gguf` (f32, and q8_0) loaded by llama.cpp gives the logits petal gives
  for the base model with the PEFT adapter attached (within 1e-5 of the largest logit in f32,
  5e-2 in q8_0);
- `petal export --format gguf-lora` loaded by llama.cpp over the base GGUF (`lora_path`) gives
  them too;
- gguf-py reads the adapter file: its metadata (general.type adapter, adapter.type lora,
  adapter.lora.alpha as f32) and, for every PEFT tensor, the GGUF tensor llama.cpp's converter
  would make of it (A as it is, B with the q/k rows permuted for the llama architecture).

Versions: llama-cpp-python 0.3.36, gguf 0.19.0, safetensors 0.8.0, numpy.
"""
import json
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from safetensors.numpy import load_file


def logits(model, ids, lora=None):
    # f32 key/value cache (llama.cpp keeps f16 by default)
    kw = dict(model_path=str(model), logits_all=True, n_ctx=256, verbose=False, n_threads=2,
              type_k=0, type_v=0)
    if lora:
        kw["lora_path"] = str(lora)
    m = llama_cpp.Llama(**kw)
    m.eval(ids)
    return np.array(m.scores[: len(ids)], dtype=np.float32)


def permute(w, heads):
    """llama.cpp's converter: rows reshaped (heads, 2, d/2, ...) with the middle axes swapped."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_base_name(peft_key):
    module = peft_key.replace("base_model.model.", "").split(".lora_")[0]
    fixed = {"model.embed_tokens": "token_embd", "lm_head": "output"}
    if module in fixed:
        return fixed[module] + ".weight"
    _, _, n, kind, proj = module.split(".")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    return f"blk.{n}.{names[proj]}.weight"


def check_adapter_file(path, adapter_dir, arch, heads, kv_heads):
    r = gguf.GGUFReader(str(path))
    f = {k: r.fields[k] for k in r.fields}
    text = lambda k: bytes(f[k].parts[f[k].data[0]]).decode()
    assert text("general.type") == "adapter" and text("adapter.type") == "lora", path
    assert text("general.architecture") == arch
    alpha_field = f["adapter.lora.alpha"]
    assert alpha_field.types == [gguf.GGUFValueType.FLOAT32], alpha_field.types
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    assert abs(float(alpha_field.parts[-1][0]) - cfg["lora_alpha"]) < 1e-6
    tensors = {t.name: t for t in r.tensors}
    peft = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    worst = 0.0
    for key, w in peft.items():
        base = gguf_base_name(key)
        is_a = ".lora_A" in key
        name = base + (".lora_a" if is_a else ".lora_b")
        t = tensors[name]
        got = np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        want = w.astype(np.float32)
        if not is_a and arch == "llama" and ".attn_q." in base:
            want = permute(want, heads)
        if not is_a and arch == "llama" and ".attn_k." in base:
            want = permute(want, kv_heads)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst == 0.0, f"adapter tensors differ by {worst}"
    return len(peft)


def main():
    case = json.loads(sys.argv[1])
    ids = case["ids"]
    want = load_file(case["reference"])["logits"][0]
    scale = float(np.abs(want).max())
    report = {"case": case["name"], "largest_logit": scale}
    for label, model, lora, tol in [
        ("merged_f32", case["merged_f32"], None, 1e-5),
        ("merged_q8_0", case["merged_q8_0"], None, 5e-2),
        ("base_plus_lora", case["base"], case["lora"], 1e-5),
    ]:
        got = logits(model, ids, lora)
        d = float(np.abs(got - want).max()) / scale
        report[label] = d
        assert d < tol, f"{case['name']}: {label}: llama.cpp differs by {d} of the largest logit"
    base = logits(case["base"], ids)
    report["base_without_adapter"] = float(np.abs(base - want).max()) / scale
    report["adapter_tensors_checked"] = check_adapter_file(
        case["lora"], case["adapter"], case["arch"], case["heads"], case["kv_heads"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
