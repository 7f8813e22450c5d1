#!/usr/bin/env python3
"""Golden AdaLoRA rank allocation, made by PEFT's own `RankAllocator`.

PEFT's AdaLoRA over a module shaped like petal's conformance toy (`layers.0.fc1`: 10 -> 12
with a bias, `layers.1.fc2`: 12 -> 6 without), init_r 4, target_r 2, tinit 1, tfinal 3,
deltaT 2, total_step 12, beta1 0.85, beta2 0.9. A, B and E start from seeded normal values
(E nonzero, so a masked triplet shows as a zero). Each step gets seeded gradients written
into `.grad` and the parameters moved by a seeded step (as an optimizer would), then
`AdaLoraModel.update_and_allocate(step)`, as PEFT's training loop calls it. Also PEFT's
orthogonal regulariser: AdaLoraModel.forward's added loss, read off a model whose output
has a zero loss.

    target/venv-ref/bin/python tools/golden/make_adalora_allocator.py

Writes tests/fixtures/golden/adalora_allocator.safetensors (`<m>`: layers.0.fc1,
layers.1.fc2; `<p>`: lora_A (4, in), lora_B (out, 4), lora_E (4, 1)):
  init.<m>.<p>       f32  the starting tensors
  grad.<s>.<m>.<p>   f32  the gradient given at step s
  move.<s>.<m>.<p>   f32  what is added to the parameter before step s's allocation
  after.<s>.<m>.<p>  f32  the parameter after step s's allocation (E masked)
  mask.<s>.<m>       f32  PEFT's rank_pattern after step s, 1 = kept (where PEFT set one)
  ipt.<s>.<m>.<p>    f32  the allocator's exp_avg_ipt after step s (until they are reset)
  unc.<s>.<m>.<p>    f32  its exp_avg_unc
  orth_reg           f32  orth_reg_weight 0.3 times the mean Frobenius norm, on `init`
Versions: tools/golden/requirements.txt (torch 2.15.0, peft 0.21.2, safetensors 0.8.0).
"""
import pathlib
from types import SimpleNamespace

import torch
from peft import AdaLoraConfig, get_peft_model
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/golden/adalora_allocator.safetensors"
MODULES = ["layers.0.fc1", "layers.1.fc2"]
PARTS = ["lora_A", "lora_B", "lora_E"]
STEPS = 12


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            [
                torch.nn.ModuleDict({"fc1": torch.nn.Linear(10, 12)}),
                torch.nn.ModuleDict({"fc2": torch.nn.Linear(12, 6, bias=False)}),
            ]
        )

    def forward(self, x):
        # a zero loss, so AdaLoraModel.forward's loss is its regulariser alone
        h = torch.nn.functional.silu(self.layers[0]["fc1"](x))
        y = self.layers[1]["fc2"](h)
        return SimpleNamespace(loss=(y * 0.0).sum())


def params(model):
    """(module, part) -> the AdaLoRA parameter of adapter `default`."""
    out = {}
    for name, p in model.named_parameters():
        for m in MODULES:
            for part in PARTS:
                if name.endswith(f"{m}.{part}.default"):
                    out[(m, part)] = p
    assert len(out) == len(MODULES) * len(PARTS), sorted(out)
    return out


def main():
    torch.manual_seed(0)
    cfg = AdaLoraConfig(
        init_r=4,
        target_r=2,
        tinit=1,
        tfinal=3,
        deltaT=2,
        beta1=0.85,
        beta2=0.9,
        total_step=STEPS,
        orth_reg_weight=0.3,
        lora_alpha=8,
        target_modules=["fc1", "fc2"],
    )
    model = get_peft_model(Toy(), cfg)
    ps = params(model)
    gen = torch.Generator().manual_seed(7)
    out = {}
    with torch.no_grad():
        for (m, part), p in ps.items():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            out[f"init.{m}.{part}"] = p.detach().clone()
    # AdaLoraModel.forward adds orth_reg_weight * the regulariser to the (zero) loss
    reg = model.base_model(torch.randn(2, 10, generator=gen)).loss
    out["orth_reg"] = reg.detach().reshape(1)
    for step in range(STEPS):
        with torch.no_grad():
            for (m, part), p in ps.items():
                g = torch.randn(p.shape, generator=gen)
                move = torch.randn(p.shape, generator=gen) * 0.05
                p.add_(move)
                p.grad = g
                out[f"grad.{step}.{m}.{part}"] = g.clone()
                out[f"move.{step}.{m}.{part}"] = move.clone()
        model.base_model.update_and_allocate(step)
        alloc = model.base_model.rankallocator
        for (m, part), p in ps.items():
            out[f"after.{step}.{m}.{part}"] = p.detach().clone()
            key = next((k for k in alloc.exp_avg_ipt if k.endswith(f"{m}.{part}.default")), None)
            if key is not None:  # the importance EMAs (reset after the final allocation)
                out[f"ipt.{step}.{m}.{part}"] = alloc.exp_avg_ipt[key].clone()
                out[f"unc.{step}.{m}.{part}"] = alloc.exp_avg_unc[key].clone()
        pattern = model.peft_config["default"].rank_pattern
        if pattern:
            for m in MODULES:
                key = next(k for k in pattern if f"{m}.lora_E" in k)
                out[f"mask.{step}.{m}"] = torch.tensor(pattern[key], dtype=torch.float32)
        for p in ps.values():
            p.grad = None
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(OUT))
    print(f"wrote {OUT} ({len(out)} tensors)")


if __name__ == "__main__":
    main()
