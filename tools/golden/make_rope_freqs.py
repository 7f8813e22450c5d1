#!/usr/bin/env python3
"""llama.cpp's `rope_freqs.weight` for llama3 rope scaling, as its converter computes it.

A transcription of `LlamaModel.generate_extra_tensors` in llama.cpp's convert_hf_to_gguf.py: the
frequencies `1 / base ** (arange(0, dim, 2, float32) / dim)` in torch float32, then per frequency
(Python floats) 1 below the high-frequency wavelength threshold, `factor` above the low one, and
`1 / ((1 - smooth) / factor + smooth)` between, stored as float32.

    /root/pyref/bin/python tools/golden/make_rope_freqs.py

Writes tests/fixtures/golden/rope_freqs.json: for Llama 3.1 8B's settings (head_dim 128, theta
500000, factor 8, low 1, high 4, original 8192) and Llama 3.2 1B's (head_dim 64, factor 32), the
parameters and the factors. Versions: tools/golden/requirements.txt (torch 2.15.0).
"""
import json
import math
from importlib.metadata import version
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[2] / "tests/fixtures/golden/rope_freqs.json"


def rope_factors(base, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(1)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).tolist()


def main():
    cases = []
    for name, dim, factor in (("llama3.1-8b", 128, 8.0), ("llama3.2-1b", 64, 32.0)):
        p = {"head_dim": dim, "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        f = rope_factors(p["rope_theta"], dim, factor, 1.0, 4.0, 8192)
        cases.append({"name": name, **p, "factors": f})
        print(name, f"{sum(1 < x < factor for x in f)} of {len(f)} frequencies on the ramp")
    OUT.write_text(json.dumps({"torch": version("torch"), "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
