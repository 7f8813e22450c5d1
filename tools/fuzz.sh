#!/usr/bin/env bash
# Coverage-guided fuzzing of petal's readers (fuzz/targets.rs): the GGUF reader, an adapter's
# safetensors, adapter_config.json, a model's config.json and JSONL data, each for SECONDS
# (default 60) with libFuzzer through cargo-fuzz. cargo-fuzz wants a nightly compiler;
# RUSTC_BOOTSTRAP=1 lets the stable one build it. Crashes land in fuzz/artifacts/TARGET/: fix,
# then keep the input in fuzz/regressions/TARGET/ (the normal tests replay it).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf adapter_safetensors adapter_config model_config jsonl_data)
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
# no sanitizer: the targets are safe Rust; a panic, an abort or an allocation over
# -malloc_limit_mb is what counts as a crash
cargo fuzz build -s none -O
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t: ${secs}s"
  # one process, the corpus grown in place; -rss_limit_mb bounds a runaway allocation
  if ! cargo fuzz run -s none -O "$t" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=4096 -malloc_limit_mb=2048 -timeout=20 \
      -print_final_stats=1 2>"/tmp/petal-fuzz-$t.log"; then
    echo "   CRASH: see /tmp/petal-fuzz-$t.log and fuzz/artifacts/$t/"
    status=1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "/tmp/petal-fuzz-$t.log" | sed 's/^/   /'
done
exit $status
