#!/usr/bin/env python3
"""lm-evaluation-harness's scores of a served petal model against `petal eval`'s own on the same
examples: acc, acc_norm, and each choice's log-likelihood (from the harness's logged samples).

    python tools/eval/compare.py petal.json samples.jsonl LM_EVAL_OUTPUT_DIR
"""
import glob
import json
import sys

petal = json.load(open(sys.argv[1]))
samples = [json.loads(l) for l in open(sys.argv[2])]
results = sorted(glob.glob(f"{sys.argv[3]}/**/results_*.json", recursive=True))[-1]
harness = json.load(open(results))["results"]["petal_mc"]
logged = sorted(glob.glob(f"{sys.argv[3]}/**/samples_petal_mc_*.jsonl", recursive=True))[-1]
docs = {}
for l in open(logged):
    d = json.loads(l)
    docs[d["doc_id"]] = [float(r[0]) for r in d["filtered_resps"]]  # (loglikelihood, is_greedy)
diff = max(abs(a - b) for i, s in enumerate(samples) for a, b in zip(s["loglikelihoods"], docs[i]))
acc, norm = harness["acc,none"], harness["acc_norm,none"]
print(json.dumps({"examples": len(samples), "petal_acc": petal["accuracy"], "harness_acc": acc,
                  "petal_acc_norm": petal["acc_norm"], "harness_acc_norm": norm,
                  "max_loglikelihood_difference": diff}))
ok = abs(acc - petal["accuracy"]) < 1e-9 and abs(norm - petal["acc_norm"]) < 1e-9 and diff < 1e-3
sys.exit(0 if ok else "the harness's scores differ from petal eval's")
