// pybind11 module sdxl_kernels._C: argument checks and CPU/CUDA dispatch.
//
// The Python caller allocates every output and passes it in; this file checks
// dtypes, devices, shapes and strides (raising, never crashing), then hands
// raw pointers to the kernels declared in ops.h. `stream` is the cudaStream_t
// as an integer (torch.cuda.current_stream().cuda_stream) and is ignored for
// CPU tensors. It must be the current stream of x's device: CUDA workspaces
// come from PyTorch's caching allocator, which ties them to that stream.
#include "ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace py = pybind11;

namespace sdxl_kernels {
namespace {

using OptTensor = std::optional<at::Tensor>;

constexpr bool kHasCuda =
#ifdef WITH_CUDA
    true;
#else
    false;
#endif

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name,
                       " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}


const at::Tensor* present(const OptTensor& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(),
              " but x is on ", x.device());
}

void check_float32(const at::Tensor& t, const at::Tensor& x,
                   at::IntArrayRef sizes, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name,
                   " must be float32, got ", t.scalar_type());
  check_device(t, x, name);
  TORCH_CHECK_VALUE(t.sizes() == sizes, name, " must have shape ", sizes,
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// Dispatch after checks: CPU kernels always, CUDA kernels when built.
void check_backend(const at::Tensor& x, const char* op) {
  if (x.is_cpu()) return;
  TORCH_CHECK(x.is_cuda(), op, ": unsupported device ", x.device());
  TORCH_CHECK(kHasCuda, op, ": x is on ", x.device(),
              " but sdxl_kernels._C was built without CUDA kernels");
}

#ifdef WITH_CUDA
void* stream_ptr(int64_t stream) {
  return reinterpret_cast<void*>(static_cast<intptr_t>(stream));
}

void check_cuda_error(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, op, ": CUDA error: ", err);
}
#endif

// ------------------------------------------------------------- group norm

// True when t's strides are dense in the given dim order (innermost first).
// Size-1 dims constrain nothing, as in at::Tensor::is_contiguous.
bool dense_in_order(const at::Tensor& t, const std::vector<int64_t>& order) {
  int64_t expected = 1;
  for (int64_t d : order) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

enum class Layout { kNCHW, kChannelsLast, kOther };

// NCHW (row-major) or channels-last: C innermost, then spatial row-major,
// then N. Dims 2..: the spatial dims, flattened to S.
Layout layout_of(const at::Tensor& t) {
  const int64_t D = t.dim();
  std::vector<int64_t> order;
  for (int64_t d = D - 1; d >= 0; --d) order.push_back(d);
  if (dense_in_order(t, order)) return Layout::kNCHW;
  order.assign({1});
  for (int64_t d = D - 1; d >= 2; --d) order.push_back(d);
  order.push_back(0);
  if (dense_in_order(t, order)) return Layout::kChannelsLast;
  return Layout::kOther;
}

GroupNormShape group_norm_shape(const at::Tensor& x, int64_t num_groups,
                                const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.dim() <= 5, op,
                    ": x must be [N, C, *spatial] with 0 to 3 spatial dims, "
                    "got shape ",
                    x.sizes());
  dtype_of(x, "x");
  const Layout layout = layout_of(x);
  TORCH_CHECK_VALUE(layout != Layout::kOther, op,
                    ": x must be contiguous or channels-last (stride(1) == 1 "
                    "and dense spatial strides), got strides ",
                    x.strides(), " for shape ", x.sizes());
  GroupNormShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s.S *= x.size(d);
  s.G = num_groups;
  s.channels_last = layout == Layout::kChannelsLast;
  TORCH_CHECK_VALUE(num_groups > 0 && s.C % num_groups == 0, op,
                    ": num_groups must be positive and divide C = ", s.C,
                    ", got ", num_groups);
  return s;
}

// A tensor that must match x in dtype, device, shape and layout.
void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name,
                   " must have x's dtype ", x.scalar_type(), ", got ",
                   t.scalar_type());
  check_device(t, x, name);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " must have x's shape ",
                    x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(layout_of(t) == layout_of(x), name,
                    " must have x's memory layout (strides ", x.strides(),
                    "), got strides ", t.strides());
}

void check_not_aliased(const at::Tensor& out, const at::Tensor& in,
                       const char* out_name, const char* in_name) {
  TORCH_CHECK_VALUE(out.numel() == 0 || out.data_ptr() != in.data_ptr(),
                    out_name,
                    " must not share memory with ", in_name);
}

// Optional [C] weight/bias in x's dtype; returns the data pointer or null.
const void* param_ptr(const OptTensor& p, const at::Tensor& x, int64_t C,
                      const char* name) {
  const at::Tensor* t = present(p);
  if (t == nullptr) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), name,
                   " must have x's dtype ", x.scalar_type(), ", got ",
                   t->scalar_type());
  check_device(*t, x, name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, name,
                    " must have shape [", C, "], got ", t->sizes());
  TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
  return t->data_ptr();
}

// Optional float32 [C] gradient output; returns the data pointer or null.
float* grad_param_ptr(const OptTensor& p, const at::Tensor& x, int64_t C,
                      const char* name) {
  const at::Tensor* t = present(p);
  if (t == nullptr) return nullptr;
  check_float32(*t, x, {C}, name);
  return t->data_ptr<float>();
}

void group_norm_silu_fwd(const at::Tensor& x, const OptTensor& weight,
                         const OptTensor& bias, const at::Tensor& y,
                         const at::Tensor& mean, const at::Tensor& rstd,
                         int64_t num_groups, double eps, bool silu,
                         int64_t stream) {
  constexpr const char* op = "group_norm_silu_fwd";
  const GroupNormShape s = group_norm_shape(x, num_groups, op);
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  check_like_x(y, x, "y");
  check_not_aliased(y, x, "y", "x");
  check_float32(mean, x, {s.N, s.G}, "mean");
  check_float32(rstd, x, {s.N, s.G}, "rstd");
  const void* w = param_ptr(weight, x, s.C, "weight");
  const void* b = param_ptr(bias, x, s.C, "bias");
  check_backend(x, op);
  const DType dtype = dtype_of(x, "x");
  const float feps = static_cast<float>(eps);
  if (x.is_cpu()) {
    group_norm_silu_fwd_cpu(dtype, x.data_ptr(), w, b, y.data_ptr(),
                            mean.data_ptr<float>(), rstd.data_ptr<float>(), s,
                            feps, silu);
    return;
  }
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(x.device());
  at::Tensor ws = at::empty({group_norm_silu_cuda_fwd_workspace(s)},
                            x.options().dtype(at::kFloat));
  check_cuda_error(
      group_norm_silu_fwd_cuda(dtype, x.data_ptr(), w, b, y.data_ptr(),
                               mean.data_ptr<float>(), rstd.data_ptr<float>(),
                               s, feps, silu, ws.data_ptr<float>(),
                               stream_ptr(stream)),
      op);
#else
  (void)stream;
#endif
}

// dy may have any strides: when its layout differs from x's it is first
// copied into x's layout (one extra read and write of dy).
void group_norm_silu_bwd(const at::Tensor& dy_in, const at::Tensor& x,
                         const at::Tensor& mean, const at::Tensor& rstd,
                         const OptTensor& weight, const OptTensor& bias,
                         const at::Tensor& dx, const OptTensor& dweight,
                         const OptTensor& dbias, int64_t num_groups, bool silu,
                         int64_t stream) {
  constexpr const char* op = "group_norm_silu_bwd";
  const GroupNormShape s = group_norm_shape(x, num_groups, op);
  TORCH_CHECK_TYPE(dy_in.scalar_type() == x.scalar_type(),
                   "dy must have x's dtype ", x.scalar_type(), ", got ",
                   dy_in.scalar_type());
  check_device(dy_in, x, "dy");
  TORCH_CHECK_VALUE(dy_in.sizes() == x.sizes(), "dy must have x's shape ",
                    x.sizes(), ", got ", dy_in.sizes());
  at::Tensor dy = dy_in;
  if (layout_of(dy) != layout_of(x)) {
    dy = at::empty_strided(x.sizes(), x.strides(), dy_in.options());
    dy.copy_(dy_in);
  }
  check_like_x(dx, x, "dx");
  check_not_aliased(dx, x, "dx", "x");
  check_not_aliased(dx, dy, "dx", "dy");
  check_float32(mean, x, {s.N, s.G}, "mean");
  check_float32(rstd, x, {s.N, s.G}, "rstd");
  const void* w = param_ptr(weight, x, s.C, "weight");
  const void* b = param_ptr(bias, x, s.C, "bias");
  float* dw = grad_param_ptr(dweight, x, s.C, "dweight");
  float* db = grad_param_ptr(dbias, x, s.C, "dbias");
  check_backend(x, op);
  const DType dtype = dtype_of(x, "x");
  if (x.is_cpu()) {
    group_norm_silu_bwd_cpu(dtype, dy.data_ptr(), x.data_ptr(),
                            mean.data_ptr<float>(), rstd.data_ptr<float>(), w,
                            b, dx.data_ptr(), dw, db, s, silu);
    return;
  }
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(x.device());
  at::Tensor ws = at::empty({group_norm_silu_cuda_bwd_workspace(s)},
                            x.options().dtype(at::kFloat));
  check_cuda_error(
      group_norm_silu_bwd_cuda(dtype, dy.data_ptr(), x.data_ptr(),
                               mean.data_ptr<float>(), rstd.data_ptr<float>(),
                               w, b, dx.data_ptr(), dw, db, s, silu,
                               ws.data_ptr<float>(), stream_ptr(stream)),
      op);
#else
  (void)stream;
#endif
}

// ------------------------------------------------------- fourier embedding

void fourier_embedding(const at::Tensor& values, const at::Tensor& freqs,
                       const at::Tensor& out, int64_t dim,
                       bool flip_sin_to_cos, int64_t stream) {
  constexpr const char* op = "fourier_embedding";
  TORCH_CHECK_VALUE(dim >= 1, op, ": dim must be >= 1, got ", dim);
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat,
                   "values must be float32, got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 2 && values.is_contiguous(),
                    "values must be a contiguous [B, N] tensor, got shape ",
                    values.sizes(), " strides ", values.strides());
  const int64_t B = values.size(0);
  const int64_t N = values.size(1);
  check_float32(freqs, values, {dim / 2}, "freqs");
  const DType dtype = dtype_of(out, "out");
  check_device(out, values, "out");
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == B &&
                        out.size(1) == N * dim,
                    "out must have shape [", B, ", ", N * dim, "], got ",
                    out.sizes());
  TORCH_CHECK_VALUE(out.size(1) <= 1 || out.stride(1) == 1,
                    "out must have stride(1) == 1, got strides ",
                    out.strides());
  TORCH_CHECK_VALUE(B <= 1 || out.stride(0) >= N * dim,
                    "out rows must not overlap: stride(0) must be >= ",
                    N * dim, ", got ", out.stride(0));
  check_backend(values, op);
  if (values.is_cpu()) {
    fourier_embedding_cpu(dtype, values.data_ptr<float>(),
                          freqs.data_ptr<float>(), out.data_ptr(), B, N, dim,
                          out.stride(0), flip_sin_to_cos);
    return;
  }
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(values.device());
  check_cuda_error(
      fourier_embedding_cuda(dtype, values.data_ptr<float>(),
                             freqs.data_ptr<float>(), out.data_ptr(), B, N,
                             dim, out.stride(0), flip_sin_to_cos,
                             stream_ptr(stream)),
      op);
#else
  (void)stream;
#endif
}

// c10 errors carry a C++ backtrace in what(); raise the bare message with
// the matching Python type instead.
void translate_c10_errors(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  }
}

}  // namespace
}  // namespace sdxl_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace sdxl_kernels;
  using py::arg;
  // Kernels may run for milliseconds: let other Python threads go.
  using NoGil = py::call_guard<py::gil_scoped_release>;
  py::register_local_exception_translator(translate_c10_errors);
  m.doc() = "C++/CUDA kernels of sdxl_kernels (outputs are caller-allocated)";

  m.def(
      "has_cuda", [] { return kHasCuda; },
      "True when this build contains the CUDA kernels.");
  m.def("group_norm_silu_fwd", &group_norm_silu_fwd, arg("x"), arg("weight"),
        arg("bias"), arg("y"), arg("mean"), arg("rstd"), arg("num_groups"),
        arg("eps"), arg("silu"), arg("stream") = 0, NoGil(),
        "GroupNorm (+ SiLU) forward. x: [N, C, *spatial] NCHW or "
        "channels-last; y like x; mean, rstd: float32 [N, num_groups].");
  m.def("group_norm_silu_bwd", &group_norm_silu_bwd, arg("dy"), arg("x"),
        arg("mean"), arg("rstd"), arg("weight"), arg("bias"), arg("dx"),
        arg("dweight"), arg("dbias"), arg("num_groups"), arg("silu"),
        arg("stream") = 0, NoGil(),
        "GroupNorm (+ SiLU) backward. dx like x; dweight, dbias: float32 [C] "
        "or None. dy is copied into x's layout if its strides differ.");
  m.def("fourier_embedding", &fourier_embedding, arg("values"), arg("freqs"),
        arg("out"), arg("dim"), arg("flip_sin_to_cos"), arg("stream") = 0,
        NoGil(),
        "Sinusoidal embedding of float32 values [B, N] into out [B, N*dim] "
        "(out.stride(1) == 1; out.stride(0) may exceed N*dim).");
}
