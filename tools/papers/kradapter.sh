#!/usr/bin/env bash
# KRAdapter's toy claim (the official approximate_weight.py, small): fit random, sparse,
# whitened and low-rank target matrices (1024, 768) with KRAdapter and with LoRA at an equal
# parameter budget, through petal's own layers and AdamW; writes docs/papers/kradapter.md.
#
#   tools/papers/kradapter.sh [SEEDS] [STEPS]   (default seeds "0 1", 300 steps: about 10 min
#   per seed on 2 cores)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
seeds=${1:-0 1}
steps=${2:-300}
cd "$root"
cargo build --release -p petal-train --example kradapter_toy >&2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for s in $seeds; do
  echo "== seed $s" >&2
  target/release/examples/kradapter_toy "$s" "$steps" >> "$out"
done
python3 tools/papers/kradapter_report.py "$out" "$seeds" "$steps" > docs/papers/kradapter.md
echo "wrote docs/papers/kradapter.md" >&2
