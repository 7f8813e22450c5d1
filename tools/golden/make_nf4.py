#!/usr/bin/env python3
"""Golden NF4 and grouped-int4 quantization, made apart from petal's Rust:

- NF4 by bitsandbytes itself (QLoRA's quantizer, CPU backend):
  `bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
  compress_statistics=True)` and `dequantize_4bit` of the result.
- int4 in groups of 128 by a transcription of GPTQ's round-to-nearest grid (the `Quantizer`
  class of the GPTQ reference code, `find_params` with `sym=False, perchannel=True` over each
  group, then `quantize`), written here from the GPTQ paper's code, with scales kept in f16 as
  GPTQ checkpoints store them and the dequantized value `(q - zero) * scale` in f32.

    /root/pyref/bin/python tools/golden/make_nf4.py

Writes tests/fixtures/golden/quant_nf4.safetensors; for each weight `<w>` in `rows`
(70 x 640: 700 blocks, three second-level groups that cross rows) and `wide` (3 x 19200: 300
blocks a row, more than one group a row):
  <w>.weight        f32 (rows, cols)  the input, seeded normal * 0.02 with a few outliers
  <w>.packed        u8  (rows*cols/2)  bnb's packed codes (first value in the high nibble)
  <w>.absmax        u8  (blocks)       bnb's 8-bit codes of the block scales
  <w>.nested_absmax f32 (groups)       bnb's second-level scales
  <w>.offset        f32 (1)            bnb's mean of the block scales
  <w>.nf4           f32 (rows, cols)   bnb's dequantize_4bit
  <w>.int4          f32 (rows, cols)   the GPTQ-grid transcription's dequantized values
  nested_code       f32 (256)          bnb's 8-bit dynamic code as its state keeps it
  nf4_code          f32 (16)           bnb's NF4 code

Versions: tools/golden/requirements.txt (torch 2.15.0, bitsandbytes 0.50.2, safetensors 0.8.0).
"""
from importlib.metadata import version
from pathlib import Path

import torch
import bitsandbytes.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fixtures/golden/quant_nf4.safetensors"
SHAPES = {"rows": (70, 640), "wide": (3, 19200)}


def weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    # a few outliers, as real weights have: blocks whose scale is far from the mean
    idx = torch.randint(0, w.numel(), (w.numel() // 500,), generator=g)
    w.view(-1)[idx] *= 8.0
    return w


def gptq_int4(w, group=128):
    """GPTQ's asymmetric 4-bit grid per group of `group` values along each row (RTN)."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // group, group)
    maxq = 15
    xmin = torch.minimum(x.min(dim=-1).values, torch.zeros(()))
    xmax = torch.maximum(x.max(dim=-1).values, torch.zeros(()))
    both_zero = (xmin == 0) & (xmax == 0)
    xmin[both_zero] = -1
    xmax[both_zero] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(x / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    scale16 = scale.half().float()
    return ((q - zero.unsqueeze(-1)) * scale16.unsqueeze(-1)).reshape(rows, cols)


def main():
    out = {}
    for seed, (name, shape) in enumerate(SHAPES.items()):
        w = weight(shape, seed + 1)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert state.nested and state.blocksize == 64 and state.state2.blocksize == 256
        out[f"{name}.weight"] = w
        out[f"{name}.packed"] = packed.reshape(-1).contiguous()
        out[f"{name}.absmax"] = state.absmax.contiguous()
        out[f"{name}.nested_absmax"] = state.state2.absmax.float().contiguous()
        out[f"{name}.offset"] = state.offset.reshape(1).float()
        out[f"{name}.nf4"] = F.dequantize_4bit(packed, state).float().contiguous()
        out[f"{name}.int4"] = gptq_int4(w)
        out["nested_code"] = state.state2.code.float().contiguous()
        out["nf4_code"] = state.code.float().contiguous()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": version("torch"), "bitsandbytes": version("bitsandbytes")}
    save_file(out, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({', '.join(f'{k} {v}' for k, v in meta.items())})")


if __name__ == "__main__":
    main()
