#!/usr/bin/env bash
# petal's CUDA modules built for the CPU (module.cpp) into DIR: petal0.so and the attention
# modules for heads of 8, 16, 32, 64 and 128 (the golden models' heads are 8 and 16; other
# sizes take candle's ops). Then, for instance, every golden adapter through the
# CUDA kernels, emulated, against PEFT:
#
#     tools/cuda_emu/build_modules.sh /tmp/emu
#     PETAL_CUDA_EMULATE=/tmp/emu PETAL_CUDA_KERNELS=1 \
#         python3 tools/golden/check_on_device.py target/release/petal cpu
set -eu
DIR=$1
SRC=$(cd "$(dirname "$0")" && pwd)/module.cpp
mkdir -p "$DIR"
for hd in 0 8 16 32 64 128; do
    def=""
    [ $hd -gt 0 ] && def="-DHD=$hd"
    g++ -std=c++20 -O1 -shared -fPIC -pthread -Wno-unknown-pragmas $def "$SRC" -o "$DIR/petal$hd.so"
done
