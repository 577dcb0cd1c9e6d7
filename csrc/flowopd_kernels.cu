// Fused bf16 kernels for the MMDiT's memory-bound small ops, and Flow-GRPO's SDE step in fp32.
// bf16 in and out, fp32 math, one rounding per output. Each has a plain PyTorch twin in kernels.py,
// which is the reference; kernels.py checks every kernel against it (python bench.py --check).
//
// The library has no torch headers and a plain C interface (raw pointers, sizes, the CUDA stream):
// kernels.py validates shapes, strides and alignment, then calls these launchers through ctypes.
// That keeps the build short and free of torch's C++ ABI, and lets the tests compile this same file
// as C++ against csrc/cuda_emu.h (threads stand in for CUDA threads) and run it on a CPU.
//
// Layout conventions: "rows" are the last dimension (D); 16-byte vectors of 8 bf16, so D % 8 == 0
// and every row start is 16-byte aligned (kernels.py checks both).

#ifdef FLOWOPD_EMULATE
#include "cuda_emu.h"
#define LAUNCH(kernel, grid, block, stream, ...) emu::launch(kernel, grid, block, __VA_ARGS__)
#else
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#define LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, (cudaStream_t)(stream)>>>(__VA_ARGS__)
#endif
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------------------------------------
// helpers: 8 bf16 <-> 8 floats through one 16-byte access; sums over a warp or a group of lanes

__device__ __forceinline__ void load8(const bf16* p, float* f) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ void store8(bf16* p, const float* f) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
}

// sum over aligned groups of W lanes (W a power of two <= 32); every lane of the warp must call it
template <int W>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// blocks for a grid-stride loop over `work` items (capped: the loop covers the rest)
static int grid_stride_blocks(int64_t work, int per_block) {
    int64_t blocks = (work + per_block - 1) / per_block;
    if (blocks > (1 << 20)) blocks = 1 << 20;
    return (int)(blocks < 1 ? 1 : blocks);
}

// blocks for one item per thread group (no loop: every item needs its block); 0 if too many
static int grid_rows(int64_t rows, int per_block) {
    int64_t blocks = (rows + per_block - 1) / per_block;
    return blocks > 2147483647LL ? 0 : (int)(blocks < 1 ? 1 : blocks);
}

// ---------------------------------------------------------------------------------------------
// (a) LayerNorm (no affine) + adaLN modulation: out = LN(x) * (1 + scale[b]) + shift[b].
// One warp per row of D; lane l holds vectors l, l + 32, ... (VPT of them) in registers, so x is
// read once; mean and variance by two passes over the registers (no E[x^2] - E[x]^2 cancellation).
// scale/shift: (B, 1, D) views with per-sample stride mod_stride (chunks of the adaLN output).

template <int VPT>
__global__ void __launch_bounds__(128) modulate_fwd_kernel(const bf16* __restrict__ x, const bf16* __restrict__ scale,
                                                           const bf16* __restrict__ shift, bf16* __restrict__ out,
                                                           int64_t rows, int64_t tokens, int D, int64_t mod_stride,
                                                           float eps) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // warp-uniform
    const bf16* xr = x + row * D;
    float v[VPT][8];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int c = (i * 32 + lane) * 8;
        if (c < D) {
            load8(xr + c, v[i]);
#pragma unroll
            for (int k = 0; k < 8; k++) sum += v[i][k];
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) v[i][k] = 0.f;
        }
    }
    const float mean = group_sum<32>(sum) / D;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        if ((i * 32 + lane) * 8 < D) {
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float d = v[i][k] - mean;
                sq += d * d;
            }
        }
    }
    const float rstd = rsqrtf(group_sum<32>(sq) / D + eps);
    const int64_t b = row / tokens;
    const bf16* sc = scale + b * mod_stride;
    const bf16* sh = shift + b * mod_stride;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int c = (i * 32 + lane) * 8;
        if (c < D) {
            float s[8], t[8], o[8];
            load8(sc + c, s);
            load8(sh + c, t);
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = (v[i][k] - mean) * rstd * (1.f + s[k]) + t[k];
            store8(out + row * D + c, o);
        }
    }
}

// Its input gradient (scale and shift frozen, as every adaLN vector is under LoRA training):
// dxhat = g (1 + scale); dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
template <int VPT>
__global__ void __launch_bounds__(128) modulate_bwd_kernel(const bf16* __restrict__ grad, const bf16* __restrict__ x,
                                                           const bf16* __restrict__ scale, bf16* __restrict__ dx,
                                                           int64_t rows, int64_t tokens, int D, int64_t mod_stride,
                                                           float eps) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const bf16* xr = x + row * D;
    const bf16* gr = grad + row * D;
    const bf16* sc = scale + (row / tokens) * mod_stride;
    float v[VPT][8], g[VPT][8];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int c = (i * 32 + lane) * 8;
        if (c < D) {
            float s[8];
            load8(xr + c, v[i]);
            load8(gr + c, g[i]);
            load8(sc + c, s);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                sum += v[i][k];
                g[i][k] *= 1.f + s[k];
            }
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) v[i][k] = g[i][k] = 0.f;
        }
    }
    const float mean = group_sum<32>(sum) / D;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        if ((i * 32 + lane) * 8 < D) {
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float d = v[i][k] - mean;
                sq += d * d;
            }
        }
    }
    const float rstd = rsqrtf(group_sum<32>(sq) / D + eps);
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
#pragma unroll
        for (int k = 0; k < 8; k++) {  // padded entries are 0 in g, so they add nothing
            v[i][k] = (v[i][k] - mean) * rstd;
            sg += g[i][k];
            sgx += g[i][k] * v[i][k];
        }
    }
    const float mg = group_sum<32>(sg) / D;
    const float mgx = group_sum<32>(sgx) / D;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int c = (i * 32 + lane) * 8;
        if (c < D) {
            float o[8];
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = rstd * (g[i][k] - mg - v[i][k] * mgx);
            store8(dx + row * D + c, o);
        }
    }
}

typedef void (*modulate_fwd_t)(const bf16*, const bf16*, const bf16*, bf16*, int64_t, int64_t, int, int64_t, float);
typedef void (*modulate_bwd_t)(const bf16*, const bf16*, const bf16*, bf16*, int64_t, int64_t, int, int64_t, float);

template <int VPT>
static void pick_modulate(modulate_fwd_t* f, modulate_bwd_t* b) {
    *f = modulate_fwd_kernel<VPT>;
    *b = modulate_bwd_kernel<VPT>;
}

static bool modulate_kernels(int D, modulate_fwd_t* f, modulate_bwd_t* b) {
    switch ((D + 255) / 256) {  // 16-byte vectors per lane
        case 1: pick_modulate<1>(f, b); return true;
        case 2: pick_modulate<2>(f, b); return true;
        case 3: pick_modulate<3>(f, b); return true;
        case 4: pick_modulate<4>(f, b); return true;
        case 5: pick_modulate<5>(f, b); return true;
        case 6: pick_modulate<6>(f, b); return true;
        case 7: pick_modulate<7>(f, b); return true;
        case 8: pick_modulate<8>(f, b); return true;
        default: return false;
    }
}

// ---------------------------------------------------------------------------------------------
// (b) gated residual: out = x + gate[b] * y  (x == nullptr: out = gate[b] * y, the input gradient
// of y). Elementwise over (B, N, D) in 8-wide vectors; gate is (B, 1, D) with per-sample stride.

__global__ void __launch_bounds__(256) gated_kernel(const bf16* __restrict__ x, const bf16* __restrict__ gate,
                                                    const bf16* __restrict__ y, bf16* __restrict__ out, int64_t vectors,
                                                    int64_t sample_elems, int D, int64_t gate_stride) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t e = i * 8;
        const int64_t b = e / sample_elems;
        const int d = (int)(e % D);
        float g[8], yv[8], o[8];
        load8(gate + b * gate_stride + d, g);
        load8(y + e, yv);
        if (x != nullptr) {
            float xv[8];
            load8(x + e, xv);
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = xv[k] + g[k] * yv[k];
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = g[k] * yv[k];
        }
        store8(out + e, o);
    }
}

// ---------------------------------------------------------------------------------------------
// (c) GELU, tanh approximation (PyTorch's formula and constants), and its derivative.

__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
    const float kKappa = 0.044715f;
    const float inner = kBeta * (x + kKappa * x * x * x);
    return 0.5f * x * (1.f + tanhf(inner));
}

__device__ __forceinline__ float gelu_tanh_grad_f(float x) {
    const float kBeta = 0.7978845608028654f;
    const float kKappa = 0.044715f;
    const float x_sq = x * x;
    const float inner = kBeta * (x + kKappa * x_sq * x);
    const float t = tanhf(inner);
    const float left = 0.5f * x;
    const float right = 1.f + t;
    return 0.5f * right + left * (1.f - t * t) * kBeta * (1.f + 3.f * kKappa * x_sq);
}

__global__ void __launch_bounds__(256) gelu_fwd_kernel(const bf16* __restrict__ x, bf16* __restrict__ out, int64_t vectors) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += (int64_t)gridDim.x * blockDim.x) {
        float v[8];
        load8(x + i * 8, v);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = gelu_tanh_f(v[k]);
        store8(out + i * 8, v);
    }
}

__global__ void __launch_bounds__(256) gelu_bwd_kernel(const bf16* __restrict__ grad, const bf16* __restrict__ x,
                                                       bf16* __restrict__ dx, int64_t vectors) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += (int64_t)gridDim.x * blockDim.x) {
        float v[8], g[8];
        load8(x + i * 8, v);
        load8(grad + i * 8, g);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = g[k] * gelu_tanh_grad_f(v[k]);
        store8(dx + i * 8, v);
    }
}

// ---------------------------------------------------------------------------------------------
// (d) RMSNorm over the head dim with weight: out = x rsqrt(mean(x^2) + eps) w. A group of D / 8
// lanes per row (8 for SD3.5's head dim 64, four rows per warp). The input may be a strided view
// (q or k of the fused qkv, (B, H, N, D) permuted from (B, N, 3, H, D)): rows are addressed through
// three leading sizes/strides; the output is contiguous. Rows past the end still join the shuffles.

template <int LPR>
__global__ void __launch_bounds__(128) rms_fwd_kernel(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                      bf16* __restrict__ out, int64_t rows, int64_t n1, int64_t n2,
                                                      int64_t s0, int64_t s1, int64_t s2, float eps) {
    const int sub = threadIdx.x % LPR;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / LPR) + threadIdx.x / LPR;
    const bool valid = row < rows;
    const int D = LPR * 8;
    float v[8];
    if (valid) {
        const int64_t i0 = row / (n1 * n2), r = row % (n1 * n2);
        load8(x + i0 * s0 + (r / n2) * s1 + (r % n2) * s2 + sub * 8, v);
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = 0.f;
    }
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < 8; k++) sq += v[k] * v[k];
    const float rstd = rsqrtf(group_sum<LPR>(sq) / D + eps);
    if (valid) {
        float wv[8];
        load8(w + sub * 8, wv);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = v[k] * rstd * wv[k];
        store8(out + row * D + sub * 8, v);
    }
}

// Its input gradient (weight frozen): xn = x rstd, dxn = g w, dx = rstd (dxn - xn mean(dxn xn)).
// grad and dx are contiguous; x is addressed as in the forward.
template <int LPR>
__global__ void __launch_bounds__(128) rms_bwd_kernel(const bf16* __restrict__ grad, const bf16* __restrict__ x,
                                                      const bf16* __restrict__ w, bf16* __restrict__ dx, int64_t rows,
                                                      int64_t n1, int64_t n2, int64_t s0, int64_t s1, int64_t s2,
                                                      float eps) {
    const int sub = threadIdx.x % LPR;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / LPR) + threadIdx.x / LPR;
    const bool valid = row < rows;
    const int D = LPR * 8;
    float v[8], g[8];
    if (valid) {
        const int64_t i0 = row / (n1 * n2), r = row % (n1 * n2);
        float wv[8];
        load8(x + i0 * s0 + (r / n2) * s1 + (r % n2) * s2 + sub * 8, v);
        load8(grad + row * D + sub * 8, g);
        load8(w + sub * 8, wv);
#pragma unroll
        for (int k = 0; k < 8; k++) g[k] *= wv[k];
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = g[k] = 0.f;
    }
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < 8; k++) sq += v[k] * v[k];
    const float rstd = rsqrtf(group_sum<LPR>(sq) / D + eps);
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        v[k] *= rstd;
        dot += g[k] * v[k];
    }
    dot = group_sum<LPR>(dot) / D;
    if (valid) {
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = rstd * (g[k] - v[k] * dot);
        store8(dx + row * D + sub * 8, v);
    }
}

typedef void (*rms_fwd_t)(const bf16*, const bf16*, bf16*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float);
typedef void (*rms_bwd_t)(const bf16*, const bf16*, const bf16*, bf16*, int64_t, int64_t, int64_t, int64_t, int64_t,
                          int64_t, float);

template <int LPR>
static void pick_rms(rms_fwd_t* f, rms_bwd_t* b) {
    *f = rms_fwd_kernel<LPR>;
    *b = rms_bwd_kernel<LPR>;
}

static bool rms_kernels(int D, rms_fwd_t* f, rms_bwd_t* b) {
    switch (D) {
        case 8: pick_rms<1>(f, b); return true;
        case 16: pick_rms<2>(f, b); return true;
        case 32: pick_rms<4>(f, b); return true;
        case 64: pick_rms<8>(f, b); return true;
        case 128: pick_rms<16>(f, b); return true;
        case 256: pick_rms<32>(f, b); return true;
        default: return false;
    }
}

// ---------------------------------------------------------------------------------------------
// (e) Flow-GRPO's SDE step (METHOD 2), fp32, one block per sample:
//   mean = x + (v + c (x + (1 - s) v)) dt,  c = std^2 / (2 s),  dt = s_next - s
//   sample: next = mean + step_std * noise;  score: next given
//   log_prob = mean over elements of [-(next - mean)^2 / (2 step_std^2) - log(step_std) - log(2 pi) / 2]
// coef[b] = (c, 1 - s, dt, step_std, 2 step_std^2, log step_std), computed by kernels.py with the twin's
// own torch ops. The elementwise arithmetic is done in the twin's order with explicit round-to-nearest
// operations (no FMA contraction), so mean and next equal the twin's bit for bit; the log-prob sum is
// a tree in fixed order (deterministic), not torch's order.

__global__ void __launch_bounds__(512) sde_step_kernel(const float* __restrict__ x, const float* __restrict__ v,
                                                       const float* __restrict__ other, const float* __restrict__ coef,
                                                       float* __restrict__ next_out, float* __restrict__ mean_out,
                                                       float* __restrict__ log_prob, int64_t n, int sample) {
    __shared__ float partial[32];
    const int64_t b = blockIdx.x;
    const float c = coef[b * 6 + 0], one_m_s = coef[b * 6 + 1], dt = coef[b * 6 + 2];
    const float step_std = coef[b * 6 + 3], two_var = coef[b * 6 + 4], log_std = coef[b * 6 + 5];
    const float half_log_2pi = 0.9189385332046727f;
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const int64_t e = b * n + i;
        const float xe = x[e], ve = v[e];
        const float inner = __fadd_rn(xe, __fmul_rn(one_m_s, ve));
        const float mean = __fadd_rn(xe, __fmul_rn(__fadd_rn(ve, __fmul_rn(c, inner)), dt));
        float nxt;
        if (sample) {
            nxt = __fadd_rn(mean, __fmul_rn(step_std, other[e]));
            next_out[e] = nxt;
        } else {
            nxt = other[e];
        }
        mean_out[e] = mean;
        const float d = __fadd_rn(nxt, -mean);
        acc += __fadd_rn(__fadd_rn(-__fmul_rn(d, d) / two_var, -log_std), -half_log_2pi);
    }
    acc = group_sum<32>(acc);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        float t = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.f;
        t = group_sum<32>(t);
        if (lane == 0) log_prob[b] = t / (float)n;
    }
}

// ---------------------------------------------------------------------------------------------
// The C interface. Each returns 0 or a CUDA error code (the launch's, from cudaGetLastError);
// -1 means an unsupported size (kernels.py checks sizes first, so it signals a bug there).

extern "C" {

const char* flowopd_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

int flowopd_modulate_fwd(const void* x, const void* scale, const void* shift, void* out, int64_t rows, int64_t tokens,
                         int D, int64_t mod_stride, float eps, void* stream) {
    modulate_fwd_t f;
    modulate_bwd_t b;
    if (D % 8 != 0 || !modulate_kernels(D, &f, &b)) return -1;
    if (grid_rows(rows, 4) == 0) return -1;
    LAUNCH(f, grid_rows(rows, 4), 128, stream, (const bf16*)x, (const bf16*)scale, (const bf16*)shift, (bf16*)out, rows,
           tokens, D, mod_stride, eps);
    return (int)cudaGetLastError();
}

int flowopd_modulate_bwd(const void* grad, const void* x, const void* scale, void* dx, int64_t rows, int64_t tokens,
                         int D, int64_t mod_stride, float eps, void* stream) {
    modulate_fwd_t f;
    modulate_bwd_t b;
    if (D % 8 != 0 || !modulate_kernels(D, &f, &b)) return -1;
    if (grid_rows(rows, 4) == 0) return -1;
    LAUNCH(b, grid_rows(rows, 4), 128, stream, (const bf16*)grad, (const bf16*)x, (const bf16*)scale, (bf16*)dx, rows,
           tokens, D, mod_stride, eps);
    return (int)cudaGetLastError();
}

int flowopd_gated(const void* x, const void* gate, const void* y, void* out, int64_t numel, int64_t sample_elems, int D,
                  int64_t gate_stride, void* stream) {
    if (D % 8 != 0 || numel % 8 != 0) return -1;
    LAUNCH(gated_kernel, grid_stride_blocks(numel / 8, 256), 256, stream, (const bf16*)x, (const bf16*)gate, (const bf16*)y,
           (bf16*)out, numel / 8, sample_elems, D, gate_stride);
    return (int)cudaGetLastError();
}

int flowopd_gelu_fwd(const void* x, void* out, int64_t numel, void* stream) {
    if (numel % 8 != 0) return -1;
    LAUNCH(gelu_fwd_kernel, grid_stride_blocks(numel / 8, 256), 256, stream, (const bf16*)x, (bf16*)out, numel / 8);
    return (int)cudaGetLastError();
}

int flowopd_gelu_bwd(const void* grad, const void* x, void* dx, int64_t numel, void* stream) {
    if (numel % 8 != 0) return -1;
    LAUNCH(gelu_bwd_kernel, grid_stride_blocks(numel / 8, 256), 256, stream, (const bf16*)grad, (const bf16*)x, (bf16*)dx,
           numel / 8);
    return (int)cudaGetLastError();
}

int flowopd_rms_fwd(const void* x, const void* w, void* out, int64_t rows, int64_t n1, int64_t n2, int64_t s0,
                    int64_t s1, int64_t s2, int D, float eps, void* stream) {
    rms_fwd_t f;
    rms_bwd_t b;
    if (!rms_kernels(D, &f, &b)) return -1;
    const int rows_per_block = 128 / (D / 8);
    if (grid_rows(rows, rows_per_block) == 0) return -1;
    LAUNCH(f, grid_rows(rows, rows_per_block), 128, stream, (const bf16*)x, (const bf16*)w, (bf16*)out, rows, n1, n2, s0,
           s1, s2, eps);
    return (int)cudaGetLastError();
}

int flowopd_rms_bwd(const void* grad, const void* x, const void* w, void* dx, int64_t rows, int64_t n1, int64_t n2,
                    int64_t s0, int64_t s1, int64_t s2, int D, float eps, void* stream) {
    rms_fwd_t f;
    rms_bwd_t b;
    if (!rms_kernels(D, &f, &b)) return -1;
    const int rows_per_block = 128 / (D / 8);
    if (grid_rows(rows, rows_per_block) == 0) return -1;
    LAUNCH(b, grid_rows(rows, rows_per_block), 128, stream, (const bf16*)grad, (const bf16*)x, (const bf16*)w, (bf16*)dx,
           rows, n1, n2, s0, s1, s2, eps);
    return (int)cudaGetLastError();
}

int flowopd_sde_step(const void* x, const void* v, const void* other, const void* coef, void* next_out, void* mean_out,
                     void* log_prob, int64_t batch, int64_t n, int sample, void* stream) {
    if (batch < 1 || batch > 2147483647LL) return -1;
    LAUNCH(sde_step_kernel, (int)batch, 512, stream, (const float*)x, (const float*)v, (const float*)other,
           (const float*)coef, (float*)next_out, (float*)mean_out, (float*)log_prob, n, sample);
    return (int)cudaGetLastError();
}

}  // extern "C"
