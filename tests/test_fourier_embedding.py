import math

import pytest
import torch
from safetensors.torch import load_file

import sdxl_kernels
from sdxl_kernels import backends, fourier_embedding
from sdxl_kernels.ops.fourier_embedding import fourier_embedding_op, fourier_embedding_out_op

from .conftest import fixture_path


def sinusoid64(values, dim, max_period=10000.0, flip_sin_to_cos=True, shift=0.0):
    """float64, straight from the formula: each value v → [cos(v f_j), sin(v f_j)] (or sin first), f_j =
    max_period^(-j / (half - shift)), a zero column for odd dim; rows concatenate their N embeddings."""
    v = values.double().reshape(values.shape[0], -1, 1)  # (B, N, 1)
    half = dim // 2
    f = torch.tensor([max_period ** (-j / (half - shift)) for j in range(half)], dtype=torch.float64)
    a = v * f.to(v.device)
    parts = [torch.cos(a), torch.sin(a)] if flip_sin_to_cos else [torch.sin(a), torch.cos(a)]
    if dim % 2:
        parts.append(torch.zeros(*a.shape[:-1], 1, dtype=a.dtype, device=a.device))
    return torch.cat(parts, -1).reshape(values.shape[0], -1)


VALUES = {
    "timesteps": torch.tensor([0.0, 1.0, 500.5, 999.0]),
    "micro": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 768.0, 16.0, 48.0, 896.0, 1152.0]]),
    "one": torch.tensor([[7.25]]),
}


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
@pytest.mark.parametrize("dim", [1, 2, 15, 256, 320, 1281])
@pytest.mark.parametrize("convention", ["sgm", "diffusers"])
def test_matches_float64_formula(backend, values, dim, convention, poison):
    name, device = backend
    kw = {} if convention == "sgm" else dict(flip_sin_to_cos=False, downscale_freq_shift=1.0)
    if dim == 2 and convention == "diffusers":
        pytest.skip("half - shift = 0: diffusers divides by zero too")
    backends.set_backend("fourier_embedding", name)
    out = fourier_embedding(values.to(device), dim, **kw)
    assert sdxl_kernels.last_backend("fourier_embedding") == name
    ref = sinusoid64(values, dim, 10000.0, convention == "sgm", 0.0 if convention == "sgm" else 1.0)
    assert out.shape == ref.shape and out.dtype == torch.float32
    # float32 phase: |v·f| up to ~1e3 carries ~6e-5 rounding, which cos/sin pass on.
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-4, rtol=0)


def test_matches_sgm_fixture(backend):
    name, device = backend
    fx = load_file(fixture_path("sgm", "fourier.safetensors"))
    backends.set_backend("fourier_embedding", name)
    for key in ("original_size", "crop_coords_top_left", "target_size", "aesthetic_score"):
        out = fourier_embedding(fx[key].to(device), 256)
        torch.testing.assert_close(out.cpu(), fx[key + "_emb"], atol=1e-5, rtol=0)
    for dim in (320, 384, 15):
        out = fourier_embedding(fx["timesteps"].to(device), dim)
        torch.testing.assert_close(out.cpu(), fx[f"timestep_emb_{dim}"], atol=1e-5, rtol=0)
    # The base ADM vector without the pooled text: three (B, 2) inputs → (B, 1536), written into one buffer.
    vec = torch.full((2, 1536), float("nan"), device=device)
    keys = ("original_size", "crop_coords_top_left", "target_size")
    for i, key in enumerate(keys):
        fourier_embedding(fx[key].to(device), 256, out=vec[:, 512 * i : 512 * (i + 1)])
    torch.testing.assert_close(vec.cpu(), fx["base_vector_without_pooled"], atol=1e-5, rtol=0)


def test_matches_diffusers_fixture(backend):
    """diffusers' SDXL add_time_proj: flip_sin_to_cos=True, freq_shift=0, each time id embedded to 16."""
    name, device = backend
    io = load_file(fixture_path("diffusers", "tiny_unet.io.safetensors"))
    backends.set_backend("fourier_embedding", name)
    out = fourier_embedding(io["time_ids"].to(device), 16)  # (B, 6*16)
    torch.testing.assert_close(out.cpu(), io["intermediate.add_time_proj"].reshape(2, -1), atol=1e-5, rtol=0)
    t = fourier_embedding(io["timestep"].to(device), 8)
    torch.testing.assert_close(t.cpu(), io["intermediate.time_proj"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_out_slice_and_dtypes(backend, dtype):
    """out= writes a column slice of a wider tensor and nothing else."""
    name, device = backend
    backends.set_backend("fourier_embedding", name)
    values = VALUES["micro"].to(device)
    big = torch.full((2, 10 + 6 * 33 + 7), -3.0, device=device, dtype=dtype)
    res = fourier_embedding(values, 33, out=big[:, 10:-7])
    assert res.data_ptr() == big[:, 10:].data_ptr()
    ref = sinusoid64(values.cpu(), 33)
    torch.testing.assert_close(big[:, 10:-7].double().cpu(), ref, atol=max(2 * torch.finfo(dtype).eps, 2e-4), rtol=0)
    assert (big[:, :10] == -3).all() and (big[:, -7:] == -3).all()
    plain = fourier_embedding(values, 33, dtype=dtype)
    assert plain.dtype == dtype and torch.equal(plain, big[:, 10:-7])


def test_integer_timesteps(backend):
    name, device = backend
    backends.set_backend("fourier_embedding", name)
    t = torch.tensor([0, 5, 999], device=device)
    torch.testing.assert_close(fourier_embedding(t, 64), fourier_embedding(t.float(), 64))


def test_backward(backend):
    name, device = backend
    backends.set_backend("fourier_embedding", name)
    for flip in (True, False):
        v = torch.tensor([[0.3, 2.0], [5.5, -1.25]], device=device, requires_grad=True)
        g = torch.randn(2, 2 * 9, device=device)
        (fourier_embedding(v, 9, flip_sin_to_cos=flip) * g).sum().backward()
        v64 = v.detach().double().cpu().requires_grad_()
        (sinusoid64(v64, 9, flip_sin_to_cos=flip) * g.double().cpu()).sum().backward()
        torch.testing.assert_close(v.grad.double().cpu(), v64.grad, atol=1e-4, rtol=1e-4)


def test_empty_batch(backend):
    name, device = backend
    backends.set_backend("fourier_embedding", name)
    assert fourier_embedding(torch.zeros(0, 3, device=device), 8).shape == (0, 24)


def test_opcheck(backend):
    name, device = backend
    backends.set_backend("fourier_embedding", name)
    v = VALUES["micro"].to(device)
    torch.library.opcheck(fourier_embedding_op, (v.clone().requires_grad_(), 16, 10000.0, True, 0.0, torch.float32))
    out = torch.empty(2, 6 * 16, device=device)
    torch.library.opcheck(fourier_embedding_out_op, (v, out, 16, 10000.0, True, 0.0))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda v: fourier_embedding(v.tolist(), 8), TypeError, "values must be a torch.Tensor"),
        (lambda v: fourier_embedding(v[None], 8), ValueError, "shape"),
        (lambda v: fourier_embedding(v, 0), ValueError, "dim"),
        (lambda v: fourier_embedding(v, 8.0), ValueError, "dim"),
        (lambda v: fourier_embedding(v, 8, max_period=0.0), ValueError, "max_period"),
        (lambda v: fourier_embedding(v, 8, out=torch.empty(2, 8)), ValueError, "out must have shape"),
        (lambda v: fourier_embedding(v, 8, out=torch.empty(2, 48, dtype=torch.int32)), TypeError, "floating"),
        (lambda v: fourier_embedding(v, 8, out=torch.empty(48, 2).t()), ValueError, "unit stride"),
        (lambda v: fourier_embedding(v, 8, out=torch.empty(2, 48, device="meta")), ValueError, "meta"),
        (lambda v: fourier_embedding(v.bool(), 8), TypeError, "real number"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(VALUES["micro"])


def test_nan_and_inf_propagate(backend):
    name, device = backend
    backends.set_backend("fourier_embedding", name)
    out = fourier_embedding(torch.tensor([[1.0, math.nan, math.inf]], device=device), 8).cpu()
    assert torch.isfinite(out[0, :8]).all()
    assert out[0, 8:].isnan().all(), "NaN and inf arguments give NaN sinusoids"
