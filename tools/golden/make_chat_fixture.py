"""Golden chat-templated task prompts (tests/fixtures/golden/chat_tasks.json) for `petal eval
--task ... --chat`, made by lm-evaluation-harness itself (lm_eval 0.4.13 with
`--apply_chat_template`, zero-shot) through transformers' `apply_chat_template` with the chat
templates of the two instruct models petal's assets hold (read from their GGUF files by
transformers' own GGUF loader).

MMLU: the first rows of tests/fixtures/golden/mmlu_raw.jsonl (the task's description becomes a
system turn, the choices lose their delimiter). GSM8K: the first rows of the `gsm8k` asset,
written to tests/fixtures/golden/gsm8k_raw.jsonl. Each example keeps the harness's plain
(unchatted) prompt too, which the Rust test finds its example by.

    /root/pyref/bin/python tools/golden/make_chat_fixture.py ~/.cache/petal/gsm8k/test.jsonl
"""
import json
import os
import sys

import datasets
import lm_eval
import transformers
import yaml
from lm_eval.api.task import ConfigurableTask
from transformers import AutoTokenizer

from make_mmlu_fixture import ROOT, chat_kwargs, rendered

MODELS = {"smollm2": "~/.cache/petal/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          "qwen2.5-coder-0.5b": "~/.cache/petal/qwen2.5-coder-0.5b/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"}
GSM8K = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")
assert lm_eval.__version__ == "0.4.13", lm_eval.__version__


def gsm8k_context(doc, tok):
    """The harness's zero-shot GSM8K context for one problem (chatted with `tok`)."""
    config = yaml.safe_load(open(GSM8K))
    for k in ("dataset_path", "dataset_name", "tag"):
        config.pop(k, None)
    ds = datasets.Dataset.from_list([doc])
    config["custom_dataset"] = lambda **_: {"test": ds, "train": ds}
    task = ConfigurableTask(config=config)
    return task.fewshot_context(task.test_docs()[0], 0, **chat_kwargs(tok))


def main():
    mmlu_rows = [json.loads(l) for l in open(os.path.join(ROOT, "mmlu_raw.jsonl"))]
    mmlu_rows = [r for r in mmlu_rows if r["question"] != "question"][:4]
    gsm_rows = [json.loads(l) for l in open(sys.argv[1])][:3]
    with open(os.path.join(ROOT, "gsm8k_raw.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in gsm_rows)
    out = {"lm_eval": lm_eval.__version__, "transformers": transformers.__version__, "models": {}}
    for name, path in MODELS.items():
        path = os.path.expanduser(path)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        m = {"chat_template": tok.chat_template, "bos": tok.bos_token or "", "eos": tok.eos_token or "",
             "mmlu": [], "gsm8k": []}
        for r in mmlu_rows:
            doc = {"question": r["question"], "subject": r["topic"].replace(" ", "_"),
                   "choices": [r[f"answer_{x}"] for x in "abcd"], "answer": "ABCD".index(r["correct_answer"])}
            plain, _, _ = rendered(doc["subject"], doc)
            context, conts, answer = rendered(doc["subject"], doc, chat=tok)
            m["mmlu"].append({"plain": plain, "prompt": context, "choices": conts, "answer": answer})
        for r in gsm_rows:
            m["gsm8k"].append({"plain": gsm8k_context(r, None), "prompt": gsm8k_context(r, tok)})
        out["models"][name] = m
    with open(os.path.join(ROOT, "chat_tasks.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{len(mmlu_rows)} MMLU and {len(gsm_rows)} GSM8K examples for {', '.join(MODELS)}")


if __name__ == "__main__":
    main()
