#!/usr/bin/env python3
"""PaCA's layer, run from the official code (WooSunghyeon/paca, the PEFT fork's
peft/src/peft/tuners/paca/layer.py) fetched apart from this repository, not vendored.

The fork's layer module is loaded on its own against the pinned upstream PEFT (its imports:
`BaseTunerLayer`, `BufferDict`, `gather_params_ctx`, ...); only its package's `PacaConfig` is
stood in for, which the layer never reads. Its custom autograd function expects 3-D input, as
the digest notes; the cases use (batch, seq, in).

Per case: a base nn.Linear with bias, the official `Linear` on it (paca_w = W[:, idx] / scaling,
so it starts at identity), paca_w moved as training would, one training forward (which writes
scaling * paca_w into W's columns, then one product) and a backward through a fixed projection;
then `merge()`. Writes tests/fixtures/golden/paca.safetensors: W, b, the indices, paca_w, x,
the projection, y, dL/dx, dL/dpaca_w and the merged W.

Run with the pinned venv (tools/golden/requirements.txt):
    python tools/golden/paca_oracle.py /path/to/paca-checkout-or-git-dir
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
import warnings

import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
LAYER = "peft/src/peft/tuners/paca/layer.py"
# (out, in, r, paca_alpha)
CASES = {"square": (8, 8, 3, 6.0), "wide": (5, 12, 4, 8.0), "tall": (12, 6, 2, 2.0)}


def layer_source(src):
    if os.path.isfile(os.path.join(src, LAYER)):
        return open(os.path.join(src, LAYER)).read()
    return subprocess.check_output(["git", "--git-dir", src, "show", f"HEAD:{LAYER}"], text=True)


def load_layer(src):
    import peft.tuners

    pkg = types.ModuleType("peft.tuners.paca")
    pkg.__path__ = []
    cfg = types.ModuleType("peft.tuners.paca.config")
    cfg.PacaConfig = object
    sys.modules.update({"peft.tuners.paca": pkg, "peft.tuners.paca.config": cfg})
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(layer_source(src))
    spec = importlib.util.spec_from_file_location("peft.tuners.paca.layer", f.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["peft.tuners.paca.layer"] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    mod = load_layer(sys.argv[1])
    torch.manual_seed(20250122)
    out = {}
    for name, (d_out, d_in, r, alpha) in CASES.items():
        base = torch.nn.Linear(d_in, d_out, bias=True)
        w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
        lin = mod.Linear(base, "default", r=r, paca_alpha=alpha)
        lin.train()
        idx = lin.paca_indices["default"].clone()
        with torch.no_grad():
            lin.paca_w["default"].add_(0.5 * torch.randn_like(lin.paca_w["default"]))
        paca_w = lin.paca_w["default"].detach().clone()
        x = torch.randn(2, 3, d_in, requires_grad=True)
        proj = torch.randn(2, 3, d_out)
        y = lin(x)
        (y * proj).sum().backward()
        lin.merge()
        out |= {
            f"{name}.w": w0, f"{name}.b": b0, f"{name}.idx": idx.to(torch.int64),
            f"{name}.paca_w": paca_w, f"{name}.x": x.detach(), f"{name}.proj": proj,
            f"{name}.y": y.detach(), f"{name}.dx": x.grad.detach(),
            f"{name}.dpaca_w": lin.paca_w["default"].grad.detach().clone(),
            f"{name}.merged": lin.get_base_layer().weight.detach().clone(),
        }
        print(name, "indices", idx.tolist(), "scaling", lin.scaling["default"])
    path = os.path.join(ROOT, "paca.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
