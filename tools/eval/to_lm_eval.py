#!/usr/bin/env python3
"""A `petal eval --task ... --samples` file of multiple-choice examples as an offline
lm-evaluation-harness task: DIR/data.jsonl and DIR/petal_mc.yaml (local JSON through
`dataset_kwargs`, the prompt as given, each choice after a space as its `target_delimiter`, the
answer's index), so that the harness scores exactly the examples petal scored.

With `--dump DUMP` (the same examples from `petal eval --task ... --dump-task DUMP`): the
examples as petal's task holds them before a chat template (`petal eval --chat`), each task
description the harness's `description`, which its `--apply_chat_template` makes a system turn.

    python tools/eval/to_lm_eval.py samples.jsonl DIR [--dump DUMP]
"""
import json
import os
import sys

src, out = sys.argv[1], sys.argv[2]
dump = sys.argv[4] if sys.argv[3:4] == ["--dump"] else None
os.makedirs(out, exist_ok=True)
rows = [json.loads(l) for l in open(dump or src)]
for i, r in enumerate(rows):
    r.setdefault("index", i)
with open(os.path.join(out, "data.jsonl"), "w") as f:
    for r in rows:
        if "choices" not in r:
            sys.exit(f"{src}: example {r['index']} is not multiple choice")
        # petal's choices carry their leading space; the harness adds it as the delimiter
        if not all(c.startswith(" ") for c in r["choices"]):
            sys.exit(f"{src}: example {r['index']}: a choice without its leading space")
        d = r.get("description", "")
        f.write(json.dumps({"description": d, "prompt": r["prompt"][len(d):],
                            "choices": [c[1:] for c in r["choices"]], "answer": r["answer"]}) + "\n")
data = os.path.abspath(os.path.join(out, "data.jsonl"))
with open(os.path.join(out, "petal_mc.yaml"), "w") as f:
    f.write(f"""task: petal_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
description: "{{{{description}}}}"
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
""")
print(f"{len(rows)} examples -> {out}")
