#!/usr/bin/env python3
"""SSF, transcribed from the paper (Lian et al., NeurIPS 2022, arXiv 2210.08823, Sec. 3.2 and
eq. 4-5), written apart from petal's Rust, on one pre-norm step of a decoder: an RMSNorm (weight
g) followed by a linear (W, b), SSF after each:

    h = gamma_n * rmsnorm(x; g) + beta_n
    y = gamma_l * (h W^T + b) + beta_l

and the paper's re-parameterisation (eq. 5), which leaves y unchanged: the norm's weight becomes
g * gamma_n; the linear's weight diag(gamma_l) W and its bias gamma_l * (b + W beta_n) + beta_l
(the norm's shift reaches the linear through W, so it lands in the linear's bias).

Writes tests/fixtures/golden/ssf.safetensors. Run with the pinned venv
(tools/golden/requirements.txt): python tools/golden/ssf_oracle.py
"""
import os

import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
ROWS, D, OUT, EPS = 5, 12, 7, 1e-5


def rmsnorm(x, g):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS) * g


def main():
    rng = np.random.default_rng(20221016)
    f = lambda *s: rng.standard_normal(s)
    x, g, w, b = f(ROWS, D), 1 + 0.1 * f(D), f(OUT, D) / np.sqrt(D), 0.1 * f(OUT)
    gn, bn, gl, bl = 1 + 0.3 * f(D), 0.3 * f(D), 1 + 0.3 * f(OUT), 0.3 * f(OUT)
    h = gn * rmsnorm(x, g) + bn
    y = gl * (h @ w.T + b) + bl
    merged = {
        "merged.norm_weight": g * gn,
        "merged.weight": gl[:, None] * w,
        "merged.bias": gl * (b + w @ bn) + bl,
    }
    # the merged form computes the same y
    y2 = rmsnorm(x, merged["merged.norm_weight"]) @ merged["merged.weight"].T + merged["merged.bias"]
    assert np.allclose(y, y2)
    out = {"x": x, "g": g, "w": w, "b": b, "norm_scale": gn, "norm_shift": bn,
           "scale": gl, "shift": bl, "y": y, **merged}
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()},
              os.path.join(ROOT, "ssf.safetensors"))


if __name__ == "__main__":
    main()
