#!/usr/bin/env python3
"""Golden GGUF block dequantization, written apart from petal's Rust (which decodes through candle):
raw blocks of the ten classic GGML quant types and what llama.cpp's own Python reference,
gguf-py's `gguf.quants.dequantize`, makes of them:

    /root/pyref/bin/python tools/golden/make_quant_blocks.py

Writes tests/fixtures/golden/quant_blocks.safetensors with, for each name in q4_0 q4_1 q5_0 q5_1
q8_0 q2_k q3_k q4_k q5_k q6_k:
  <name>.bytes   uint8   (ROWS, row_bytes)  the raw blocks, row-major, COLS/block_size a row
  <name>.values  float32 (ROWS, COLS)       gguf.quants.dequantize(bytes, type)

How the bytes are made (the same for every type, none goes through a quantizer): seeded random
bytes (seed = the type's index in TYPES), then each f16 scale field of each block is overwritten
with a finite f16 drawn uniformly from [0.001, 0.05], negated at random for the fields llama.cpp's
quantizers can make negative (the `d` of the symmetric types, the `m` minimum of Q4_1/Q5_1);
`d`/`dmin` of Q2_K/Q4_K/Q5_K and `d` of Q4_1/Q5_1 stay positive, as the quantizers leave them.
Everything else (nibbles, high bits, packed 6-bit sub-scales, int8 Q8_0 quants and Q6_K scales)
is random, so every bit pattern is exercised. Byte offsets of the f16 fields inside a block,
from the block layouts in gguf-py's quants.py (dequantize_blocks) and GGML_QUANT_SIZES:
  Q4_0  18 B: d@0                 | qs[16]
  Q4_1  20 B: d@0 m@2             | qs[16]
  Q5_0  22 B: d@0                 | qh[4] qs[16]
  Q5_1  24 B: d@0 m@2             | qh[4] qs[16]
  Q8_0  34 B: d@0                 | qs int8[32]
  Q2_K  84 B: scales[16] qs[64]   | d@80 dmin@82
  Q3_K 110 B: hmask[32] qs[64] scales[12] | d@108
  Q4_K 144 B: d@0 dmin@2          | scales[12] qs[128]
  Q5_K 176 B: d@0 dmin@2          | scales[12] qh[32] qs[128]
  Q6_K 210 B: ql[128] qh[64] scales int8[16] | d@208

Versions: tools/golden/requirements.txt (gguf 0.19.0, safetensors 0.8.0) and numpy.
"""
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fixtures/golden/quant_blocks.safetensors"
ROWS, COLS = 3, 512  # 512 = 16 blocks of 32 = 2 blocks of 256

# type -> [(byte offset of an f16 scale field in the block, may it be negative)]
TYPES = {
    T.Q4_0: [(0, True)],
    T.Q4_1: [(0, False), (2, True)],
    T.Q5_0: [(0, True)],
    T.Q5_1: [(0, False), (2, True)],
    T.Q8_0: [(0, True)],
    T.Q2_K: [(80, False), (82, False)],
    T.Q3_K: [(108, True)],
    T.Q4_K: [(0, False), (2, False)],
    T.Q5_K: [(0, False), (2, False)],
    T.Q6_K: [(208, True)],
}


def make_blocks(qtype, fields, seed):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block_size
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off, signed in fields:
        scale = rng.uniform(0.001, 0.05, size=n_blocks)
        if signed:
            scale *= rng.choice([-1.0, 1.0], size=n_blocks)
        blocks[:, off:off + 2] = scale.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(ROWS, COLS // block_size * type_size)


def main():
    out = {}
    for seed, (qtype, fields) in enumerate(TYPES.items()):
        name = qtype.name.lower()
        raw = make_blocks(qtype, fields, seed)
        values = gguf.quants.dequantize(raw, qtype)
        assert values.dtype == np.float32 and values.shape == (ROWS, COLS), (name, values.shape)
        assert np.isfinite(values).all(), name
        out[f"{name}.bytes"] = np.ascontiguousarray(raw)
        out[f"{name}.values"] = np.ascontiguousarray(values)
        print(f"{name:5} row_bytes={raw.shape[1]:4} |v|max={np.abs(values).max():.4g}")
    save_file(out, OUT, metadata={"generator": "tools/golden/make_quant_blocks.py",
                                  "gguf": version("gguf")})
    back = load_file(OUT)
    assert all(np.array_equal(back[k], v) for k, v in out.items())
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
