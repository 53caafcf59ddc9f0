// GroupNorm (+ optional SiLU) on the CPU: forward and backward.
//
// Math and symbols: see csrc/ops.h. Statistics are fp32 within an L1-sized
// tile (two passes over the hot tile, with the Chan-Golub-LeVeque correction
// term) and merged across tiles with Chan's pairwise formula in double, so
// large offsets (mean >> std) do not cancel the way E[x^2]-E[x]^2 would.
//
// Two layouts (ops.h, GroupNormShape):
//   NCHW:          group (n, g) is one contiguous block of Cg*S elements; one
//                  task per group computes its statistics and then normalizes
//                  it while the block is still in L2.
//   channels-last: a group is strided, so work is split into (n, chunk of
//                  rows) tasks with per-channel accumulators vectorized along
//                  C; a short serial step merges the per-chunk partials.
//
// Hot loops are plain float loops that GCC auto-vectorizes (-O3, -march):
// reductions use kLanes independent accumulators (no -ffast-math needed),
// sigmoid is built on exp_neg_abs below instead of a per-element libm call,
// and loops whose pointers could alias take them as __restrict parameters.
#include "../ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace sdxl_kernels {
namespace {

constexpr int64_t kLanes = 32;          // independent accumulators (2 zmm)
constexpr int64_t kTile = 2048;         // floats per L1-resident tile (8 KiB)
constexpr int64_t kChunkElems = 16384;  // channels-last rows*C per task
constexpr int64_t kGrainElems = 32768;  // smaller work runs on one thread
constexpr int64_t kCacheElems = 65536;  // backward keeps dz of groups this big

// ---------------------------------------------------------------- exp/silu

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// a = exp(-|z|) in (0, 1], from float and integer ops only, so loops around
// it vectorize (no libm call, no branches, no float compares).
//   x = -min(|z|, 131): the clamp is an integer min on the bit pattern, which
//       GCC vectorizes as one instruction and which also maps inf and NaN to
//       131 (z itself carries the NaN into the result).
//   exp(x) = 2^k * exp(r), k = round(x*log2(e)) via the 1.5*2^23 trick,
//       r = x - k*ln2 with ln2 split in two (Cody-Waite; k*kLn2Hi is exact),
//       |r| <= ln2/2, exp(r) by a degree-6 minimax polynomial (relative error
//       2e-9 before rounding; measured <= 1 ulp over [-87, 0]).
//   2^k = 2^(k+64) * 2^-64: the exponent field of 2^(k+64) stays valid for
//       k >= -189, and the 2^-64 (folded into the coefficients) lets results
//       below 2^-126 underflow gracefully to denormals and 0.
inline float exp_neg_abs(float z) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: t's low bits hold k
  constexpr uint32_t kAbsMask = 0x7fffffffu;
  constexpr uint32_t kClamp = 0x43030000u;  // bits of 131.0f
  constexpr float kS = 5.421010862427522e-20f;  // 2^-64
  const float x = -from_bits(std::min(to_bits(z) & kAbsMask, kClamp));
  const float t = x * kLog2e + kRound;
  const float k = t - kRound;
  float r = x - k * kLn2Hi;
  r = r - k * kLn2Lo;
  float p = kS * 1.3843652559444308e-3f;
  p = p * r + kS * 8.37415549904108e-3f;
  p = p * r + kS * 4.166800156235695e-2f;
  p = p * r + kS * 1.6666431725025177e-1f;
  p = p * r + kS * 4.999999403953552e-1f;
  p = p * r + kS;
  p = p * r + kS;
  const uint32_t pow2_k64 = (to_bits(t) - to_bits(kRound) + 191u) << 23;
  return p * from_bits(pow2_k64);
}

// sigmoid(z) = 1/(1 + a) for z >= 0 and a/(1 + a) for z < 0, a = exp(-|z|):
// no overflow anywhere. silu(z) = z * sigmoid(z): -> z as z -> +inf, -> -0
// (or a denormal) for z << 0, NaN for NaN and for z = -inf (as PyTorch).
inline float silu(float z) {
  const float a = exp_neg_abs(z);
  return (z >= 0.0f ? z : z * a) / (1.0f + a);
}

// dy * d silu/dz = dy * s * (1 + z*(1 - s)), s = sigmoid(z).
inline float silu_grad(float dy, float z) {
  const float a = exp_neg_abs(z);
  const float s = (z >= 0.0f ? 1.0f : a) / (1.0f + a);
  return dy * s * (1.0f + z * (1.0f - s));
}

// ---------------------------------------------------------- dtype plumbing

template <typename T>
constexpr bool kIsFloat = std::is_same_v<T, float>;

// A float view of n contiguous elements: p itself for float, else a
// converted copy in buf (n <= buffer size).
template <typename T>
inline const float* load_tile(const T* p, int64_t n, float* buf) {
  if constexpr (kIsFloat<T>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return buf;
  }
}

// Where to compute float results bound for p: p itself for float, else buf
// (followed by store_tile).
template <typename T>
inline float* out_tile(T* p, float* buf) {
  if constexpr (kIsFloat<T>) {
    return p;
  } else {
    return buf;
  }
}

template <typename T>
inline void store_tile(const float* buf, int64_t n, T* p) {
  if constexpr (!kIsFloat<T>) {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
}

// weight/bias as float vectors (w = 1, b = 0 when absent).
template <typename T>
std::vector<float> channel_vector(const T* p, int64_t C, float fill) {
  std::vector<float> v(C, fill);
  if (p != nullptr) {
    for (int64_t c = 0; c < C; ++c) v[c] = static_cast<float>(p[c]);
  }
  return v;
}

// --------------------------------------------------------------- reductions

// Sum with kLanes accumulators: vectorizes without reassociation flags and
// adds in a fixed order, so results do not depend on thread count.
inline float lane_sum(const float* __restrict x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[i + l];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += x[i];
  for (int64_t l = 0; l < kLanes; ++l) tail += acc[l];
  return tail;
}

inline float lane_dot(const float* __restrict x, const float* __restrict y,
                      int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[i + l] * y[i + l];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += x[i] * y[i];
  for (int64_t l = 0; l < kLanes; ++l) tail += acc[l];
  return tail;
}

// (count, mean, m2 = sum (x - mean)^2), merged by Chan et al.'s formula.
struct Moments {
  double n = 0.0;
  double mean = 0.0;
  double m2 = 0.0;

  void merge(double nb, double mean_b, double m2_b) {
    if (nb <= 0.0) return;
    const double total = n + nb;
    const double delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    n = total;
  }
  double rstd(double eps) const {
    return 1.0 / std::sqrt(std::max(m2 / n, 0.0) + eps);
  }
};

// Corrected two-pass moments of one L1-resident run: the second pass
// re-reads hot data, and sum(d) corrects the rounding of the first mean.
inline void merge_run(const float* __restrict x, int64_t n, Moments& mom) {
  const float mean = lane_sum(x, n) / static_cast<float>(n);
  float acc1[kLanes] = {};
  float acc2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float d = x[i + l] - mean;
      acc1[l] += d;
      acc2[l] += d * d;
    }
  }
  float s1 = 0.0f;
  float s2 = 0.0f;
  for (; i < n; ++i) {
    const float d = x[i] - mean;
    s1 += d;
    s2 += d * d;
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    s1 += acc1[l];
    s2 += acc2[l];
  }
  const double dn = static_cast<double>(n);
  mom.merge(dn, mean + s1 / dn, std::max(0.0, s2 - double(s1) * s1 / dn));
}

// ------------------------------------------------------------ elementwise

// y = f((x - mean) * scale + shift), f = silu or identity.
template <bool SILU>
inline void normalize_run(const float* __restrict x, float* __restrict y,
                          int64_t n, float mean, float scale, float shift) {
  for (int64_t i = 0; i < n; ++i) {
    const float z = (x[i] - mean) * scale + shift;
    y[i] = SILU ? silu(z) : z;
  }
}

// Same along a channels-last row, with per-channel mean/scale/shift.
template <bool SILU>
inline void normalize_row(const float* __restrict x, float* __restrict y,
                          int64_t C, const float* __restrict mean,
                          const float* __restrict scale,
                          const float* __restrict shift) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = (x[c] - mean[c]) * scale[c] + shift[c];
    y[c] = SILU ? silu(z) : z;
  }
}

// Channels-last row kernels. Pointers arrive as __restrict parameters:
// GCC honours restrict there (not on locals), so these loops vectorize
// without runtime alias checks.
inline void add_row(float* __restrict sum, const float* __restrict x,
                    int64_t C) {
  for (int64_t c = 0; c < C; ++c) sum[c] += x[c];
}

inline void add_row_moments(float* __restrict d1, float* __restrict d2,
                            const float* __restrict x,
                            const float* __restrict mean, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float d = x[c] - mean[c];
    d1[c] += d;
    d2[c] += d * d;
  }
}

// a[c] += dz*xhat, b_sum[c] += dz along one row.
template <bool SILU>
inline void add_row_grad_sums(float* __restrict a, float* __restrict b_sum,
                              const float* __restrict x,
                              const float* __restrict dy,
                              const float* __restrict mean,
                              const float* __restrict rstd,
                              const float* __restrict w,
                              const float* __restrict b, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float xh = (x[c] - mean[c]) * rstd[c];
    const float dz = SILU ? silu_grad(dy[c], xh * w[c] + b[c]) : dy[c];
    a[c] += dz * xh;
    b_sum[c] += dz;
  }
}

// dx = rstd * (dz*w - c2 - xhat*c1) along one row.
template <bool SILU>
inline void dx_row(float* __restrict dx, const float* __restrict x,
                   const float* __restrict dy, const float* __restrict mean,
                   const float* __restrict rstd, const float* __restrict w,
                   const float* __restrict b, const float* __restrict c1,
                   const float* __restrict c2, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float xh = (x[c] - mean[c]) * rstd[c];
    const float dz = SILU ? silu_grad(dy[c], xh * w[c] + b[c]) : dy[c];
    dx[c] = rstd[c] * (dz * w[c] - c2[c] - xh * c1[c]);
  }
}

// xhat and dz of one run of a single channel.
template <bool SILU>
inline void grad_run(const float* __restrict x, const float* __restrict dy,
                     float* __restrict xhat, float* __restrict dz, int64_t n,
                     float mean, float rstd, float w, float b) {
  for (int64_t i = 0; i < n; ++i) {
    const float xh = (x[i] - mean) * rstd;
    xhat[i] = xh;
    dz[i] = SILU ? silu_grad(dy[i], xh * w + b) : dy[i];
  }
}

// dx = rstd * (dz*w - c2 - xhat*c1), dz recomputed from x and dy.
template <bool SILU>
inline void dx_run(const float* __restrict x, const float* __restrict dy,
                   float* __restrict dx, int64_t n, float mean, float rstd,
                   float w, float b, float c1, float c2) {
  for (int64_t i = 0; i < n; ++i) {
    const float xh = (x[i] - mean) * rstd;
    const float dz = SILU ? silu_grad(dy[i], xh * w + b) : dy[i];
    dx[i] = rstd * (dz * w - c2 - xh * c1);
  }
}

// dx = rstd * (dz*w - c2 - xhat*c1) from a cached dz.
inline void dx_from_dz_run(const float* __restrict x,
                           const float* __restrict dz, float* __restrict dx,
                           int64_t n, float mean, float rstd, float w, float c1,
                           float c2) {
  for (int64_t i = 0; i < n; ++i) {
    const float xh = (x[i] - mean) * rstd;
    dx[i] = rstd * (dz[i] * w - c2 - xh * c1);
  }
}

// ------------------------------------------------------------ NCHW forward

template <typename T, bool SILU>
void forward_nchw(const T* x, const float* w, const float* b, T* y,
                  float* mean, float* rstd, const GroupNormShape& s,
                  float eps) {
  const int64_t Cg = s.channels_per_group();
  const int64_t group_elems = Cg * s.S;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / group_elems);
  at::parallel_for(0, s.N * s.G, grain, [&](int64_t begin, int64_t end) {
    float xbuf[kTile];
    float ybuf[kTile];
    for (int64_t ng = begin; ng < end; ++ng) {
      const T* xg = x + ng * group_elems;  // group (n, g) is contiguous
      T* yg = y + ng * group_elems;
      Moments mom;
      for (int64_t i = 0; i < group_elems; i += kTile) {
        const int64_t n = std::min(kTile, group_elems - i);
        merge_run(load_tile(xg + i, n, xbuf), n, mom);
      }
      const float m = static_cast<float>(mom.mean);
      const float r = static_cast<float>(mom.rstd(eps));
      mean[ng] = m;
      rstd[ng] = r;
      const int64_t c0 = (ng % s.G) * Cg;
      for (int64_t j = 0; j < Cg; ++j) {
        const float scale = r * w[c0 + j];
        for (int64_t i = 0; i < s.S; i += kTile) {
          const int64_t n = std::min(kTile, s.S - i);
          const int64_t off = j * s.S + i;
          float* out = out_tile(yg + off, ybuf);
          normalize_run<SILU>(load_tile(xg + off, n, xbuf), out, n, m, scale,
                              b[c0 + j]);
          store_tile(out, n, yg + off);
        }
      }
    }
  });
}

// --------------------------------------------------- channels-last forward

// Rows of C elements handled by one channels-last task.
inline int64_t rows_per_chunk(int64_t C) {
  return std::max<int64_t>(1, kChunkElems / C);
}

template <typename T, bool SILU>
void forward_channels_last(const T* x, const float* w, const float* b, T* y,
                           float* mean, float* rstd, const GroupNormShape& s,
                           float eps) {
  const int64_t C = s.C, S = s.S, G = s.G, Cg = s.channels_per_group();
  const int64_t rows = rows_per_chunk(C);
  const int64_t chunks = ceil_div(S, rows);
  const int64_t tasks = s.N * chunks;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (rows * C));

  // Pass 1: per (n, chunk, g) moments, from per-channel two-pass moments.
  std::vector<Moments> partial(tasks * G);  // [N, chunks, G]
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(C), mu(C), d1(C), d2(C), row(kIsFloat<T> ? 0 : C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks;
      const int64_t s0 = (task % chunks) * rows;
      const int64_t R = std::min(rows, S - s0);
      const T* xt = x + (n * S + s0) * C;
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t r = 0; r < R; ++r) {
        add_row(sum.data(), load_tile(xt + r * C, C, row.data()), C);
      }
      for (int64_t c = 0; c < C; ++c) mu[c] = sum[c] / static_cast<float>(R);
      std::fill(d1.begin(), d1.end(), 0.0f);
      std::fill(d2.begin(), d2.end(), 0.0f);
      for (int64_t r = 0; r < R; ++r) {
        add_row_moments(d1.data(), d2.data(),
                        load_tile(xt + r * C, C, row.data()), mu.data(), C);
      }
      // Channels -> group without per-channel divisions (equal counts R):
      //   mean_g = avg_c mean_c,  m2_g = sum_c m2_c + R * (mean_c - mean_g)^2
      // with mean_c = mu + d1/R and m2_c = d2 - d1^2/R (corrected two-pass).
      const double inv_R = 1.0 / static_cast<double>(R);
      for (int64_t g = 0; g < G; ++g) {
        double mean_g = 0.0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          mean_g += mu[c] + d1[c] * inv_R;
        }
        mean_g /= static_cast<double>(Cg);
        double m2_g = 0.0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          const double delta = mu[c] + d1[c] * inv_R - mean_g;
          m2_g += std::max(0.0, d2[c] - double(d1[c]) * d1[c] * inv_R) +
                  R * delta * delta;
        }
        partial[task * G + g] = Moments{double(R * Cg), mean_g, m2_g};
      }
    }
  });

  // Merge chunks; expand (mean, rstd * w) to per-(n, c) vectors.
  std::vector<float> mean_c(s.N * C), scale_c(s.N * C);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      Moments mom;
      for (int64_t k = 0; k < chunks; ++k) {
        const Moments& p = partial[(n * chunks + k) * G + g];
        mom.merge(p.n, p.mean, p.m2);
      }
      const float m = static_cast<float>(mom.mean);
      const float r = static_cast<float>(mom.rstd(eps));
      mean[n * G + g] = m;
      rstd[n * G + g] = r;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        mean_c[n * C + c] = m;
        scale_c[n * C + c] = r * w[c];
      }
    }
  }

  // Pass 2: normalize row by row.
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xrow(kIsFloat<T> ? 0 : C), yrow(kIsFloat<T> ? 0 : C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks;
      const int64_t s0 = (task % chunks) * rows;
      const int64_t R = std::min(rows, S - s0);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t off = (n * S + s0 + r) * C;
        float* out = out_tile(y + off, yrow.data());
        normalize_row<SILU>(load_tile(x + off, C, xrow.data()), out, C,
                            &mean_c[n * C], &scale_c[n * C], b);
        store_tile(out, C, y + off);
      }
    }
  });
}

// ----------------------------------------------------------- NCHW backward

// Per-(n, c) sums A = sum_s dz*xhat and B = sum_s dz, reduced into
// dweight/dbias after the parallel region (fixed order: deterministic).
inline void write_param_grads(const std::vector<double>& A,
                              const std::vector<double>& B, int64_t N,
                              int64_t C, float* dweight, float* dbias) {
  for (int64_t c = 0; c < C; ++c) {
    double a = 0.0, bsum = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      a += A[n * C + c];
      bsum += B[n * C + c];
    }
    if (dweight != nullptr) dweight[c] = static_cast<float>(a);
    if (dbias != nullptr) dbias[c] = static_cast<float>(bsum);
  }
}

template <typename T, bool SILU>
void backward_nchw(const T* dy, const T* x, const float* mean,
                   const float* rstd, const float* w, const float* b, T* dx,
                   float* dweight, float* dbias, const GroupNormShape& s) {
  const int64_t Cg = s.channels_per_group();
  const int64_t group_elems = Cg * s.S;
  const double inv_count = 1.0 / static_cast<double>(group_elems);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / group_elems);
  // With SiLU, dz costs an exp: keep the group's dz (L2-sized) for the dx
  // pass instead of recomputing it.
  const bool cache_dz = SILU && group_elems <= kCacheElems;
  std::vector<double> A(s.N * s.C), B(s.N * s.C);
  at::parallel_for(0, s.N * s.G, grain, [&](int64_t begin, int64_t end) {
    float xbuf[kTile], dybuf[kTile], xhat[kTile], dz_tile[kTile];
    std::vector<float> dz_group(cache_dz ? group_elems : 0);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t c0 = (ng % s.G) * Cg;
      const int64_t nc0 = (ng / s.G) * s.C + c0;
      const T* xg = x + ng * group_elems;
      const T* dyg = dy + ng * group_elems;
      T* dxg = dx + ng * group_elems;
      const float m = mean[ng];
      const float r = rstd[ng];
      double sum_wa = 0.0, sum_wb = 0.0;
      for (int64_t j = 0; j < Cg; ++j) {
        double a = 0.0, bsum = 0.0;
        for (int64_t i = 0; i < s.S; i += kTile) {
          const int64_t n = std::min(kTile, s.S - i);
          const int64_t off = j * s.S + i;
          float* dz = cache_dz ? dz_group.data() + off : dz_tile;
          grad_run<SILU>(load_tile(xg + off, n, xbuf),
                         load_tile(dyg + off, n, dybuf), xhat, dz, n, m, r,
                         w[c0 + j], b[c0 + j]);
          a += lane_dot(dz, xhat, n);
          bsum += lane_sum(dz, n);
        }
        A[nc0 + j] = a;
        B[nc0 + j] = bsum;
        sum_wa += w[c0 + j] * a;
        sum_wb += w[c0 + j] * bsum;
      }
      const float c1 = static_cast<float>(sum_wa * inv_count);
      const float c2 = static_cast<float>(sum_wb * inv_count);
      for (int64_t j = 0; j < Cg; ++j) {
        for (int64_t i = 0; i < s.S; i += kTile) {
          const int64_t n = std::min(kTile, s.S - i);
          const int64_t off = j * s.S + i;
          float* out = out_tile(dxg + off, xhat);
          if (cache_dz) {
            dx_from_dz_run(load_tile(xg + off, n, xbuf), dz_group.data() + off,
                           out, n, m, r, w[c0 + j], c1, c2);
          } else {
            dx_run<SILU>(load_tile(xg + off, n, xbuf),
                         load_tile(dyg + off, n, dybuf), out, n, m, r,
                         w[c0 + j], b[c0 + j], c1, c2);
          }
          store_tile(out, n, dxg + off);
        }
      }
    }
  });
  write_param_grads(A, B, s.N, s.C, dweight, dbias);
}

// -------------------------------------------------- channels-last backward

template <typename T, bool SILU>
void backward_channels_last(const T* dy, const T* x, const float* mean,
                            const float* rstd, const float* w, const float* b,
                            T* dx, float* dweight, float* dbias,
                            const GroupNormShape& s) {
  const int64_t C = s.C, S = s.S, G = s.G, Cg = s.channels_per_group();
  const int64_t rows = rows_per_chunk(C);
  const int64_t chunks = ceil_div(S, rows);
  const int64_t tasks = s.N * chunks;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (rows * C));

  // Group statistics expanded per (n, c).
  std::vector<float> mean_c(s.N * C), rstd_c(s.N * C);
  for (int64_t nc = 0; nc < s.N * C; ++nc) {
    const int64_t ng = (nc / C) * G + (nc % C) / Cg;
    mean_c[nc] = mean[ng];
    rstd_c[nc] = rstd[ng];
  }

  // Pass 1: per (n, chunk, c) sums of dz*xhat and dz.
  std::vector<float> part_a(tasks * C), part_b(tasks * C);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const bool convert = !kIsFloat<T>;
    std::vector<float> xrow(convert ? C : 0), dyrow(convert ? C : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks;
      const int64_t s0 = (task % chunks) * rows;
      const int64_t R = std::min(rows, S - s0);
      float* a = &part_a[task * C];
      float* b_sum = &part_b[task * C];
      std::fill(a, a + C, 0.0f);
      std::fill(b_sum, b_sum + C, 0.0f);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t off = (n * S + s0 + r) * C;
        add_row_grad_sums<SILU>(a, b_sum, load_tile(x + off, C, xrow.data()),
                                load_tile(dy + off, C, dyrow.data()),
                                &mean_c[n * C], &rstd_c[n * C], w, b, C);
      }
    }
  });

  // Merge chunks (fixed order), then c1/c2 per group expanded per (n, c).
  std::vector<double> A(s.N * C, 0.0), B(s.N * C, 0.0);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t k = 0; k < chunks; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        A[n * C + c] += part_a[(n * chunks + k) * C + c];
        B[n * C + c] += part_b[(n * chunks + k) * C + c];
      }
    }
  }
  write_param_grads(A, B, s.N, C, dweight, dbias);
  const double inv_count = 1.0 / static_cast<double>(Cg * S);
  std::vector<float> c1_c(s.N * C), c2_c(s.N * C);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      double sum_wa = 0.0, sum_wb = 0.0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        sum_wa += w[c] * A[n * C + c];
        sum_wb += w[c] * B[n * C + c];
      }
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        c1_c[n * C + c] = static_cast<float>(sum_wa * inv_count);
        c2_c[n * C + c] = static_cast<float>(sum_wb * inv_count);
      }
    }
  }

  // Pass 2: dx row by row.
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const bool convert = !kIsFloat<T>;
    std::vector<float> xrow(convert ? C : 0), dyrow(convert ? C : 0),
        dxrow(convert ? C : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks;
      const int64_t s0 = (task % chunks) * rows;
      const int64_t R = std::min(rows, S - s0);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t off = (n * S + s0 + r) * C;
        float* out = out_tile(dx + off, dxrow.data());
        dx_row<SILU>(out, load_tile(x + off, C, xrow.data()),
                     load_tile(dy + off, C, dyrow.data()), &mean_c[n * C],
                     &rstd_c[n * C], w, b, &c1_c[n * C], &c2_c[n * C], C);
        store_tile(out, C, dx + off);
      }
    }
  });
}

// ----------------------------------------------------------------- dispatch

// channels-last only matters when both C > 1 and S > 1; otherwise the two
// layouts address memory identically and the NCHW path is the faster one.
inline bool use_channels_last(const GroupNormShape& s) {
  return s.channels_last && s.C > 1 && s.S > 1;
}

template <typename T>
void forward(const void* x, const void* weight, const void* bias, void* y,
             float* mean, float* rstd, const GroupNormShape& s, float eps,
             bool silu) {
  const auto w = channel_vector(static_cast<const T*>(weight), s.C, 1.0f);
  const auto b = channel_vector(static_cast<const T*>(bias), s.C, 0.0f);
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  if (use_channels_last(s)) {
    auto f = silu ? forward_channels_last<T, true>
                  : forward_channels_last<T, false>;
    f(xp, w.data(), b.data(), yp, mean, rstd, s, eps);
  } else {
    auto f = silu ? forward_nchw<T, true> : forward_nchw<T, false>;
    f(xp, w.data(), b.data(), yp, mean, rstd, s, eps);
  }
}

template <typename T>
void backward(const void* dy, const void* x, const float* mean,
              const float* rstd, const void* weight, const void* bias,
              void* dx, float* dweight, float* dbias, const GroupNormShape& s,
              bool silu) {
  const auto w = channel_vector(static_cast<const T*>(weight), s.C, 1.0f);
  const auto b = channel_vector(static_cast<const T*>(bias), s.C, 0.0f);
  const T* dyp = static_cast<const T*>(dy);
  const T* xp = static_cast<const T*>(x);
  T* dxp = static_cast<T*>(dx);
  if (use_channels_last(s)) {
    auto f = silu ? backward_channels_last<T, true>
                  : backward_channels_last<T, false>;
    f(dyp, xp, mean, rstd, w.data(), b.data(), dxp, dweight, dbias, s);
  } else {
    auto f = silu ? backward_nchw<T, true> : backward_nchw<T, false>;
    f(dyp, xp, mean, rstd, w.data(), b.data(), dxp, dweight, dbias, s);
  }
}

}  // namespace

void group_norm_silu_fwd_cpu(DType dtype, const void* x, const void* weight,
                             const void* bias, void* y, float* mean,
                             float* rstd, const GroupNormShape& shape,
                             float eps, bool silu) {
  if (shape.N * shape.C * shape.S == 0) return;
  switch (dtype) {
    case DType::kFloat32:
      return forward<float>(x, weight, bias, y, mean, rstd, shape, eps, silu);
    case DType::kFloat16:
      return forward<c10::Half>(x, weight, bias, y, mean, rstd, shape, eps,
                                silu);
    case DType::kBFloat16:
      return forward<c10::BFloat16>(x, weight, bias, y, mean, rstd, shape, eps,
                                    silu);
  }
}

void group_norm_silu_bwd_cpu(DType dtype, const void* dy, const void* x,
                             const float* mean, const float* rstd,
                             const void* weight, const void* bias, void* dx,
                             float* dweight, float* dbias,
                             const GroupNormShape& shape, bool silu) {
  if (shape.N * shape.C * shape.S == 0) {  // empty sums
    if (dweight != nullptr) std::fill(dweight, dweight + shape.C, 0.0f);
    if (dbias != nullptr) std::fill(dbias, dbias + shape.C, 0.0f);
    return;
  }
  switch (dtype) {
    case DType::kFloat32:
      return backward<float>(dy, x, mean, rstd, weight, bias, dx, dweight,
                             dbias, shape, silu);
    case DType::kFloat16:
      return backward<c10::Half>(dy, x, mean, rstd, weight, bias, dx, dweight,
                                 dbias, shape, silu);
    case DType::kBFloat16:
      return backward<c10::BFloat16>(dy, x, mean, rstd, weight, bias, dx,
                                     dweight, dbias, shape, silu);
  }
}

}  // namespace sdxl_kernels
