#!/usr/bin/env python3
"""The AWQ golden folder against AutoAWQ's own code: its dequantizer reads what make_gptq.py's
decoder reads, and its packer writes the folder's bytes.

petal's test (`crates/petal-io/tests/gptq.rs`) holds petal's reading of
tests/fixtures/golden/llama_awq to the weights make_gptq.py's decoder unpacks. Both that decoder
and make_gptq.py's packer are transcriptions; this script runs AutoAWQ 0.2.9's own
`dequantize_gemm` (awq/utils/packing_utils.py) and `WQLinear_GEMM.from_linear`
(awq/modules/linear/gemm.py) on every quantized linear of the folder:

- `dequantize_gemm(qweight, qzeros, scales)` (scales widened to f32, so its `(q - zero) *
  scale` runs in f32 as the decoder's does) equals the decoder's weights exactly;
- `from_linear` given those weights and the folder's scales and zeros returns the folder's
  qweight, qzeros and scales bit for bit.

AutoAWQ is deprecated and its package does not import with transformers 5 (its `__init__`
loads every model class), so the two files are loaded alone from the pinned sdist, with the
two helpers gemm.py imports from the package given in place (`try_import`: no compiled
extension; `get_best_device`: the CPU).

    target/venv-ref/bin/python tools/golden/check_awq_packer.py   # downloads autoawq==0.2.9's sdist

Exits non-zero on any difference.
"""
import importlib.util
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import types

import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDER = ROOT / "tests/fixtures/golden/llama_awq"
VERSION = "0.2.9"


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def autoawq(tmp):
    subprocess.run([sys.executable, "-m", "pip", "download", f"autoawq=={VERSION}", "--no-deps",
                    "--no-binary", ":all:", "-d", tmp], check=True, capture_output=True)
    with tarfile.open(next(pathlib.Path(tmp).glob("autoawq-*.tar.gz"))) as t:
        t.extractall(tmp, filter="data")
    src = pathlib.Path(tmp) / f"autoawq-{VERSION}" / "awq"
    # the package's modules gemm.py imports, without the package's __init__
    for name in ("awq", "awq.utils", "awq.modules"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["awq"].__path__ = []  # a package, so `awq.modules.triton` is an ImportError
    helpers = types.ModuleType("awq.utils.module")
    helpers.try_import = lambda name: (None, "not built here")
    sys.modules["awq.utils.module"] = helpers
    utils = types.ModuleType("awq.utils.utils")
    utils.get_best_device = lambda: "cpu"
    sys.modules["awq.utils.utils"] = utils
    packing = load("awq.utils.packing_utils", src / "utils/packing_utils.py")
    gemm = load("awq.modules.linear.gemm", src / "modules/linear/gemm.py")
    return packing, gemm


def main():
    sys.path.insert(0, str(ROOT / "tools/golden"))
    from make_gptq import KINDS, awq_unpack

    group = KINDS["llama_awq"][1]
    with tempfile.TemporaryDirectory() as tmp:
        packing, gemm = autoawq(tmp)
        saved = load_file(str(FOLDER / "model.safetensors"))
        names = sorted(k[: -len(".qweight")] for k in saved if k.endswith(".qweight"))
        assert names, "no quantized linear in the folder"
        for name in names:
            t = {p: saved[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales")}
            w, _, zeros = awq_unpack(t, group)  # (out, in) f32; zeros (groups, out)
            theirs = packing.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"].float(), 4, group)
            assert torch.equal(theirs.t(), w), f"{name}: dequantize_gemm differs from the decoder"
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data = w.clone()
            q = gemm.WQLinear_GEMM.from_linear(linear, 4, group, scales=t["scales"].float(),
                                                zeros=zeros.to(torch.float32))
            for part in ("qweight", "qzeros", "scales"):
                assert torch.equal(getattr(q, part), t[part]), f"{name}: from_linear's {part} differs"
        print(f"{len(names)} linears: AutoAWQ {VERSION}'s dequantize_gemm and from_linear agree with "
              f"{FOLDER.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
