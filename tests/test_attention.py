import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import sdxl_kernels
from sdxl_kernels import attention_ref, backends, flash_attention, scaled_dot_product_attention
from sdxl_kernels.ops import attention as attn
from sdxl_kernels.ops.attention import BwdConfig, FwdConfig, flash_attention_bwd_op, flash_attention_fwd_op

from .conftest import examples

OP = "scaled_dot_product_attention"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [40, 64, 80, 128, 160]
SEQS = [(1, 1), (97, 77), (128, 128), (333, 77), (1000, 1000)]
BATCH_HEADS = [(1, 1), (3, 3)]


def _grid():
    """dtype × head dim × (Lq, Lk) × causal × (batch, heads). Under the interpreter (no CUDA) two of the eight
    small ((Lq, Lk), (batch, heads)) pairs per (dtype, head dim, causal), rotating so that every pair meets
    every head dim; the rest, and (1000, 1000) always, run only on a GPU."""
    cases = []
    for i, (dtype, d, causal) in enumerate(itertools.product(DTYPES, HEAD_DIMS, [False, True])):
        for j, (seq, bh) in enumerate(itertools.product(SEQS, BATCH_HEADS)):
            small = j in ((i * 3) % 8, (i * 3 + 4) % 8)  # 8 = the (seq, bh) pairs without (1000, 1000)
            marks = () if CUDA or small else pytest.mark.skip(reason="full grid runs on CUDA only")
            cases.append(pytest.param(dtype, d, seq, causal, bh, marks=marks))
    return cases


def make_qkv(bsz, heads, lq, lk, d, dtype, *, heads_kv=None, layout="bhld", seed=0, device=DEVICE):
    """q (B, H, Lq, D), k/v (B, H_kv, Lk, D), dout like q; layout "blhd" gives transposed [B, L, H, D] views."""
    heads_kv = heads_kv or heads
    gen = torch.Generator().manual_seed(seed)

    def rand(h, length):
        if layout == "blhd":
            return torch.randn(bsz, length, h, d, generator=gen).to(dtype).to(device).transpose(1, 2)
        return torch.randn(bsz, h, length, d, generator=gen).to(dtype).to(device)

    return rand(heads, lq), rand(heads_kv, lk), rand(heads_kv, lk), rand(heads, lq)


def run(fn, q, k, v, dout, **kw):
    """Output and (dq, dk, dv) of fn through autograd; the leaves keep the inputs' strides (no clone)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def ref64(q, k, v, dout, causal=False, scale=None):
    ref = lambda *a: attention_ref(*a, causal=causal, scale=scale)  # noqa: E731
    return run(ref, q.double(), k.double(), v.double(), dout.double())


@contextlib.contextmanager
def low_precision_math():
    """PyTorch's math SDPA computing in the input dtype (as eager attention in fp16/bf16 does), not upcast."""
    prev = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(prev)


def eager(q, k, v, dout, **kw):
    with low_precision_math():
        return run(F.scaled_dot_product_attention, q, k, v, dout, **kw)


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def check_close(name, ours, eager_out, ref, dtype):
    """Ours must be no worse than 2x eager PyTorch at the same dtype, with a one-ulp floor."""
    floor = torch.finfo(dtype).eps * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    limit = max(2 * max_err(eager_out, ref), floor)
    err = max_err(ours, ref)
    assert not ours.isnan().any(), f"{name}: NaN in output"
    assert err <= limit, f"{name}: max error {err:.3g} > {limit:.3g} (eager {max_err(eager_out, ref):.3g})"


def check_all(out, grads, q, k, v, dout, dtype, **kw):
    """out and (dq, dk, dv) against the float64 reference, within 2x of eager's error."""
    causal, scale = kw.get("is_causal", False), kw.get("scale")
    out_ref, grads_ref = ref64(q, k, v, dout, causal, scale)
    out_eager, grads_eager = eager(q, k, v, dout, **kw)
    check_close("out", out, out_eager, out_ref, dtype)
    for label, ours, eag, ref in zip(("dq", "dk", "dv"), grads, grads_eager, grads_ref):
        assert ours.dtype == dtype and ours.shape == ref.shape
        check_close(label, ours, eag, ref, dtype)


@pytest.fixture
def triton_backend():
    backends.set_backend(OP, "triton")
    yield


# ---- numerics ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, head_dim, seq, causal, bh", _grid())
def test_matches_reference(dtype, head_dim, seq, causal, bh, triton_backend, poison):
    (lq, lk), (bsz, heads) = seq, bh
    q, k, v, dout = make_qkv(bsz, heads, lq, lk, head_dim, dtype)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, is_causal=causal)
    assert sdxl_kernels.last_backend(OP) == "triton"
    assert out.dtype == dtype and out.shape == q.shape
    check_all(out, grads, q, k, v, dout, dtype, is_causal=causal)


# Tiles of 16/32 make the small shapes below span many blocks (BLOCK_M ≠ BLOCK_N both ways), so every
# loop phase (unmasked, causal diagonal, ragged end) and the GQA head loop run more than once.
SMALL_TILES = [
    (FwdConfig(32, 16, 4, 1), BwdConfig(16, 32, 32, 16, 4, 1)),
    (FwdConfig(16, 32, 4, 1), BwdConfig(32, 16, 16, 32, 4, 1)),
]


@pytest.mark.parametrize("tiles", SMALL_TILES, ids=["M>N", "M<N"])
@pytest.mark.parametrize("seq, causal", [((61, 45), True), ((45, 61), True), ((50, 50), True), ((33, 70), False)])
def test_many_small_tiles(tiles, seq, causal, monkeypatch, triton_backend, poison):
    fwd, bwd = tiles
    monkeypatch.setattr(attn, "fwd_config", lambda *a: fwd)
    monkeypatch.setattr(attn, "bwd_config", lambda *a: bwd)
    q, k, v, dout = make_qkv(2, 4, *seq, 40, torch.float16, heads_kv=2)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, is_causal=causal, enable_gqa=True)
    check_all(out, grads, q, k, v, dout, torch.float16, is_causal=causal, enable_gqa=True)


class _Spy:
    """Stands in for a @triton.jit kernel and records the TMA flag of each launch."""

    def __init__(self, kernel):
        self.kernel, self.tma = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tma.append(kwargs["TMA"])
            return self.kernel[grid](*args, **kwargs)

        return launch


def spy_kernels(monkeypatch) -> dict[str, _Spy]:
    spies = {}
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        spies[name] = _Spy(getattr(attn, name))
        monkeypatch.setattr(attn, name, spies[name])
    return spies


# The Hopper path (TMA tensor descriptors in the forward and in both backward loops) under the interpreter:
# small tiles, ragged ends both ways, padded head dims, GQA, diffusers' [B, L, H, D] views.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, seq, causal, layout", [
    (40, (61, 45), True, "bhld"), (64, (45, 61), True, "blhd"), (80, (33, 77), False, "blhd"),
    (64, (50, 50), False, "bhld"),
])  # fmt: skip
def test_tma_kernels(dtype, head_dim, seq, causal, layout, monkeypatch, triton_backend, poison):
    monkeypatch.setattr(attn, "fwd_config", lambda *a, **k: FwdConfig(32, 16, 4, 1, tma=True))
    monkeypatch.setattr(attn, "bwd_config", lambda *a, **k: BwdConfig(16, 32, 32, 16, 4, 1, tma=True))
    spies = spy_kernels(monkeypatch)
    q, k, v, dout = make_qkv(2, 4, *seq, head_dim, dtype, heads_kv=2, layout=layout)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, is_causal=causal, enable_gqa=True)
    assert all(spy.tma == [True] for spy in spies.values())
    check_all(out, grads, q, k, v, dout, dtype, is_causal=causal, enable_gqa=True)


def test_hopper_tables_take_tma_and_fall_back_for_unaligned(monkeypatch, triton_backend, poison):
    """With sm_90's tables: aligned inputs go through TMA; rows 59 elements apart cannot (TMA needs 16-byte
    strides) and run the pointer loads (the forward with the sm_80 tiles), still correct."""
    monkeypatch.setattr(attn, "_arch", lambda device: 90)
    spies = spy_kernels(monkeypatch)
    q, k, v, dout = make_qkv(1, 2, 45, 77, 64, torch.float16)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout)
    assert all(spy.tma == [True] for spy in spies.values()) and attn.tma_reason(q, k, v) is None
    check_all(out, grads, q, k, v, dout, torch.float16)

    q, k, v, dout = make_qkv(1, 2, 45, 77, 59, torch.float16)
    assert "multiple of 8" in attn.tma_reason(q, k, v)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout)
    assert all(spy.tma == [True, False] for spy in spies.values())
    check_all(out, grads, q, k, v, dout, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blhd_views_and_flash_attention(dtype, triton_backend, poison):
    """diffusers' [B, L, H, D] tensors transposed to [B, H, L, D]: no copies, output in the same layout."""
    q, k, v, dout = make_qkv(2, 3, 70, 77, 64, dtype, layout="blhd")
    assert not q.is_contiguous()
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, is_causal=True)
    assert out.transpose(1, 2).is_contiguous(), "output keeps query's [B, L, H, D] memory layout"
    assert all(g.stride() == t.stride() for g, t in zip(grads, (q, k, v)))
    check_all(out, grads, q, k, v, dout, dtype, is_causal=True)

    blhd = [t.transpose(1, 2) for t in (q, k, v, dout)]  # contiguous (B, L, H, D)
    out2, grads2 = run(lambda *a: flash_attention(*a, causal=True), *blhd)
    assert out2.is_contiguous() and out2.shape == blhd[0].shape
    assert torch.equal(out2.transpose(1, 2), out)
    for g2, g in zip(grads2, grads):
        assert torch.equal(g2.transpose(1, 2), g)


def test_arbitrary_strides(triton_backend, poison):
    """Rows padded inside a wider buffer, a key with a non-unit head-dim stride, a value broadcast over the
    batch (stride 0), an odd head dim (row strides not multiples of 8: the unaligned path), and a custom scale."""
    d = 59
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 50, d + 5, generator=gen).half().to(DEVICE)[..., :d]
    k = torch.randn(2, 3, d, 45, generator=gen).half().to(DEVICE).transpose(-1, -2)
    v = torch.randn(1, 3, 45, d, generator=gen).half().to(DEVICE).expand(2, 3, 45, d)
    dout = torch.randn(2, 3, 50, d, generator=gen).half().to(DEVICE)
    assert k.stride(-1) != 1 and v.stride(0) == 0 and q.stride(2) == d + 5
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, scale=0.3)
    assert attn._stride_kwargs(q=q, k=k, v=v)[1] == 1  # row strides 59·45: not multiples of 8
    check_all(out, grads, q, k, v, dout, torch.float16, scale=0.3)


@pytest.mark.parametrize("head_dim", [16, 32, 256])
def test_head_dim_extremes(head_dim, triton_backend, poison):
    q, k, v, dout = make_qkv(1, 2, 45, 61, head_dim, torch.bfloat16)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, is_causal=True)
    check_all(out, grads, q, k, v, dout, torch.bfloat16, is_causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention(causal, triton_backend, poison):
    q, k, v, dout = make_qkv(2, 6, 40, 33, 64, torch.bfloat16, heads_kv=2)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, is_causal=causal, enable_gqa=True)
    assert sdxl_kernels.last_backend(OP) == "triton"
    check_all(out, grads, q, k, v, dout, torch.bfloat16, is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("arch, sms", [(90, 132), (80, 108)], ids=["H100/H200", "A100"])
def test_cross_attention_backward_plan_fills_the_gpu(arch, sms):
    """SDXL's cross-attention backward, [2, 10, 4096, 64] queries × 77 keys: the dK/dV grid of the arch's table
    config is split over the queries until it has at least 2 programs per SM; self-attention is not split."""
    cfg = attn.bwd_config(64, DEVICE, arch=arch)
    split, per = attn.dkdv_split(4096, 77, 20, cfg.block_m1, cfg.block_n1, sms)
    grid = -(-77 // cfg.block_n1) * 20 * split
    assert split > 1 and grid >= 2 * sms and per % cfg.block_m1 == 0 and (split - 1) * per < 4096 <= split * per
    assert attn.dkdv_split(4096, 4096, 20, cfg.block_m1, cfg.block_n1, sms)[0] == 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_kv", [4, 2])
def test_split_dkdv_matches_and_is_bitwise_deterministic(causal, heads_kv, monkeypatch, triton_backend, poison):
    """The split query range (planned here for a pretend 40-SM GPU, so the small shape splits 4 ways): float32
    partials summed in a fixed order give the reference gradients, the same bits on every run."""
    monkeypatch.setattr(attn, "_split_sms", lambda device: 40)
    splits = []
    real = attn.dkdv_split
    monkeypatch.setattr(attn, "dkdv_split", lambda *a: splits.append(real(*a)) or splits[-1])
    q, k, v, dout = make_qkv(2, 4, 61, 45, 64, torch.bfloat16, heads_kv=heads_kv)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, is_causal=causal, enable_gqa=True)
    assert splits and splits[-1][0] > 1
    check_all(out, grads, q, k, v, dout, torch.bfloat16, is_causal=causal, enable_gqa=True)
    _, again = run(scaled_dot_product_attention, q, k, v, dout, is_causal=causal, enable_gqa=True)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


def test_lse_is_the_row_logsumexp(triton_backend, poison):
    q, k, v, _ = make_qkv(2, 2, 37, 50, 80, torch.float16)
    out, lse = flash_attention_fwd_op(q, k, v, True, 0.2)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.2
    scores = scores.masked_fill(~torch.ones(37, 50, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 37)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-3, rtol=1e-4)


def test_backward_is_deterministic(triton_backend):
    q, k, v, dout = make_qkv(2, 4, 150, 130, 80, torch.bfloat16, heads_kv=2)
    _, first = run(scaled_dot_product_attention, q, k, v, dout, is_causal=True, enable_gqa=True)
    _, second = run(scaled_dot_product_attention, q, k, v, dout, is_causal=True, enable_gqa=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_inference_path_equals_autograd_path(triton_backend):
    q, k, v, _ = make_qkv(1, 2, 65, 77, 40, torch.float16)
    with torch.no_grad():
        fast = scaled_dot_product_attention(q, k, v)
    slow = scaled_dot_product_attention(q.requires_grad_(), k, v).detach()
    assert torch.equal(fast, slow)


# ---- zero sizes, bad input, fallback ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 2, 0, 5), (1, 2, 5, 0), (0, 2, 5, 5), (1, 2, 0, 0)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_zero_sizes_match_pytorch(shape, causal, triton_backend, poison):
    bsz, heads, lq, lk = shape
    q, k, v, dout = make_qkv(bsz, heads, lq, lk, 32, torch.float16)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, is_causal=causal)
    cpu = [t.cpu() for t in (q, k, v, dout)]
    out_pt, grads_pt = run(F.scaled_dot_product_attention, *cpu, is_causal=causal)  # PyTorch's math on the CPU
    assert torch.equal(out.cpu(), out_pt)  # zeros when there are no keys
    for g, g_pt in zip(grads, grads_pt):
        assert torch.equal(g.cpu(), g_pt)


def _bad_inputs():
    t = lambda *s, dtype=torch.float16: torch.randn(*s).to(dtype)  # noqa: E731
    return {
        "batch": (t(2, 2, 5, 8), t(3, 2, 5, 8), t(3, 2, 5, 8)),
        "heads": (t(1, 2, 5, 8), t(1, 3, 5, 8), t(1, 3, 5, 8)),
        "head dim": (t(1, 2, 5, 8), t(1, 2, 5, 16), t(1, 2, 5, 16)),
        "dtype": (t(1, 2, 5, 8), t(1, 2, 5, 8, dtype=torch.bfloat16), t(1, 2, 5, 8)),
        "device": (t(1, 2, 5, 8), t(1, 2, 5, 8).to("meta"), t(1, 2, 5, 8)),
        "rank": (t(8), t(8), t(8)),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_like_pytorch(case):
    """Automatic choice: what PyTorch's SDPA raises, we raise (the torch backend serves invalid inputs)."""
    q, k, v = _bad_inputs()[case]
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(type(theirs.value), match=None) as ours:
        scaled_dot_product_attention(q, k, v)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_forced_triton_says_why(case, triton_backend):
    q, k, v = _bad_inputs()[case]
    with pytest.raises(RuntimeError, match="forced backend 'triton' cannot serve"):
        scaled_dot_product_attention(q, k, v)


def test_head_dim_over_256(triton_backend):
    q, k, v, _ = make_qkv(1, 1, 4, 4, 264, torch.float16)
    with pytest.raises(RuntimeError, match="head dim 264 outside 1..256"):
        scaled_dot_product_attention(q, k, v)
    backends.set_backend(OP, None)
    out = scaled_dot_product_attention(q, k, v)  # PyTorch serves it
    assert sdxl_kernels.last_backend(OP) == "torch"
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q: flash_attention(q[0], q[0], q[0]), ValueError, "q must have shape"),
        (lambda q: flash_attention(q, q[:1], q[:1]), ValueError, "batch"),
        (lambda q: flash_attention(q, q[..., :16], q[..., :16]), ValueError, "head dim"),
        (lambda q: flash_attention(q, q[:, :, :3], q[:, :, :3]), ValueError, "must divide"),
        (lambda q: flash_attention(q, q, q.float()), TypeError, "one dtype"),
        (lambda q: flash_attention(q, q.to("meta"), q), ValueError, "one device"),
        (lambda q: flash_attention(q, q, q[:, :3]), ValueError, "must agree"),
        (lambda q: flash_attention(q.tolist(), q, q), TypeError, "q must be a torch.Tensor"),
        (lambda q: flash_attention(q, q, q.int()), TypeError, "floating-point"),
    ],
)
def test_flash_attention_bad_input(call, error, match):
    q = torch.randn(2, 5, 4, 32, dtype=torch.float16)
    with pytest.raises(error, match=match):
        call(q)


@pytest.mark.parametrize(
    "kwargs, dtype",
    [
        (dict(attn_mask=torch.ones(9, 7, dtype=torch.bool).tril()), torch.float16),
        (dict(dropout_p=0.5), torch.float16),
        ({}, torch.float32),
        (dict(is_causal=True), torch.float64),
    ],
    ids=["mask", "dropout", "fp32", "fp64"],
)
def test_unsupported_goes_to_torch(kwargs, dtype):
    q, k, v, _ = make_qkv(1, 2, 9, 7, 16, dtype)
    kwargs = {key: val.to(q.device) if isinstance(val, torch.Tensor) else val for key, val in kwargs.items()}
    torch.manual_seed(0)
    out = scaled_dot_product_attention(q, k, v, **kwargs)
    assert sdxl_kernels.last_backend(OP) == "torch"
    torch.manual_seed(0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, **kwargs))
    backends.set_backend(OP, "triton")
    with pytest.raises(RuntimeError, match="cannot serve"):
        scaled_dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_kv", [3, 1])
def test_torch_backend_inside_the_op(causal, heads_kv, monkeypatch):
    """Inputs no kernel takes (float32 here) still go through the op under autograd: PyTorch's SDPA serves
    forward and backward, and the op's lse is the exact row logsumexp (computed a few rows at a time)."""
    monkeypatch.setattr(attn, "LSE_CHUNK", 64)  # several chunks even at this size
    q, k, v, dout = make_qkv(2, 3, 21, 17, 16, torch.float32, heads_kv=heads_kv)
    gqa = heads_kv != 3
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, is_causal=causal, enable_gqa=gqa)
    assert sdxl_kernels.last_backend(OP) == "torch"
    out_ref, grads_ref = ref64(q, k, v, dout, causal)
    torch.testing.assert_close(out, out_ref.float(), atol=1e-5, rtol=1e-5)
    for ours, ref in zip(grads, grads_ref):
        torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)
    _, lse = flash_attention_fwd_op(q, k, v, causal, 0.25)
    kk = k.double().repeat_interleave(3 // heads_kv, dim=1)
    scores = (q.double() @ kk.transpose(-1, -2)) * 0.25
    if causal:
        scores = scores.masked_fill(~torch.ones(21, 17, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_forward_on_torch_backward_on_triton(poison):
    """The lse of the torch backend is exact, so the Triton backward may follow it (a backend forced between
    forward and backward)."""
    q, k, v, dout = make_qkv(1, 2, 37, 29, 64, torch.float16)
    backends.set_backend(OP, "torch")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention(*leaves)
    backends.set_backend(OP, "triton")
    out.backward(dout)
    assert sdxl_kernels.last_backend(OP) == "triton"
    check_all(out.detach(), [t.grad for t in leaves], q, k, v, dout, torch.float16)


def test_signature_matches_pytorch():
    q = torch.randn(1, 1, 3, 8)
    for fn in (F.scaled_dot_product_attention, scaled_dot_product_attention):
        fn(q, q, q, None, 0.0, False, scale=0.5, enable_gqa=False)
        with pytest.raises(TypeError):
            fn(q, q, q, None, 0.0, False, 0.5)  # scale is keyword-only


def test_automatic_choice():
    """CUDA fp16 goes to Triton; CPU tensors go to PyTorch unless Triton is forced (interpreter)."""
    q, k, v, _ = make_qkv(1, 2, 9, 7, 16, torch.float16)
    scaled_dot_product_attention(q, k, v)
    assert sdxl_kernels.last_backend(OP) == ("triton" if CUDA else "torch")


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_no_extension_backends_for_attention(name):
    backends.set_backend(OP, name)
    q, k, v, _ = make_qkv(1, 2, 9, 7, 16, torch.float16)
    with pytest.raises(RuntimeError, match="not implemented for this op"):
        scaled_dot_product_attention(q, k, v)


# ---- registration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(causal, triton_backend):
    q, k, v, dout = make_qkv(1, 2, 19, 23, 40, torch.float16, layout="blhd")
    torch.library.opcheck(flash_attention_fwd_op, (q.requires_grad_(), k.requires_grad_(), v, causal, 0.15))
    out, lse = flash_attention_fwd_op(q.detach(), k.detach(), v, causal, 0.15)
    torch.library.opcheck(flash_attention_bwd_op, (dout, q.detach(), k.detach(), v, out, lse, causal, 0.15))


def test_torch_compile_fullgraph(triton_backend):
    """The op and its backward trace into one graph (CPU: the interpreter runs the kernels)."""
    import torch._dynamo

    torch._dynamo.reset()

    def f(x, w):
        qkv = (x @ w).unflatten(-1, (3, 2, 32))  # (B, L, 3, H, D)
        q, k, v = qkv.unbind(2)  # (B, L, H, D) views
        out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.float().square().mean()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 16, generator=gen).half().to(DEVICE)
    w = (0.3 * torch.randn(16, 192, generator=gen)).half().to(DEVICE).requires_grad_()
    loss = torch.compile(f, fullgraph=True)(x, w)
    loss.backward()
    w_ref = w.detach().clone().requires_grad_()
    loss_ref = f(x, w_ref)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=2e-3, rtol=2e-3)


# ---- random shapes ---------------------------------------------------------------------------------------------


@settings(max_examples=examples(6, 12), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    bsz=st.integers(1, 2),
    heads_kv=st.integers(1, 2),
    group=st.integers(1, 2),
    lq=st.integers(1, 80),
    lk=st.integers(1, 80),
    head_dim=st.integers(16, 96),
    causal=st.booleans(),
    bf16=st.booleans(),
    layout=st.sampled_from(["bhld", "blhd"]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_random_shapes(bsz, heads_kv, group, lq, lk, head_dim, causal, bf16, layout, seed):
    dtype = torch.bfloat16 if bf16 else torch.float16
    backends.set_backend(OP, "triton")
    heads = heads_kv * group
    q, k, v, dout = make_qkv(bsz, heads, lq, lk, head_dim, dtype, heads_kv=heads_kv, layout=layout, seed=seed)
    kw = dict(is_causal=causal, enable_gqa=group > 1)
    out, grads = run(scaled_dot_product_attention, q, k, v, dout, **kw)
    check_all(out, grads, q, k, v, dout, dtype, **kw)
