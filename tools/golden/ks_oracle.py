#!/usr/bin/env python3
"""The two-sample Kolmogorov-Smirnov test KS-Lottery runs per embedding row, by SciPy (pinned in
requirements.txt): for pairs of samples (a row before and after tuning, sizes as petal's tiny
and real embeddings, with and without ties), `scipy.stats.ks_2samp(a, b).statistic` and the
p-value petal uses, the limiting Kolmogorov distribution at sqrt(n m / (n + m)) D
(`scipy.stats.kstwobign.sf`); the exact p-value of ks_2samp's default is recorded too.

Writes tests/fixtures/golden/ks.safetensors. Run with the pinned venv:
python tools/golden/ks_oracle.py
"""
import os

import numpy as np
from safetensors.numpy import save_file
from scipy import stats

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")


def main():
    rng = np.random.default_rng(20240205)
    out = {}
    cases = {
        "small_shift": (32, lambda a: a + 0.3),
        "tiny_change": (576, lambda a: a + 1e-3 * rng.standard_normal(a.shape)),
        "large_change": (576, lambda a: a * 1.5 + 0.1),
        "ties": (64, lambda a: np.round(a + 0.2, 1)),
        "same": (48, lambda a: a.copy()),
    }
    for name, (n, f) in cases.items():
        a = rng.standard_normal(n).astype(np.float32)
        if name == "ties":
            a = np.round(a, 1).astype(np.float32)
        b = f(a.astype(np.float64)).astype(np.float32)
        r = stats.ks_2samp(a, b)
        en = n * n / (2 * n)
        out[f"{name}.a"] = a
        out[f"{name}.b"] = b
        out[f"{name}.stat_p"] = np.array([r.statistic, stats.kstwobign.sf(np.sqrt(en) * r.statistic), r.pvalue])
    save_file({k: np.ascontiguousarray(v, dtype=np.float64 if k.endswith("stat_p") else np.float32)
               for k, v in out.items()}, os.path.join(ROOT, "ks.safetensors"))


if __name__ == "__main__":
    main()
