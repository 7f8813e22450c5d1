#!/usr/bin/env python3
"""Golden GSM8K verdicts by lm-evaluation-harness's own filter and metric.

Model outputs paired with GSM8K reference solutions (ending in `#### N`), scored as the
harness's `gsm8k` task scores them under its "flexible-extract" filter: the task's YAML as
installed (its `filter_list` and `metric_list`), the harness's `RegexFilter` and `take_first`
filters, and its registered `exact_match` metric with the YAML's arguments. Nothing of the
harness is written out here: change the YAML or the filter and the verdicts follow.

    target/venv-ref/bin/pip install -r tools/eval/requirements.txt
    target/venv-ref/bin/python tools/golden/make_gsm8k_extract.py

Writes tests/fixtures/golden/gsm8k_extract.json: {lm_eval, cases: [{output, answer,
harness_extracted, harness_correct}]}. Versions: tools/eval/requirements.txt (lm_eval 0.4.13).
"""
import json
import pathlib

import lm_eval
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_metric
from lm_eval.filters import build_filter_ensemble

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/golden"
YAML = pathlib.Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml"

# (model output after the stop strings, the reference solution)
CASES = [
    ("Janet sells 16 - 3 - 4 = 9 eggs a day. 9 * 2 = 18 dollars. The answer is 18.", "She sells 9 eggs.\n#### 18"),
    ("9 * $2 = $18", "#### 18"),
    ("It costs $5.", "#### 5"),
    ("So she makes 18.0 dollars.", "#### 18"),
    ("The total is 18.00", "#### 18"),
    ("She has 1,000 apples.", "Total: 1,000 apples\n#### 1000"),
    ("1000 apples", "#### 1,000"),
    ("x = 10,000,000", "#### 10000000"),
    ("The answer is -5.", "#### -5"),
    ("-3 degrees", "#### -3"),
    ("no number at all", "#### 4"),
    ("", "#### 4"),
    ("5 apples and 7 pears, 12 in all", "#### 12"),
    ("It ends 5, and then 6,", "#### 6"),
    ("Answer: 25%", "#### 25"),
    ("1/2 of 10 is 5", "#### 5"),
    ("The result is 7...", "#### 7"),
    ("It is 30 ... I think", "#### 30"),
    ("between 10-20", "#### 20"),
    ("Total: $ 45", "#### 45"),
    ("It takes 3.5 hours.", "#### 3.5"),
    ("It takes 3.50 hours.", "#### 3.5"),
    ("ages 5 and 8.", "#### 8"),
    ("ages 5 and 8.", "#### 5"),
    ("2 + 2 = 4\n#### 4", "#### 4"),
    ("9", "#### 9"),
    ("The answer is 42 . Done", "#### 42"),
    ("0.5 of them", "#### .5"),
    ("In 2024 she was 12", "#### 12"),
    ("about 12 or 13", "#### 12"),
    ("$1,234.56 in total", "#### 1234.56"),
    ("It was 007", "#### 7"),
]


def main():
    task = yaml.safe_load(YAML.read_text())
    flexible = next(f for f in task["filter_list"] if f["name"] == "flexible-extract")
    steps = [[f["function"], {k: v for k, v in f.items() if k != "function"}] for f in flexible["filter"]]
    ensemble = build_filter_ensemble("flexible-extract", steps)
    metric = next(m for m in task["metric_list"] if m["metric"] == "exact_match")
    kwargs = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    exact_match = get_metric("exact_match")

    cases = []
    for output, answer in CASES:
        inst = Instance("generate_until", {"answer": answer}, ("", {}), 0, resps=[output])
        ensemble.apply([inst])
        extracted = inst.filtered_resps["flexible-extract"]
        # the harness's target is doc_to_target, the whole solution ("{{answer}}")
        score = exact_match(references=[answer], predictions=[extracted], **kwargs)["exact_match"]
        cases.append(dict(output=output, answer=answer, harness_extracted=extracted,
                          harness_correct=bool(score == 1.0)))
    out = dict(lm_eval=lm_eval.__version__, filter=flexible, metric=metric, cases=cases)
    (GOLDEN / "gsm8k_extract.json").write_text(json.dumps(out, indent=1) + "\n")
    for c in cases:
        print(f"{c['harness_correct']!s:5} {c['harness_extracted']!r:14} {c['output']!r} vs {c['answer']!r}")


if __name__ == "__main__":
    main()
