// Sinusoidal (Fourier) embedding on the CPU; math in csrc/ops.h.
//
// The op is tiny (SDXL: a few rows of 256 features), so the aim is low
// overhead: one pass, no temporaries, threads only for large batches.
// a = v * freqs[j] is the plain float product PyTorch computes, and
// sin/cos are evaluated in double and rounded once, within an ulp of torch.cos/sin.
#include "../ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace sdxl_kernels {
namespace {

constexpr int64_t kGrainElems = 16384;
constexpr int64_t kChunk = 256;  // frequencies per vectorised step

// sin(a), cos(a) for float a, in double so the result rounds to within ~0.5 ulp of the true value.
// Cody-Waite: k = rint(a·2/π), r = a - k·π/2 with π/2 split in two doubles (exact for |k| < 2^20),
// |r| ≤ π/4; then Taylor polynomials (truncation < 1e-11) and the quadrant q = k mod 4 picks
// (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s). Straight-line code so GCC vectorises the loop;
// |a| beyond kMaxReduced and non-finite a go through std::sin/std::cos afterwards.
constexpr double kMaxReduced = 1.0e6;

inline void sincos_reduced(float a, double& sin_out, double& cos_out) {
  const double kRound = 6755399441055744.0;  // 1.5·2^52: x + kRound holds rint(x) in its low bits
  const double x = a;
  const double shifted = x * 0.63661977236758134308 + kRound;
  const double k = shifted - kRound;
  int64_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  const int64_t q = bits & 3;  // k mod 4 (1.5·2^52 is a multiple of 4)
  const double r = (x - k * 1.57079632673412561417) - k * 6.07710050650619224932e-11;
  const double r2 = r * r;
  const double s = r + r * r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 +
                   r2 * (-1.0 / 39916800)))));
  const double c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 +
                   r2 * (-1.0 / 3628800 + r2 * (1.0 / 479001600))))));
  const double swap_s = (q & 1) ? c : s;
  const double swap_c = (q & 1) ? s : c;
  sin_out = (q & 2) ? -swap_s : swap_s;
  cos_out = ((q + 1) & 2) ? -swap_c : swap_c;
}

// One chunk of arguments → sin, cos in local buffers: plain float arrays, so the loop vectorises.
void sincos_chunk(const float* __restrict a, float* __restrict sin_out, float* __restrict cos_out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double s, c;
    sincos_reduced(a[j], s, c);
    sin_out[j] = static_cast<float>(s);
    cos_out[j] = static_cast<float>(c);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (!(std::fabs(a[j]) <= kMaxReduced)) {  // also NaN and inf
      sin_out[j] = std::sin(a[j]);
      cos_out[j] = std::cos(a[j]);
    }
  }
}

template <typename T>
void fourier_row(float v, const float* freqs, T* sin_dst, T* cos_dst, int64_t half) {
  alignas(64) float a[kChunk], sin_buf[kChunk], cos_buf[kChunk];
  for (int64_t j0 = 0; j0 < half; j0 += kChunk) {
    const int64_t n = std::min(kChunk, half - j0);
    for (int64_t j = 0; j < n; ++j) a[j] = v * freqs[j0 + j];  // the float product PyTorch computes
    sincos_chunk(a, sin_buf, cos_buf, n);
    for (int64_t j = 0; j < n; ++j) {
      sin_dst[j0 + j] = static_cast<T>(sin_buf[j]);
      cos_dst[j0 + j] = static_cast<T>(cos_buf[j]);
    }
  }
}

template <typename T>
void fourier(const float* values, const float* freqs, T* out, int64_t B,
             int64_t N, int64_t dim, int64_t out_stride_b, bool flip) {
  const int64_t half = dim / 2;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / dim);
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N;
      const int64_t i = row % N;
      T* first = out + b * out_stride_b + i * dim;  // cos if flip, else sin
      T* second = first + half;
      fourier_row(values[row], freqs, flip ? second : first, flip ? first : second, half);
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
