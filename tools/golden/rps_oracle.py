#!/usr/bin/env python3
"""Randomised parameter sharing as an adapter, transcribed from ROAST (Desai et al., 2022: tiles of
a weight read consecutive slots of one shared array, with sign hashes) and from petal's documented
mapping (docs/methods/rps.md: SplitMix64's finaliser on global positions), written apart from the
Rust. dW = sign * M[slot]; dL/dM is the scatter-add of sign * dL/dW over the entries per slot.

Writes tests/fixtures/golden/rps.safetensors for two linears, (6, 10) then (9, 4), m = 50, tile 8,
seed 7. Run with the pinned venv: python tools/golden/rps_oracle.py
"""
import os

import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
MASK = (1 << 64) - 1
M, TILE, SEED = 50, 8, 7


def splitmix(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def layer_map(offset, numel):
    slots, signs = np.zeros(numel, np.int64), np.zeros(numel, np.float32)
    for i in range(numel):
        t, j = divmod(i, TILE)
        start = splitmix(SEED ^ splitmix(offset + t * TILE)) % M
        slots[i] = (start + j) % M
        signs[i] = 1.0 if splitmix(SEED ^ splitmix(~(offset + i) & MASK)) & 1 else -1.0
    return slots, signs


def main():
    rng = np.random.default_rng(2024)
    m = rng.standard_normal(M).astype(np.float32)
    out, dm, offset = {"m": m}, np.zeros(M, np.float32), 0
    for name, (o, i) in {"a": (6, 10), "b": (9, 4)}.items():
        slots, signs = layer_map(offset, o * i)
        offset += o * i
        delta = (signs * m[slots]).reshape(o, i)
        proj = rng.standard_normal((o, i)).astype(np.float32)
        np.add.at(dm, slots, signs * proj.reshape(-1))
        out[f"{name}.delta"], out[f"{name}.proj"] = delta, proj
    out["dm"] = dm
    path = os.path.join(ROOT, "rps.safetensors")
    save_file(out, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
