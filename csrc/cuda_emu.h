// A CPU stand-in for the few CUDA features flowopd_kernels.cu uses, so the tests can compile that
// same file as C++ (-DFLOWOPD_EMULATE) and run its kernels on tensors in host memory.
// Each launch runs blockDim.x std::threads that walk the grid's blocks in turn; a warp's 32 threads
// exchange values for __shfl_xor_sync through a shared slot array and a barrier, __syncthreads is a
// barrier over the block. A thread that returns from the kernel early drops out of its warp and
// block barriers for that block (as exited threads do on a GPU). bf16 conversions round to nearest
// even, as cuda_bf16.h does. Not for speed: for checking indexing, reductions and arithmetic.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3() = default;
    dim3(unsigned x_) : x(x_) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct __nv_bfloat16 { uint16_t bits; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };

inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40u)};  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

typedef int cudaError_t;
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return 0; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == 0 ? "no error (emulated)" : "emulated launch error"; }

namespace emu {
struct Warp {
    float slots[32];
    std::barrier<> bar;
    explicit Warp(int n) : bar(n) {}
};
inline thread_local Warp* warp;
inline thread_local std::barrier<>* block_barrier;

template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Args... args) {
    blockDim = block;
    gridDim = grid;
    const int threads = (int)block.x;
    std::barrier<> grid_bar(threads);  // between blocks: the next block starts with fresh barriers
    std::vector<std::unique_ptr<Warp>> warps;
    std::unique_ptr<std::barrier<>> block_bar;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; t++) {
        pool.emplace_back([&, t] {
            threadIdx = dim3((unsigned)t);
            for (unsigned bx = 0; bx < grid.x; bx++) {
                if (t == 0) {
                    warps.clear();
                    for (int w = 0; w * 32 < threads; w++) warps.push_back(std::make_unique<Warp>(std::min(32, threads - w * 32)));
                    block_bar = std::make_unique<std::barrier<>>(threads);
                }
                grid_bar.arrive_and_wait();
                blockIdx = dim3(bx);
                warp = warps[t / 32].get();
                block_barrier = block_bar.get();
                kernel(args...);
                warp->bar.arrive_and_drop();
                block_barrier->arrive_and_drop();
                grid_bar.arrive_and_wait();
            }
        });
    }
    for (auto& th : pool) th.join();
}
}  // namespace emu

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    const int lane = (int)(threadIdx.x & 31);
    emu::warp->slots[lane] = v;
    emu::warp->bar.arrive_and_wait();
    const float r = emu::warp->slots[lane ^ mask];
    emu::warp->bar.arrive_and_wait();
    return r;
}
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
