#!/usr/bin/env bash
# Two petal binaries on the same training, alternating, `ROUNDS` rounds: each run's
# `petal train --json` summary as one JSON line (with the binary's label and the round), then
# the medians of their median step times and the ratio. For a change's before and after on one
# machine; nothing else should run meanwhile.
#     tools/bench/ab_train.sh OLD NEW DATA [OUT.jsonl]
#     (env: MODEL, METHOD, STEPS, BATCH, SEQ, ROUNDS; EXTRA: more train flags, e.g. "--set init_r=1")
set -euo pipefail
OLD=$1 NEW=$2 DATA=$3 OUT=${4:-/dev/stdout}
MODEL=${MODEL:-asset:qwen2.5-coder-0.5b} METHOD=${METHOD:-lora} STEPS=${STEPS:-6}
BATCH=${BATCH:-4} SEQ=${SEQ:-256} ROUNDS=${ROUNDS:-2}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
: >"$T/runs.jsonl"
for round in $(seq "$ROUNDS"); do
  for which in old new; do
    bin=$OLD; [ "$which" = new ] && bin=$NEW
    "$bin" train --model "$MODEL" --data "$DATA" --method "$METHOD" --max-steps "$STEPS" \
      --lr 0.001 --batch-size "$BATCH" --seq-len "$SEQ" --seed 0 --val-fraction 0 \
      --out "$T/run" --overwrite true --json ${EXTRA:-} >"$T/one.json"
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d.update(binary=sys.argv[2], round=int(sys.argv[3])); print(json.dumps(d))' \
      "$T/one.json" "$which" "$round" >>"$T/runs.jsonl"
  done
done
cat "$T/runs.jsonl" >"$OUT"
python3 - "$T/runs.jsonl" <<'PY' >&2
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = {w: statistics.median(r["median_step_seconds"] for r in runs if r["binary"] == w) for w in ("old", "new")}
rss = {w: max(r["peak_rss_mb"] for r in runs if r["binary"] == w) for w in ("old", "new")}
print(f"median step: old {med['old']:.2f} s, new {med['new']:.2f} s ({med['old'] / med['new']:.2f}x); "
      f"peak RSS: old {rss['old']:.0f} MB, new {rss['new']:.0f} MB")
PY
