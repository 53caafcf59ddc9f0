"""Low-level tests of the compiled extension `sdxl_kernels._C`.

(a) each _C function against float64 math written here, on CPU (and CUDA when
    the build has it), with every output poisoned with NaN before the call;
(b) `python -m sdxl_kernels.tools.nvcc_check` (skipped without nvcc);
(c) the standalone CMakeLists.txt builds a module that imports and runs.
(a) is skipped when the extension is not built; (b) and (c) do not need it.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

try:
    _C = importlib.import_module("sdxl_kernels._C")
except ImportError:
    _C = None

needs_C = pytest.mark.skipif(_C is None, reason="sdxl_kernels._C is not built")

DEVICES = ["cpu"]
if _C is not None and _C.has_cuda() and torch.cuda.is_available():
    DEVICES.append("cuda")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN = float("nan")

# Relative tolerance per output dtype: one unit of the final rounding (fp32:
# what fp32 statistics and accumulation leave). Absolute slack is set per
# test relative to the largest reference value.
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# (N, C, G, spatial): batch 1 and 3, C = 320 / 32 groups and C = 63 / 3
# groups, spatial rank 0 to 3, and one shape big enough for several CPU
# tiles and channels-last chunks with ragged ends.
SHAPES = [
    (1, 320, 32, (7, 5)),
    (3, 320, 32, (1, 1)),
    (3, 63, 3, (3, 4, 5)),
    (1, 63, 3, (9,)),
    (3, 63, 3, ()),
    (2, 96, 8, (45, 47)),
]
SHAPE_IDS = [f"N{n}-C{c}-G{g}-S{'x'.join(map(str, sp)) or '0d'}" for n, c, g, sp in SHAPES]

# (silu, affine)
MODES = [(True, True), (False, True), (True, False)]
MODE_IDS = ["silu-affine", "affine", "silu"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def stream_of(device: str) -> int:
    return torch.cuda.current_stream().cuda_stream if device == "cuda" else 0


def make_input(shape, dtype, channels_last, device, scale=3.0, offset=1.0):
    """x with channels innermost in memory when channels_last (any rank)."""
    n, c, *spatial = shape
    x = torch.randn(n, *spatial, c, dtype=torch.float64) * scale + offset
    x = x.to(dtype).movedim(-1, 1)
    if not channels_last:
        x = x.contiguous()
    return x.to(device)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t).fill_(NAN)


def poisoned(*shape, device) -> torch.Tensor:
    return torch.full(shape, NAN, dtype=torch.float32, device=device)


def group_norm_silu_f64(x, weight, bias, num_groups, eps, silu):
    """y, mean, rstd in float64; the variance by two passes over x."""
    n, c = x.shape[:2]
    xg = x.reshape(n, num_groups, -1)  # (N, G, Cg*S)
    mean = xg.mean(-1)
    var = ((xg - mean[..., None]) ** 2).mean(-1)
    rstd = 1.0 / torch.sqrt(var + eps)
    xhat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    bshape = (1, c) + (1,) * (x.dim() - 2)
    z = xhat
    if weight is not None:
        z = z * weight.reshape(bshape)
    if bias is not None:
        z = z + bias.reshape(bshape)
    y = z * torch.sigmoid(z) if silu else z
    return y, mean, rstd


def assert_close_scaled(actual, expected, rtol, atol_scale):
    """|actual - expected| <= rtol*|expected| + atol_scale*max|expected|."""
    expected = expected.double().cpu()
    atol = atol_scale * expected.abs().max().item() + 1e-30
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol)


def params(c, dtype, device, affine):
    if not affine:
        return None, None
    w = (torch.randn(c, dtype=torch.float64) * 0.5 + 1.0).to(dtype).to(device)
    b = (torch.randn(c, dtype=torch.float64) * 0.5).to(dtype).to(device)
    return w, b


def as_f64(t):
    return None if t is None else t.double().cpu()


# --------------------------------------------------------------- (a) forward


@needs_C
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("silu,affine", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_silu_fwd(dtype, channels_last, shape, silu, affine, device):
    n, c, g, spatial = shape
    x = make_input((n, c, *spatial), dtype, channels_last, device)
    w, b = params(c, dtype, device, affine)
    y, mean, rstd = poisoned_like(x), poisoned(n, g, device=device), poisoned(n, g, device=device)

    _C.group_norm_silu_fwd(x, w, b, y, mean, rstd, g, 1e-5, silu, stream_of(device))

    y_ref, mean_ref, rstd_ref = group_norm_silu_f64(as_f64(x), as_f64(w), as_f64(b), g, 1e-5, silu)
    assert y.stride() == x.stride()
    assert_close_scaled(y, y_ref, RTOL[dtype], 1e-5)
    assert_close_scaled(mean, mean_ref, 1e-5, 1e-6)
    assert_close_scaled(rstd, rstd_ref, 1e-5, 0.0)


@needs_C
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_group_norm_variance_survives_large_offset(channels_last, device):
    # mean 1e4, std 1: E[x^2] - E[x]^2 in fp32 would lose every digit of var.
    x = make_input((2, 64, 33, 31), torch.float32, channels_last, device, scale=1.0, offset=1e4)
    y, mean, rstd = poisoned_like(x), poisoned(2, 8, device=device), poisoned(2, 8, device=device)
    _C.group_norm_silu_fwd(x, None, None, y, mean, rstd, 8, 1e-6, False, stream_of(device))
    y_ref, _, rstd_ref = group_norm_silu_f64(as_f64(x), None, None, 8, 1e-6, False)
    assert_close_scaled(rstd, rstd_ref, 1e-4, 0.0)
    assert_close_scaled(y, y_ref, 1e-3, 1e-4)


@needs_C
@pytest.mark.parametrize("device", DEVICES)
def test_silu_across_the_exp_range(device):
    # One group per channel; bias and a large weight push z over [-1700, 1700]
    # so exp(-z) overflows and underflows; the last channel gets z = +-inf.
    c, s = 8, 512
    x = torch.linspace(-1.0, 1.0, s, dtype=torch.float64).repeat(1, c, 1).float().to(device)
    w = torch.tensor([1e3, 100.0, 60.0, 10.0, 1.0, 1e3, 0.1, 1.0], device=device)
    b = torch.tensor([0.0, -20.0, 20.0, -80.0, 0.0, 500.0, -87.0, 0.0], device=device)
    y, mean, rstd = poisoned_like(x), poisoned(1, c, device=device), poisoned(1, c, device=device)
    _C.group_norm_silu_fwd(x, w, b, y, mean, rstd, c, 0.0, True, stream_of(device))
    y_ref, _, _ = group_norm_silu_f64(as_f64(x), as_f64(w), as_f64(b), c, 0.0, True)
    # z is computed in fp32, so y inherits ~|z| * 1e-7 relative error for z << 0.
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=5e-4, atol=1e-30)

    b_inf = torch.tensor([math.inf, -math.inf] * (c // 2), device=device)
    _C.group_norm_silu_fwd(x, None, b_inf, y, mean, rstd, c, 0.0, True, stream_of(device))
    assert torch.isposinf(y[0, 0::2]).all()  # silu(+inf) = +inf
    assert torch.isnan(y[0, 1::2]).all()  # silu(-inf) = -inf * 0 = NaN, as torch


@needs_C
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_group_norm_nan_stays_in_its_group(channels_last, device):
    x = make_input((2, 16, 5, 6), torch.float32, channels_last, device)
    x[1, 5, 2, 3] = NAN  # sample 1, group 1 (4 channels per group)
    y, mean, rstd = poisoned_like(x), poisoned(2, 4, device=device), poisoned(2, 4, device=device)
    _C.group_norm_silu_fwd(x, None, None, y, mean, rstd, 4, 1e-5, True, stream_of(device))
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[1, 1] = True
    assert torch.equal(torch.isnan(mean.cpu()), bad)
    assert torch.isnan(y[1, 4:8]).all()
    assert not torch.isnan(y[0]).any() and not torch.isnan(y[1, :4]).any() and not torch.isnan(y[1, 8:]).any()


# -------------------------------------------------------------- (a) backward


@needs_C
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("silu,affine", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_silu_bwd(dtype, channels_last, shape, silu, affine, device):
    n, c, g, spatial = shape
    x = make_input((n, c, *spatial), dtype, channels_last, device)
    dy = make_input((n, c, *spatial), dtype, channels_last, device, scale=1.0, offset=0.0)
    w, b = params(c, dtype, device, affine)

    x64 = as_f64(x).requires_grad_()
    w64 = as_f64(w).requires_grad_() if affine else None
    b64 = as_f64(b).requires_grad_() if affine else None
    y_ref, mean_ref, rstd_ref = group_norm_silu_f64(x64, w64, b64, g, 1e-5, silu)
    leaves = [x64] + ([w64, b64] if affine else [])
    grads = torch.autograd.grad(y_ref, leaves, as_f64(dy))

    mean = mean_ref.detach().float().to(device)
    rstd = rstd_ref.detach().float().to(device)
    dx = poisoned_like(x)
    dw = poisoned(c, device=device) if affine else None
    db = poisoned(c, device=device) if affine else None
    _C.group_norm_silu_bwd(dy, x, mean, rstd, w, b, dx, dw, db, g, silu, stream_of(device))

    assert dx.stride() == x.stride()
    assert_close_scaled(dx, grads[0], RTOL[dtype], 1e-5)
    if affine:
        assert_close_scaled(dw, grads[1], 1e-5, 1e-5)
        assert_close_scaled(db, grads[2], 1e-5, 1e-5)


@needs_C
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_norm_silu_bwd_large_group(dtype, device):
    # 4 x 130 x 140 = 72800 elements per group: beyond the CPU kernel's dz cache.
    n, c, g = 2, 8, 2
    x = make_input((n, c, 130, 140), dtype, False, device)
    dy = make_input((n, c, 130, 140), dtype, False, device, scale=1.0, offset=0.0)
    w, b = params(c, dtype, device, True)
    x64, w64, b64 = (as_f64(t).requires_grad_() for t in (x, w, b))
    y_ref, mean_ref, rstd_ref = group_norm_silu_f64(x64, w64, b64, g, 1e-5, True)
    grads = torch.autograd.grad(y_ref, [x64, w64, b64], as_f64(dy))
    dx, dw, db = poisoned_like(x), poisoned(c, device=device), poisoned(c, device=device)
    mean, rstd = mean_ref.detach().float().to(device), rstd_ref.detach().float().to(device)
    _C.group_norm_silu_bwd(dy, x, mean, rstd, w, b, dx, dw, db, g, True, stream_of(device))
    assert_close_scaled(dx, grads[0], RTOL[dtype], 1e-5)
    assert_close_scaled(dw, grads[1], 1e-5, 1e-5)
    assert_close_scaled(db, grads[2], 1e-5, 1e-5)


@needs_C
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_group_norm_bwd_dy_in_other_layout(channels_last, dtype, device):
    # dy arrives in the other memory layout (or transposed): the binding
    # copies it into x's layout, so dx must equal the same-layout result.
    shape = (2, 32, 6, 7)
    x = make_input(shape, dtype, channels_last, device)
    dy = make_input(shape, dtype, channels_last, device, scale=1.0, offset=0.0)
    w, b = params(32, dtype, device, True)
    mean, rstd = poisoned(2, 4, device=device), poisoned(2, 4, device=device)
    _C.group_norm_silu_fwd(x, w, b, poisoned_like(x), mean, rstd, 4, 1e-5, True, stream_of(device))

    def run(dy_):
        dx, dw, db = poisoned_like(x), poisoned(32, device=device), poisoned(32, device=device)
        _C.group_norm_silu_bwd(dy_, x, mean, rstd, w, b, dx, dw, db, 4, True, stream_of(device))
        return dx, dw, db

    expected = run(dy)
    other = dy.contiguous() if channels_last else dy.to(memory_format=torch.channels_last)
    odd = dy.transpose(2, 3).contiguous().transpose(2, 3)
    for dy_other in (other, odd):
        for got, want in zip(run(dy_other), expected):
            assert torch.equal(got, want)


@needs_C
def test_group_norm_bwd_without_param_grads():
    x = make_input((1, 8, 4, 4), torch.float32, False, "cpu")
    dy = torch.randn_like(x)
    mean, rstd = torch.zeros(1, 2), torch.ones(1, 2)
    dx = poisoned_like(x)
    _C.group_norm_silu_bwd(dy, x, mean, rstd, None, None, dx, None, None, 2, False, 0)
    # With the stats given (mean 0, rstd 1): xhat = x and
    # dx = dy - mean_g(dy) - xhat * mean_g(dy * xhat).
    dyg, xh = as_f64(dy).reshape(1, 2, -1), as_f64(x).reshape(1, 2, -1)
    want = dyg - dyg.mean(-1, keepdim=True) - xh * (dyg * xh).mean(-1, keepdim=True)
    assert_close_scaled(dx, want.reshape(x.shape), 1e-5, 1e-6)


# ------------------------------------------------------------- (a) fourier


def fourier_f64(values, freqs, dim, flip):
    """float64 sin/cos of the float32 products, laid out [B, N*dim]."""
    a = (values[..., None] * freqs).double()  # fp32 product, as the kernel
    sin, cos = torch.sin(a), torch.cos(a)
    parts = [cos, sin] if flip else [sin, cos]
    if dim % 2:
        parts.append(a.new_zeros(*a.shape[:-1], 1))
    emb = torch.cat(parts, dim=-1)  # (B, N, dim)
    return emb.reshape(values.shape[0], -1)


@needs_C
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flip", [True, False], ids=["cos-sin", "sin-cos"])
@pytest.mark.parametrize("b,n,dim", [(3, 5, 256), (2, 1, 7), (1, 6, 320), (4, 2, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fourier_embedding_strided_out(dtype, b, n, dim, flip, device):
    values = (torch.rand(b, n) * 1000.0).to(device)  # timesteps / pixel sizes
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half, 1)).to(device)
    big = torch.full((b, 3 + n * dim + 5), NAN, dtype=dtype, device=device)
    out = big[:, 3 : 3 + n * dim]  # column slice: stride(0) > n*dim

    _C.fourier_embedding(values, freqs, out, dim, flip, stream_of(device))

    ref = fourier_f64(values.cpu(), freqs.cpu(), dim, flip)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0.0, atol=2 * eps if dtype == torch.float32 else eps)
    assert torch.isnan(big[:, :3]).all() and torch.isnan(big[:, 3 + n * dim :]).all()


# ------------------------------------------------------ (a) argument checks


@needs_C
def test_bad_arguments_raise():
    x = torch.randn(2, 8, 4, 4)
    y, mean, rstd = torch.empty_like(x), torch.empty(2, 2), torch.empty(2, 2)
    w = torch.ones(8)
    fwd = _C.group_norm_silu_fwd
    with pytest.raises(TypeError, match="mean must be float32"):
        fwd(x, w, None, y, mean.half(), rstd, 2, 1e-5, True, 0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fwd(x.double(), None, None, y.double(), mean, rstd, 2, 1e-5, True, 0)
    with pytest.raises(ValueError, match="num_groups"):
        fwd(x, w, None, y, torch.empty(2, 3), torch.empty(2, 3), 3, 1e-5, True, 0)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        fwd(x, torch.ones(7), None, y, mean, rstd, 2, 1e-5, True, 0)
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        fwd(x[..., ::2], None, None, y[..., ::2], mean, rstd, 2, 1e-5, True, 0)
    with pytest.raises(ValueError, match="y must have x's memory layout"):
        fwd(x, None, None, y.to(memory_format=torch.channels_last), mean, rstd, 2, 1e-5, True, 0)
    with pytest.raises(ValueError, match=r"mean must have shape \[2, 2\]"):
        fwd(x, None, None, y, torch.empty(4), rstd, 2, 1e-5, True, 0)
    with pytest.raises(ValueError, match="y must not share memory with x"):
        fwd(x, None, None, x, mean, rstd, 2, 1e-5, True, 0)
    with pytest.raises(ValueError, match="x must be"):
        fwd(torch.randn(8), None, None, torch.randn(8), mean, rstd, 2, 1e-5, True, 0)
    with pytest.raises(RuntimeError, match="rstd is on meta"):
        fwd(x, None, None, y, mean, torch.empty(2, 2, device="meta"), 2, 1e-5, True, 0)
    with pytest.raises(ValueError, match=r"dweight must have shape \[8\]"):
        _C.group_norm_silu_bwd(x, x, mean, rstd, w, None, y, torch.empty(4), None, 2, True, 0)

    values, freqs = torch.rand(2, 3), torch.rand(4)
    with pytest.raises(ValueError, match="stride"):
        _C.fourier_embedding(values, freqs, torch.empty(24, 2).t(), 8, True, 0)
    with pytest.raises(ValueError, match=r"freqs must have shape \[4\]"):
        _C.fourier_embedding(values, torch.rand(3), torch.empty(2, 24), 8, True, 0)
    with pytest.raises(TypeError, match="values must be float32"):
        _C.fourier_embedding(values.half(), freqs, torch.empty(2, 24), 8, True, 0)


@needs_C
def test_has_cuda_is_bool():
    assert isinstance(_C.has_cuda(), bool)
    if torch.version.cuda is None:
        assert _C.has_cuda() is False


# -------------------------------------------------------------- (b) nvcc


def test_nvcc_check_compiles_without_spills():
    nvcc_check = importlib.import_module("sdxl_kernels.tools.nvcc_check")
    if nvcc_check.find_nvcc() is None:
        pytest.skip("nvcc not found")
    proc = subprocess.run(
        [sys.executable, "-m", "sdxl_kernels.tools.nvcc_check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.stdout.startswith("SKIPPED"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 with spills, 0 compile errors" in proc.stdout


def test_parse_ptxas_output():
    nvcc_check = importlib.import_module("sdxl_kernels.tools.nvcc_check")
    text = textwrap.dedent(
        """\
        ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
        ptxas info    : Function properties for _Z1kPf
            8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 368 bytes cmem[0]
        """
    )
    (k,) = nvcc_check.parse_ptxas(text, "k.cu")
    assert (k.name, k.arch, k.registers, k.smem, k.stack) == ("_Z1kPf", "sm_90", 40, 2048, 8)
    assert (k.spill_stores, k.spill_loads, k.spills) == (4, 12, True)


# ------------------------------------------------------------- (c) cmake


def test_cmake_builds_an_importable_module(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    pybind11 = pytest.importorskip("pybind11")
    build = tmp_path / "build"
    configure = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 1)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"

    probe = textwrap.dedent(
        f"""\
        import sys
        import torch
        import torch.nn.functional as F
        sys.path.insert(0, {str(build)!r})
        import _C
        x = torch.randn(2, 16, 5, 5)
        y, mean, rstd = torch.empty_like(x), torch.empty(2, 4), torch.empty(2, 4)
        _C.group_norm_silu_fwd(x, None, None, y, mean, rstd, 4, 1e-5, True, 0)
        torch.testing.assert_close(y, F.silu(F.group_norm(x, 4)), rtol=1e-5, atol=1e-5)
        print("ok", _C.has_cuda())
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok")
