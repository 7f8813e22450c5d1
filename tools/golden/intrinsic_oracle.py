#!/usr/bin/env python3
"""The intrinsic-dimension Fastfood projection, run from the official code
(jgamper/intrinsic-dimensionality, intrinsic/fastfood.py) fetched apart from this repository, not
vendored: `fastfood_vars` draws the signs, permutation and Gaussian diagonal (torch's and NumPy's
generators, on the CPU with device='cpu'), `fastfood_torched` projects. The fixture records the
random vectors it used, so petal's test feeds them in, and the projection and its gradient.

Writes tests/fixtures/golden/intrinsic.safetensors. Run with the pinned venv
(tools/golden/requirements.txt):
    python tools/golden/intrinsic_oracle.py /path/to/intrinsic-dimensionality-checkout-or-git-dir
"""
import importlib.util
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
SRC = "intrinsic/fastfood.py"
CASES = {"padded": (5, 120), "exact": (7, 64), "wide": (40, 100)}  # (d, D)


def load(src):
    if os.path.isfile(os.path.join(src, SRC)):
        text = open(os.path.join(src, SRC)).read()
    else:
        text = subprocess.check_output(["git", "--git-dir", src, "show", f"HEAD:{SRC}"], text=True)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("fastfood", f.name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ff = load(sys.argv[1])
    torch.manual_seed(2018)
    np.random.seed(2018)
    out = {}
    for name, (d, dd) in CASES.items():
        params = ff.fastfood_vars(dd, device="cpu")
        bb, pi, gg = params[0], params[1], params[2]
        v = torch.randn(d, requires_grad=True)
        y = ff.fastfood_torched(v, dd, params)
        proj = torch.randn(dd)
        (y * proj).sum().backward()
        out |= {f"{name}.signs": bb, f"{name}.perm": pi.to(torch.int64), f"{name}.gauss": gg,
                f"{name}.v": v.detach(), f"{name}.y": y.detach(), f"{name}.proj": proj, f"{name}.dv": v.grad}
        print(name, "L", params[4], "|y|", float(y.abs().max()))
    path = os.path.join(ROOT, "intrinsic.safetensors")
    save_file({k: t.contiguous() for k, t in out.items()}, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
