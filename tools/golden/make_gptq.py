#!/usr/bin/env python3
"""A GPTQ checkpoint (AutoGPTQ / GPTQModel's `checkpoint_format: "gptq"`, v1), for petal's loader of GPTQ folders.

A tiny random Llama (hidden 128, intermediate 256, so the rows of q/k/v/o/gate/up are one group of
128 and those of down two) has every decoder linear quantized to 4 bits by round to nearest on
GPTQ's own grid (`Quantizer.find_params` / `quantize` of the GPTQ code, asymmetric: per output row
and group of 128 inputs the range widened to include 0, `scale = (max - min) / 15`,
`zero = round(-min / scale)`, `q = clamp(round(w / scale) + zero, 0, 15)`; scales stored in f16),
without GPTQ's error-compensating updates (they need calibration data and change no storage).
The codes are packed as AutoGPTQ's `QuantLinear.pack` does (auto_gptq/nn_modules/qlinear/
qlinear_cuda_old.py, AutoGPTQ/AutoGPTQ@179776bd1d97a2e7f84b72318630f43719647a11):

    X.qweight  int32 (in / 8, out)      eight 4-bit codes per word along the input: the code of
                                        input i in bits 4 (i % 8) of row i // 8
    X.qzeros   int32 (groups, out / 8)  the zero points less one (v1's convention), eight per word
                                        along the output: output o in bits 4 (o % 8) of column o // 8
    X.scales   f16   (groups, out)
    X.g_idx    int32 (in,)              i // 128 (no act-order)

and no `X.weight`; the embedding, the norms and the head stay f32. The reference logits come from a
fresh LlamaForCausalLM holding the weights unpacked from the saved file by a separate decoder that
follows the same file's dequantization (`scale * (q - (stored_zero + 1))`, here in f32), checked to
equal the quantized values exactly.

Two more folders from the same tiny Llama (other seeds), for the other layouts petal reads:

- llama_gptq_act/: act-order (`desc_act: true`), groups of 32. GPTQ's `fasterquant` with
  `actorder` visits the columns in order of decreasing Hessian diagonal (`perm = argsort(diag(H),
  descending=True)`), quantizes runs of 32 columns in that order as one group each, and stores
  `g_idx[perm[k]] = k // 32` with the codes back in the columns' own order; here the diagonal is a
  random positive vector (the storage does not depend on where it came from).
- llama_awq/: AutoAWQ's GEMM layout, groups of 64: AWQ's own grid (`pseudo_quantize_tensor`:
  `scale = (max - min).clamp(1e-5) / 15`, `zero = clamp(-round(min / scale), 0, 15)`, no widening
  to include 0) and `WQLinear_GEMM.from_linear`'s packing (qweight `(in, out / 8)` and qzeros
  `(groups, out / 8)`, eight codes per word along the output in the order `[0, 2, 4, 6, 1, 3, 5,
  7]`, zeros not less one; casper-hansen/AutoAWQ awq/modules/linear/gemm.py), read back by the
  GEMM dequantizer's steps (`unpack_awq`, `reverse_awq_order` with `[0, 4, 1, 5, 2, 6, 3, 7]`,
  `(q - zero) * scale`; awq/utils/packing_utils.py), written apart from the packer below.

    /root/pyref/bin/python tools/golden/make_gptq.py

Writes tests/fixtures/golden/llama_gptq/ (config.json with quantization_config {quant_method gptq,
bits 4, group_size 128, desc_act false, sym false, checkpoint_format gptq}, generation_config.json,
model.safetensors, the tokenizer of the tiny golden Llama) and logits.safetensors (`input_ids`,
`logits`, f32).

Versions: tools/golden/requirements.txt (torch 2.15.0, transformers 5.24.0, safetensors 0.8.0);
no GPTQ package is needed.
"""
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests/fixtures/golden"
OUT = GOLDEN / "llama_gptq"
IDS = torch.tensor([[1, 5, 9, 14, 20, 33, 2, 71], [7, 7, 3, 90, 45, 12, 60, 8]])
BITS, MAXQ = 4, 15
PER_WORD = 32 // BITS
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def quantize(w, group, order=None):
    """GPTQ's asymmetric round to nearest of an (out, in) weight, per row and group of `group`
    inputs taken in `order` (act-order; default the columns' own order).

    Returns the codes (out, in) int64 in the columns' own order, the f32 scales and the zeros
    (out, groups), and g_idx (in,): the group of each input."""
    out_f, in_f = w.shape
    order = torch.arange(in_f) if order is None else order
    g = w[:, order].reshape(out_f, in_f // group, group)
    xmin = g.min(dim=2).values.clamp(max=0)
    xmax = g.max(dim=2).values.clamp(min=0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0], xmax[both0] = -1.0, 1.0
    scale = (xmax - xmin) / MAXQ
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, MAXQ)
    codes = torch.empty(out_f, in_f, dtype=torch.int64)
    codes[:, order] = q.reshape(out_f, in_f).to(torch.int64)
    g_idx = torch.empty(in_f, dtype=torch.int64)
    g_idx[order] = torch.arange(in_f) // group
    return codes, scale, zero.to(torch.int64), g_idx


def to_int32(words):
    """Words held in int64 as unsigned 32-bit values, reinterpreted as int32 (two's complement)."""
    assert words.min() >= 0 and words.max() < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(q, scale, zero, g_idx):
    """The GPTQ v1 tensors of one linear from its codes (out, in), f32 scales and zeros (out, groups)."""
    out_f, in_f = q.shape
    scales = scale.t().contiguous().half()                     # (groups, out)
    # AutoGPTQ's pack recomputes the codes from the layer's (fake-quantized) weight with the f16
    # scales: round((W + zero * scale) / scale_f16); on this grid they are the codes themselves
    wq = (scale[:, g_idx] * (q - zero[:, g_idx])).float()
    sz = (zero * scale).t()                                    # (groups, out), as `scale_zeros`
    intweight = torch.round((wq.t() + sz[g_idx]) / scales.float()[g_idx]).to(torch.int64)  # (in, out)
    assert torch.equal(intweight, q.t()), "pack's recomputed codes differ from the quantizer's"
    shifts = BITS * torch.arange(PER_WORD, dtype=torch.int64)
    # qweight[r, o] |= intweight[8 r + j, o] << 4 j
    qweight = (intweight.reshape(in_f // PER_WORD, PER_WORD, out_f) << shifts[None, :, None]).sum(1)
    # v1: `zeros -= 1` before packing; a zero of 0 would wrap to -1 and spill into the other nibbles
    z = zero.t() - 1                                           # (groups, out)
    assert z.min() >= 0 and z.max() <= MAXQ, "a zero point outside 1..15 has no clean v1 code"
    # qzeros[:, c] |= zeros[:, 8 c + j] << 4 j
    qzeros = (z.reshape(z.shape[0], out_f // PER_WORD, PER_WORD) << shifts[None, None, :]).sum(2)
    return {
        "qweight": to_int32(qweight),
        "qzeros": to_int32(qzeros),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }


def unpack(t):
    """An (out, in) f32 weight from the saved v1 tensors, following AutoGPTQ's dequantization
    (QuantLinear.forward's torch path: shift and mask each word, zeros + 1, scale * (q - zero),
    each input's scale and zero taken by its g_idx).

    Also returns the codes (in, out) and the zeros (groups, out) it read."""
    wf = torch.arange(0, 32, BITS, dtype=torch.int32)
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"].long()
    zeros = torch.bitwise_and(torch.bitwise_right_shift(qzeros[:, :, None], wf[None, None, :]), MAXQ)
    zeros = (zeros + 1).reshape(qzeros.shape[0], -1)           # (groups, out)
    codes = torch.bitwise_and(torch.bitwise_right_shift(qweight[:, None, :], wf[None, :, None]), MAXQ)
    codes = codes.reshape(-1, qweight.shape[1])                # (in, out)
    w = scales.float()[g_idx] * (codes - zeros[g_idx]).float()
    return w.t().contiguous(), codes, zeros


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def awq_quantize(w, group):
    """AWQ's `pseudo_quantize_tensor` grid (zero point, 4 bits) of an (out, in) weight: the codes
    (out, in), f32 scales and zeros (out, groups)."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    max_val, min_val = g.amax(dim=2), g.amin(dim=2)
    scale = (max_val - min_val).clamp(min=1e-5) / MAXQ
    zero = (-torch.round(min_val / scale)).clamp(0, MAXQ)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, MAXQ)
    return q.reshape(out_f, in_f).to(torch.int64), scale, zero.to(torch.int64)


def awq_pack(q, scale, zero, group):
    """WQLinear_GEMM.from_linear's tensors from the codes (out, in), scales and zeros (out, groups)."""
    out_f, in_f = q.shape
    scales = scale.t().contiguous().half()                     # (groups, out)
    g_of = torch.arange(in_f) // group
    wq = (scale[:, g_of] * (q - zero[:, g_of])).float()        # the fake-quantized linear.weight
    scale_zeros = (zero * scale).t()                           # (groups, out)
    intweight = torch.round((wq.t() + scale_zeros[g_of]) / scales.float()[g_of]).to(torch.int64)
    assert torch.equal(intweight, q.t()), "pack's recomputed codes differ from the quantizer's"
    qweight = torch.zeros(in_f, out_f // PER_WORD, dtype=torch.int64)
    qzeros = torch.zeros(in_f // group, out_f // PER_WORD, dtype=torch.int64)
    zeros = zero.t()                                           # (groups, out)
    for col in range(out_f // PER_WORD):
        for i in range(PER_WORD):
            qweight[:, col] |= intweight[:, col * PER_WORD + AWQ_ORDER[i]] << (i * BITS)
            qzeros[:, col] |= zeros[:, col * PER_WORD + AWQ_ORDER[i]] << (i * BITS)
    return {"qweight": to_int32(qweight), "qzeros": to_int32(qzeros), "scales": scales}


def awq_unpack(t, group):
    """An (out, in) f32 weight by the GEMM dequantizer's steps; also the codes (in, out) and zeros."""
    shifts = torch.arange(0, 32, BITS)
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).reshape(qweight.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).reshape(qzeros.shape[0], -1)
    reverse = torch.arange(iw.shape[-1]).view(-1, PER_WORD)[:, AWQ_REVERSE_ORDER].reshape(-1)
    iw, iz = iw[:, reverse] & MAXQ, iz[:, reverse] & MAXQ
    w = (iw - iz.repeat_interleave(group, dim=0)).float() * scales.float().repeat_interleave(group, dim=0)
    return w.t().contiguous(), iw, iz


KINDS = {
    # folder: (seed, group, quantization_config)
    "llama_gptq": (5, 128, {"quant_method": "gptq", "bits": BITS, "group_size": 128,
                            "desc_act": False, "sym": False, "checkpoint_format": "gptq"}),
    "llama_gptq_act": (6, 32, {"quant_method": "gptq", "bits": BITS, "group_size": 32,
                               "desc_act": True, "sym": False, "checkpoint_format": "gptq"}),
    "llama_awq": (7, 64, {"quant_method": "awq", "bits": BITS, "group_size": 64,
                          "zero_point": True, "version": "gemm", "modules_to_not_convert": None}),
}


def build(folder, seed, group, quant_config):
    out = GOLDEN / folder
    awq = quant_config["quant_method"] == "awq"
    act = quant_config.get("desc_act", False)
    parts = ("qweight", "qzeros", "scales") + (() if awq else ("g_idx",))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=64,
        rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    quant_names = [f"model.layers.{i}.{m}" for i in range(cfg.num_hidden_layers) for m in LINEARS]

    tensors, expected = {}, {}
    reordered = 0
    for name in quant_names:
        w = sd.pop(f"{name}.weight")
        if awq:
            q, scale, zero = awq_quantize(w, group)
            packed = awq_pack(q, scale, zero, group)
            g_idx = torch.arange(w.shape[1]) // group
        else:
            # act-order: the columns by decreasing diagonal of a (here random) Hessian
            order = torch.argsort(torch.rand(w.shape[1]) + 0.1, descending=True) if act else None
            q, scale, zero, g_idx = quantize(w, group, order)
            reordered += int(not torch.equal(g_idx, torch.arange(w.shape[1]) // group))
            packed = pack(q, scale, zero, g_idx)
        for part, t in packed.items():
            tensors[f"{name}.{part}"] = t
        # the quantized values: f16 scale times (code - zero), in f32
        s16 = packed["scales"].float().t()[:, g_idx]
        expected[name] = (s16 * (q - zero[:, g_idx]).float(), q, zero)
    assert reordered == (len(quant_names) if act else 0)
    tensors.update(sd)

    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)  # config.json, generation_config.json (model.safetensors replaced below)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(GOLDEN / "llama" / name, out / name)

    # the reference: the saved file read back, the linears unpacked, a fresh model
    saved = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in quant_names for k in saved)
    state = {}
    for k, v in saved.items():
        base, part = k.rsplit(".", 1)
        if base in quant_names:
            continue
        assert v.dtype == torch.float32, k
        state[k] = v
    for name in quant_names:
        t = {p: saved[f"{name}.{p}"] for p in parts}
        assert t["qweight"].dtype == torch.int32 and t["qzeros"].dtype == torch.int32
        assert t["scales"].dtype == torch.float16
        w, codes, zeros = awq_unpack(t, group) if awq else unpack(t)
        want, q, zero = expected[name]
        assert torch.equal(codes, q.t()), name
        assert torch.equal(zeros, zero.t()), name
        assert torch.equal(w, want), f"{name}: unpacked weight differs from the quantized values"
        state[f"{name}.weight"] = w
    ref = LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = ref(IDS).logits.float().contiguous()
    meta = {k: version(k) for k in ("torch", "transformers", "safetensors")}
    save_file({"input_ids": IDS.to(torch.int64), "logits": logits}, str(out / "logits.safetensors"),
              metadata=meta)

    all_zeros = torch.cat([expected[n][2].flatten() for n in quant_names])
    print(f"wrote {out} ({meta}); zero points {all_zeros.min().item()}..{all_zeros.max().item()} "
          f"({all_zeros.unique().numel()} distinct); quantization_config: {quant_config}")
    n0 = quant_names[0]
    for part in parts:
        print(f"  {n0}.{part}: {tuple(saved[f'{n0}.{part}'].shape)} {saved[f'{n0}.{part}'].dtype}")


def main():
    for folder, (seed, group, quant_config) in KINDS.items():
        build(folder, seed, group, quant_config)


if __name__ == "__main__":
    main()
