"""Adapters trained and saved by petal load in the real PEFT with the same logits, and models
merged by `petal merge` load in transformers with the same logits.

For each case: `petal train` a few steps on a tiny golden model (so B is non-zero), `petal
forward` writes petal's logits, then PEFT (PeftModel.from_pretrained) loads petal's adapter folder
and its logits are compared. Run from the repo root after `cargo build --release -p petal-cli`:

    .venv/bin/python tools/golden/check_petal_adapters.py [path/to/petal]

CHECK_ONLY=TEXT runs only the cases whose flags contain TEXT.
"""
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
PETAL = sys.argv[1] if len(sys.argv) > 1 else "target/release/petal"
IDS = "1,5,9,14,20,33,2,71;7,7,3,90,45,12,60,8"
CASES = [
    ("llama", ["--r", "4", "--alpha", "8", "--target-modules", "q_proj,v_proj"]),
    ("llama", ["--r", "8", "--alpha", "4", "--rslora", "true", "--target-modules", "all-linear"]),
    ("llama", ["--r", "2", "--alpha", "5", "--target-modules", r"re:.*\.layers\.1\.(self_attn\.(k|o)_proj|mlp\.down_proj)"]),
    ("llama", ["--r", "4", "--alpha", "16", "--target-modules", "all-linear", "--exclude-modules", "down_proj,q_proj"]),
    ("qwen2", ["--r", "4", "--alpha", "12", "--target-modules", "all-linear"]),
    ("llama", ["--method", "loha", "--r", "4", "--alpha", "6", "--target-modules", "all-linear"]),
    ("qwen2", ["--method", "loha", "--r", "3", "--alpha", "5", "--target-modules", "q_proj,v_proj"]),
    ("llama", ["--method", "lokr", "--r", "2", "--alpha", "5", "--target-modules", "all-linear"]),
    ("qwen2", ["--method", "lokr", "--r", "1", "--alpha", "3", "--target-modules", "q_proj,up_proj,down_proj",
               "--decompose-both", "true", "--decompose-factor", "4"]),
    ("llama", ["--method", "ia3"]),
    ("llama", ["--method", "prompt_tuning", "--num-virtual-tokens", "4"]),
    ("qwen2", ["--method", "ln_tuning"]),
    ("llama", ["--r", "4", "--alpha", "8", "--dora", "true", "--target-modules", "q_proj,v_proj,down_proj"]),
    ("qwen2", ["--r", "2", "--alpha", "6", "--dora", "true", "--target-modules", "k_proj,up_proj"]),
    ("qwen2", ["--method", "ia3", "--target-modules", "k_proj,v_proj,up_proj", "--feedforward-modules", "up_proj"]),
    ("llama", ["--method", "oft", "--oft-block-size", "8"]),
    ("qwen2", ["--method", "oft", "--r", "4", "--exact-cayley", "true", "--target-modules", "q_proj,k_proj,down_proj"]),
    # PEFT on CPU computes one butterfly factor only (more need its CUDA extension)
    ("llama", ["--method", "boft", "--boft-block-size", "4", "--target-modules", "q_proj,v_proj,down_proj"]),
    ("qwen2", ["--method", "road", "--road-variant", "road_2", "--group-size", "8", "--target-modules", "q_proj,k_proj,v_proj"]),
    ("llama", ["--method", "road", "--road-variant", "road_4", "--group-size", "16"]),
    ("llama", ["--method", "vera", "--r", "4", "--target-modules", "q_proj,v_proj,down_proj"]),
    ("qwen2", ["--method", "vera", "--r", "8"]),
    ("llama", ["--r", "4", "--alpha", "8", "--init", "pissa", "--target-modules", "q_proj,v_proj,down_proj"]),
    ("qwen2", ["--r", "3", "--alpha", "6", "--init", "olora"]),
    ("llama", ["--r", "4", "--alpha", "8", "--init", "pissa", "--dora", "true", "--target-modules", "q_proj,down_proj"]),
    ("qwen2", ["--r", "2", "--alpha", "6", "--dora", "true", "--bias", "lora_only", "--target-modules", "k_proj,v_proj,o_proj"]),
    # PiSSA / OLoRA saved as plain LoRA of rank 2r: PEFT applies it to the original base model
    ("llama", ["--r", "4", "--alpha", "8", "--init", "pissa", "--save-as-lora", "true", "--target-modules", "q_proj,v_proj"]),
    ("qwen2", ["--r", "2", "--alpha", "4", "--init", "olora", "--rslora", "true", "--save-as-lora", "true"]),
    # BitFit (petal's own): Llama has no biases, so the merged model gains them (attention_bias,
    # mlp_bias); qwen2 trains its q/k/v biases only
    ("llama", ["--method", "bitfit"]),
    ("qwen2", ["--method", "bitfit", "--target-modules", "q_proj,k_proj,v_proj"]),
    # SSF (petal's own): the merged model (W' = diag(g) W, b' = g b + beta) is the reference
    ("llama", ["--method", "ssf"]),
    ("qwen2", ["--method", "ssf", "--target-modules", "q_proj,k_proj,v_proj"]),
    # SSF after the norms too: gamma folds into the norm weights, beta into q/k/v and gate/up biases
    ("llama", ["--method", "ssf", "--set", "norms=true", "--set", "init_weights=false"]),
    ("llama", ["--method", "kradapter"]),
    ("llama", ["--method", "quanta", "--set", "d=3", "--target-modules", "q_proj,v_proj,down_proj"]),
    ("qwen2", ["--method", "paca", "--r", "4", "--alpha", "8"]),
    # RoSA: LoRA for one step, the mask from step 2's gradients, S trained at step 3
    ("llama", ["--method", "rosa", "--r", "2", "--alpha", "4", "--set", "schedule=wl1", "--set", "d=0.05"]),
    # FISH: the Fisher from step 1's two sequences, then the mask's values trained
    ("qwen2", ["--method", "fish", "--set", "fisher_samples=2", "--set", "density=0.01"]),
    # Chain of LoRA (petal's own schedule): three links of one step each, saved as plain LoRA of
    # rank 3 r; its checkpoint (the links) must give the same logits
    ("llama", ["--method", "chain_of_lora", "--set", "links=3", "--set", "link_steps=1", "--r", "2", "--alpha", "4",
               "--target-modules", "q_proj,v_proj,down_proj"]),
    ("llama", ["--method", "prefix_tuning", "--num-virtual-tokens", "3"]),
    ("mistral", ["--method", "prefix_tuning", "--num-virtual-tokens", "2"]),
    ("qwen2", ["--method", "p_tuning", "--num-virtual-tokens", "3"]),
    ("llama", ["--method", "p_tuning", "--num-virtual-tokens", "3", "--encoder", "lstm", "--encoder-hidden-size", "8"]),
    ("llama", ["--method", "prefix_tuning", "--num-virtual-tokens", "3", "--prefix-projection", "true",
               "--encoder-hidden-size", "12"]),
    ("llama", ["--r", "2", "--alpha", "4", "--target-modules", "q_proj", "--modules-to-save", "lm_head"]),
    ("qwen2", ["--method", "ia3", "--modules-to-save", "lm_head"]),
    ("llama", ["--r", "2", "--alpha", "4", "--target-modules", "v_proj", "--modules-to-save", "embed_tokens"]),
    ("qwen2", ["--method", "loha", "--target-modules", "q_proj", "--modules-to-save", "embed_tokens"]),
    ("qwen2", ["--r", "2", "--alpha", "4", "--target-modules", "q_proj,o_proj", "--bias", "all"]),
    ("qwen2", ["--r", "2", "--alpha", "4", "--target-modules", "k_proj,v_proj", "--bias", "lora_only"]),
    ("llama", ["--r", "4", "--alpha", "8", "--target-modules", "embed_tokens,q_proj"]),
    ("qwen2", ["--r", "2", "--alpha", "6", "--target-modules", "embed_tokens"]),
    ("llama", ["--r", "2", "--alpha", "4", "--target-modules", "q_proj", "--trainable-tokens", "3,5,71"]),
    ("qwen2", ["--r", "2", "--alpha", "4", "--target-modules", "v_proj", "--trainable-tokens", "7,90"]),
    # AdaLoRA over 3 steps: tinit 0, tfinal 1 masks down to target_r; saved cut, with rank_pattern
    ("llama", ["--method", "adalora", "--r", "4", "--alpha", "8", "--target-r", "2", "--tinit", "0", "--tfinal", "1",
               "--target-modules", "q_proj,v_proj,up_proj"]),
]


def main():
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.txt")
        with open(data, "w") as f:
            f.write(" ".join(f"w{(i * 7) % 96}" for i in range(2000)))
        only = os.environ.get("CHECK_ONLY")  # run the cases whose flags contain this text
        for i, (base, flags) in enumerate(CASES):
            if only and only not in " ".join(flags):
                continue
            run = os.path.join(tmp, f"run{i}")
            model = os.path.join(ROOT, base)
            subprocess.run([PETAL, "train", "--model", model, "--data", data, "--max-steps", "3", "--lr", "0.05",
                            "--seq-len", "16", "--batch-size", "2", "--val-fraction", "0", "--out", run, *flags],
                           check=True, capture_output=True)
            out = os.path.join(tmp, f"logits{i}.safetensors")
            subprocess.run([PETAL, "forward", "--model", model, "--adapter", os.path.join(run, "adapter"),
                            "--input-ids", IDS, "--out", out], check=True, capture_output=True)
            ours = load_file(out)["logits"]
            if "--save-as-lora" in flags or "chain_of_lora" in flags:  # the plain-LoRA form equals the trained one
                ck = os.path.join(tmp, f"ck{i}.safetensors")
                subprocess.run([PETAL, "forward", "--model", model, "--adapter",
                                os.path.join(run, "checkpoints", "step-000003"), "--input-ids", IDS, "--out", ck],
                               check=True, capture_output=True)
                trained = load_file(ck)["logits"]
                rel_form = ((ours - trained).abs().max() / trained.abs().max()).item()
                worst = max(worst, rel_form)
                print(f"plain LoRA form against the trained residual form: relative error {rel_form:.2e}")
            ids = torch.tensor([[int(x) for x in r.split(",")] for r in IDS.split(";")])
            if {"bitfit", "ssf", "kradapter", "quanta", "paca", "rosa", "fish"} & set(flags):  # petal's own (PEFT has none): the merged model is the reference
                merged = os.path.join(tmp, f"merged{i}")
                subprocess.run([PETAL, "merge", "--model", model, "--adapter", os.path.join(run, "adapter"),
                                "--out", merged], check=True, capture_output=True)
                with torch.no_grad():
                    ref = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits.float()
                    plain = AutoModelForCausalLM.from_pretrained(model).eval()(input_ids=ids).logits.float()
                rel = ((ours - ref).abs().max() / ref.abs().max()).item()
                effect = ((ref - plain).abs().max() / ref.abs().max()).item()
                rel = rel if effect > 1e-3 else float("inf")
                worst = max(worst, rel)
                print(f"{base:6} {' '.join(flags):90} merged by petal, loaded by transformers: "
                      f"adapter effect {effect:.2e}  relative error {rel:.2e}")
                continue
            m = AutoModelForCausalLM.from_pretrained(model)
            pm = PeftModel.from_pretrained(m, os.path.join(run, "adapter")).eval()
            with torch.no_grad():
                ref = pm(input_ids=ids).logits.float()
                with pm.disable_adapter():
                    plain = pm(input_ids=ids).logits.float()
            rel = ((ours - ref).abs().max() / ref.abs().max()).item()
            tail = ref[:, -plain.shape[1]:]  # prompt tuning adds virtual positions in front
            effect = ((tail - plain).abs().max() / ref.abs().max()).item()
            if effect < 1e-3:
                rel = float("inf")  # the adapter must change the output, or the check proves nothing
            if {"prompt_tuning", "prefix_tuning", "p_tuning"} & set(flags):  # cannot be merged; petal refuses
                r = subprocess.run([PETAL, "merge", "--model", model, "--adapter", os.path.join(run, "adapter"),
                                    "--out", os.path.join(tmp, "nope")], capture_output=True, text=True)
                assert r.returncode != 0 and "cannot be merged" in r.stderr, r.stderr
                worst = max(worst, rel)
                print(f"{base:6} {' '.join(flags):90} adapter effect {effect:.2e}  relative error {rel:.2e}")
                continue
            merged = os.path.join(tmp, f"merged{i}")
            subprocess.run([PETAL, "merge", "--model", model, "--adapter", os.path.join(run, "adapter"), "--out", merged],
                           check=True, capture_output=True)
            with torch.no_grad():
                mm = AutoModelForCausalLM.from_pretrained(merged).eval()
                rel_merged = ((mm(input_ids=ids).logits.float() - ref).abs().max() / ref.abs().max()).item()
            rel = max(rel, rel_merged)
            worst = max(worst, rel)
            print(f"merged by petal, loaded by transformers: relative error {rel_merged:.2e}")
            print(f"{base:6} {' '.join(flags):90} adapter effect {effect:.2e}  relative error {rel:.2e}")
    print(f"worst relative error {worst:.2e}: {'OK' if worst < 1e-4 else 'MISMATCH'}")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
