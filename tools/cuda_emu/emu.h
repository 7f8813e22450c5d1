// A CPU stand-in for the few CUDA features petal's kernels use, so their logic (indexing,
// tiling, masking, reductions) can be checked on a machine without a GPU: each block runs as
// blockDim.x OS threads meeting at a real barrier for __syncthreads, blocks one after another
// (so `__shared__` can be a function-local static), warp shuffles through a block-wide buffer
// (every kernel here calls them with the whole block). Not a model of timing or of memory
// coherence beyond what __syncthreads orders. C++20.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct emu_dim3 {
    unsigned x, y, z;
};
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;
inline std::barrier<>* emu_barrier = nullptr;
inline float emu_lanes[1024];

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    emu_lanes[threadIdx.x] = v;
    __syncthreads();
    const float r = emu_lanes[threadIdx.x ^ lane_mask];
    __syncthreads();
    return r;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
using std::max;
using std::min;

struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// Runs `kernel` over the grid, blocks in turn, each block's threads at once.
template <class F>
void emu_launch(emu_dim3 grid, unsigned block, F kernel) {
    blockDim = {block, 1, 1};
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                std::barrier<> bar(block);
                emu_barrier = &bar;
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < block; t++)
                    threads.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        kernel();
                    });
                for (auto& t : threads) t.join();
            }
}
