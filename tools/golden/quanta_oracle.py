#!/usr/bin/env python3
"""QuanTA's layer, run from the official code (quanta-fine-tuning/quanta,
quanta/quanta/tuners/quanta.py) fetched apart from this repository, not vendored.

The official module imports its package's `PeftConfig` / `PeftType`; only the layer class
`Linear` is used here, so a two-name shim stands in for that package (its pinned old torch and
peft are not needed for the layer). The layer runs with its only implemented init,
`sum_opposite_freeze_one`, on a zero base weight without a bias, so its output is the update
alone: `Q_theta(x) - x Q_theta0^T`. The gates are then moved away from their frozen copy, as
training would, and the layer is evaluated again, and merged (`eval()` with merge_weights) for
the full dW.

Writes tests/fixtures/golden/quanta.safetensors: per case, the gates (`<case>.g.<pair>`),
their frozen copy (`<case>.f.<pair>`), the input x, the layer's output and its merged dW.

Run with the pinned venv (tools/golden/requirements.txt, plus opt_einsum):
    python tools/golden/quanta_oracle.py /path/to/quanta-checkout-or-git-dir
"""
import dataclasses
import enum
import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
import types

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
LAYER = "quanta/quanta/tuners/quanta.py"
# (out, in, per_dim_features): square, a padded input, a cut output, four axes
CASES = {
    "square": (12, 12, [3, 4]),
    "padded": (12, 10, [2, 2, 3]),
    "cut": (6, 12, [3, 4]),
    "four": (24, 24, [2, 3, 2, 2]),
}


def layer_source(src):
    if os.path.isfile(os.path.join(src, LAYER)):
        return open(os.path.join(src, LAYER)).read()
    return subprocess.check_output(["git", "--git-dir", src, "show", f"HEAD:{LAYER}"], text=True)


def load_layer(src):
    pkg = types.ModuleType("qshim")
    pkg.__path__ = []
    utils = types.ModuleType("qshim.utils")

    @dataclasses.dataclass
    class PeftConfig:
        peft_type: object = None

    utils.PeftConfig = PeftConfig
    utils.PeftType = enum.Enum("PeftType", ["QUANTA"])
    tuners = types.ModuleType("qshim.tuners")
    tuners.__path__ = []
    sys.modules.update({"qshim": pkg, "qshim.utils": utils, "qshim.tuners": tuners})
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(layer_source(src))
    spec = importlib.util.spec_from_file_location("qshim.tuners.quanta", f.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["qshim.tuners.quanta"] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    mod = load_layer(sys.argv[1])
    torch.manual_seed(20240601)
    out = {}
    for name, (d_out, d_in, dims) in CASES.items():
        lin = mod.Linear(
            d_in, d_out, per_dim_features=dims, bias=False, merge_weights=True,
            initialize_mode="sum_opposite_freeze_one",
        )
        with torch.no_grad():
            lin.weight.zero_()
        lin.train()
        x = torch.randn(5, d_in)
        with torch.no_grad():
            at_init = lin(x).clone()  # merges -Q(theta0) into W on first use
            for k, v in lin.quanta_weights.items():
                v.add_(0.3 * torch.randn_like(v))
            y = lin(x).clone()
            lin.eval()  # merges Q(theta): W = Q(theta) - Q(theta0), padded or cut
            dw = lin.weight.detach().clone()
        assert at_init.abs().max() < 1e-5, "the official layer starts at identity"
        for k, v in lin.quanta_weights.items():
            key = k.replace(" ", "_")  # "-1 -2" -> "-1_-2"
            out[f"{name}.g.{key}"] = v.detach().contiguous()
            out[f"{name}.f.{key}"] = lin.quanta_weights2[k].detach().contiguous()
        out[f"{name}.x"] = x
        out[f"{name}.y"] = y
        out[f"{name}.delta"] = dw
        print(name, "pairs", list(lin.quanta_weights.keys()), "|y|", float(y.abs().max()))
    path = os.path.join(ROOT, "quanta.safetensors")
    save_file(out, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
