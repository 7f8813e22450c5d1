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
BITS, GROUP, MAXQ = 4, 128, 15
PER_WORD = 32 // BITS
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANT_CONFIG = {"quant_method": "gptq", "bits": BITS, "group_size": GROUP, "desc_act": False,
                "sym": False, "checkpoint_format": "gptq"}


def quantize(w):
    """GPTQ's asymmetric round to nearest of an (out, in) weight, per row and group of GROUP inputs.

    Returns the codes (out, in) int64, the f32 scales and the zeros (out, groups)."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // GROUP, GROUP)
    xmin = g.min(dim=2).values.clamp(max=0)
    xmax = g.max(dim=2).values.clamp(min=0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0], xmax[both0] = -1.0, 1.0
    scale = (xmax - xmin) / MAXQ
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, MAXQ)
    return q.reshape(out_f, in_f).to(torch.int64), scale, zero.to(torch.int64)


def to_int32(words):
    """Words held in int64 as unsigned 32-bit values, reinterpreted as int32 (two's complement)."""
    assert words.min() >= 0 and words.max() < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(q, scale, zero):
    """The GPTQ v1 tensors of one linear from its codes (out, in), f32 scales and zeros (out, groups)."""
    out_f, in_f = q.shape
    scales = scale.t().contiguous().half()                     # (groups, out)
    # AutoGPTQ's pack recomputes the codes from the layer's (fake-quantized) weight with the f16
    # scales: round((W + zero * scale) / scale_f16); on this grid they are the codes themselves
    wq = (scale.repeat_interleave(GROUP, 1) * (q - zero.repeat_interleave(GROUP, 1))).float()
    sz = (zero * scale).t()                                    # (groups, out), as `scale_zeros`
    g_of = torch.arange(in_f) // GROUP
    intweight = torch.round((wq.t() + sz[g_of]) / scales.float()[g_of]).to(torch.int64)  # (in, out)
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
        "g_idx": (torch.arange(in_f) // GROUP).to(torch.int32),
    }


def unpack(t):
    """An (out, in) f32 weight from the saved v1 tensors, following AutoGPTQ's dequantization
    (QuantLinear.forward's torch path: shift and mask each word, zeros + 1, scale * (q - zero)).

    Also returns the codes (in, out) and the zeros (groups, out) it read."""
    wf = torch.arange(0, 32, BITS, dtype=torch.int32)
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"].long()
    zeros = torch.bitwise_and(torch.bitwise_right_shift(qzeros[:, :, None], wf[None, None, :]), MAXQ)
    zeros = (zeros + 1).reshape(qzeros.shape[0], -1)           # (groups, out)
    codes = torch.bitwise_and(torch.bitwise_right_shift(qweight[:, None, :], wf[None, :, None]), MAXQ)
    codes = codes.reshape(-1, qweight.shape[1])                # (in, out)
    w = scales.float()[g_idx] * (codes - zeros[g_idx]).float()
    return w.t().contiguous(), codes, zeros


def main():
    torch.manual_seed(5)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=64,
        rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    quant_names = [f"model.layers.{i}.{m}" for i in range(cfg.num_hidden_layers) for m in LINEARS]

    tensors, expected = {}, {}
    for name in quant_names:
        w = sd.pop(f"{name}.weight")
        q, scale, zero = quantize(w)
        packed = pack(q, scale, zero)
        for part, t in packed.items():
            tensors[f"{name}.{part}"] = t
        # the quantized values: f16 scale times (code - zero), in f32
        s16 = packed["scales"].float().t().repeat_interleave(GROUP, 1)
        expected[name] = (s16 * (q - zero.repeat_interleave(GROUP, 1)).float(), q, zero)
    tensors.update(sd)

    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT)  # config.json, generation_config.json (model.safetensors replaced below)
    save_file(tensors, str(OUT / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((OUT / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    (OUT / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(GOLDEN / "llama" / name, OUT / name)

    # the reference: the saved file read back, the linears unpacked, a fresh model
    saved = load_file(str(OUT / "model.safetensors"))
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in quant_names for k in saved)
    state = {}
    for k, v in saved.items():
        base, part = k.rsplit(".", 1)
        if base in quant_names:
            continue
        assert v.dtype == torch.float32, k
        state[k] = v
    for name in quant_names:
        parts = {p: saved[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
        assert parts["qweight"].dtype == torch.int32 and parts["qzeros"].dtype == torch.int32
        assert parts["scales"].dtype == torch.float16 and parts["g_idx"].dtype == torch.int32
        w, codes, zeros = unpack(parts)
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
    save_file({"input_ids": IDS.to(torch.int64), "logits": logits}, str(OUT / "logits.safetensors"),
              metadata=meta)

    all_zeros = torch.cat([expected[n][2].flatten() for n in quant_names])
    print(f"wrote {OUT} ({meta}); zero points {all_zeros.min().item()}..{all_zeros.max().item()} "
          f"({all_zeros.unique().numel()} distinct); quantization_config: {QUANT_CONFIG}")
    n0 = quant_names[0]
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        print(f"  {n0}.{part}: {tuple(saved[f'{n0}.{part}'].shape)} {saved[f'{n0}.{part}'].dtype}")


if __name__ == "__main__":
    main()
