#!/usr/bin/env python3
"""Golden LoftQ and MiCA initialisations of LoRA, made apart from petal's Rust.

- MiCA (`init_lora_weights="mica"`) by PEFT itself: `get_peft_model` over a module of two
  linears; B is the r left singular vectors of W with the smallest singular values, A is zero,
  B is frozen (its `requires_grad`, and the trainable-parameter count, are recorded).
- LoftQ (`init_lora_weights="loftq"`): PEFT 0.21.2's `loftq_init` runs its quantizer on
  "cuda" (or "xpu") unconditionally, so it cannot run on this CPU. This script runs the same
  loop on the CPU with the same parts: bitsandbytes' own quantizers, called as `loftq_init`
  calls them (`bnb.nn.Params4bit(res, compress_statistics=False, quant_type="nf4")` and
  `dequantize_4bit`, through bitsandbytes' reference implementation, see `dequantize_4bit`
  below; `bnb.nn.Int8Params(res)` and `int8_vectorwise_dequant`), and PEFT's own
  `_low_rank_decomposition` for the SVD; only the device differs.

    python -m venv /tmp/venv-bnb && /tmp/venv-bnb/bin/pip install -r tools/golden/requirements.txt \
        bitsandbytes==0.50.2
    /tmp/venv-bnb/bin/python tools/golden/make_lora_inits.py

Writes tests/fixtures/golden/lora_inits.safetensors; for each weight `<w>` in `tall` (96 x 64),
`wide` (48 x 128) and `odd` (40 x 72: NF4 blocks of 64 cross its rows, as bitsandbytes
quantizes the flattened tensor):
  <w>.weight                 f32 (out, in)  the input, seeded normal * 0.02 with a few outliers
  <w>.loftq<b>_<t>.base      f32 (out, in)  the dequantized base LoftQ leaves (b bits, t iterations)
  <w>.loftq<b>_<t>.lora_A    f32 (r, in)    R of the last SVD
  <w>.loftq<b>_<t>.lora_B    f32 (out, r)   L of the last SVD
  <w>.mica.lora_A / lora_B   f32            PEFT's MiCA initialisation (r = 4)
  mica.trainable             i64 (1)        PEFT's trainable-parameter count (A only)
for (b, t) in (4, 1), (4, 3), (8, 1), (8, 2), r = 4.

And adapters PEFT saves over the tiny golden Llama (tests/fixtures/golden/llama, from
make_fixtures.py), their A and B moved off their start so they matter, with PEFT's logits on
make_fixtures.py's input ids, for petal to load (rebuilding LoftQ's Q from W) and match:
tests/fixtures/golden/adapters/llama_{loftq4,loftq8,mica}/ and
tests/fixtures/golden/lora_inits_logits.safetensors (`input_ids`, one logits tensor each).
LoftQ through PEFT's `get_peft_model` with `init_lora_weights="loftq"`, its layer's
`loftq_init` given the CPU loop below in place of the "cuda" one (the rest is PEFT's).

Versions: tools/golden/requirements.txt (torch 2.15.0, peft 0.21.2, safetensors 0.8.0) and
bitsandbytes 0.50.2.
"""
from importlib.metadata import version
from pathlib import Path

import bitsandbytes as bnb
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute as dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code as get_4bit_code
import torch
import peft.tuners.lora.layer as lora_layer
from make_fixtures import INPUT_IDS
from peft import LoftQConfig, LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
from peft.utils.loftq_utils import _low_rank_decomposition
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fixtures/golden/lora_inits.safetensors"
SHAPES = {"tall": (96, 64), "wide": (48, 128), "odd": (40, 72)}
RANK = 4
RUNS = [(4, 1), (4, 3), (8, 1), (8, 2)]


def weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    idx = torch.randint(0, w.numel(), (max(1, w.numel() // 500),), generator=g)
    w.view(-1)[idx] *= 8.0
    return w


def dequantize_4bit(qweight):
    """`bnb.functional.dequantize_4bit` by bitsandbytes' own reference implementation (its
    default backend: blocks of 64 over the flattened tensor, as `quantize_4bit` wrote them).
    bitsandbytes 0.50.2's CPU kernel, which the call would reach here, reads a weight whose rows
    hold fewer values than a block (the tiny Llama's 32 and 48) with other blocks' scales: 5x
    the error of the reference on a (16, 32) weight."""
    st = qweight.quant_state
    code = get_4bit_code(st.quant_type, qweight.device)
    flat = qweight.data.view(torch.uint8).reshape(-1)
    return dequantize_4bit_compute(flat, st.absmax, code, st.blocksize, st.shape, torch.float32)


@torch.no_grad()
def loftq_cpu(weight, num_bits, reduced_rank, num_iter):
    """`peft.utils.loftq_utils.loftq_init` of PEFT 0.21.2, step for step, on the CPU."""
    weight = weight.to(torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        if num_bits == 4:
            qweight = bnb.nn.Params4bit(
                res.to("cpu"), requires_grad=False, compress_statistics=False, quant_type="nf4"
            ).to("cpu")
            assert qweight.bnb_quantized
            dequantized_weight = dequantize_4bit(qweight)
        else:
            qweight = bnb.nn.Int8Params(res.to("cpu"), requires_grad=False).to("cpu")
            assert qweight.data.dtype == torch.int8
            dequantized_weight = bnb.functional.int8_vectorwise_dequant(qweight.data, qweight.SCB)
        res = weight - dequantized_weight
        output = _low_rank_decomposition(res, reduced_rank=reduced_rank)
        L, R = output["L"], output["R"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    return dequantized_weight, R, L


class Two(torch.nn.Module):
    def __init__(self, ws):
        super().__init__()
        self.lin = torch.nn.ModuleDict()
        for name, w in ws.items():
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.clone()
            self.lin[name] = lin

    def forward(self, x):
        return x


def main():
    out = {}
    ws = {name: weight(shape, seed) for seed, (name, shape) in enumerate(SHAPES.items())}
    for name, w in ws.items():
        out[f"{name}.weight"] = w
        for bits, iters in RUNS:
            base, a, b = loftq_cpu(w, bits, RANK, iters)
            key = f"{name}.loftq{bits}_{iters}"
            out[f"{key}.base"] = base.contiguous()
            out[f"{key}.lora_A"] = a.contiguous()
            out[f"{key}.lora_B"] = b.contiguous()
    model = get_peft_model(
        Two(ws), LoraConfig(r=RANK, lora_alpha=8, init_lora_weights="mica", target_modules=list(SHAPES))
    )
    for name in SHAPES:
        layer = model.base_model.model.lin[name]
        assert not layer.lora_B["default"].weight.requires_grad
        assert layer.lora_A["default"].weight.requires_grad
        out[f"{name}.mica.lora_A"] = layer.lora_A["default"].weight.detach().contiguous()
        out[f"{name}.mica.lora_B"] = layer.lora_B["default"].weight.detach().contiguous()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["mica.trainable"] = torch.tensor([trainable], dtype=torch.int64)
    meta = {n: version(n) for n in ("torch", "peft", "bitsandbytes", "safetensors")}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, OUT, metadata=meta)
    print(f"wrote {OUT} ({len(out)} tensors; {meta})")


def loftq_on_cpu(self, adapter_name, config):
    """`LoraLayer.loftq_init` of PEFT 0.21.2 with `loftq_cpu` for `loftq_init`."""
    c = config.loftq_config
    weight = self.get_base_layer().weight
    qweight, lora_a, lora_b = loftq_cpu(weight, c["loftq_bits"], self.r[adapter_name], c["loftq_iter"])
    self.lora_A[adapter_name].weight.data = lora_a
    self.lora_B[adapter_name].weight.data = lora_b
    self.get_base_layer().weight.data = qweight


def end_to_end():
    lora_layer.LoraLayer.loftq_init = loftq_on_cpu
    cases = {
        "llama_loftq4": LoraConfig(r=4, lora_alpha=4, init_lora_weights="loftq",
                                   loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2),
                                   target_modules=["q_proj", "v_proj", "down_proj"]),
        "llama_loftq8": LoraConfig(r=2, lora_alpha=6, init_lora_weights="loftq",
                                   loftq_config=LoftQConfig(loftq_bits=8, loftq_iter=1), target_modules="all-linear"),
        "llama_mica": LoraConfig(r=4, lora_alpha=8, init_lora_weights="mica", target_modules=["k_proj", "up_proj"]),
    }
    out = {"input_ids": INPUT_IDS.to(torch.int64)}
    golden = ROOT / "tests/fixtures/golden"
    for i, (name, cfg) in enumerate(cases.items()):
        torch.manual_seed(200 + i)
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(golden / "llama"), cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_A" in n or ("lora_B" in n and p.requires_grad):
                    p.add_(torch.randn_like(p) * 0.05)
        pm.eval()
        with torch.no_grad():
            out[name] = pm(input_ids=INPUT_IDS).logits.float().contiguous()
        pm.save_pretrained(golden / "adapters" / name)
    save_file(out, golden / "lora_inits_logits.safetensors")


if __name__ == "__main__":
    main()
    end_to_end()
