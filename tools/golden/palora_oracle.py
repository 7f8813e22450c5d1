#!/usr/bin/env python3
"""PaLoRA's layer and ray sampler, run from the OFFICIAL code (nik-dim/palora), not transcribed: at
run time `git show` extracts src/callbacks/methods/ll/palora_modules.py (class PaLinear) and
src/callbacks/methods/utils/samplers.py (class AnnealingSampler) from a clone or bare mirror of the
repository into a temporary directory, and this script imports those two files as they are. Nothing
else of the repository is imported (palora.py and src/utils pull in wandb, lightning, ...).

The official PaLinear: y = F.linear(x, W, b) + scaling * sum_k ray[k] * (x A_k^T B_k^T), with
scaling = lora_alpha / r; W and b are trainable (not frozen). The official AnnealingSampler for two
tasks: rays = stack(linspace(eps, 1 - eps, num), its flip), then rays ** (mul * t), each row divided
by its sum; `sample` asserts num > 1.

Three tasks are NOT recorded (no `rays3` key): the official sampler calls meshzoo.triangle, and
the MIT-era meshzoo (< 0.9) is no longer on PyPI; only 0.12+ (proprietary licence) is there. The
samplers.py import of meshzoo is satisfied by a stub whose triangle() raises, so the two-task path
runs without it. For the record, the old open-source meshzoo.triangle(n) returns bary (3, P),
P = (n + 1)(n + 2) / 2, point p = ((n - i - j) / n, j / n, i / n) for i in 0..=n (outer), j in
0..=n - i (inner); and AnnealingSampler(num_tasks=3, num=N) stores the POINT COUNT
(m + 1)(m + 2) / 2, m = int((-1 + sqrt(8N - 1)) / 2), in self.num and then passes that count to
meshzoo.triangle as the number of intervals (num=6 -> triangle(6) -> 28 points).

Writes tests/fixtures/golden/palora.safetensors (all float32):
  K = 2 tasks, r 2, in 5, out 4, lora_alpha 3, ray (0.3, 0.7): x, weight, bias, A = cat(A_0, A_1)
    (4, 5), B = cat(B_0, B_1, dim 1) (4, 4), ray, alpha, r, y, proj, grad_x / grad_A / grad_B of
    sum(y * proj), delta = scaling * sum_k ray_k B_k A_k.
  K = 3 tasks, r 1, in 6, out 3, lora_alpha 1, ray (0.2, 0.5, 0.3): the same keys suffixed `3`.
  ts = (0, 0.25, 0.5, 1); rays2 = AnnealingSampler(2, num=4, mul=5, epsilon=0.01).sample(t) per t
    (4, 4, 2); rays2_3 the same with num=3 (4, 3, 2).

Run from the repository root with the pinned venv (tools/golden/requirements.txt):
  PALORA_REPO=/path/to/palora python tools/golden/palora_oracle.py
PALORA_REPO defaults to /work/.mirror/nik-dim+palora/repo; without it,
`git clone https://github.com/nik-dim/palora` and point PALORA_REPO at the clone.
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import types

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
REPO = os.environ.get("PALORA_REPO", "/work/.mirror/nik-dim+palora/repo")
FILES = {
    "palora_modules": "src/callbacks/methods/ll/palora_modules.py",
    "samplers": "src/callbacks/methods/utils/samplers.py",
}


def git(*args):
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, text=True).stdout


def load_official(tmp):
    """Extracts the two official files with `git show` and imports them as standalone modules."""
    if not os.path.isdir(REPO):
        sys.exit(f"no PaLoRA repository at {REPO}: git clone https://github.com/nik-dim/palora "
                 "and set PALORA_REPO to the clone")
    commit = git("rev-parse", "HEAD").strip()
    print("official PaLoRA commit", commit)

    # samplers.py does `import meshzoo` at the top; only the three-task path uses it.
    stub = types.ModuleType("meshzoo")

    def triangle(*_args, **_kwargs):
        raise NotImplementedError("meshzoo stub: the three-task sampler is not recorded")

    stub.triangle = triangle
    sys.modules["meshzoo"] = stub

    mods = {}
    for name, path in FILES.items():
        dst = os.path.join(tmp, name + ".py")
        with open(dst, "w") as f:
            f.write(git("show", f"HEAD:{path}"))
        spec = importlib.util.spec_from_file_location("palora_official_" + name, dst)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses looks the module up by name
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods["palora_modules"], mods["samplers"]


def layer_case(pm, k, r, d_in, d_out, alpha, ray, suffix):
    layer = pm.PaLinear(in_features=d_in, out_features=d_out, num_members=k, r=r, lora_alpha=alpha)
    assert list(layer.lora_A.keys()) == [str(i) for i in range(k)]
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in))
        layer.bias.copy_(torch.randn(d_out))
        for i in range(k):
            layer.lora_A[str(i)].copy_(torch.randn(r, d_in))
        for i in range(k):
            layer.lora_B[str(i)].copy_(torch.randn(d_out, r))
    x = torch.randn(2, 3, d_in).requires_grad_(True)
    proj = torch.randn(2, 3, d_out)
    ray_t = torch.tensor(ray, dtype=torch.float32)

    y = layer(x, ray_t)
    (y * proj).sum().backward()

    a_list = [layer.lora_A[str(i)] for i in range(k)]
    b_list = [layer.lora_B[str(i)] for i in range(k)]
    with torch.no_grad():
        scaling = layer.scaling
        assert scaling == alpha / r
        delta = scaling * sum(ray_t[i] * (b_list[i] @ a_list[i]) for i in range(k))
        merged = torch.nn.functional.linear(x, layer.weight + delta, layer.bias)
        assert torch.allclose(merged, y, atol=1e-5), "merged update disagrees with the official forward"

    out = {
        "x": x.detach(), "weight": layer.weight.detach(), "bias": layer.bias.detach(),
        "A": torch.cat([a.detach() for a in a_list], 0), "B": torch.cat([b.detach() for b in b_list], 1),
        "ray": ray_t, "alpha": torch.tensor([float(alpha)]), "r": torch.tensor([float(r)]),
        "y": y.detach(), "proj": proj, "grad_x": x.grad,
        "grad_A": torch.cat([a.grad for a in a_list], 0), "grad_B": torch.cat([b.grad for b in b_list], 1),
        "delta": delta,
    }
    return {key + suffix: v for key, v in out.items()}


def main():
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        pm, samplers = load_official(tmp)

        torch.manual_seed(0)
        out.update(layer_case(pm, k=2, r=2, d_in=5, d_out=4, alpha=3.0, ray=(0.3, 0.7), suffix=""))
        out.update(layer_case(pm, k=3, r=1, d_in=6, d_out=3, alpha=1.0, ray=(0.2, 0.5, 0.3), suffix="3"))

        ts = [0.0, 0.25, 0.5, 1.0]
        out["ts"] = torch.tensor(ts, dtype=torch.float32)
        for key, num in (("rays2", 4), ("rays2_3", 3)):
            sampler = samplers.AnnealingSampler(num_tasks=2, num=num, mul=5, epsilon=0.01)
            out[key] = torch.stack([sampler.sample(t) for t in ts])

    out = {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}
    path = os.path.join(ROOT, "palora.safetensors")
    save_file(out, path)
    print("wrote", os.path.normpath(path))
    for k, v in out.items():
        print(f"  {k:8s} {tuple(v.shape)}")


if __name__ == "__main__":
    main()
