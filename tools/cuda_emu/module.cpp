// One of petal's CUDA modules as a CPU shared library (emu.h standing in for CUDA), so the
// Rust side's launches (kernel names, argument order, output shapes, grids) run on the CPU:
// `petal_ops::cuda::emulate_from(dir)` loads dir/petal0.so (the row and elementwise kernels,
// built without HD) and dir/petal<HD>.so (attention for heads of HD), as the GPU loads its
// modules. Arguments arrive as cuLaunchKernel takes them: an array of pointers to each value.
//
//     g++ -std=c++20 -O1 -shared -fPIC -pthread [-DHD=64] module.cpp -o petal[64].so
#include "emu.h"

#include "../../crates/petal-ops/src/cuda/common.cuh"
#ifdef HD
#include "../../crates/petal-ops/src/cuda/attention.cu"
#else
#include "../../crates/petal-ops/src/cuda/kernels.cu"
#endif

#include <functional>
#include <map>
#include <string>
#include <utility>

template <class... A, size_t... I>
static void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<A*>(args[I])...);
}

// A kernel taking its arguments from cuLaunchKernel's array.
template <class... A>
static std::function<void(void**)> entry(void (*f)(A...)) {
    return [f](void** args) { call_with(f, args, std::index_sequence_for<A...>{}); };
}

#define E(name) {#name, entry(&name)}

static const std::map<std::string, std::function<void(void**)>>& kernels() {
    static const std::map<std::string, std::function<void(void**)>> table = {
#ifdef HD
        E(attn_fwd_f32),   E(attn_fwd_bf16), E(attn_stats_f32), E(attn_stats_bf16),
        E(attn_dq_f32),    E(attn_dq_bf16),  E(attn_dkv_f32),   E(attn_dkv_bf16),
#else
        E(softmax_fwd_f32),     E(softmax_fwd_bf16),    E(softmax_bwd_f32),
        E(softmax_bwd_bf16),    E(rope_f32),            E(rope_bf16),
        E(swiglu_fwd_f32),      E(swiglu_fwd_bf16),     E(swiglu_bwd_f32),
        E(swiglu_bwd_bf16),     E(ce_fwd_f32),          E(ce_fwd_bf16),
        E(rms_fwd_f32_f32),     E(rms_fwd_f32_bf16),    E(rms_fwd_bf16_f32),
        E(rms_fwd_bf16_bf16),   E(rms_bwd_f32_f32),     E(rms_bwd_f32_bf16),
        E(rms_bwd_bf16_f32),    E(rms_bwd_bf16_bf16),   E(ce_grad_f32_f32),
        E(ce_grad_f32_bf16),    E(ce_grad_bf16_f32),    E(ce_grad_bf16_bf16),
        E(adamw_multi),         E(lora_fwd_f32),        E(lora_fwd_bf16),
#endif
    };
    return table;
}

// Runs kernel `name` over the grid; 1 where the module has no such kernel.
extern "C" int petal_emu_launch(const char* name, void** args, unsigned gx, unsigned gy,
                                unsigned gz, unsigned block) {
    const auto it = kernels().find(name);
    if (it == kernels().end()) return 1;
    emu_launch({gx, gy, gz}, block, [&] { it->second(args); });
    return 0;
}
