"""check: our kernels on the GPU, compiled (no interpreter), against float32 references computed on the GPU.

Planned ~60-100 s on an H100/H200 (cap 110 s), nearly all of it Triton's JIT compiling the ~12 kernel variants
these cases pick (4 kernels each); the arithmetic is a few hundred milliseconds.

Each case runs forward and backward of our op on its forced backend (so a case it cannot serve fails instead
of quietly running PyTorch), with the caching allocator first filled with NaN (so an output element a kernel
never writes shows up), and compares with a float32 reference (TF32 off) computed independently from the
formula (sdxl_kernels.reference) on the same low-precision inputs. The limit is twice the error PyTorch's own
op makes in the same dtype against that reference, plus a floor of a few ulps of the largest reference value:
    max |ours - ref| ≤ 2 · max |eager - ref| + FLOOR[dtype] · max |ref|
for the output and for every gradient. Each row records the backend that served it (`last_backend`) and, for
attention, the path the forward took ("tma": Hopper's tensor descriptors; "pointers").
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
ATTN_OP = "scaled_dot_product_attention"


@dataclasses.dataclass(frozen=True)
class AttnCase:
    label: str
    shape: tuple  # (B, H, Lq, Lk, D) on the GPU
    dry: tuple  # the same on a dry run
    dtypes: tuple = (torch.bfloat16,)
    layout: str = "bhld"  # "blhd": [B, L, H, D] tensors viewed as [B, H, L, D] (diffusers)
    causal: bool = False
    kv_heads: int | None = None  # GQA
    unaligned: bool = False  # rows padded to D + 1 elements: TMA cannot address them
    path: str | None = None  # the forward path the case must take, where it is fixed


BF, FP = torch.bfloat16, torch.float16
ATTENTION = (  # in order of importance: a step cut short by its cap has measured the first ones
    AttnCase("self-4096", (2, 10, 4096, 4096, 64), (1, 2, 64, 64, 64), (BF, FP)),
    AttnCase("self-4096-blhd", (2, 10, 4096, 4096, 64), (1, 2, 64, 64, 64), (BF,), layout="blhd"),
    AttnCase("cross-77-4096", (2, 10, 4096, 77, 64), (1, 2, 64, 77, 64), (BF, FP), layout="blhd"),
    AttnCase("self-1024", (2, 20, 1024, 1024, 64), (1, 2, 32, 32, 64), (BF,), layout="blhd"),
    AttnCase("cross-77-1024", (2, 20, 1024, 77, 64), (1, 2, 32, 77, 64), (BF,), layout="blhd"),
    AttnCase("ragged-97x77", (2, 10, 97, 77, 64), (1, 2, 97, 77, 64), (BF,)),
    AttnCase("d40", (2, 8, 1024, 1024, 40), (1, 2, 48, 48, 40), (BF, FP)),
    AttnCase("d80", (2, 8, 1024, 1024, 80), (1, 2, 48, 48, 80), (BF, FP)),
    AttnCase("d128", (2, 8, 1024, 1024, 128), (1, 2, 48, 48, 128), (BF,)),
    AttnCase("d160", (2, 8, 256, 256, 160), (1, 2, 32, 32, 160), (BF,)),
    AttnCase("causal", (2, 10, 1024, 1024, 64), (1, 2, 48, 48, 64), (BF,), causal=True),
    AttnCase("gqa", (2, 10, 1024, 1024, 64), (1, 4, 32, 32, 64), (BF,), kv_heads=2),
    AttnCase("unaligned", (2, 10, 1000, 1000, 64), (1, 2, 40, 40, 64), (BF,), unaligned=True, path="pointers"),
)
GN_SHAPES = (  # (label, GPU shape, dry shape): the GroupNorms of SDXL at 1024² (UNet 128², 64², 32²; VAE 256²)
    ("unet-128", (2, 320, 128, 128), (1, 320, 8, 8)),
    ("unet-64", (2, 640, 64, 64), (1, 640, 4, 4)),
    ("unet-32", (2, 1280, 32, 32), (1, 1280, 2, 2)),
    ("vae-256", (1, 512, 256, 256), (1, 512, 4, 4)),
)
GROUPS, EPS = 32, 1e-5


def poison(device: torch.device, nbytes: int) -> None:
    """Fill the caching allocator's free blocks with NaN bytes (0xFF), so outputs allocated next start as NaN."""
    if device.type == "cuda":
        torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(255)  # freed at once, NaN bytes left behind


def err(got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got.double() - ref.double()).abs().max().item()
    return diff if math.isfinite(diff) else float("inf")


def verdict(got, eager, ref, dtype) -> dict:
    e, base = err(got, ref), err(eager, ref)
    limit = 2 * base + FLOOR[dtype] * ref.abs().max().item()
    return {"max_err": e, "eager_err": base, "limit": limit, "passed": bool(e <= limit)}


# ---- attention ------------------------------------------------------------------------------------------------


def attn_inputs(case: AttnCase, dtype, device, dry: bool):
    b, h, lq, lk, d = case.dry if dry else case.shape
    hk = case.kv_heads or h
    g = torch.Generator(device=device).manual_seed(0)

    def make(heads, n):
        if case.unaligned:  # (B, H, n, D) inside rows of D + 1: row stride 65, not a multiple of 8
            return torch.randn(b, heads, n, d + 1, device=device, dtype=dtype, generator=g)[..., :d]
        if case.layout == "blhd":
            return torch.randn(b, n, heads, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
        return torch.randn(b, heads, n, d, device=device, dtype=dtype, generator=g)

    return make(h, lq), make(hk, lk), make(hk, lk), make(h, lq)  # q, k, v, dout


def _forward_backward(fn, q, k, v, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # detach keeps the strides
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


def check_attention(ctx, case: AttnCase, dtype) -> list[str]:
    import sdxl_kernels
    from sdxl_kernels.ops import attention
    from sdxl_kernels.reference import attention_ref

    from .. import timing

    device = ctx.device
    q, k, v, dout = attn_inputs(case, dtype, device, ctx.dry_run)
    gqa = k.shape[1] != q.shape[1]
    flags = dict(is_causal=case.causal, enable_gqa=gqa)
    ours = lambda q, k, v: sdxl_kernels.scaled_dot_product_attention(q, k, v, **flags)  # noqa: E731
    eager = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **flags)  # noqa: E731
    f32 = torch.float32
    ref = lambda q, k, v: attention_ref(q, k, v, case.causal, compute_dtype=f32, out_dtype=f32)  # noqa: E731
    base = dict(op="attention", label=case.label, shape=list(case.dry if ctx.dry_run else case.shape),
                dtype=str(dtype).removeprefix("torch."), layout="unaligned" if case.unaligned else case.layout,
                causal=case.causal, provider="ours-triton")  # fmt: skip
    with _no_tf32():
        want_out, want_grads = _forward_backward(ref, q, k, v, dout)
    eager_out, eager_grads = _forward_backward(eager, q, k, v, dout)
    poison(device, 4 * q.numel() * q.element_size())
    with timing.forced_backend(ATTN_OP, "ours-triton"):
        path = attention.forward_path(q, k, v)
        got_out, got_grads = _forward_backward(ours, q, k, v, dout)
        backend = sdxl_kernels.last_backend(ATTN_OP)
    failures = []
    fwd = verdict(got_out, eager_out, want_out, dtype)
    bwd = {name: verdict(g, e, w, dtype) for name, g, e, w in zip(("dq", "dk", "dv"), got_grads, eager_grads,
                                                                     want_grads)}  # fmt: skip
    path_ok = case.path is None or path == case.path
    ctx.row(**base, mode="fwd", backend=backend, path=path, **fwd, path_ok=path_ok)
    passed = all(r["passed"] for r in bwd.values())
    worst = max(bwd.values(), key=lambda r: r["max_err"] / max(r["limit"], 1e-30))
    ctx.row(**base, mode="bwd", backend=backend, path=path, grads=bwd, passed=passed,
            max_err=worst["max_err"], limit=worst["limit"])  # fmt: skip
    tag = f"attention {case.label} {base['dtype']}"
    if not fwd["passed"]:
        failures.append(f"{tag} fwd: max err {fwd['max_err']:.3g} > {fwd['limit']:.3g}")
    if not passed:
        failures.append(f"{tag} bwd: " + ", ".join(f"{n} {r['max_err']:.3g}/{r['limit']:.3g}" for n, r in bwd.items()))
    if not path_ok:
        failures.append(f"{tag}: forward took the {path} path, expected {case.path}")
    if backend != "triton":
        failures.append(f"{tag}: served by {backend!r}, not triton")
    return failures


class _no_tf32:
    """References in true float32: TF32 matmuls would carry ~1e-3 relative error of their own."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


# ---- GroupNorm + SiLU -------------------------------------------------------------------------------------------


def check_group_norm(ctx, label: str, shape: tuple, layout: str, dtype) -> list[str]:
    import sdxl_kernels
    from sdxl_kernels.reference import group_norm_silu_ref

    from .. import timing

    device = ctx.device
    g = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    c = shape[1]
    x = (torch.randn(shape, device=device, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    w = (1 + 0.1 * torch.randn(c, device=device, generator=g)).to(dtype)
    b = (0.1 * torch.randn(c, device=device, generator=g)).to(dtype)
    dy = torch.randn(shape, device=device, generator=g).to(dtype).contiguous(memory_format=fmt)

    def fwd_bwd(fn, compute):
        leaves = [t.detach().to(compute).requires_grad_() for t in (x, w, b)]
        y = fn(*leaves)
        return y.detach(), torch.autograd.grad(y, leaves, dy.to(compute))

    want, want_g = fwd_bwd(lambda x, w, b: group_norm_silu_ref(x, GROUPS, w, b, EPS), torch.float64)
    eager, eager_g = fwd_bwd(lambda x, w, b: F.silu(F.group_norm(x, GROUPS, w, b, EPS)), dtype)
    poison(device, 2 * x.numel() * x.element_size())
    with timing.forced_backend("group_norm_silu", "ours-triton"):
        got, got_g = fwd_bwd(lambda x, w, b: sdxl_kernels.group_norm_silu(x, GROUPS, w, b, EPS), dtype)
        backend = sdxl_kernels.last_backend("group_norm_silu")
    base = dict(op="group_norm_silu", label=f"{label}-{layout}", shape=list(shape), layout=layout,
                dtype=str(dtype).removeprefix("torch."), provider="ours-triton", backend=backend)  # fmt: skip
    fwd = verdict(got, eager, want, dtype)
    fmt_ok = got.stride() == x.stride()
    ctx.row(**base, mode="fwd", **fwd, keeps_layout=fmt_ok)
    bwd = {n: verdict(a, e, r, dtype) for n, a, e, r in zip(("dx", "dweight", "dbias"), got_g, eager_g, want_g)}
    ctx.row(**base, mode="bwd", grads=bwd, passed=all(r["passed"] for r in bwd.values()))
    tag = f"group_norm_silu {label} {layout}"
    failures = [] if fwd["passed"] else [f"{tag} fwd: {fwd['max_err']:.3g} > {fwd['limit']:.3g}"]
    failures += [f"{tag} {n}: {r['max_err']:.3g} > {r['limit']:.3g}" for n, r in bwd.items() if not r["passed"]]
    failures += [] if fmt_ok else [f"{tag}: the output does not keep x's memory format"]
    failures += [] if backend == "triton" else [f"{tag}: served by {backend!r}"]
    return failures


# ---- fourier_embedding -------------------------------------------------------------------------------------------


def check_fourier(ctx) -> list[str]:
    import sdxl_kernels
    from sdxl_kernels.reference import fourier_embedding_ref

    from .. import timing

    device = ctx.device
    micro = torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [896, 1152, 64, 0, 1024, 1024]], device=device).float()
    t = torch.tensor([999.0, 421.5], device=device)
    failures = []
    for label, values, dim in (("micro-conditioning", micro, 256), ("timestep", t, 320)):
        cols = values.shape[1] * dim if values.dim() == 2 else dim
        y = torch.full((values.shape[0], 1280 + cols), float("nan"), device=device)  # written in place, poisoned
        with timing.forced_backend("fourier_embedding", "ours-triton"):
            sdxl_kernels.fourier_embedding(values, dim, out=y[:, 1280:])
            backend = sdxl_kernels.last_backend("fourier_embedding")
        want = fourier_embedding_ref(values.double(), dim).reshape(values.shape[0], cols)
        got = y[:, 1280:]
        eager = fourier_embedding_ref(values, dim, compute_dtype=torch.float32).reshape(values.shape[0], cols)
        e, base = err(got, want), err(eager, want)
        limit = 2 * base + 1e-6
        untouched = bool(torch.isnan(y[:, :1280]).all())  # the columns before the slice are left alone
        ctx.row(op="fourier_embedding", label=label, shape=list(values.shape) + [dim], dtype="float32", mode="fwd",
                provider="ours-triton", backend=backend, max_err=e, eager_err=base, limit=limit, passed=e <= limit,
                outside_untouched=untouched)  # fmt: skip
        if e > limit or not untouched or backend != "triton":
            failures.append(f"fourier_embedding {label}: err {e:.3g} (limit {limit:.3g}), outside untouched "
                            f"{untouched}, backend {backend}")  # fmt: skip
    return failures


def run(ctx) -> list[str]:
    failures = []

    def attempt(what: str, fn, *args):
        try:
            failures.extend(fn(ctx, *args))
        except Exception as exc:  # a crash is a failed case with its reason; the next case still runs
            ctx.row(op=what.split()[0], label=what, error=f"{type(exc).__name__}: {exc}"[:2000], passed=False)
            failures.append(f"{what}: {type(exc).__name__}: {exc}"[:500])
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    for case in ATTENTION:
        for dtype in case.dtypes:
            attempt(f"attention {case.label} {dtype}", check_attention, case, dtype)
    for label, shape, dry in GN_SHAPES:
        for layout in ("nchw", "channels_last"):
            attempt(f"group_norm_silu {label} {layout}", check_group_norm, label, dry if ctx.dry_run else shape,
                    layout, torch.bfloat16)  # fmt: skip
    attempt("fourier_embedding", check_fourier)
    return failures
