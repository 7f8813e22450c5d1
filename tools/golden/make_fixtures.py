"""Golden fixtures for petal, made by the real transformers + PEFT (versions in requirements.txt).

Writes tests/fixtures/golden/: tiny random Llama (GQA, untied head, llama3 rope scaling) and
Qwen2 (GQA, q/k/v bias, tied head) models as HF folders, PEFT LoRA adapters covering the
config cases petal must match, and the logits of each on fixed input ids.

    python -m venv .venv && .venv/bin/pip install -r tools/golden/requirements.txt
    .venv/bin/python tools/golden/make_fixtures.py [--mixed-only]

Also writes mixed_batch.safetensors: PEFT's mixed-adapter batches (`adapter_names`) over the
saved adapters (`--mixed-only`: that file alone).
"""
import json
import os
import sys

import torch
from peft import (AdaLoraConfig, BOFTConfig, IA3Config, LNTuningConfig, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig,
                  PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, RoadConfig, VeraConfig, get_peft_model)
import peft.tuners.boft.layer as boft_layer
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
VOCAB = 96
INPUT_IDS = torch.tensor([[1, 5, 9, 14, 20, 33, 2, 71], [7, 7, 3, 90, 45, 12, 60, 8]])


def write_tokenizer(d):
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "w1", "eos_token": "w2", "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )
    return LlamaForCausalLM(cfg).eval()


def qwen2():
    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    )
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random non-zero biases (default init leaves them zero)
        for n, p in m.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.5)
    return m


def mistral():
    torch.manual_seed(2)
    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-5, sliding_window=None,
    )
    return MistralForCausalLM(cfg).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float().contiguous()


ADAPTERS = {
    # name: (model, LoraConfig kwargs)
    "llama_lora_qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama_rslora_all_linear": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear")),
    "llama_lora_regex": ("llama", dict(r=2, lora_alpha=5, target_modules=r".*\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.down_proj)")),
    "llama_lora_exclude_patterns": ("llama", dict(
        r=4, lora_alpha=16, target_modules="all-linear", exclude_modules=["down_proj", "q_proj"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})),
    "llama_lora_layers": ("llama", dict(r=3, lora_alpha=6, target_modules=["gate_proj", "up_proj"], layers_to_transform=[1])),
    "qwen2_lora_all_linear": ("qwen2", dict(r=4, lora_alpha=12, target_modules="all-linear")),
    "qwen2_lora_second": ("qwen2", dict(r=2, lora_alpha=3, target_modules=["k_proj", "up_proj"])),
    # LoHa (FedPara): alpha != r, a rank_pattern, all four factors random (init_weights=False)
    "llama_loha_all_linear": ("llama", dict(method="loha", r=4, alpha=6, target_modules="all-linear", rank_pattern={"v_proj": 2})),
    "qwen2_loha_qv": ("qwen2", dict(method="loha", r=3, alpha=5, target_modules=["q_proj", "v_proj"])),
    # LoKr: low-rank W2 (r small), full W2 (r large), and decompose_both with a decompose_factor
    "llama_lokr_all_linear": ("llama", dict(method="lokr", r=2, alpha=5, target_modules="all-linear")),
    "llama_lokr_full_w2": ("llama", dict(method="lokr", r=8, alpha=4, target_modules=["v_proj", "o_proj"])),
    "qwen2_lokr_decompose_both": ("qwen2", dict(method="lokr", r=1, alpha=3, target_modules=["q_proj", "up_proj", "down_proj"],
                                                decompose_both=True, decompose_factor=4)),
    # DoRA: magnitude vector over the LoRA direction (qwen2: k_proj with a bias)
    "llama_dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2_dora": ("qwen2", dict(r=2, lora_alpha=6, use_dora=True, target_modules=["k_proj", "up_proj"])),
    # IA3: output scaling of k/v (qwen2: with their biases), input scaling of down_proj; random vectors
    "llama_ia3": ("llama", dict(method="ia3", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "qwen2_ia3": ("qwen2", dict(method="ia3", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    # Prompt tuning: 3 random virtual tokens; logits include their positions, as PEFT returns them
    "llama_prompt_tuning": ("llama", dict(method="prompt_tuning", num_virtual_tokens=3)),
    "qwen2_prompt_tuning": ("qwen2", dict(method="prompt_tuning", num_virtual_tokens=5)),
    # LN tuning: trained copies of norm weights (perturbed below so they matter)
    "llama_ln_tuning": ("llama", dict(method="ln_tuning", target_modules=["input_layernorm", "norm"])),
    # OFT: Cayley-Neumann blocks (PEFT's default), exact Cayley with r given, one shared block
    "llama_oft_neumann": ("llama", dict(method="oft", oft_block_size=8, r=0, target_modules="all-linear")),
    "qwen2_oft_exact": ("qwen2", dict(method="oft", r=4, oft_block_size=0, use_cayley_neumann=False,
                                      target_modules=["q_proj", "k_proj", "down_proj"])),
    "llama_oft_block_share": ("llama", dict(method="oft", oft_block_size=4, r=0, block_share=True,
                                            num_cayley_neumann_terms=7, target_modules=["v_proj", "up_proj"])),
    # BOFT: one factor (what PEFT computes on CPU), and two butterfly factors (its CUDA path,
    # reproduced below with a pure-torch block diagonal)
    "llama_boft": ("llama", dict(method="boft", boft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2_boft_butterfly": ("qwen2", dict(method="boft", boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=2,
                                           target_modules=["q_proj", "k_proj", "up_proj"])),
    # RoAd: all three variants (qwen2: biased outputs)
    "llama_road_1": ("llama", dict(method="road", variant="road_1", group_size=8, target_modules="all-linear")),
    "qwen2_road_2": ("qwen2", dict(method="road", variant="road_2", group_size=4, target_modules=["q_proj", "k_proj", "v_proj"])),
    "llama_road_4": ("llama", dict(method="road", variant="road_4", group_size=16, target_modules=["o_proj", "gate_proj"])),
    # VeRA: shared projections sized for the largest targeted linear
    "llama_vera": ("llama", dict(method="vera", r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2_vera_all_linear": ("qwen2", dict(method="vera", r=8, projection_prng_key=7, target_modules="all-linear")),
    # PiSSA / OLoRA: A and B start from W's SVD / QR and the base keeps the residual; A and B are
    # then moved (as training would), so loading must rebuild the same residual from W
    "llama_pissa": ("llama", dict(r=4, lora_alpha=8, init="pissa", target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2_olora": ("qwen2", dict(r=3, lora_alpha=6, init="olora", target_modules="all-linear")),
    # PiSSA / OLoRA with DoRA: the magnitude starts from the norm of the residual plus B A (= W)
    "llama_pissa_dora": ("llama", dict(r=4, lora_alpha=8, init="pissa", use_dora=True, target_modules=["q_proj", "down_proj"])),
    "qwen2_olora_dora": ("qwen2", dict(r=2, lora_alpha=4, init="olora", use_dora=True, target_modules=["k_proj", "up_proj"])),
    # DoRA with a trained bias (qwen2 k_proj/v_proj have biases): added outside the magnitude
    "qwen2_dora_bias": ("qwen2", dict(r=2, lora_alpha=6, use_dora=True, bias="lora_only", target_modules=["k_proj", "v_proj", "o_proj"])),
    # Prefix tuning: per-layer key/value prefixes (GQA: PEFT sizes them for the kv heads); the
    # projected variant is saved by PEFT as the projection's output
    "llama_prefix_tuning": ("llama", dict(method="prefix_tuning", num_virtual_tokens=3)),
    "mistral_prefix_tuning": ("mistral", dict(method="prefix_tuning", num_virtual_tokens=5)),
    "qwen2_prefix_projection": ("qwen2", dict(method="prefix_tuning", num_virtual_tokens=4, prefix_projection=True,
                                              encoder_hidden_size=16)),
    # P-tuning: the MLP encoder's output is what PEFT saves (and what it computed the logits from)
    "llama_p_tuning": ("llama", dict(method="p_tuning", num_virtual_tokens=4, encoder_hidden_size=16)),
    "llama_p_tuning_lstm": ("llama", dict(method="p_tuning", num_virtual_tokens=4, encoder_hidden_size=8,
                                          encoder_reparameterization_type="LSTM", encoder_num_layers=2)),
    # modules_to_save: a full trained copy of the head (perturbed below), untied and tied
    "llama_lora_head_to_save": ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "qwen2_ia3_tied_head_to_save": ("qwen2", dict(method="ia3", target_modules=["k_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"], modules_to_save=["lm_head"])),
    # modules_to_save on the token embedding: a trained copy of the table (qwen2: the tied head
    # keeps the original table, PEFT's default without ensure_weight_tying)
    "llama_lora_embed_to_save": ("llama", dict(r=2, lora_alpha=4, target_modules=["v_proj"], modules_to_save=["embed_tokens"])),
    "qwen2_lora_tied_embed_to_save": ("qwen2", dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    # LoRA's bias option (BitFit-style): PEFT trains the base biases and saves them (moved below)
    "qwen2_lora_bias_all": ("qwen2", dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], bias="all")),
    "qwen2_lora_bias_lora_only": ("qwen2", dict(r=2, lora_alpha=4, target_modules=["k_proj", "v_proj"], bias="lora_only")),
    # AdaLoRA: random SVD-form triplets (E non-zero); the trained case below adds rank masks
    "qwen2_adalora": ("qwen2", dict(method="adalora", init_r=3, target_r=2, lora_alpha=6, total_step=10,
                                    target_modules=["q_proj", "down_proj"])),
    # LoRA on the token embedding (PEFT also saves the base table), untied and tied
    "llama_lora_embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"])),
    "qwen2_lora_embedding_tied": ("qwen2", dict(r=2, lora_alpha=6, target_modules=["embed_tokens"])),
    # trainable_token_indices: chosen embedding rows trained in full (moved below); the tied
    # qwen2 head uses the same rows
    "llama_lora_trainable_tokens": ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                  trainable_token_indices=[3, 5, 71])),
    "qwen2_lora_trainable_tokens_tied": ("qwen2", dict(r=2, lora_alpha=4, target_modules=["v_proj"],
                                                       trainable_token_indices={"embed_tokens": [7, 90]})),
}


def peft_config(kw):
    kw = dict(kw)
    method = kw.pop("method", "lora")
    if method == "loha":
        return LoHaConfig(init_weights=False, **kw)
    if method == "ln_tuning":
        return LNTuningConfig(task_type="CAUSAL_LM", **kw)
    if method == "adalora":
        return AdaLoraConfig(init_lora_weights=False, **kw)
    if method == "p_tuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", **kw)
    if method == "prefix_tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", **kw)
    if method == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", **kw)
    if method == "ia3":
        return IA3Config(init_ia3_weights=False, **kw)
    if method == "lokr":
        return LoKrConfig(init_weights=False, **kw)
    if method == "oft":
        return OFTConfig(init_weights=False, **kw)
    if method == "boft":
        return BOFTConfig(init_weights=False, **kw)
    if method == "road":
        return RoadConfig(init_weights=False, **kw)
    if method == "vera":
        return VeraConfig(init_weights=False, **kw)
    init = kw.pop("init", False)
    return LoraConfig(init_lora_weights=init, lora_dropout=0.0, **kw)


def boft_butterflies_without_cuda():
    """PEFT computes BOFT butterfly factors > 1 only through its CUDA extension (fbd_cuda), whose
    forward is a block diagonal per factor; give it that block diagonal in plain torch."""
    boft_layer.get_fbd_cuda = lambda: True
    boft_layer.FastBlockDiag.apply = staticmethod(
        lambda x: torch.stack([torch.block_diag(*torch.unbind(f)) for f in torch.unbind(x)]))


def main():
    boft_butterflies_without_cuda()
    os.makedirs(ROOT, exist_ok=True)
    bases = {"llama": llama, "qwen2": qwen2, "mistral": mistral}
    out = {"input_ids": INPUT_IDS.to(torch.int64)}
    for name, make in bases.items():
        d = os.path.join(ROOT, name)
        m = make()
        m.save_pretrained(d)
        write_tokenizer(d)
        out[f"{name}.base"] = logits(m)
    for i, (aname, (base, kw)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        m = bases[base]()
        pm = get_peft_model(m, peft_config(kw))
        with torch.no_grad():  # DoRA magnitudes, LN-tuning copies: away from their init, so they matter
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n or "ln_tuning_layers" in n:
                    p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
                if "init" in kw and ("lora_A" in n or "lora_B" in n):
                    p.add_(torch.randn_like(p) * 0.05)
                if "modules_to_save" in n or "trainable_tokens_delta" in n:
                    p.add_(torch.randn_like(p) * 0.05)
                if n.endswith(".bias") and p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        pm.eval()
        out[f"{aname}"] = logits(pm)
        pm.save_pretrained(os.path.join(ROOT, "adapters", aname))
    # AdaLoRA trained by PEFT: the budget schedule masks triplets, the saved tensors are cut to
    # the kept ranks and `rank_pattern` records the masks (some layers keep none)
    torch.manual_seed(7)
    pm = get_peft_model(llama(), AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6,
                                               lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, VOCAB, (2, 8))
    for step in range(6):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()
    out["llama_adalora_trained"] = logits(pm)
    pm.save_pretrained(os.path.join(ROOT, "adapters", "llama_adalora_trained"))
    # P-tuning's LSTM encoder in training form: its tensors under PEFT's names and its output,
    # for petal's encoder (bidirectional, two layers, then the MLP head) to reproduce
    torch.manual_seed(11)
    pm = get_peft_model(llama(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=8,
                                                     encoder_reparameterization_type="LSTM", encoder_num_layers=2))
    enc = pm.prompt_encoder["default"]
    tensors = {f"prompt_encoder.{k}": v.detach().clone().contiguous() for k, v in enc.state_dict().items()}
    with torch.no_grad():
        tensors["output"] = enc(torch.arange(5).unsqueeze(0))[0].contiguous()
    save_file(tensors, os.path.join(ROOT, "p_tuning_lstm_encoder.safetensors"))
    # Two adapters on one model: only the second active, then both active at once.
    m = qwen2()
    pm = PeftModel.from_pretrained(m, os.path.join(ROOT, "adapters", "qwen2_lora_all_linear"), adapter_name="a")
    pm.load_adapter(os.path.join(ROOT, "adapters", "qwen2_lora_second"), adapter_name="b")
    pm.eval()
    pm.set_adapter("b")
    out["qwen2_two_adapters.b"] = logits(pm)
    pm.base_model.set_adapter(["a", "b"])
    out["qwen2_two_adapters.ab"] = logits(pm)
    # PEFT's parameter accounting for one adapter, for petal's count to match.
    m = llama()
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable, total = pm.get_nb_trainable_parameters()
    counts = {"llama_r8_all_linear": {"trainable": trainable, "total": total}}
    m = llama()
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"]))
    trainable, total = pm.get_nb_trainable_parameters()
    counts["llama_r8_all_linear_head_to_save"] = {"trainable": trainable, "total": total}
    with open(os.path.join(ROOT, "param_counts.json"), "w") as f:
        json.dump(counts, f)
    save_file(out, os.path.join(ROOT, "logits.safetensors"))
    print("wrote", ROOT, file=sys.stderr)


# Mixed-adapter batches: PEFT's `adapter_names`, each row through its own adapter (or none)
MIXED_IDS = torch.tensor([[1, 5, 9, 14, 20, 33, 2, 71], [7, 7, 3, 90, 45, 12, 60, 8], [4, 18, 18, 2, 95, 0, 31, 6],
                          [50, 49, 48, 47, 3, 3, 1, 2], [11, 22, 33, 44, 55, 66, 77, 88]])
MIXED = {
    # name: (base, {adapter name: fixture adapter}, adapter of each row)
    "qwen2_mixed": ("qwen2", {"a": "qwen2_lora_all_linear", "b": "qwen2_lora_second", "c": "qwen2_lora_embedding_tied"},
                    ["a", "__base__", "b", "c", "a"]),
    "llama_mixed": ("llama", {"q": "llama_lora_qv", "e": "llama_lora_embedding"}, ["q", "e", "__base__", "e", "q"]),
    # a trained head copy (modules_to_save): PEFT wants every row's adapter to have one
    # (KeyError otherwise), so only that adapter and the base rows here
    "llama_mixed_head": ("llama", {"h": "llama_lora_head_to_save", "q": "llama_lora_qv"},
                         ["h", "__base__", "h", "__base__", "h"]),
}


def mixed_batches():
    """Writes mixed_batch.safetensors (the ids, and the logits of each case in MIXED, made from
    the adapters main() saved) and mixed_batch.json (the cases)."""
    bases = {"llama": llama, "qwen2": qwen2}
    out = {"input_ids": MIXED_IDS.to(torch.int64)}
    for case, (base, adapters, rows) in MIXED.items():
        names = list(adapters)
        pm = PeftModel.from_pretrained(bases[base](), os.path.join(ROOT, "adapters", adapters[names[0]]),
                                       adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(os.path.join(ROOT, "adapters", adapters[n]), adapter_name=n)
        pm.eval()
        with torch.no_grad():
            out[case] = pm(input_ids=MIXED_IDS, adapter_names=rows).logits.float().contiguous()
    save_file(out, os.path.join(ROOT, "mixed_batch.safetensors"))
    with open(os.path.join(ROOT, "mixed_batch.json"), "w") as f:
        json.dump({c: {"base": b, "adapters": a, "rows": r} for c, (b, a, r) in MIXED.items()}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--mixed-only"]:  # the adapters main() saved are on disk already
        mixed_batches()
    else:
        main()
        mixed_batches()
