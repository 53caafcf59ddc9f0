// GroupNorm (+ SiLU) forward and backward on CUDA; math and symbols in
// csrc/ops.h. No torch headers: raw pointers, sizes and a cudaStream_t.
//
// Every kernel that touches x uses one block geometry (ops.h: kCudaThreads,
// group_norm_silu_cuda_rows/split):
//   NCHW:          blockIdx.x = n*C + c, the 256 threads walk s (coalesced).
//   channels-last: blockIdx.x = n*tiles + tile; lane % 32 is a channel of a
//                  32-channel tile (coalesced along C), the 8 rows walk s.
//   blockIdx.y:    one of `split` chunks of s, so batch 1 x 320 channels
//                  still launches hundreds of blocks.
//
// Forward:  partial  per (n, c, split) Welford (count, mean, m2)
//           finalize per (n, g): Chan-merge the group's Cg*split partials,
//                    write mean, rstd
//           apply    y = f((x - mean) * rstd*w + b)
// Backward: partial  per (n, c, split) sums of dz*xhat and dz
//           group    per (n, g): c1, c2 from sum_c w[c] * partials
//           params   per c: dweight, dbias = sums over (n, split)
//           dx       dx = rstd * (dz*w - c2 - xhat*c1)
// Partials live in a float32 workspace the caller allocates (ops.h sizes it).
// No atomics: results are deterministic run to run.
#include "../ops.h"
#include "dtype.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace sdxl_kernels {
namespace {

constexpr int kThreads = static_cast<int>(kCudaThreads);
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;

template <typename T>
__device__ __forceinline__ float load_or(const T* p, int64_t i, float fill) {
  return p != nullptr ? to_float(p[i]) : fill;
}

// silu(z) = z / (1 + exp(-z)): -0 for z << 0, z for z >> 0, NaN for NaN.
// __fdividef (2 ulp) returns 0 once the denominator passes 2^126, which is
// the right limit here, and avoids the IEEE division's slow-path call.
__device__ __forceinline__ float silu(float z) {
  return __fdividef(z, 1.0f + __expf(-z));
}

// dy * d silu/dz = dy * s * (1 + z*(1 - s)), s = sigmoid(z).
__device__ __forceinline__ float silu_grad(float dy, float z) {
  const float s = __fdividef(1.0f, 1.0f + __expf(-z));
  return dy * s * (1.0f + z * (1.0f - s));
}

// (count, mean, m2) with Welford updates and Chan's pairwise merge.
// Plain aggregate so it can live in __shared__ memory.
struct Moments {
  float n;
  float mean;
  float m2;

  __device__ void push(float x) {
    n += 1.0f;
    const float d = x - mean;
    mean += __fdividef(d, n);
    m2 += d * (x - mean);
  }
  __device__ void merge(float nb, float mean_b, float m2_b) {
    if (nb == 0.0f) return;
    const float total = n + nb;
    const float delta = mean_b - mean;
    const float ratio = nb / total;
    mean += delta * ratio;
    m2 += m2_b + delta * delta * n * ratio;
    n = total;
  }
  __device__ void merge(const Moments& o) { merge(o.n, o.mean, o.m2); }
};

// Where this thread works (see the header comment).
template <bool CL>
struct Tile {
  static constexpr int kCols = CL ? static_cast<int>(kCudaChannelTile) : 1;
  static constexpr int kRows = kThreads / kCols;

  int64_t n;
  int64_t c;
  bool active;      // c < C (channels-last tiles may overhang)
  int row;          // this thread's first s within the chunk
  int64_t s0, s1;   // the block's chunk of s
  int64_t base;     // offset of (n, c, 0)
  int64_t s_step;   // offset between s and s + 1

  __device__ Tile(int64_t C, int64_t S, int64_t split) {
    const int col = threadIdx.x % kCols;
    row = threadIdx.x / kCols;
    if (CL) {
      const int64_t tiles = (C + kCols - 1) / kCols;
      n = blockIdx.x / tiles;
      c = (blockIdx.x % tiles) * kCols + col;
    } else {
      n = blockIdx.x / C;
      c = blockIdx.x % C;
    }
    active = c < C;
    const int64_t chunk = (S + split - 1) / split;
    s0 = blockIdx.y * chunk;
    s1 = min(S, s0 + chunk);
    base = CL ? n * C * S + c : (n * C + c) * S;
    s_step = CL ? C : 1;
  }
  __device__ int64_t offset(int64_t s) const { return base + s * s_step; }
  // Index of this (n, c, split) partial in the workspace arrays.
  __device__ int64_t partial_index(int64_t C, int64_t split) const {
    return (n * C + c) * split + blockIdx.y;
  }
};

// Sum over the threads that share a column (the same channel), in shared
// memory; on return row 0 holds the totals. All threads must call it.
template <int kCols, typename V, typename Merge>
__device__ void reduce_rows(V& v, V* sh, Merge merge) {
  constexpr int kRows = kThreads / kCols;
  const int row = threadIdx.x / kCols;
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kRows / 2; stride > 0; stride >>= 1) {
    if (row < stride) {
      merge(v, sh[threadIdx.x + stride * kCols]);
      sh[threadIdx.x] = v;
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------ forward

template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads)
    gn_fwd_partial_kernel(const T* __restrict__ x,     // [N, C, S]
                          float* __restrict__ part_n,  // [N, C, split]
                          float* __restrict__ part_mean,
                          float* __restrict__ part_m2,
                          int64_t C, int64_t S, int64_t split) {
  using TileT = Tile<CL>;
  const TileT t(C, S, split);
  Moments m{0.0f, 0.0f, 0.0f};
  if (t.active) {
    for (int64_t s = t.s0 + t.row; s < t.s1; s += TileT::kRows) {
      m.push(to_float(x[t.offset(s)]));
    }
  }
  __shared__ Moments sh[kThreads];
  reduce_rows<TileT::kCols>(m, sh,
                            [](Moments& a, const Moments& b) { a.merge(b); });
  if (t.row == 0 && t.active) {
    const int64_t i = t.partial_index(C, split);
    part_n[i] = m.n;
    part_mean[i] = m.mean;
    part_m2[i] = m.m2;
  }
}

// One warp per (n, g). The group's partials are contiguous: channels
// g*Cg .. g*Cg+Cg-1 of sample n start at (n*C + g*Cg)*split = ng*Cg*split.
__global__ void __launch_bounds__(kThreads)
    gn_fwd_finalize_kernel(const float* __restrict__ part_n,
                           const float* __restrict__ part_mean,
                           const float* __restrict__ part_m2,
                           float* __restrict__ mean,  // [N, G]
                           float* __restrict__ rstd,  // [N, G]
                           int64_t NG, int64_t parts_per_group, float eps) {
  const int64_t ng =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (ng >= NG) return;  // whole warps leave together
  Moments m{0.0f, 0.0f, 0.0f};
  const int64_t base = ng * parts_per_group;
  for (int64_t j = lane; j < parts_per_group; j += kWarp) {
    m.merge(part_n[base + j], part_mean[base + j], part_m2[base + j]);
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float on = __shfl_down_sync(0xffffffffu, m.n, offset);
    const float om = __shfl_down_sync(0xffffffffu, m.mean, offset);
    const float om2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
    m.merge(on, om, om2);
  }
  if (lane == 0) {
    mean[ng] = m.mean;
    rstd[ng] = 1.0f / sqrtf(fmaxf(m.m2 / m.n, 0.0f) + eps);
  }
}

template <typename T, bool CL, bool SILU>
__global__ void __launch_bounds__(kThreads)
    gn_fwd_apply_kernel(const T* __restrict__ x,       // [N, C, S]
                        const T* __restrict__ weight,  // [C] or null
                        const T* __restrict__ bias,    // [C] or null
                        const float* __restrict__ mean,  // [N, G]
                        const float* __restrict__ rstd,  // [N, G]
                        T* __restrict__ y,             // [N, C, S]
                        int64_t C, int64_t S, int64_t G, int64_t split) {
  using TileT = Tile<CL>;
  const TileT t(C, S, split);
  if (!t.active) return;
  const int64_t ng = t.n * G + t.c / (C / G);
  const float m = mean[ng];
  const float scale = rstd[ng] * load_or(weight, t.c, 1.0f);
  const float shift = load_or(bias, t.c, 0.0f);
  for (int64_t s = t.s0 + t.row; s < t.s1; s += TileT::kRows) {
    const int64_t i = t.offset(s);
    const float z = (to_float(x[i]) - m) * scale + shift;
    y[i] = from_float<T>(SILU ? silu(z) : z);
  }
}

// ----------------------------------------------------------------- backward

struct SumPair {
  float a;  // sum dz * xhat
  float b;  // sum dz
};

template <typename T, bool CL, bool SILU>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_partial_kernel(const T* __restrict__ dy,      // [N, C, S]
                          const T* __restrict__ x,       // [N, C, S]
                          const float* __restrict__ mean,  // [N, G]
                          const float* __restrict__ rstd,  // [N, G]
                          const T* __restrict__ weight,  // [C] or null
                          const T* __restrict__ bias,    // [C] or null
                          float* __restrict__ part_a,    // [N, C, split]
                          float* __restrict__ part_b,    // [N, C, split]
                          int64_t C, int64_t S, int64_t G, int64_t split) {
  using TileT = Tile<CL>;
  const TileT t(C, S, split);
  SumPair acc{0.0f, 0.0f};
  if (t.active) {
    const int64_t ng = t.n * G + t.c / (C / G);
    const float m = mean[ng];
    const float r = rstd[ng];
    const float w = load_or(weight, t.c, 1.0f);
    const float b = load_or(bias, t.c, 0.0f);
    for (int64_t s = t.s0 + t.row; s < t.s1; s += TileT::kRows) {
      const int64_t i = t.offset(s);
      const float xhat = (to_float(x[i]) - m) * r;
      const float g = to_float(dy[i]);
      const float dz = SILU ? silu_grad(g, xhat * w + b) : g;
      acc.a += dz * xhat;
      acc.b += dz;
    }
  }
  __shared__ SumPair sh[kThreads];
  reduce_rows<TileT::kCols>(acc, sh, [](SumPair& u, const SumPair& v) {
    u.a += v.a;
    u.b += v.b;
  });
  if (t.row == 0 && t.active) {
    const int64_t i = t.partial_index(C, split);
    part_a[i] = acc.a;
    part_b[i] = acc.b;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// One warp per (n, g): c1 = sum_c w*A / M, c2 = sum_c w*B / M, M = Cg*S.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_group_kernel(const float* __restrict__ part_a,
                        const float* __restrict__ part_b,
                        const T* __restrict__ weight,  // [C] or null
                        float* __restrict__ coef,      // [N, G, 2]: c1, c2
                        int64_t NG, int64_t G, int64_t Cg, int64_t split,
                        float inv_count) {
  const int64_t ng =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (ng >= NG) return;
  const int64_t parts = Cg * split;
  const int64_t base = ng * parts;
  const int64_t c0 = (ng % G) * Cg;
  float sa = 0.0f;
  float sb = 0.0f;
  for (int64_t j = lane; j < parts; j += kWarp) {
    const float w = load_or(weight, c0 + j / split, 1.0f);
    sa += w * part_a[base + j];
    sb += w * part_b[base + j];
  }
  sa = warp_sum(sa);
  sb = warp_sum(sb);
  if (lane == 0) {
    coef[2 * ng] = sa * inv_count;
    coef[2 * ng + 1] = sb * inv_count;
  }
}

// One warp per channel: dweight[c] = sum_{n, split} A, dbias[c] = ... B.
__global__ void __launch_bounds__(kThreads)
    gn_bwd_param_kernel(const float* __restrict__ part_a,
                        const float* __restrict__ part_b,
                        float* __restrict__ dweight,  // [C] or null
                        float* __restrict__ dbias,    // [C] or null
                        int64_t N, int64_t C, int64_t split) {
  const int64_t c =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= C) return;
  float sa = 0.0f;
  float sb = 0.0f;
  for (int64_t j = lane; j < N * split; j += kWarp) {
    const int64_t i = ((j / split) * C + c) * split + j % split;
    sa += part_a[i];
    sb += part_b[i];
  }
  sa = warp_sum(sa);
  sb = warp_sum(sb);
  if (lane == 0) {
    if (dweight != nullptr) dweight[c] = sa;
    if (dbias != nullptr) dbias[c] = sb;
  }
}

template <typename T, bool CL, bool SILU>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_dx_kernel(const T* __restrict__ dy,        // [N, C, S]
                     const T* __restrict__ x,         // [N, C, S]
                     const float* __restrict__ mean,  // [N, G]
                     const float* __restrict__ rstd,  // [N, G]
                     const T* __restrict__ weight,    // [C] or null
                     const T* __restrict__ bias,      // [C] or null
                     const float* __restrict__ coef,  // [N, G, 2]
                     T* __restrict__ dx,              // [N, C, S]
                     int64_t C, int64_t S, int64_t G, int64_t split) {
  using TileT = Tile<CL>;
  const TileT t(C, S, split);
  if (!t.active) return;
  const int64_t ng = t.n * G + t.c / (C / G);
  const float m = mean[ng];
  const float r = rstd[ng];
  const float c1 = coef[2 * ng];
  const float c2 = coef[2 * ng + 1];
  const float w = load_or(weight, t.c, 1.0f);
  const float b = load_or(bias, t.c, 0.0f);
  for (int64_t s = t.s0 + t.row; s < t.s1; s += TileT::kRows) {
    const int64_t i = t.offset(s);
    const float xhat = (to_float(x[i]) - m) * r;
    const float g = to_float(dy[i]);
    const float dz = SILU ? silu_grad(g, xhat * w + b) : g;
    dx[i] = from_float<T>(r * (dz * w - c2 - xhat * c1));
  }
}

// -------------------------------------------------------------- launchers

// Calls f(std::bool_constant<a>, std::bool_constant<b>) for runtime a, b.
template <typename F>
void with_bools(bool a, bool b, F&& f) {
  if (a) {
    if (b) {
      f(std::true_type{}, std::true_type{});
    } else {
      f(std::true_type{}, std::false_type{});
    }
  } else {
    if (b) {
      f(std::false_type{}, std::true_type{});
    } else {
      f(std::false_type{}, std::false_type{});
    }
  }
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

unsigned warp_blocks(int64_t warps) {
  return static_cast<unsigned>(ceil_div(warps, kWarpsPerBlock));
}

template <typename T>
const char* forward(const void* x_, const void* weight_, const void* bias_,
                    void* y_, float* mean, float* rstd,
                    const GroupNormShape& s, float eps, bool silu, float* ws,
                    cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_);
  const T* weight = static_cast<const T*>(weight_);
  const T* bias = static_cast<const T*>(bias_);
  T* y = static_cast<T*>(y_);
  const int64_t split = group_norm_silu_cuda_split(s);
  const int64_t P = s.N * s.C * split;
  float* part_n = ws;
  float* part_mean = ws + P;
  float* part_m2 = ws + 2 * P;
  const dim3 grid(static_cast<unsigned>(group_norm_silu_cuda_rows(s)),
                  static_cast<unsigned>(split));
  with_bools(s.channels_last, silu, [&](auto cl, auto act) {
    constexpr bool CL = decltype(cl)::value;
    constexpr bool SILU = decltype(act)::value;
    gn_fwd_partial_kernel<T, CL><<<grid, kThreads, 0, stream>>>(
        x, part_n, part_mean, part_m2, s.C, s.S, split);
    gn_fwd_finalize_kernel<<<warp_blocks(s.N * s.G), kThreads, 0, stream>>>(
        part_n, part_mean, part_m2, mean, rstd, s.N * s.G,
        s.channels_per_group() * split, eps);
    gn_fwd_apply_kernel<T, CL, SILU><<<grid, kThreads, 0, stream>>>(
        x, weight, bias, mean, rstd, y, s.C, s.S, s.G, split);
  });
  return last_error();
}

template <typename T>
const char* backward(const void* dy_, const void* x_, const float* mean,
                     const float* rstd, const void* weight_,
                     const void* bias_, void* dx_, float* dweight,
                     float* dbias, const GroupNormShape& s, bool silu,
                     float* ws, cudaStream_t stream) {
  const T* dy = static_cast<const T*>(dy_);
  const T* x = static_cast<const T*>(x_);
  const T* weight = static_cast<const T*>(weight_);
  const T* bias = static_cast<const T*>(bias_);
  T* dx = static_cast<T*>(dx_);
  const int64_t split = group_norm_silu_cuda_split(s);
  const int64_t P = s.N * s.C * split;
  float* part_a = ws;
  float* part_b = ws + P;
  float* coef = ws + 2 * P;
  const int64_t Cg = s.channels_per_group();
  const dim3 grid(static_cast<unsigned>(group_norm_silu_cuda_rows(s)),
                  static_cast<unsigned>(split));
  with_bools(s.channels_last, silu, [&](auto cl, auto act) {
    constexpr bool CL = decltype(cl)::value;
    constexpr bool SILU = decltype(act)::value;
    gn_bwd_partial_kernel<T, CL, SILU><<<grid, kThreads, 0, stream>>>(
        dy, x, mean, rstd, weight, bias, part_a, part_b, s.C, s.S, s.G,
        split);
    gn_bwd_group_kernel<T><<<warp_blocks(s.N * s.G), kThreads, 0, stream>>>(
        part_a, part_b, weight, coef, s.N * s.G, s.G, Cg, split,
        static_cast<float>(1.0 / static_cast<double>(Cg * s.S)));
    if (dweight != nullptr || dbias != nullptr) {
      gn_bwd_param_kernel<<<warp_blocks(s.C), kThreads, 0, stream>>>(
          part_a, part_b, dweight, dbias, s.N, s.C, split);
    }
    gn_bwd_dx_kernel<T, CL, SILU><<<grid, kThreads, 0, stream>>>(
        dy, x, mean, rstd, weight, bias, coef, dx, s.C, s.S, s.G, split);
  });
  return last_error();
}

}  // namespace

const char* group_norm_silu_fwd_cuda(DType dtype, const void* x,
                                     const void* weight, const void* bias,
                                     void* y, float* mean, float* rstd,
                                     const GroupNormShape& shape, float eps,
                                     bool silu, float* workspace,
                                     void* stream) {
  if (shape.N * shape.C * shape.S == 0) return nullptr;
  const auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return forward<float>(x, weight, bias, y, mean, rstd, shape, eps, silu,
                            workspace, st);
    case DType::kFloat16:
      return forward<__half>(x, weight, bias, y, mean, rstd, shape, eps, silu,
                             workspace, st);
    case DType::kBFloat16:
      return forward<__nv_bfloat16>(x, weight, bias, y, mean, rstd, shape, eps,
                                    silu, workspace, st);
  }
  return "group_norm_silu_fwd_cuda: unknown dtype";
}

const char* group_norm_silu_bwd_cuda(DType dtype, const void* dy, const void* x,
                                     const float* mean, const float* rstd,
                                     const void* weight, const void* bias,
                                     void* dx, float* dweight, float* dbias,
                                     const GroupNormShape& shape, bool silu,
                                     float* workspace, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  if (shape.N * shape.C * shape.S == 0) {  // empty sums
    for (float* p : {dweight, dbias}) {
      if (p != nullptr && shape.C > 0) {
        cudaMemsetAsync(p, 0, sizeof(float) * shape.C, st);
      }
    }
    return last_error();
  }
  switch (dtype) {
    case DType::kFloat32:
      return backward<float>(dy, x, mean, rstd, weight, bias, dx, dweight,
                             dbias, shape, silu, workspace, st);
    case DType::kFloat16:
      return backward<__half>(dy, x, mean, rstd, weight, bias, dx, dweight,
                              dbias, shape, silu, workspace, st);
    case DType::kBFloat16:
      return backward<__nv_bfloat16>(dy, x, mean, rstd, weight, bias, dx,
                                     dweight, dbias, shape, silu, workspace,
                                     st);
  }
  return "group_norm_silu_bwd_cuda: unknown dtype";
}

}  // namespace sdxl_kernels
