#!/usr/bin/env python3
"""KRAdapter's update, transcribed from the paper (Albert et al., ICCV 2025, arXiv 2508.00230,
Sec. 3) and the official layer's README (PaulAlbert31/KRAdapter), written apart from petal's Rust:
for W of shape (d_out, d_in), n = min, N = max, r = floor(sqrt(n)), d the least with r(r+d) >= N;
U (n, r), V (n, r+d); M = the column-wise Khatri-Rao product of V^T and U^T, transposed: row i of
M is kron(V[i], U[i]); the update is scaling * M[:, :N] along W (transposed when d_out > d_in).

Writes tests/fixtures/golden/kradapter.safetensors: for each case, random U and V and the update.
Run with the pinned venv (tools/golden/requirements.txt): python tools/golden/kradapter_oracle.py
"""
import math
import os

import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
CASES = {"wide": (7, 20), "tall": (20, 7), "square": (9, 9), "long": (24, 80)}  # (d_out, d_in)
SCALING = 2.0


def khatri_rao_columns(a, b):
    """Column-wise Khatri-Rao product: column j is kron(a[:, j], b[:, j])."""
    return np.stack([np.kron(a[:, j], b[:, j]) for j in range(a.shape[1])], axis=1)


def update(u, v, d_out, d_in):
    big = max(d_out, d_in)
    m = khatri_rao_columns(v.T, u.T).T  # (n, r (r + d)); row i = kron(V[i], U[i])
    m = SCALING * m[:, :big]
    return m if d_out <= d_in else m.T


def main():
    rng = np.random.default_rng(20250731)
    out = {}
    for name, (d_out, d_in) in CASES.items():
        n, big = min(d_out, d_in), max(d_out, d_in)
        r = math.isqrt(n)
        d = 0
        while r * (r + d) < big:
            d += 1
        u = rng.standard_normal((n, r)).astype(np.float32)
        v = rng.standard_normal((n, r + d)).astype(np.float32)
        out[f"{name}.U"] = u
        out[f"{name}.V"] = v
        delta = update(u.astype(np.float64), v.astype(np.float64), d_out, d_in)
        out[f"{name}.delta"] = np.ascontiguousarray(delta, dtype=np.float32)  # save_file writes raw memory
    save_file(out, os.path.join(ROOT, "kradapter.safetensors"))


if __name__ == "__main__":
    main()
