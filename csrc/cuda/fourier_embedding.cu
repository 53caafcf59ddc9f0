// Sinusoidal (Fourier) embedding on CUDA; math in csrc/ops.h.
// One thread per (row, j): a = v * freqs[j] (plain fp32 product, as in
// PyTorch), sincosf (full precision, not the __sinf intrinsic) writes both
// halves; with odd dim the extra slot j == half writes the zero pad.
#include "../ops.h"
#include "dtype.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace sdxl_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride beyond this

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fourier_embedding_kernel(const float* __restrict__ values,  // [B, N]
                             const float* __restrict__ freqs,   // [half]
                             T* __restrict__ out,  // [B, N*dim], row stride
                             int64_t rows,         // B*N
                             int64_t N, int64_t dim, int64_t out_stride_b,
                             bool flip_sin_to_cos) {
  const int64_t half = dim / 2;
  const int64_t per_row = half + (dim & 1);
  const int64_t total = rows * per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < total; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / per_row;
    const int64_t j = idx - row * per_row;
    T* o = out + (row / N) * out_stride_b + (row % N) * dim;
    if (j == half) {  // odd dim: zero pad
      o[dim - 1] = from_float<T>(0.0f);
      continue;
    }
    const float a = values[row] * freqs[j];
    float sin_a;
    float cos_a;
    sincosf(a, &sin_a, &cos_a);
    o[j] = from_float<T>(flip_sin_to_cos ? cos_a : sin_a);
    o[half + j] = from_float<T>(flip_sin_to_cos ? sin_a : cos_a);
  }
}

template <typename T>
const char* launch(const float* values, const float* freqs, void* out,
                   int64_t B, int64_t N, int64_t dim, int64_t out_stride_b,
                   bool flip, cudaStream_t stream) {
  const int64_t total = B * N * (dim / 2 + (dim & 1));
  const auto blocks =
      static_cast<unsigned>(std::min(ceil_div(total, kThreads), kMaxBlocks));
  fourier_embedding_kernel<T><<<blocks, kThreads, 0, stream>>>(
      values, freqs, static_cast<T*>(out), B * N, N, dim, out_stride_b, flip);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* fourier_embedding_cuda(DType out_dtype, const float* values,
                                   const float* freqs, void* out, int64_t B,
                                   int64_t N, int64_t dim,
                                   int64_t out_stride_b, bool flip_sin_to_cos,
                                   void* stream) {
  if (B * N * dim == 0) return nullptr;
  const auto st = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case DType::kFloat32:
      return launch<float>(values, freqs, out, B, N, dim, out_stride_b,
                           flip_sin_to_cos, st);
    case DType::kFloat16:
      return launch<__half>(values, freqs, out, B, N, dim, out_stride_b,
                            flip_sin_to_cos, st);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(values, freqs, out, B, N, dim,
                                   out_stride_b, flip_sin_to_cos, st);
  }
  return "fourier_embedding_cuda: unknown dtype";
}

}  // namespace sdxl_kernels
