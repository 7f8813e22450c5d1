#!/usr/bin/env bash
# A `--features cuda` petal for another machine's GPU: builds here (any nvcc that candle's
# kernels compile with, e.g. Debian's CUDA 11.8 with CUDA_COMPUTE_CAP=80: their PTX is compiled
# for the card by its driver) and loads cuBLAS, cuRAND and NVRTC at run time, so the binary
# runs against whatever CUDA the GPU machine has. candle-core asks cudarc for link-time CUDA
# (`dynamic-linking`); a copy of candle-core with run-time loading (`dynamic-loading`) is given
# to cargo through --config, leaving the repository's manifests as they are. Run from the repo
# root:
#
#     tools/bench/build_gpu.sh [CUDA version of the GPU machine, default 13000]
#
# Leaves .gpu/petal.gz, the libcudart it links (candle's kernels need the runtime) and the
# CUDA kernels' test binary in .gpu/tests; carry .gpu to the GPU machine, then:
# gunzip -c .gpu/petal.gz > /tmp/petal; chmod +x /tmp/petal;
# LD_LIBRARY_PATH=$PWD/.gpu TESTS=.gpu/tests tools/bench/gpu.sh /tmp/petal OUT_DIR
set -eu
VERSION=${1:-13000}
cargo fetch -q
# cargo writes the patch into Cargo.lock: put the repository's back when done
cp Cargo.lock "${TMPDIR:-/tmp}/petal-Cargo.lock"
trap 'cp "${TMPDIR:-/tmp}/petal-Cargo.lock" Cargo.lock' EXIT
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-0.11.1 | head -1)
COPY=${CANDLE_COPY:-${TMPDIR:-/tmp}/candle-core-dynamic-loading}
rm -rf "$COPY"
cp -r "$SRC" "$COPY"
python3 - "$COPY/Cargo.toml" <<'EOF'
import sys
p = sys.argv[1]
s = open(p).read()
old = '    "cuda-version-from-build-system",\n    "dynamic-linking",\n'
assert old in s, "candle-core's cudarc features are not the expected ones"
open(p, "w").write(s.replace(old, '    "dynamic-loading",\n'))
EOF
CUDARC_CUDA_VERSION=$VERSION CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80} \
    CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu} \
    cargo build --release -p petal-cli --features cuda \
    --config "patch.crates-io.candle-core.path=\"$COPY\""
BIN=${CARGO_TARGET_DIR:-target/gpu}/release/petal
mkdir -p .gpu
strip -o .gpu/petal "$BIN"
gzip -9f .gpu/petal
for lib in $(ldd "$BIN" | awk '/libcudart/ {print $3}'); do cp -L "$lib" .gpu/; done
# the CUDA kernels' tests, for gpu.sh's TESTS=.gpu/tests
rm -rf .gpu/tests && mkdir -p .gpu/tests
CUDARC_CUDA_VERSION=$VERSION CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80} \
    CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu} \
    cargo test --release -p petal-ops --features cuda --test cuda_kernels --no-run \
    --config "patch.crates-io.candle-core.path=\"$COPY\"" 2>&1 |
    sed -n 's/.*Executable .*(\(.*\))/\1/p' | while read -r t; do
        strip -o .gpu/tests/cuda_kernels "$t" && gzip -9f .gpu/tests/cuda_kernels
    done
ls -la .gpu
