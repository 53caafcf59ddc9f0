import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdxl_kernels
from sdxl_kernels import backends, group_norm_silu, group_norm_silu_ref
from sdxl_kernels.ops.group_norm_silu import group_norm_silu_backward_op, group_norm_silu_op

from .conftest import examples

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, spatial, G): SDXL's 32 groups over 320 channels, odd channel counts, 1x1 and odd spatial sizes,
# 1-D and 3-D spatial, more channels per group than one tile, and enough positions to split the reduction.
SHAPES = [
    (1, 320, (8, 8), 32),
    (3, 63, (7, 5), 3),
    (1, 32, (1, 1), 32),
    (2, 12, (3, 4, 5), 4),
    (3, 8, (37,), 2),
    (1, 8, (40, 40), 2),
    (2, 128, (33,), 1),
]


def make_inputs(shape, dtype, device, layout, affine=True, seed=0):
    n, c, spatial, g = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, *spatial, generator=gen) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(c, generator=gen)).to(dtype) if affine else None
    b = (0.5 * torch.randn(c, generator=gen)).to(dtype) if affine else None
    dy = torch.randn(n, c, *spatial, generator=gen).to(dtype)
    if layout == "channels_last":
        perm = (0, *range(2, x.dim()), 1)
        inv = [perm.index(i) for i in range(x.dim())]
        x = x.permute(perm).contiguous().permute(inv)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(w), move(b), move(dy), g


def run(fn, x, g, w, b, dy, **kw):
    """Output and (dx, dw, db) of fn through autograd."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], g, leaves[1], leaves[2], **kw)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def ref64(x, g, w, b, eps=1e-5, activation="silu"):
    up = lambda t: None if t is None else t.double()  # noqa: E731
    return group_norm_silu_ref(up(x), g, up(w), up(b), eps, activation)


def eager(x, g, w, b, eps=1e-5, activation="silu"):
    """PyTorch's kernels (the ATen op: F.group_norm refuses one value per group in training)."""
    n, c = x.shape[:2]
    x = x if x.dim() in (4, 5) else x.contiguous()  # ATen takes channels-last only for 4-D/5-D
    y = torch.ops.aten.native_group_norm(x, w, b, n, c, x[0, 0].numel(), g, eps)[0]
    return F.silu(y) if activation == "silu" else y


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def check_close(name, ours, eager_out, ref, dtype):
    """Ours must be no worse than 2x eager PyTorch at the same dtype (with a one-ulp floor)."""
    floor = 4 * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    limit = max(2 * max_err(eager_out, ref), floor)
    err = max_err(ours, ref)
    assert not ours.isnan().any(), f"{name}: NaN in output"
    assert err <= limit, f"{name}: max error {err:.3g} > {limit:.3g} (eager {max_err(eager_out, ref):.3g})"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_backward(backend, shape, dtype, layout, poison):
    name, device = backend
    if layout == "channels_last" and len(shape[2]) == 0:
        pytest.skip("no spatial dims")
    x, w, b, dy, g = make_inputs(shape, dtype, device, layout)
    backends.set_backend("group_norm_silu", name)
    y, grads = run(group_norm_silu, x, g, w, b, dy)
    assert sdxl_kernels.last_backend("group_norm_silu") == name
    assert y.dtype == dtype and y.stride() == x.stride(), "output must keep x's dtype and memory format"

    y_ref, grads_ref = run(ref64, x, g, w, b, dy.double())
    backends.set_backend("group_norm_silu", None)
    y_eager, grads_eager = run(eager, x, g, w, b, dy)
    check_close("y", y, y_eager, y_ref, dtype)
    for label, ours, eag, ref in zip(("dx", "dweight", "dbias"), grads, grads_eager, grads_ref):
        assert ours.dtype == eag.dtype and ours.shape == ref.shape
        check_close(label, ours, eag, ref, dtype)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_affine_and_activation_variants(backend, affine, activation, poison):
    name, device = backend
    x, w, b, dy, g = make_inputs((2, 24, (5, 6), 6), torch.float32, device, "contiguous", affine=affine)
    backends.set_backend("group_norm_silu", name)
    y, grads = run(group_norm_silu, x, g, w, b, dy, activation=activation, eps=1e-6)
    y_ref, grads_ref = run(ref64, x, g, w, b, dy.double(), activation=activation, eps=1e-6)
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=1e-5)
    for ours, ref in zip(grads, grads_ref):
        if ref is not None:
            torch.testing.assert_close(ours.double(), ref.double(), atol=1e-4, rtol=1e-4)


def test_bias_without_weight(backend):
    name, device = backend
    x, _, b, dy, g = make_inputs((2, 8, (9,), 2), torch.float32, device, "contiguous")
    backends.set_backend("group_norm_silu", name)
    y, (dx, _, db) = run(group_norm_silu, x, g, None, b, dy)
    y_ref, (dx_ref, _, db_ref) = run(ref64, x, g, None, b, dy.double())
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(db.double(), db_ref.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx.double(), dx_ref.double(), atol=1e-4, rtol=1e-4)


def test_large_mean_is_numerically_sound(backend):
    """A large offset over a small spread: E[x²]-E[x]² in float32 would lose every digit here."""
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    x = (300.0 + torch.randn(1, 16, 40, 40, generator=gen)).to(device)
    backends.set_backend("group_norm_silu", name)
    y = group_norm_silu(x, 4)
    torch.testing.assert_close(y.double(), ref64(x, 4, None, None), atol=1e-4, rtol=1e-4)


def test_expanded_and_strided_inputs(backend):
    """dy from y.sum() is an expanded (stride-0) tensor; x with a step is neither contiguous nor CL."""
    name, device = backend
    backends.set_backend("group_norm_silu", name)
    x = torch.randn(2, 8, 10, 12, device=device)[..., ::2].requires_grad_()
    group_norm_silu(x, 4).sum().backward()
    x_ref = x.detach().double().requires_grad_()
    ref64(x_ref, 4, None, None).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-4, rtol=1e-4)


def test_nan_propagates_to_its_group_only(backend):
    name, device = backend
    x = torch.randn(2, 8, 4, 4, device=device)
    x[1, 5, 2, 3] = float("nan")
    x[0, 0, 0, 0] = float("inf")
    backends.set_backend("group_norm_silu", name)
    y = group_norm_silu(x, 4)
    nan_groups = y.reshape(2, 4, -1).isnan().any(-1)
    expected = torch.zeros(2, 4, dtype=torch.bool)
    expected[1, 2] = expected[0, 0] = True
    assert torch.equal(nan_groups.cpu(), expected)


def test_empty_batch(backend):
    name, device = backend
    backends.set_backend("group_norm_silu", name)
    x = torch.randn(0, 8, 3, 3, device=device, requires_grad=True)
    y = group_norm_silu(x, 4)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_module_state_dict_matches_group_norm():
    gn = torch.nn.GroupNorm(4, 16)
    ours = sdxl_kernels.GroupNormSiLU(4, 16)
    assert ours.state_dict().keys() == gn.state_dict().keys()
    torch.nn.init.normal_(gn.weight)
    ours.load_state_dict(gn.state_dict())
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(ours(x), F.silu(gn(x)), atol=1e-5, rtol=1e-5)
    plain = sdxl_kernels.GroupNormSiLU(4, 16, activation=None)
    plain.load_state_dict(gn.state_dict())
    torch.testing.assert_close(plain(x), gn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w: group_norm_silu(x[0, 0, 0], 4), ValueError, "shape"),
        (lambda x, w: group_norm_silu(x, 3), ValueError, "divide"),
        (lambda x, w: group_norm_silu(x, 0), ValueError, "num_groups"),
        (lambda x, w: group_norm_silu(x, 4, w[:7]), ValueError, "weight"),
        (lambda x, w: group_norm_silu(x, 4, w, w[:5]), ValueError, "bias"),
        (lambda x, w: group_norm_silu(x.to(torch.int32), 4), TypeError, "floating"),
        (lambda x, w: group_norm_silu(x, 4, w.to(torch.int64)), TypeError, "weight"),
        (lambda x, w: group_norm_silu(x.tolist(), 4), TypeError, "x must be a torch.Tensor"),
        (lambda x, w: group_norm_silu(x, 4, w.to("meta")), ValueError, "weight is on meta"),
        (lambda x, w: group_norm_silu(x, 4, activation="relu"), ValueError, "activation"),
        (lambda x, w: group_norm_silu(x, 4, eps=-1.0), ValueError, "eps"),
    ],
)
def test_bad_input(call, error, match):
    x, w = torch.randn(2, 8, 3, 3), torch.randn(8)
    with pytest.raises(error, match=match):
        call(x, w)


def test_forced_backend_that_cannot_serve_raises():
    backends.set_backend("group_norm_silu", "cuda")
    with pytest.raises(RuntimeError, match="forced backend 'cuda' cannot serve"):
        group_norm_silu(torch.randn(1, 4, 2, 2), 2)


def test_float64_goes_to_torch():
    y = group_norm_silu(torch.randn(1, 4, 3, 3, dtype=torch.float64), 2)
    assert y.dtype == torch.float64 and sdxl_kernels.last_backend("group_norm_silu") == "torch"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, layout):
    name, device = backend
    backends.set_backend("group_norm_silu", name)
    x, w, b, dy, g = make_inputs((2, 8, (5, 4), 2), torch.float32, device, layout)
    torch.library.opcheck(group_norm_silu_op, (x.requires_grad_(), g, w.requires_grad_(), b, 1e-5, True))
    y, mean, rstd = group_norm_silu_op(x.detach(), g, w.detach(), b, 1e-5, True)
    torch.library.opcheck(group_norm_silu_backward_op, (dy, x.detach(), mean, rstd, w.detach(), b, g, 1e-5, True))


def test_torch_compile_fullgraph():
    """Both ops (and the backward) trace into one graph on the CPU."""
    import torch._dynamo

    torch._dynamo.reset()
    norm = sdxl_kernels.GroupNormSiLU(4, 16)

    def f(x, t):
        emb = sdxl_kernels.fourier_embedding(t, 16)  # (B, 16)
        return norm(x + emb[:, :, None, None]).square().mean()

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    t = torch.tensor([3.0, 700.0])
    loss = compiled(x, t)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_()
    f(x_ref, t).backward()
    torch.testing.assert_close(loss, f(x_ref.detach(), t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)


@settings(max_examples=examples(12, 25), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 3),
    groups=st.integers(1, 6),
    c_per_g=st.integers(1, 20),
    spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_random_shapes(n, groups, c_per_g, spatial, channels_last, seed):
    shape = (n, groups * c_per_g, tuple(spatial), groups)
    layout = "channels_last" if channels_last and spatial else "contiguous"
    for name in ("triton", "cpu"):
        if name == "cpu" and not backends.cpu_extension_available():
            continue
        device = torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")
        x, w, b, dy, g = make_inputs(shape, torch.float32, device, layout, seed=seed)
        backends.set_backend("group_norm_silu", name)
        y, grads = run(group_norm_silu, x, g, w, b, dy)
        y_ref, grads_ref = run(ref64, x, g, w, b, dy.double())
        tol = 1e-4 * math.sqrt(x[0].numel())
        torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=1e-5)
        for ours, ref in zip(grads, grads_ref):
            torch.testing.assert_close(ours.double(), ref.double(), atol=tol, rtol=1e-4)
