#!/usr/bin/env python3
"""The GPTQ and AWQ golden folders against the packers' own code: their dequantizers read what
make_gptq.py's decoders read, and their packers write the folders' bytes.

petal's test (`crates/petal-io/tests/gptq.rs`) holds petal's reading of
tests/fixtures/golden/llama_gptq, llama_gptq_act and llama_awq to the weights make_gptq.py's
decoders unpack. Those decoders and make_gptq.py's packers are transcriptions; this script runs
the originals on every quantized linear of the folders:

- AWQ, AutoAWQ 0.2.9 (awq/utils/packing_utils.py, awq/modules/linear/gemm.py):
  `dequantize_gemm(qweight, qzeros, scales)` equals the decoder's weights exactly (scales widened
  to f32, so its `(q - zero) * scale` runs in f32 as the decoder's does), and
  `WQLinear_GEMM.from_linear` given those weights and the folder's scales and zeros returns the
  folder's qweight, qzeros and scales bit for bit;
- GPTQ, AutoGPTQ 0.7.1 (auto_gptq/nn_modules/qlinear/qlinear_cuda.py, whose `pack` and
  torch forward follow g_idx, so act-order too): its forward on the identity (no CUDA
  extension: the torch path; f32 scales) gives the decoder's weights exactly, and `pack` given
  those weights, the folder's scales, zeros and g_idx returns the folder's qweight, qzeros,
  scales and g_idx bit for bit.

Neither package imports whole here (AutoAWQ's `__init__` loads every model class of
transformers 4, AutoGPTQ's its CUDA extensions), so each file is loaded alone from the pinned
distribution (`pip download`), with the helpers it imports from its package given in place.

    target/venv-ref/bin/python tools/golden/check_quant_packers.py

Exits non-zero on any difference.
"""
import importlib.util
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile

import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests/fixtures/golden"
VERSION = "0.2.9"
GPTQ_VERSION = "0.7.1"


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


def autogptq(tmp):
    subprocess.run([sys.executable, "-m", "pip", "download", f"auto-gptq=={GPTQ_VERSION}", "--no-deps",
                    "--only-binary", ":all:", "-d", tmp], check=True, capture_output=True)
    wheel = next(pathlib.Path(tmp).glob("auto_gptq-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract("auto_gptq/nn_modules/qlinear/qlinear_cuda.py", tmp)
    return load("qlinear_cuda", pathlib.Path(tmp) / "auto_gptq/nn_modules/qlinear/qlinear_cuda.py")


def linears(folder):
    saved = load_file(str(GOLDEN / folder / "model.safetensors"))
    names = sorted(k[: -len(".qweight")] for k in saved if k.endswith(".qweight"))
    assert names, f"no quantized linear in {folder}"
    return saved, names


def check_gptq(qlinear, folder, group):
    from make_gptq import unpack

    saved, names = linears(folder)
    for name in names:
        t = {p: saved[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
        w, _, zeros = unpack(t)  # (out, in) f32; zeros (groups, out), stored + 1
        out_f, in_f = w.shape
        q = qlinear.QuantLinear(4, group, in_f, out_f, bias=False)
        q.qweight, q.qzeros, q.g_idx = t["qweight"], t["qzeros"], t["g_idx"]
        q.scales = t["scales"].float()
        theirs = q(torch.eye(in_f))  # x W^T for x = I: W^T
        assert torch.equal(theirs, w.t()), f"{folder} {name}: the forward's weights differ from the decoder's"
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        linear.weight.data = w.clone()
        p = qlinear.QuantLinear(4, group, in_f, out_f, bias=False)
        p.pack(linear, t["scales"].float().t(), zeros.t().clone(), t["g_idx"].clone())
        assert torch.equal(p.qweight, t["qweight"]), f"{folder} {name}: pack's qweight differs"
        assert torch.equal(p.qzeros, t["qzeros"]), f"{folder} {name}: pack's qzeros differs"
        assert torch.equal(p.scales.half(), t["scales"]), f"{folder} {name}: pack's scales differ"
        assert torch.equal(p.g_idx, t["g_idx"]), f"{folder} {name}: pack's g_idx differs"
    return len(names)


def main():
    sys.path.insert(0, str(ROOT / "tools/golden"))
    from make_gptq import KINDS, awq_unpack

    with tempfile.TemporaryDirectory() as tmp:
        qlinear = autogptq(tmp)
        for folder in ("llama_gptq", "llama_gptq_act"):
            n = check_gptq(qlinear, folder, KINDS[folder][1])
            print(f"{folder}: {n} linears, AutoGPTQ {GPTQ_VERSION}'s forward and pack agree")
    group = KINDS["llama_awq"][1]
    with tempfile.TemporaryDirectory() as tmp:
        packing, gemm = autoawq(tmp)
        saved, names = linears("llama_awq")
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
        print(f"llama_awq: {len(names)} linears, AutoAWQ {VERSION}'s dequantize_gemm and from_linear agree")


if __name__ == "__main__":
    main()
