"""PyTorch + transformers + PEFT baseline for `petal bench --vs-pytorch`.

Builds the same workload petal runs (model config, LoRA config, batch, dtype, threads, data),
on the CPU or a CUDA GPU ("device": "cuda"), then serves rounds on stdin: a line "N" runs N measured steps and prints one JSON object per
step on stdout; "quit" exits. The first line printed is {"ready": ...}. Versions: see
tools/golden/requirements.txt (torch 2.15.0, transformers 5.24.0, peft 0.21.2).

    python tools/bench/pytorch_baseline.py '<workload json>'
"""
import json
import resource
import sys
import time

import torch


def peak_rss_mb():
    """This process's peak RSS: VmHWM, which starts afresh at exec. (ru_maxrss does not: it
    keeps the peak of the process that forked it, so petal's own peak, when larger, showed
    up as PyTorch's.)"""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def qlora_base(model, dtype):
    """The model reloaded with bitsandbytes NF4 linears, double-quantized scales, compute in
    `dtype` (QLoRA's base; bitsandbytes 0.50.2)."""
    import tempfile
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb, device_map="cpu",
                                                    dtype=dtype, attn_implementation="sdpa")


def build(w):
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(0)
    if w["model"] == "synthetic":
        c = w["config"]
        qwen = c.get("model_type") == "qwen2"  # q, k, v biases
        cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
        extra = {k: c[j] for k, j in [("head_dim", "head_dim"), ("rope_theta", "rope_theta"),
                                       ("rms_norm_eps", "eps")] if j in c}
        cfg = cls(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                  num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                  num_key_value_heads=c["kv_heads"], max_position_embeddings=c["ctx"],
                  tie_word_embeddings=c["tied"], attn_implementation="sdpa", **extra)
        model = model_cls(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(w["model"], attn_implementation="sdpa")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[w["dtype"]]
    if w.get("autocast_bf16"):
        dtype = torch.float32
    if w.get("quantize") == "nf4":
        model = qlora_base(model, dtype)
    else:
        model = model.to(dtype)
    if w["mode"] == "train" and w.get("grad_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if w["mode"] == "train":
        if w.get("adapter"):  # petal's adapter_config for the method, read by PEFT itself
            import dataclasses
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
            cls = PEFT_TYPE_TO_CONFIG_MAPPING[w["adapter"]["peft_type"]]
            known = {f.name for f in dataclasses.fields(cls)}  # as PEFT's loader, skip other keys
            cfg = cls(**{k: v for k, v in w["adapter"].items() if k in known})
        else:
            cfg = LoraConfig(r=w["r"], lora_alpha=2 * w["r"], target_modules="all-linear")
        model = get_peft_model(model, cfg)
    return model


def main():
    w = json.loads(sys.argv[1])
    torch.set_num_threads(w["threads"])
    dev = torch.device("cuda" if w.get("device", "cpu").startswith("cuda") else "cpu")
    model = build(w).to(dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, w["vocab"], (w["batch"], w["seq"]), generator=g).to(dev)
    labels = ids.clone()
    labels[:, :w.get("unscored", 0)] = -100  # an instruction's prompt: read, not scored
    # a GPU runs asynchronously: each timestamp waits for the work before it
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    opt = None
    if w["mode"] == "train":
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        model.eval()
    auto = (torch.autocast(dev.type, dtype=torch.bfloat16) if w.get("autocast_bf16")
            else torch.autocast(dev.type, enabled=False))

    def now():
        sync()
        return time.perf_counter()

    def step():
        t0 = now()
        if w["mode"] == "train":
            with auto:
                loss = model(input_ids=ids, labels=labels).loss
            t1 = now()
            loss.backward()
            t2 = now()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = now()
            if w.get("grad_checkpointing"):  # as petal reports it: forward counted with backward
                return {"backward": t2 - t0, "optimizer": t3 - t2, "total": t3 - t0}
            return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}
        if w["mode"] == "forward":
            with torch.no_grad(), auto:
                model(input_ids=ids)
            t = now() - t0
            return {"forward": t, "total": t}
        with torch.no_grad(), auto:
            model.generate(input_ids=ids[:1, : w["prompt"]], max_new_tokens=w["new_tokens"], do_sample=False,
                           min_new_tokens=w["new_tokens"], pad_token_id=0)
        t = now() - t0
        return {"total": t}

    step()  # warm-up
    print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if line == "quit":
            break
        for _ in range(int(line)):
            r = step()
            r["peak_rss_mb"] = peak_rss_mb()
            if dev.type == "cuda":  # the caching allocator's peak (the CUDA context not counted)
                r["gpu_peak_mb"] = torch.cuda.max_memory_reserved() / 1048576.0
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
