// Sinusoidal (Fourier) embedding on the CPU; math in csrc/ops.h.
//
// The op is tiny (SDXL: a few rows of 256 features), so the aim is low
// overhead: one pass, no temporaries, threads only for large batches.
// a = v * freqs[j] is the plain float product PyTorch computes, and
// std::cos/std::sin in float keep results within an ulp of torch.cos/sin.
#include "../ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

namespace sdxl_kernels {
namespace {

constexpr int64_t kGrainElems = 16384;

template <typename T>
void fourier(const float* values, const float* freqs, T* out, int64_t B,
             int64_t N, int64_t dim, int64_t out_stride_b, bool flip) {
  const int64_t half = dim / 2;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / dim);
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N;
      const int64_t i = row % N;
      const float v = values[row];
      T* first = out + b * out_stride_b + i * dim;  // sin (cos if flip)
      T* second = first + half;                      // cos (sin if flip)
      for (int64_t j = 0; j < half; ++j) {
        const float a = v * freqs[j];
        const float sin_a = std::sin(a);
        const float cos_a = std::cos(a);
        first[j] = static_cast<T>(flip ? cos_a : sin_a);
        second[j] = static_cast<T>(flip ? sin_a : cos_a);
      }
      if (dim % 2 == 1) first[dim - 1] = static_cast<T>(0.0f);
    }
  });
}

}  // namespace

void fourier_embedding_cpu(DType out_dtype, const float* values,
                           const float* freqs, void* out, int64_t B, int64_t N,
                           int64_t dim, int64_t out_stride_b,
                           bool flip_sin_to_cos) {
  if (B * N * dim == 0) return;
  switch (out_dtype) {
    case DType::kFloat32:
      return fourier(values, freqs, static_cast<float*>(out), B, N, dim,
                     out_stride_b, flip_sin_to_cos);
    case DType::kFloat16:
      return fourier(values, freqs, static_cast<c10::Half*>(out), B, N, dim,
                     out_stride_b, flip_sin_to_cos);
    case DType::kBFloat16:
      return fourier(values, freqs, static_cast<c10::BFloat16*>(out), B, N,
                     dim, out_stride_b, flip_sin_to_cos);
  }
}

}  // namespace sdxl_kernels
