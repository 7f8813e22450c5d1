#!/usr/bin/env python3
"""RoPE scaling types other than llama3, as transformers computes them: `linear`, `dynamic`,
`yarn` and `longrope`.

For each case, transformers' own rope initialisation (`ROPE_INIT_FUNCTIONS`, the code its
models run) gives the inverse frequencies and the attention factor on cos/sin; for the cases
marked `logits`, the tiny Qwen2 of tests/fixtures/golden/qwen2 loaded with that scaling in its
config gives the logits of a 40-token sequence (positions past the "original" context).
LongRoPE picks its factors by the largest position of a forward, so its cases also hold the
long factors' inv_freq, the logits of the first 12 tokens alone (within the original context:
the short factors) and those of a KV-cache decode (12 tokens, then one at a time past the
original context: transformers switches to the long factors for the new tokens only).

    /root/pyref/bin/python tools/golden/make_rope_scaling.py

Writes tests/fixtures/golden/rope_scaling.json (the cases: rope parameters, model shape,
inv_freq, attention factor) and rope_scaling.safetensors (`<case>.logits`, `input_ids`).
Versions: tools/golden/requirements.txt (torch 2.15.0, transformers 5.24.0).
"""
import copy
import json
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

GOLDEN = Path(__file__).resolve().parents[2] / "tests/fixtures/golden"

# (name, rope parameters, model shape or None for the tiny Qwen2, logits?)
QWEN25_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
CASES = [
    ("linear_tiny", {"rope_type": "linear", "factor": 4.0}, None, True),
    # dynamic NTK: the default frequencies up to max_position_embeddings (64 here)
    ("dynamic_tiny", {"rope_type": "dynamic", "factor": 2.0}, None, True),
    ("yarn_tiny", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, None, True),
    ("yarn_tiny_betas_untruncated",
     {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 2000, "beta_fast": 8.0,
      "beta_slow": 2.0, "truncate": False}, None, True),
    ("yarn_tiny_mscale",
     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.707,
      "mscale_all_dim": 1.0}, None, True),
    ("yarn_tiny_attention_factor",
     {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "attention_factor": 1.3},
     None, True),
    # Qwen2.5's documented long-context setting, at its real head size and theta
    ("yarn_qwen2.5", QWEN25_YARN, {"head_dim": 128, "rope_theta": 1000000.0, "max_position_embeddings": 131072},
     False),
    ("linear_llama2", {"rope_type": "linear", "factor": 2.0},
     {"head_dim": 128, "rope_theta": 10000.0, "max_position_embeddings": 8192}, False),
    # LongRoPE (Phi-3's): the factor from the two lengths (64 / 16), its default attention factor
    ("longrope_tiny",
     {"rope_type": "longrope", "original_max_position_embeddings": 16,
      "short_factor": [1.0, 1.05, 1.3, 1.9], "long_factor": [2.0, 4.0, 8.0, 16.0]}, None, True),
    ("longrope_tiny_factor_attention",
     {"rope_type": "longrope", "original_max_position_embeddings": 24, "factor": 3.0,
      "attention_factor": 1.15, "short_factor": [1.0, 1.0, 1.1, 1.2], "long_factor": [1.5, 3.0, 6.0, 12.0]},
     None, True),
    # the pretraining context at the config's top level (where Phi-3 keeps it), none in the scaling
    ("longrope_tiny_top_level",
     {"rope_type": "longrope", "short_factor": [1.0, 1.05, 1.3, 1.9], "long_factor": [2.0, 4.0, 8.0, 16.0]},
     {"config": {"original_max_position_embeddings": 20}}, True),
    # Phi-3-mini-128k's shape (head 96, 4096 -> 131072); smooth ramps stand in for its lists
    ("longrope_phi3_shape",
     {"rope_type": "longrope", "original_max_position_embeddings": 4096,
      "short_factor": [1.0 + 0.02 * i for i in range(48)], "long_factor": [1.0 + 1.2 * i for i in range(48)]},
     {"head_dim": 96, "rope_theta": 10000.0, "max_position_embeddings": 131072}, False),
]
SHORT = 12  # tokens within every longrope case's original context


def main():
    base = AutoConfig.from_pretrained(GOLDEN / "qwen2")
    torch.manual_seed(0)
    ids = torch.randint(0, base.vocab_size, (1, 40))
    ids[0, 0] = 1
    tensors = {"input_ids": ids.to(torch.int64)}
    cases = []
    for name, rope, shape, with_logits in CASES:
        cfg = copy.deepcopy(base)
        extra = (shape or {}).pop("config", {}) if shape else {}
        shape = shape or None
        for k, v in extra.items():  # top-level config keys
            setattr(cfg, k, v)
        theta = (shape or {}).get("rope_theta", 10000.0)
        given = {"rope_theta": theta, **rope}
        cfg.rope_parameters = dict(given)
        if shape:
            cfg.head_dim = shape["head_dim"]
            cfg.hidden_size = shape["head_dim"] * cfg.num_attention_heads
            cfg.max_position_embeddings = shape["max_position_embeddings"]
        inv_freq, attention = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
        case = {"name": name, "rope_parameters": cfg.rope_parameters,
                "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                "max_position_embeddings": cfg.max_position_embeddings,
                "inv_freq": inv_freq.tolist(), "attention_factor": float(attention), "logits": with_logits}
        if extra:  # the scaling as given (transformers copies the top-level key into it)
            case.update(rope_parameters=given, config_extra=extra)
        longrope = rope["rope_type"] == "longrope"
        if longrope:
            original = cfg.rope_parameters["original_max_position_embeddings"]
            long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=original + 1)
            case["long_inv_freq"] = long_inv_freq.tolist()
        if with_logits:
            model = AutoModelForCausalLM.from_pretrained(GOLDEN / "qwen2", config=cfg).eval()
            rot = model.model.rotary_emb
            assert torch.equal(rot.inv_freq, inv_freq) and rot.attention_scaling == attention
            with torch.no_grad():
                tensors[f"{name}.logits"] = model(ids).logits[0].contiguous()
                if longrope:
                    tensors[f"{name}.logits_short"] = model(ids[:, :SHORT]).logits[0].contiguous()
                    out = model(ids[:, :SHORT], use_cache=True)
                    cache, steps = out.past_key_values, [out.logits[0]]
                    for i in range(SHORT, ids.shape[1]):
                        out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
                        cache = out.past_key_values
                        steps.append(out.logits[0])
                    tensors[f"{name}.logits_decode"] = torch.cat(steps).contiguous()
        cases.append(case)
        print(f"{name}: attention factor {attention:.6f}, inv_freq[-1] {inv_freq[-1].item():.4e}")
    (GOLDEN / "rope_scaling.json").write_text(json.dumps(
        {"torch": version("torch"), "transformers": version("transformers"), "cases": cases}, indent=1) + "\n")
    save_file(tensors, str(GOLDEN / "rope_scaling.safetensors"))
    print(f"wrote {GOLDEN / 'rope_scaling.json'} and rope_scaling.safetensors")


if __name__ == "__main__":
    main()
