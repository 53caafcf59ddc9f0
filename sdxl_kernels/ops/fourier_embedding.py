"""Fourier (sinusoidal) embedding of timesteps and SDXL's micro-conditioning, all values in one launch.

For a scalar v and half = dim // 2 frequencies f_j = exp(-ln(max_period) · j / (half - shift)):

    a_j = v · f_j                          (float32, the same product sgm and diffusers compute)
    emb = [cos a, sin a]  (flip_sin_to_cos, sgm)   or   [sin a, cos a]  (diffusers' default)
    + one zero column when dim is odd

values (B, N) → (B, N·dim): the N embeddings of a row laid side by side, as sgm's ConcatTimestepEmbedderND.
The frequency table is computed once per (dim, max_period, shift, device) with torch.exp, exactly as the
official code does, so results agree to the rounding of cos/sin.

Backward: d emb / dv = f · [-sin a, cos a] (flip) or f · [cos a, -sin a].
"""
from __future__ import annotations

import dataclasses

import torch

from .. import backends, configs
from ..reference import fourier_embedding_ref, fourier_frequencies
from ._triton import TRITON_TYPES, KernelSpec, tl, triton

OP = "fourier_embedding"
FAMILY = "fourier_embedding"  # its launch configs in sdxl_kernels.configs
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class FourierConfig:
    """The kernel's launch, from the per-arch tables in sdxl_kernels/configs (one class, "all", for every dim)."""

    block: int  # frequencies per inner step
    num_warps: int


def config_class() -> str:
    """The fourier_embedding shape class: one, "all", for every dim."""
    return "all"


def _check_config(arch: int, cls: str, cfg: FourierConfig) -> None:
    """block a power of two in 32..4096, with one frequency per thread at least."""
    configs.check_pow2("block", cfg.block, 32, 4096)
    configs.check_launch(cfg)
    if cfg.block < 32 * cfg.num_warps:
        raise ValueError(f"block = {cfg.block}: must be at least 32 · num_warps = {32 * cfg.num_warps}")


# Sweep candidates (block, num_warps): SDXL's dims have 128 (micro-conditioning, 256) and 160 (timesteps, 320)
# frequencies, so blocks narrower than the table's 512 leave fewer lanes idle.
SWEEP = ((128, 1), (128, 2), (128, 4), (256, 2), (256, 4), (256, 8), (512, 8), (1024, 8))
CONFIG_FAMILIES = (
    configs.Family(
        FAMILY, FourierConfig, ("all",), _check_config,
        lambda arch, cls: [FourierConfig(*c) for c in SWEEP], config_class,
    ),
)  # fmt: skip

if triton is not None:

    @triton.jit
    def _fourier_kernel(
        v_ptr,  # (B*N,) float32
        freq_ptr,  # (HALF,) float32
        out_ptr,  # (B, N*DIM), row stride stride_ob, unit column stride
        N,
        HALF,
        DIM,
        stride_ob,
        FLIP: tl.constexpr,
        ODD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)  # one (b, i) value per program
        b = row // N
        i = row % N
        v = tl.load(v_ptr + row)
        base = out_ptr + b.to(tl.int64) * stride_ob + i * DIM
        for j0 in range(0, HALF, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            mask = j < HALF
            a = v * tl.load(freq_ptr + j, mask=mask, other=0.0)
            cos = tl.cos(a)
            sin = tl.sin(a)
            first = cos if FLIP else sin
            second = sin if FLIP else cos
            tl.store(base + j, first.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(base + HALF + j, second.to(out_ptr.dtype.element_ty), mask=mask)
        if ODD:
            tl.store(base + DIM - 1, tl.zeros([], out_ptr.dtype.element_ty))


def _specs(cfg: FourierConfig, archs: tuple, dtypes, variants, candidate: bool) -> list[KernelSpec]:
    specs = []
    for dtype in dtypes:
        ptrs = dict(v_ptr="fp32", freq_ptr="fp32", out_ptr=TRITON_TYPES[dtype])
        for flip, odd in variants:
            consts = dict(FLIP=flip, ODD=odd, BLOCK=cfg.block)
            label = f"{TRITON_TYPES[dtype]} FLIP={flip} ODD={odd} BLOCK={cfg.block}"
            label += f" w{cfg.num_warps} candidate" if candidate else ""
            kw = dict(num_warps=cfg.num_warps, archs=archs, candidate=candidate)
            specs.append(KernelSpec(_fourier_kernel, label, ptrs, consts, **kw))
    return specs


def compile_specs() -> list[KernelSpec]:
    """The table's config per arch × output dtype × ordering × odd/even dim; then each sweep candidate that is
    not the table's, labelled "candidate": float32 (the default output), cos first, even dim."""
    table = {arch: configs.table(arch)[FAMILY]["all"] for arch in configs.ARCHS}
    specs = []
    for cfg in dict.fromkeys(table.values()):
        archs = tuple(a for a, c in table.items() if c == cfg)
        specs += _specs(cfg, archs, OUT_DTYPES, [(f, o) for f in (True, False) for o in (False, True)], False)
    sweep: dict[FourierConfig, tuple] = {}
    for arch in configs.ARCHS:
        for cfg in configs.candidates(FAMILY, "all", arch)[1:]:
            sweep[cfg] = sweep.get(cfg, ()) + (arch,)
    for cfg, archs in sweep.items():
        specs += _specs(cfg, archs, (torch.float32,), [(True, False)], True)
    return specs


_freq_cache: dict[tuple, torch.Tensor] = {}


def frequencies(dim: int, max_period: float, shift: float, device: torch.device) -> torch.Tensor:
    key = (dim, max_period, shift, device)
    freqs = _freq_cache.get(key)
    if freqs is None:
        freqs = _freq_cache[key] = fourier_frequencies(dim, max_period, shift, torch.float32, device)
    return freqs


def _triton_run(values, out, dim, max_period, flip, shift):
    freqs = frequencies(dim, max_period, shift, values.device)
    bsz, n = values.shape
    half = dim // 2
    cfg = configs.get(FAMILY, "all", configs.device_arch(values.device))
    _fourier_kernel[(bsz * n,)](
        values, freqs, out, n, half, dim, out.stride(0),
        FLIP=flip, ODD=dim % 2 == 1, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip


def _ext_run(values, out, dim, max_period, flip, shift):
    freqs = frequencies(dim, max_period, shift, values.device)
    stream = torch.cuda.current_stream(values.device).cuda_stream if values.is_cuda else 0
    backends.extension().fourier_embedding(values, freqs, out, dim, flip, stream)


def _torch_run(values, out, dim, max_period, flip, shift):
    out.copy_(fourier_embedding_ref(values, dim, max_period, flip, shift))  # float32, as the kernels compute


def _kernel_reason(backend: str):
    def reason(values, out):
        why = backends.device_reason(values, backend)
        if why is not None:
            return why
        if out.dtype not in OUT_DTYPES:
            return f"output dtype {out.dtype} (kernels write float32/float16/bfloat16)"
        return None

    return reason


PREDICATES = {name: _kernel_reason(name) for name in ("triton", "cuda", "cpu")} | {"torch": lambda *a: None}
RUN = {"triton": _triton_run, "cuda": _ext_run, "cpu": _ext_run, "torch": _torch_run}


def _run(values, out, dim, max_period, flip, shift):
    backend = backends.select(OP, PREDICATES, values, out)
    if values.numel() == 0:
        return
    RUN[backend](values, out, dim, max_period, flip, shift)


# ---- torch.library ops ------------------------------------------------------------------------------------


@torch.library.custom_op("sdxl_kernels::fourier_embedding", mutates_args=())
def fourier_embedding_op(
    values: torch.Tensor, dim: int, max_period: float, flip_sin_to_cos: bool, shift: float, dtype: torch.dtype
) -> torch.Tensor:
    """values float32 (B, N) contiguous → (B, N·dim) of `dtype`."""
    return _embed(values, dim, max_period, flip_sin_to_cos, shift, dtype)


def _embed(values, dim, max_period, flip, shift, dtype):
    """The op's body: a new (B, N·dim) tensor of `dtype`, written by _run."""
    out = torch.empty(values.shape[0], values.shape[1] * dim, dtype=dtype, device=values.device)
    _run(values, out, dim, max_period, flip, shift)
    return out


@fourier_embedding_op.register_fake
def _(values, dim, max_period, flip_sin_to_cos, shift, dtype):
    return values.new_empty((values.shape[0], values.shape[1] * dim), dtype=dtype)


@torch.library.custom_op("sdxl_kernels::fourier_embedding_out", mutates_args=("out",))
def fourier_embedding_out_op(
    values: torch.Tensor, out: torch.Tensor, dim: int, max_period: float, flip_sin_to_cos: bool, shift: float
) -> None:
    """Writes values float32 (B, N) → out (B, N·dim), which may be a column slice of a wider tensor."""
    _run(values, out, dim, max_period, flip_sin_to_cos, shift)


@fourier_embedding_out_op.register_fake
def _(values, out, dim, max_period, flip_sin_to_cos, shift):
    return None


def _setup_context(ctx, inputs, output):
    values, dim, max_period, flip, shift, _ = inputs
    ctx.save_for_backward(values)
    ctx.dim, ctx.max_period, ctx.flip, ctx.shift = dim, max_period, flip, shift


def _backward(ctx, grad):
    (values,) = ctx.saved_tensors
    half = ctx.dim // 2
    freqs = fourier_frequencies(ctx.dim, ctx.max_period, ctx.shift, torch.float32, values.device)  # traceable
    a = values.unsqueeze(-1) * freqs  # (B, N, half)
    g = grad.float().reshape(*values.shape, ctx.dim)  # (B, N, dim)
    g_first, g_second = g[..., :half], g[..., half : 2 * half]
    if ctx.flip:  # [cos a, sin a]
        dv = (freqs * (-torch.sin(a) * g_first + torch.cos(a) * g_second)).sum(-1)
    else:  # [sin a, cos a]
        dv = (freqs * (torch.cos(a) * g_first - torch.sin(a) * g_second)).sum(-1)
    return dv, None, None, None, None, None


fourier_embedding_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ---------------------------------------------------------------------------------------------


def _check(values, dim, max_period, out):
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() not in (1, 2):
        raise ValueError(f"values must have shape (B,) or (B, N), got {tuple(values.shape)}")
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"values must be a real number tensor, got {values.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not max_period > 0:
        raise ValueError(f"max_period must be positive, got {max_period!r}")
    if out is None:
        return
    n = values.shape[1] if values.dim() == 2 else 1
    want = (values.shape[0], n * dim)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != want:
        raise ValueError(f"out must have shape {want}, got {tuple(out.shape)}")
    if out.device != values.device:
        raise ValueError(f"out is on {out.device} but values is on {values.device}")
    if not out.is_floating_point():
        raise TypeError(f"out must be a floating-point tensor, got {out.dtype}")
    if want[1] > 1 and out.stride(1) != 1:
        raise ValueError(f"out must have unit stride along its last dim, got strides {out.stride()}")
    if values.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("fourier_embedding(out=...) does not support autograd; call it without out=")


def fourier_embedding(
    values: torch.Tensor,
    dim: int,
    *,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sinusoidal embedding of every value, concatenated per row, in one kernel launch.

    values: (B,) → (B, dim), or (B, N) → (B, N·dim). Defaults equal sgm's `timestep_embedding` (cos first)
    and `ConcatTimestepEmbedderND`; `flip_sin_to_cos=False, downscale_freq_shift=1` equals diffusers'
    `get_timestep_embedding`. `out` (B, N·dim), e.g. a column slice of the whole ADM vector, is written in
    place and returned.
    """
    _check(values, dim, max_period, out)
    rows = values if values.dim() == 2 else values[:, None]  # (B, N)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.to(torch.float32).contiguous()
    args = (dim, float(max_period), flip_sin_to_cos, float(downscale_freq_shift))
    if out is None:
        return backends.call(fourier_embedding_op, _embed, (rows, *args, dtype), (rows,))
    backends.call(fourier_embedding_out_op, _run, (rows, out, *args), (rows,))
    return out
