// Declarations shared by bindings.cpp and the CPU/CUDA kernels.
//
// Kernels take raw pointers and sizes only: no torch headers here, so the
// .cu files compile with plain nvcc and the .cpp kernels stay cheap to build.
// All checks (dtype, device, shape, strides) happen in bindings.cpp.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sdxl_kernels {

// Storage type of the low-precision tensors (x, y, dy, dx, weight, bias, out).
// Statistics, workspaces, mean/rstd and dweight/dbias are always float32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// x viewed as [N, C, S] with S = prod(spatial), dense in one of two layouts:
//   NCHW          (channels_last == false): offset = n*C*S + c*S + s
//   channels-last (channels_last == true):  offset = n*C*S + s*C + c
// y, dy and dx share x's layout (bindings.cpp guarantees it).
struct GroupNormShape {
  int64_t N;
  int64_t C;
  int64_t S;
  int64_t G;  // num_groups; C % G == 0
  bool channels_last;
  int64_t channels_per_group() const { return C / G; }
};

// ---------------------------------------------------------------------------
// group_norm_silu
//
// Forward, per (n, g) over its Cg*S elements (Cg = C/G):
//   mean = sum(x) / (Cg*S)          var = sum((x - mean)^2) / (Cg*S)
//   rstd = 1 / sqrt(var + eps)      xhat = (x - mean) * rstd
//   z = xhat * w[c] + b[c]          y = silu(z) = z * sigmoid(z)   (or y = z)
// Backward (same symbols, M = Cg*S, sums over the group unless noted):
//   dz    = dy * s * (1 + z*(1 - s)), s = sigmoid(z)              (or dz = dy)
//   dxhat = dz * w[c]
//   c1 = sum(dxhat * xhat) / M       c2 = sum(dxhat) / M
//   dx = rstd * (dxhat - c2 - xhat * c1)
//   dweight[c] = sum_{n,s} dz * xhat  dbias[c] = sum_{n,s} dz
// weight/bias/dweight/dbias may be null (w = 1, b = 0, output skipped).
// ---------------------------------------------------------------------------

void group_norm_silu_fwd_cpu(DType dtype, const void* x, const void* weight,
                             const void* bias, void* y, float* mean,
                             float* rstd, const GroupNormShape& shape,
                             float eps, bool silu);

void group_norm_silu_bwd_cpu(DType dtype, const void* dy, const void* x,
                             const float* mean, const float* rstd,
                             const void* weight, const void* bias, void* dx,
                             float* dweight, float* dbias,
                             const GroupNormShape& shape, bool silu);

// ---------------------------------------------------------------------------
// fourier_embedding
//   a = values[b, i] * freqs[j]                      (float32 product)
//   out[b, i*dim + j]        = flip ? cos(a) : sin(a)      j < half = dim/2
//   out[b, i*dim + half + j] = flip ? sin(a) : cos(a)
//   out[b, i*dim + dim - 1]  = 0                           if dim is odd
// values: [B, N] contiguous; freqs: [half]; out row b starts at
// out + b*out_stride_b (elements) and is contiguous.
// ---------------------------------------------------------------------------

void fourier_embedding_cpu(DType out_dtype, const float* values,
                           const float* freqs, void* out, int64_t B, int64_t N,
                           int64_t dim, int64_t out_stride_b,
                           bool flip_sin_to_cos);

// ---------------------------------------------------------------------------
// CUDA (compiled only WITH_CUDA). Each call launches on `stream` (a
// cudaStream_t) on the current device and returns nullptr on success or a
// static error string. `workspace` is float32 scratch of at least
// group_norm_silu_cuda_{fwd,bwd}_workspace(shape) elements, allocated by the
// caller on the same device (bindings.cpp uses the caching allocator).
// ---------------------------------------------------------------------------

// Launch geometry shared by the host-side workspace sizing and the kernels.
// Every (n, channel) row — or (n, 32-channel tile) when channels-last — is
// cut along S into `split` chunks so batch 1-2 still fills ~132 SMs.
constexpr int64_t kCudaThreads = 256;
constexpr int64_t kCudaChannelTile = 32;  // channels per block, channels-last
constexpr int64_t kCudaTargetBlocks = 4 * 132;
constexpr int64_t kCudaMinBlockElems = 2048;
constexpr int64_t kCudaMaxSplit = 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t group_norm_silu_cuda_rows(const GroupNormShape& s) {
  return s.channels_last ? s.N * ceil_div(s.C, kCudaChannelTile) : s.N * s.C;
}

inline int64_t group_norm_silu_cuda_split(const GroupNormShape& s) {
  const int64_t rows = std::max<int64_t>(1, group_norm_silu_cuda_rows(s));
  const int64_t row_elems =
      s.S * (s.channels_last ? std::min(s.C, kCudaChannelTile) : 1);
  int64_t split = ceil_div(kCudaTargetBlocks, rows);
  split = std::min(split, std::max<int64_t>(1, row_elems / kCudaMinBlockElems));
  split = std::min(split, std::max<int64_t>(1, s.S));
  return std::clamp<int64_t>(split, 1, kCudaMaxSplit);
}

// Forward: per (n, c, split) Welford partials (count, mean, m2).
inline int64_t group_norm_silu_cuda_fwd_workspace(const GroupNormShape& s) {
  return 3 * s.N * s.C * group_norm_silu_cuda_split(s);
}

// Backward: per (n, c, split) sums of dz*xhat and dz, then (c1, c2) per (n, g).
inline int64_t group_norm_silu_cuda_bwd_workspace(const GroupNormShape& s) {
  return 2 * s.N * s.C * group_norm_silu_cuda_split(s) + 2 * s.N * s.G;
}

const char* group_norm_silu_fwd_cuda(DType dtype, const void* x,
                                     const void* weight, const void* bias,
                                     void* y, float* mean, float* rstd,
                                     const GroupNormShape& shape, float eps,
                                     bool silu, float* workspace,
                                     void* stream);

const char* group_norm_silu_bwd_cuda(DType dtype, const void* dy, const void* x,
                                     const float* mean, const float* rstd,
                                     const void* weight, const void* bias,
                                     void* dx, float* dweight, float* dbias,
                                     const GroupNormShape& shape, bool silu,
                                     float* workspace, void* stream);

const char* fourier_embedding_cuda(DType out_dtype, const float* values,
                                   const float* freqs, void* out, int64_t B,
                                   int64_t N, int64_t dim,
                                   int64_t out_stride_b, bool flip_sin_to_cos,
                                   void* stream);

}  // namespace sdxl_kernels
