#!/usr/bin/env python3
"""Convert petal's tiny random Qwen2 fixture (tests/fixtures/golden/qwen2, an HF folder) into a
GGUF file laid out as llama.cpp's `convert_hf_to_gguf.py` lays out a `qwen2` model, with the
`gguf` package's writer, all tensors F32:

    /root/pyref/bin/python tools/golden/make_qwen2_gguf.py

Writes tests/fixtures/golden/qwen2.gguf and tests/fixtures/golden/qwen2_gguf.json (versions and
the tensors written with their numpy shapes), then checks the file: reads it back with
`gguf.GGUFReader` (values of a few tensors equal the HF ones once the GGUF dims are reversed),
and loads it with transformers' GGUF loader to compare logits with the HF folder.

What follows llama.cpp (Qwen2Model / TextModel in convert_hf_to_gguf.py):
- key order: general.architecture (the writer's own), general.type, the general.* model
  metadata (gguf.Metadata), the qwen2.* hyperparameters, general.file_type (0 = ALL_F32), the
  tokenizer, general.quantization_version;
- tensors in the safetensors file's (sorted) key order, renamed with gguf's tensor map;
  q/k rows are NOT permuted (llama.cpp permutes only for the llama architecture); no
  output.weight when the HF checkpoint has no lm_head.weight (tied embeddings);
- numpy arrays are handed to `add_tensor` in their HF shape; the writer stores the dims
  reversed (ne[0] = innermost), so a reader that reverses them gets the HF (out, in) matrix.

Where the fixture departs from what the converter could do on its own (its tokenizer is a
WordLevel vocab "w0".."w95", not a BPE): tokenizer.ggml.pre is set to "qwen2" by hand (the
converter would fail its pre-tokenizer hash check); there are no merges, and the writer's
`add_array` silently drops an empty list, so no tokenizer.ggml.merges key is written; bos/eos
ids come from tokenizer_config (w1 -> 1, w2 -> 2) by hand, since gguf.SpecialVocab finds none
(the vocab has no added_tokens); a small chat template is added.

Versions: tools/golden/requirements.txt (gguf 0.19.0, transformers 5.24, torch 2.15).
"""
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests/fixtures/golden/qwen2"
OUT = ROOT / "tests/fixtures/golden/qwen2.gguf"
MANIFEST = ROOT / "tests/fixtures/golden/qwen2_gguf.json"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
IDS = [[1, 5, 9, 14, 20, 33, 2, 71]]


def write(out=OUT, manifest=MANIFEST, theta=None, context=None):
    """The GGUF at `out` (with `theta` / `context` in place of the folder's rope_theta and
    max_position_embeddings where given) and, where `manifest`, its manifest."""
    cfg = json.loads((SRC / "config.json").read_text())
    if theta is not None:
        cfg["rope_parameters"] = {**(cfg.get("rope_parameters") or {}), "rope_theta": theta}
    if context is not None:
        cfg["max_position_embeddings"] = context
    tok_json = json.loads((SRC / "tokenizer.json").read_text())
    tok_cfg = json.loads((SRC / "tokenizer_config.json").read_text())
    assert cfg["model_type"] == "qwen2", cfg["model_type"]
    arch = gguf.MODEL_ARCH.QWEN2
    n_layers = cfg["num_hidden_layers"]

    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])

    # tensors first (the converter's prepare_tensors runs before prepare_metadata, which needs
    # the parameter count); the header is written in the writer's key order regardless
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    weights = load_file(SRC / "model.safetensors")
    tied = "lm_head.weight" not in weights
    assert tied == bool(cfg.get("tie_word_embeddings", False)), "config and checkpoint disagree"
    written = []
    for hf_name in sorted(weights):
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"cannot map tensor {hf_name!r}")
        data = np.ascontiguousarray(weights[hf_name].astype(np.float32))
        w.add_tensor(name, data)
        written.append({"name": name, "hf_name": hf_name, "shape": list(data.shape), "dtype": "F32"})

    # general.type and the general.* model metadata, as prepare_metadata does
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, SRC, None, total)
    if meta.name is None:
        meta.name = SRC.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)

    # TextModel.set_gguf_parameters (Qwen2Model adds only an optional pooling type)
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    # _set_vocab_gpt2
    vocab = tok_json["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    n_vocab = cfg["vocab_size"]
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED for i in range(n_vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])  # an empty list: the writer drops the key (add_array returns early)
    w.add_bos_token_id(vocab[tok_cfg["bos_token"]])
    w.add_eos_token_id(vocab[tok_cfg["eos_token"]])
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    if manifest is None:
        return weights, written
    import importlib.metadata as md
    versions = {p: md.version(p) for p in ("gguf", "numpy", "safetensors", "transformers", "torch")}
    manifest.write_text(json.dumps({
        "source": "tests/fixtures/golden/qwen2",
        "script": "tools/golden/make_qwen2_gguf.py",
        "versions": versions,
        "architecture": "qwen2",
        "tied_word_embeddings": tied,
        "qk_permuted": False,
        "merges_key_written": False,
        "bos_token_id": vocab[tok_cfg["bos_token"]],
        "eos_token_id": vocab[tok_cfg["eos_token"]],
        "chat_template": CHAT_TEMPLATE,
        "tensors": written,
    }, indent=1) + "\n")
    return weights, written


def check(weights, written):
    r = gguf.GGUFReader(OUT)
    keys = list(r.fields)
    arch = r.fields["general.architecture"].contents()
    print("architecture:", arch)
    print("file size:", OUT.stat().st_size, "bytes")
    for k in keys:
        v = r.fields[k].contents()
        if isinstance(v, list) and len(v) > 6:
            v = f"[{len(v)} items: {v[:3]} ... {v[-1:]}]"
        print(f"  {k} = {v!r}")
    assert arch == "qwen2"
    assert "tokenizer.ggml.merges" not in r.fields
    assert "output.weight" not in {t.name for t in r.tensors}

    by_name = {t.name: t for t in r.tensors}
    assert [t.name for t in r.tensors] == [x["name"] for x in written]
    for x in written:
        t = by_name[x["name"]]
        # GGUF dims (ne) are innermost first: the reverse of the numpy shape
        assert list(t.shape) == x["shape"][::-1], (x["name"], list(t.shape), x["shape"])
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        # the reader's `data` is already in numpy (reversed-ne) orientation
        back = np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape)))
        assert np.array_equal(back, weights[x["hf_name"]]), x["name"]
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight"):
        t = by_name[name]
        hf = next(x["hf_name"] for x in written if x["name"] == name)
        back = np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape)))
        print(f"{name}: ne={list(map(int, t.shape))} -> reversed {back.shape} == HF {hf} "
              f"{weights[hf].shape}: {np.array_equal(back, weights[hf])}")
    print(f"all {len(written)} tensors equal their HF values (dims reversed)")


def cross_check():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor(IDS)
    ref = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(OUT.parent, gguf_file=OUT.name,
                                               dtype=torch.float32).eval()
    print("transformers gguf model: tie_word_embeddings =", got.config.tie_word_embeddings,
          "vocab", got.config.vocab_size)
    with torch.no_grad():
        a = ref(ids).logits
        b = got(ids).logits
    diff = (a - b).abs().max().item()
    print(f"max |logits(HF folder) - logits(gguf)| = {diff:.3e}")
    try:
        tok = AutoTokenizer.from_pretrained(OUT.parent, gguf_file=OUT.name)
        print("transformers tokenizer from gguf:", type(tok).__name__,
              tok.convert_ids_to_tokens(IDS[0]))
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the weights check stands
        print(f"transformers could not build the tokenizer from the gguf: "
              f"{type(e).__name__}: {e}")
    return diff


def theta_variant():
    """qwen2_theta.gguf: the same weights with rope_theta 1e6 and a context of 128 (a reader
    that lost either would take a default: 10000, and petal's 2048), and the logits transformers
    gives for it, read by its own GGUF loader and, equal to them, by the folder's model with
    those two values set: tests/fixtures/golden/qwen2_theta_logits.safetensors (`input_ids`,
    `logits`)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out = OUT.parent / "qwen2_theta.gguf"
    write(out, None, theta=1e6, context=128)
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 2, 71, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]])
    cfg = AutoConfig.from_pretrained(SRC)
    cfg.rope_parameters = {**(cfg.rope_parameters or {}), "rope_theta": 1e6}
    cfg.max_position_embeddings = 128
    ref = AutoModelForCausalLM.from_pretrained(SRC, config=cfg, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name,
                                               dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b, c = ref(ids).logits, got(ids).logits, plain(ids).logits
    print(f"theta 1e6: |folder - gguf| = {(a - b).abs().max().item():.3e}, "
          f"|theta 1e6 - theta 1e4| = {(a - c).abs().max().item():.3e}")
    assert (a - b).abs().max().item() < 1e-5 and (a - c).abs().max().item() > 1e-3
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": a.contiguous()},
              str(OUT.parent / "qwen2_theta_logits.safetensors"))


if __name__ == "__main__":
    weights, written = write()
    check(weights, written)
    d = cross_check()
    theta_variant()
    sys.exit(0 if d < 1e-5 else 1)
