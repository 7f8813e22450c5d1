#!/usr/bin/env python3
"""A `petal eval --task ... --samples` file of multiple-choice examples as an offline
lm-evaluation-harness task: DIR/data.jsonl and DIR/petal_mc.yaml (local JSON through
`dataset_kwargs`, the prompt as given, each choice after a space as its `target_delimiter`, the
answer's index), so that the harness scores exactly the examples petal scored.

    python tools/eval/to_lm_eval.py samples.jsonl DIR
"""
import json
import os
import sys

src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
rows = [json.loads(l) for l in open(src)]
with open(os.path.join(out, "data.jsonl"), "w") as f:
    for r in rows:
        if "choices" not in r:
            sys.exit(f"{src}: example {r['index']} is not multiple choice")
        # petal's choices carry their leading space; the harness adds it as the delimiter
        if not all(c.startswith(" ") for c in r["choices"]):
            sys.exit(f"{src}: example {r['index']}: a choice without its leading space")
        f.write(json.dumps({"prompt": r["prompt"], "choices": [c[1:] for c in r["choices"]],
                            "answer": r["answer"]}) + "\n")
data = os.path.abspath(os.path.join(out, "data.jsonl"))
with open(os.path.join(out, "petal_mc.yaml"), "w") as f:
    f.write(f"""task: petal_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
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
