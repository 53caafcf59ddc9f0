"""Fused GroupNorm + SiLU: Triton kernels → launchers → torch.library ops → autograd → function and module.

Math, per sample n and group g over the group's M = (C/G)·S elements (S = prod(spatial)):

    mean = Σ x / M,   var = Σ (x - mean)² / M,   rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) · rstd,   z = xhat · w[c] + b[c],   y = silu(z) = z · σ(z)

Backward, with dz = dy · σ(z) · (1 + z · (1 - σ(z)))  (dz = dy without the activation):

    dw[c] = Σ_{n,s} dz · xhat,   db[c] = Σ_{n,s} dz,   dxhat = dz · w[c]
    c1 = Σ_group dxhat · xhat / M,   c2 = Σ_group dxhat / M
    dx = rstd · (dxhat - c2 - xhat · c1)

The GPU has far more SMs than SDXL has (sample, group) pairs (2 × 32 = 64 ≪ 132), so the reduction over a
group is split along S into SPLIT programs. Each writes a partial (mean, M2) over its tiles, merged with
Chan's parallel formula (exact, no E[x²] - E[x]² cancellation):

    n = n_a + n_b,  δ = mean_b - mean_a,  mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n

x is read as (N, C, S) with strides (stride_n, stride_c, stride_s), which covers contiguous NCHW
(stride_s = 1) and channels-last (stride_c = 1) with one kernel; y, dy and dx share x's strides.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .. import backends, configs
from ._triton import TRITON_TYPES, KernelSpec, sm_count, tl, triton

OP = "group_norm_silu"
FAMILY = "group_norm_silu"  # its tile configs in sdxl_kernels.configs
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

MAX_SPLIT = 64
PART_CHUNK = 16  # backward partial sums read per step
# Without a cap ptxas (CUDA 13) settles near 72 registers and spills a few bytes; 128 leaves room for the
# pipelined loads and still fits 4 blocks of 128 threads per SM.
MAXNREG = 128


@dataclasses.dataclass(frozen=True)
class GroupNormConfig:
    """Tiles of all four kernels, from the per-arch tables in sdxl_kernels/configs by config_class(c_per_g)."""

    block_c: int  # channels per tile: at least the class's c_per_g, so one tile spans a group's channels
    block_s: int  # spatial positions per tile
    num_warps: int
    num_stages: int | None = None  # software pipelining of the tile loops; None = Triton's default


# Shape classes: "cN" serves c_per_g <= N; more channels per group than the last class loop over BLOCK_C chunks.
CLASS_C = (2, 4, 8, 16, 32, 64)
# Tile elements per thread, block_c · block_s / (32 · num_warps), at most: the backward reduce holds x, dy, xhat,
# dz and their products per element, and with 16 per thread it spills under MAXNREG (compile_check, both layouts).
MAX_PER_THREAD = 8


if triton is not None:

    @triton.jit
    def _gn_stats_kernel(
        x_ptr,  # (N, C, S) strided
        part_ptr,  # (N*G, SPLIT, 2) float32: partial mean, partial M2
        G,
        C_PER_G,
        S,
        S_PER_SPLIT,
        stride_xn,
        stride_xc,
        stride_xs,
        SPLIT,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid_ng = tl.program_id(0)
        pid_s = tl.program_id(1)
        n = pid_ng // G
        g = pid_ng % G
        x_base = x_ptr + n.to(tl.int64) * stride_xn + g * C_PER_G * stride_xc
        s_start = pid_s * S_PER_SPLIT
        s_end = tl.minimum(s_start + S_PER_SPLIT, S)
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for c0 in range(0, C_PER_G, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C_PER_G
            n_c = tl.minimum(C_PER_G - c0, BLOCK_C).to(tl.float32)
            for s0 in range(s_start, s_end, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < s_end)[None, :]
                ptrs = x_base + c[:, None] * stride_xc + s[None, :] * stride_xs
                x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                n_b = n_c * tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
                mean_b = tl.sum(tl.sum(x, axis=1), axis=0) / n_b
                d = tl.where(mask, x - mean_b, 0.0)
                m2_b = tl.sum(tl.sum(d * d, axis=1), axis=0)
                tot = cnt + n_b
                delta = mean_b - mean
                mean += delta * (n_b / tot)
                m2 += m2_b + delta * delta * (cnt * n_b / tot)
                cnt = tot
        out = part_ptr + (pid_ng * SPLIT + pid_s) * 2
        tl.store(out, mean)
        tl.store(out + 1, m2)

    @triton.jit
    def _gn_group_stats(
        part_ptr,
        pid_ng,
        C_PER_G,
        S,
        S_PER_SPLIT,
        eps,
        SPLIT,
        SPLIT_P2: tl.constexpr,
    ):
        # Merge the SPLIT partials of one group (Chan): mean = Σ n_k·mean_k / M, M2 = Σ M2_k + n_k·(mean_k - mean)².
        k = tl.arange(0, SPLIT_P2)
        kmask = k < SPLIT
        pm = tl.load(part_ptr + (pid_ng * SPLIT + k) * 2, mask=kmask, other=0.0)
        pm2 = tl.load(part_ptr + (pid_ng * SPLIT + k) * 2 + 1, mask=kmask, other=0.0)
        n_k = tl.where(kmask, C_PER_G * tl.minimum(S_PER_SPLIT, S - k * S_PER_SPLIT), 0).to(tl.float32)
        total = (C_PER_G * S).to(tl.float32)
        mean = tl.sum(n_k * pm, axis=0) / total
        dm = pm - mean
        m2 = tl.sum(pm2 + n_k * dm * dm, axis=0)
        rstd = 1.0 / tl.sqrt(m2 / total + eps)
        return mean, rstd

    @triton.jit
    def _load_affine(w_ptr, b_ptr, g, C_PER_G, c, cmask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """(w, b) of group g's channels c (BLOCK_C,) in float32: 1 and 0 where the module has none."""
        w = tl.full(c.shape, 1.0, tl.float32)
        b = tl.zeros(c.shape, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + g * C_PER_G + c, mask=cmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(b_ptr + g * C_PER_G + c, mask=cmask, other=0.0).to(tl.float32)
        return w, b

    @triton.jit
    def _gn_fwd_apply_kernel(
        x_ptr,  # (N, C, S) strided
        y_ptr,  # (N, C, S) same strides as x
        w_ptr,  # (C,) or unused
        b_ptr,  # (C,) or unused
        part_ptr,  # (N*G, SPLIT, 2) float32
        mean_ptr,  # (N*G,) float32
        rstd_ptr,  # (N*G,) float32
        G,
        C_PER_G,
        S,
        S_PER_SPLIT,
        stride_xn,
        stride_xc,
        stride_xs,
        eps,
        SPLIT,
        SPLIT_P2: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid_ng = tl.program_id(0)
        pid_s = tl.program_id(1)
        n = pid_ng // G
        g = pid_ng % G
        mean, rstd = _gn_group_stats(part_ptr, pid_ng, C_PER_G, S, S_PER_SPLIT, eps, SPLIT, SPLIT_P2)
        if pid_s == 0:
            tl.store(mean_ptr + pid_ng, mean)
            tl.store(rstd_ptr + pid_ng, rstd)
        offset = n.to(tl.int64) * stride_xn + g * C_PER_G * stride_xc
        s_start = pid_s * S_PER_SPLIT
        s_end = tl.minimum(s_start + S_PER_SPLIT, S)
        for c0 in range(0, C_PER_G, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C_PER_G
            w, shift = _load_affine(w_ptr, b_ptr, g, C_PER_G, c, cmask, HAS_WEIGHT, HAS_BIAS)
            scale = w * rstd
            for s0 in range(s_start, s_end, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < s_end)[None, :]
                idx = c[:, None] * stride_xc + s[None, :] * stride_xs  # int32 within a sample
                x = tl.load(x_ptr + offset + idx, mask=mask, other=0.0).to(tl.float32)
                z = (x - mean) * scale[:, None] + shift[:, None]  # not x·scale - mean·scale: no cancellation
                if SILU:
                    z = z * tl.sigmoid(z)
                tl.store(y_ptr + offset + idx, z.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_recompute_dz(x, dy, mean, rstd, w, b, SILU: tl.constexpr):
        xhat = (x - mean) * rstd
        if SILU:
            z = xhat * w[:, None] + b[:, None]
            sig = tl.sigmoid(z)
            dz = dy * sig * (1.0 + z * (1.0 - sig))
        else:
            dz = dy
        return xhat, dz

    @triton.jit
    def _gn_bwd_reduce_kernel(
        x_ptr,  # (N, C, S) strided
        dy_ptr,  # (N, C, S) same strides as x
        w_ptr,  # (C,) or unused
        b_ptr,  # (C,) or unused
        mean_ptr,  # (N*G,) float32
        rstd_ptr,  # (N*G,) float32
        part_ptr,  # (2, N*C, SPLIT) float32: Σ dz·xhat, Σ dz per (n, c, split)
        NC,
        G,
        C_PER_G,
        S,
        S_PER_SPLIT,
        stride_xn,
        stride_xc,
        stride_xs,
        SPLIT,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid_ng = tl.program_id(0)
        pid_s = tl.program_id(1)
        n = pid_ng // G
        g = pid_ng % G
        mean = tl.load(mean_ptr + pid_ng)
        rstd = tl.load(rstd_ptr + pid_ng)
        offset = n.to(tl.int64) * stride_xn + g * C_PER_G * stride_xc
        s_start = pid_s * S_PER_SPLIT
        s_end = tl.minimum(s_start + S_PER_SPLIT, S)
        for c0 in range(0, C_PER_G, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C_PER_G
            w, b = _load_affine(w_ptr, b_ptr, g, C_PER_G, c, cmask, HAS_WEIGHT, HAS_BIAS)
            acc_dzx = tl.zeros([BLOCK_C], tl.float32)
            acc_dz = tl.zeros([BLOCK_C], tl.float32)
            for s0 in range(s_start, s_end, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < s_end)[None, :]
                idx = c[:, None] * stride_xc + s[None, :] * stride_xs  # int32 within a sample
                x = tl.load(x_ptr + offset + idx, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + offset + idx, mask=mask, other=0.0).to(tl.float32)
                xhat, dz = _gn_recompute_dz(x, dy, mean, rstd, w, b, SILU)
                dz = tl.where(mask, dz, 0.0)
                acc_dzx += tl.sum(dz * xhat, axis=1)
                acc_dz += tl.sum(dz, axis=1)
            row = (n * G * C_PER_G + g * C_PER_G + c) * SPLIT + pid_s
            tl.store(part_ptr + row, acc_dzx, mask=cmask)
            tl.store(part_ptr + NC * SPLIT + row, acc_dz, mask=cmask)

    @triton.jit
    def _gn_bwd_apply_kernel(
        x_ptr,  # (N, C, S) strided
        dy_ptr,  # (N, C, S) same strides as x
        dx_ptr,  # (N, C, S) same strides as x
        w_ptr,  # (C,) or unused
        b_ptr,  # (C,) or unused
        mean_ptr,  # (N*G,) float32
        rstd_ptr,  # (N*G,) float32
        part_ptr,  # (2, N*C, SPLIT) float32
        NC,
        G,
        C_PER_G,
        S,
        S_PER_SPLIT,
        stride_xn,
        stride_xc,
        stride_xs,
        SPLIT,
        PART_CHUNK: tl.constexpr,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid_ng = tl.program_id(0)
        pid_s = tl.program_id(1)
        n = pid_ng // G
        g = pid_ng % G
        mean = tl.load(mean_ptr + pid_ng)
        rstd = tl.load(rstd_ptr + pid_ng)
        # c1 = Σ_c w_c Σ dz·xhat / M,  c2 = Σ_c w_c Σ dz / M over the whole group (all splits).
        c1 = 0.0
        c2 = 0.0
        for c0 in range(0, C_PER_G, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C_PER_G
            w, _ = _load_affine(w_ptr, b_ptr, g, C_PER_G, c, cmask, HAS_WEIGHT, False)
            sdzx = tl.zeros([BLOCK_C], tl.float32)
            sdz = tl.zeros([BLOCK_C], tl.float32)
            for k0 in range(0, SPLIT, PART_CHUNK):  # (BLOCK_C, PART_CHUNK) partials at a time: few registers
                k = k0 + tl.arange(0, PART_CHUNK)
                rows = (n * G * C_PER_G + g * C_PER_G + c)[:, None] * SPLIT + k[None, :]
                pmask = cmask[:, None] & (k < SPLIT)[None, :]
                sdzx += tl.sum(tl.load(part_ptr + rows, mask=pmask, other=0.0), axis=1)
                sdz += tl.sum(tl.load(part_ptr + NC * SPLIT + rows, mask=pmask, other=0.0), axis=1)
            c1 += tl.sum(tl.where(cmask, w * sdzx, 0.0), axis=0)
            c2 += tl.sum(tl.where(cmask, w * sdz, 0.0), axis=0)
        total = (C_PER_G * S).to(tl.float32)
        c1 = c1 / total
        c2 = c2 / total
        offset = n.to(tl.int64) * stride_xn + g * C_PER_G * stride_xc
        s_start = pid_s * S_PER_SPLIT
        s_end = tl.minimum(s_start + S_PER_SPLIT, S)
        for c0 in range(0, C_PER_G, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C_PER_G
            w, b = _load_affine(w_ptr, b_ptr, g, C_PER_G, c, cmask, HAS_WEIGHT, HAS_BIAS)
            for s0 in range(s_start, s_end, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                mask = cmask[:, None] & (s < s_end)[None, :]
                idx = c[:, None] * stride_xc + s[None, :] * stride_xs  # int32 within a sample
                x = tl.load(x_ptr + offset + idx, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + offset + idx, mask=mask, other=0.0).to(tl.float32)
                xhat, dz = _gn_recompute_dz(x, dy, mean, rstd, w, b, SILU)
                dx = rstd * (dz * w[:, None] - c2 - xhat * c1)
                tl.store(dx_ptr + offset + idx, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _specs(cfg: GroupNormConfig, archs: tuple, dtypes, silus, candidate: bool) -> list[KernelSpec]:
    specs = []
    layouts = {"NCHW": {"stride_xs": 1}, "channels-last": {"stride_xc": 1}}
    for dtype in dtypes:
        t = TRITON_TYPES[dtype]
        for layout, unit_stride in layouts.items():
            tile = dict(BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s) | unit_stride
            label = f"{t} {layout} BLOCK_C={cfg.block_c} BLOCK_S={cfg.block_s}"
            if candidate:
                label += f" w{cfg.num_warps}" + (f" s{cfg.num_stages}" if cfg.num_stages else "")
            ptrs = dict(x_ptr=t, y_ptr=t, dy_ptr=t, dx_ptr=t, w_ptr=t, b_ptr=t)
            ptrs |= dict(part_ptr="fp32", mean_ptr="fp32", rstd_ptr="fp32")
            kw = dict(num_warps=cfg.num_warps, maxnreg=MAXNREG, num_stages=cfg.num_stages,
                      divisible_by_16=tuple(ptrs), archs=archs, candidate=candidate)  # torch allocations
            tag = " candidate" if candidate else ""
            specs.append(KernelSpec(_gn_stats_kernel, label + tag, ptrs, tile, **kw))
            for silu in silus:
                flags = tile | dict(HAS_WEIGHT=True, HAS_BIAS=True, SILU=silu)
                lab = f"{label} SILU={silu}{tag}"
                merge = flags | dict(SPLIT_P2=MAX_SPLIT)
                specs.append(KernelSpec(_gn_fwd_apply_kernel, lab, ptrs, merge, ("eps",), **kw))
                specs.append(KernelSpec(_gn_bwd_reduce_kernel, lab, ptrs, flags, **kw))
                chunked = flags | dict(PART_CHUNK=PART_CHUNK)
                specs.append(KernelSpec(_gn_bwd_apply_kernel, lab, ptrs, chunked, **kw))
    return specs


def _by_config(configs_per_arch: dict[int, list]) -> dict[GroupNormConfig, tuple]:
    """{config: the archs that pick it}, configs in first-seen order."""
    out: dict[GroupNormConfig, tuple] = {}
    for arch, cfgs in configs_per_arch.items():
        for cfg in dict.fromkeys(cfgs):
            out[cfg] = out.get(cfg, ()) + (arch,)
    return out


def compile_specs() -> list[KernelSpec]:
    """Every kernel variant the launchers can pick (configs.table, per arch): tile config × dtype × layout
    (× activation). Then each sweep candidate that is not a table config, labelled "candidate": float32 (the
    dtype that needs the most registers in 157 of the tables' 168 variants) with the activation, both layouts."""
    tables = {arch: list(configs.table(arch)[FAMILY].values()) for arch in configs.ARCHS}
    specs = []
    for cfg, archs in _by_config(tables).items():
        specs += _specs(cfg, archs, KERNEL_DTYPES, (True, False), candidate=False)
    sweep = {
        arch: [c for cls in CONFIG_FAMILIES[0].classes for c in configs.candidates(FAMILY, cls, arch)
               if c not in tables[arch]]
        for arch in configs.ARCHS
    }  # fmt: skip
    for cfg, archs in _by_config(sweep).items():
        specs += _specs(cfg, archs, (torch.float32,), (True,), candidate=True)
    return specs


# ---- launch configuration --------------------------------------------------------------------------------


def ncs_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_s) viewing x (N, C, *spatial) as (N, C, S), or None if the spatial dims
    cannot be flattened into one stride (then the caller makes a copy)."""
    sizes, strides = x.shape[2:], x.stride()[2:]
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]):
        if s_outer != s_inner * n_inner:
            return None
    stride_s = dims[-1][1] if dims else 1
    return x.stride(0), x.stride(1), stride_s


def is_channels_last(x: torch.Tensor) -> bool:
    """C innermost and everything dense: (N, *spatial, C) in memory."""
    return x.dim() > 2 and x.stride(1) == 1 and x.permute(0, *range(2, x.dim()), 1).is_contiguous()


def config_class(c_per_g: int) -> str:
    """The group_norm_silu shape class: "cN" for the smallest N in CLASS_C with c_per_g <= N, else the last."""
    return f"c{next((n for n in CLASS_C if c_per_g <= n), CLASS_C[-1])}"


def tile_config(c_per_g: int, device: torch.device | None = None, arch: int | None = None) -> GroupNormConfig:
    arch = configs.device_arch(device) if arch is None else arch
    return configs.get(FAMILY, config_class(c_per_g), arch)


def _check_config(arch: int, cls: str, cfg: GroupNormConfig) -> None:
    """block_c a power of two from the class's N (one tile covers the group's channels) to 256; block_s a power
    of two; 1 to MAX_PER_THREAD tile elements per thread."""
    configs.check_pow2("block_c", cfg.block_c, int(cls[1:]), 256)
    configs.check_pow2("block_s", cfg.block_s, 1, 8192)
    configs.check_launch(cfg)
    tile, threads = cfg.block_c * cfg.block_s, 32 * cfg.num_warps
    if not threads <= tile <= MAX_PER_THREAD * threads:
        raise ValueError(f"block_c · block_s = {tile}: must be in {threads}..{MAX_PER_THREAD * threads} "
                         f"(1 to {MAX_PER_THREAD} elements for each of 32 · num_warps threads)")  # fmt: skip


# Sweep candidates per class, (tile elements, num_warps) with block_c = the class's N: 4 or 8 elements per
# thread; the last is today's table, kept a candidate when a sweep's file replaces it. The same on both archs,
# where each compiles without spills under MAXNREG in both layouts (compile_check builds them all).
SWEEP_TILES = ((512, 2), (1024, 4), (1024, 8), (2048, 16), (4096, 16), (2048, 8))
SWEEP = {f"c{n}": tuple((tile // n, warps) for tile, warps in SWEEP_TILES) for n in CLASS_C}
CONFIG_FAMILIES = (
    configs.Family(
        FAMILY, GroupNormConfig, tuple(f"c{n}" for n in CLASS_C), _check_config,
        lambda arch, cls: [GroupNormConfig(int(cls[1:]), *tiles) for tiles in SWEEP[cls]], config_class,
    ),
)  # fmt: skip


def split_config(n_groups: int, s: int, block_s: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT, S_PER_SPLIT): on a GPU, enough programs for ~4 per SM; under the interpreter, one tile each
    (so small test shapes exercise the merge)."""
    tiles = triton.cdiv(s, block_s)
    if device.type == "cuda":
        want = triton.cdiv(4 * sm_count(device), n_groups)
    else:
        want = tiles
    split = max(1, min(want, tiles, MAX_SPLIT))
    s_per_split = triton.cdiv(triton.cdiv(s, split), block_s) * block_s
    return triton.cdiv(s, s_per_split), s_per_split


def _flags(weight, bias, silu):
    return dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu)


@dataclasses.dataclass
class _Plan:
    """Grid and shared arguments of one launch over x viewed as (N, C, S)."""

    n: int
    c: int
    c_per_g: int
    s: int
    split: int
    s_per_split: int
    strides: tuple[int, int, int]
    meta: dict  # BLOCK_C, BLOCK_S, num_warps, maxnreg (, num_stages)

    @classmethod
    def of(cls, x: torch.Tensor, num_groups: int) -> _Plan:
        n, c = x.shape[:2]
        s = x[0, 0].numel()
        if x[0].numel() >= 2**31:
            raise ValueError(f"one sample of x has {x[0].numel()} elements; the kernels index a sample in int32")
        cfg = tile_config(c // num_groups, x.device)
        split, s_per_split = split_config(n * num_groups, s, cfg.block_s, x.device)
        meta = dict(BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, num_warps=cfg.num_warps, maxnreg=MAXNREG)
        meta |= {"num_stages": cfg.num_stages} if cfg.num_stages is not None else {}
        return cls(n, c, c // num_groups, s, split, s_per_split, ncs_strides(x), meta)

    def grid(self, num_groups: int) -> tuple[int, int]:
        return self.n * num_groups, self.split

    def sizes(self, num_groups: int) -> tuple:
        """(G, C_PER_G, S, S_PER_SPLIT, stride_n, stride_c, stride_s), the kernels' common arguments."""
        return (num_groups, self.c_per_g, self.s, self.s_per_split, *self.strides)


def _triton_forward(x, num_groups, weight, bias, eps, silu):
    p = _Plan.of(x, num_groups)
    y = torch.empty_like(x)
    mean = torch.empty(p.n, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    part = torch.empty(p.n * num_groups, p.split, 2, device=x.device, dtype=torch.float32)
    grid, sizes = p.grid(num_groups), p.sizes(num_groups)
    _gn_stats_kernel[grid](x, part, *sizes, p.split, **p.meta)
    _gn_fwd_apply_kernel[grid](
        x, y, weight, bias, part, mean, rstd, *sizes, eps, p.split,
        SPLIT_P2=MAX_SPLIT, **_flags(weight, bias, silu), **p.meta,
    )  # fmt: skip
    return y, mean, rstd


def _triton_backward(dy, x, mean, rstd, weight, bias, num_groups, eps, silu):
    p = _Plan.of(x, num_groups)
    dx = torch.empty_like(x)
    part = torch.empty(2, p.n * p.c, p.split, device=x.device, dtype=torch.float32)
    grid, sizes, flags = p.grid(num_groups), p.sizes(num_groups), _flags(weight, bias, silu)
    _gn_bwd_reduce_kernel[grid](x, dy, weight, bias, mean, rstd, part, p.n * p.c, *sizes, p.split, **flags, **p.meta)
    _gn_bwd_apply_kernel[grid](
        x, dy, dx, weight, bias, mean, rstd, part, p.n * p.c, *sizes, p.split,
        PART_CHUNK=PART_CHUNK, **flags, **p.meta,
    )  # fmt: skip
    part = part.view(2, p.n, p.c, p.split)
    dw = part[0].sum(dim=(0, 2)) if weight is not None else None  # (C,) Σ dz·xhat
    db = part[1].sum(dim=(0, 2)) if bias is not None else None  # (C,) Σ dz
    return dx, dw, db


def _ext_forward(x, num_groups, weight, bias, eps, silu):
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[0], num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    weight, bias = _as_dtype(weight, x.dtype), _as_dtype(bias, x.dtype)
    backends.extension().group_norm_silu_fwd(x, weight, bias, y, mean, rstd, num_groups, eps, silu, _stream(x))
    return y, mean, rstd


def _ext_backward(dy, x, mean, rstd, weight, bias, num_groups, eps, silu):
    c = x.shape[1]
    dx = torch.empty_like(x)
    dw = torch.empty(c, device=x.device, dtype=torch.float32) if weight is not None else None
    db = torch.empty(c, device=x.device, dtype=torch.float32) if bias is not None else None
    weight, bias = _as_dtype(weight, x.dtype), _as_dtype(bias, x.dtype)
    ext = backends.extension()
    ext.group_norm_silu_bwd(dy, x, mean, rstd, weight, bias, dx, dw, db, num_groups, silu, _stream(x))
    return dx, dw, db


def _as_dtype(p: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The extension takes weight and bias in x's dtype."""
    return p if p is None or p.dtype == dtype else p.to(dtype)


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


def _torch_forward(x, num_groups, weight, bias, eps, silu):
    """PyTorch's own kernels (what eager users run today); statistics returned in float32."""
    n, c = x.shape[:2]
    xc = x if _aten_layout(x) else x.contiguous()
    y, mean, rstd = torch.ops.aten.native_group_norm(xc, weight, bias, n, c, x[0, 0].numel(), num_groups, eps)
    if silu:
        y = torch.nn.functional.silu(y)
    if y.stride() != x.stride():  # keep x's memory format, as the other backends do
        y = torch.empty_like(x).copy_(y)
    return y, mean.float().reshape(n, num_groups), rstd.float().reshape(n, num_groups)


def _aten_layout(x: torch.Tensor) -> bool:
    """A layout ATen's group norm takes: contiguous, or channels-last for 4-D/5-D."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return x.is_contiguous() or (cl is not None and x.is_contiguous(memory_format=cl))


def _torch_backward(dy, x, mean, rstd, weight, bias, num_groups, eps, silu):
    """PyTorch's group-norm backward in float32 on the saved statistics; silu's VJP on recomputed z."""
    n, c = x.shape[:2]
    x32 = x.float() if _aten_layout(x) else x.float().contiguous()
    w32 = None if weight is None else weight.float()
    dz = dy.float()
    if silu:
        shape = (n, num_groups, -1)
        xhat = ((x32.reshape(shape) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
        bshape = (1, c) + (1,) * (x.dim() - 2)
        z = xhat * (1.0 if w32 is None else w32.reshape(bshape)) + (0.0 if bias is None else bias.float().reshape(bshape))
        dz = torch.ops.aten.silu_backward(dz, z)
    mask = [True, weight is not None, False]  # ATen's dbias needs a weight; db = Σ dz is taken below
    dz = dz.contiguous(memory_format=_memory_format(x32))
    dx, dw, _ = torch.ops.aten.native_group_norm_backward(
        dz, x32, mean, rstd, w32, n, c, x[0, 0].numel(), num_groups, mask
    )
    db = dz.sum(dim=[d for d in range(x.dim()) if d != 1]) if bias is not None else None
    return torch.empty_like(x).copy_(dx), dw, db


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return cl if cl is not None and not x.is_contiguous() and x.is_contiguous(memory_format=cl) else torch.contiguous_format


# ---- backend predicates ------------------------------------------------------------------------------------


def _kernel_reason(backend: str):
    def reason(x, weight, bias):
        why = backends.device_reason(x, backend)
        if why is not None:
            return why
        if x.dtype not in KERNEL_DTYPES:
            return f"dtype {x.dtype} (kernels take float32/float16/bfloat16)"
        if not (x.is_contiguous() or is_channels_last(x)):
            return "x is neither contiguous nor channels-last"
        return None

    return reason


PREDICATES = {name: _kernel_reason(name) for name in ("triton", "cuda", "cpu")} | {"torch": lambda *a: None}
FORWARD = {"triton": _triton_forward, "cuda": _ext_forward, "cpu": _ext_forward, "torch": _torch_forward}
BACKWARD = {"triton": _triton_backward, "cuda": _ext_backward, "cpu": _ext_backward, "torch": _torch_backward}


# ---- torch.library ops ------------------------------------------------------------------------------------


def _empty_stats(x, num_groups):
    return torch.full((x.shape[0], num_groups), float("nan"), device=x.device, dtype=torch.float32)


@torch.library.custom_op("sdxl_kernels::group_norm_silu", mutates_args=())
def group_norm_silu_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd); mean and rstd are float32 (N, G)."""
    return _forward(x, num_groups, weight, bias, eps, silu)


def _forward(x, num_groups, weight, bias, eps, silu):
    backend = backends.select(OP, PREDICATES, x, weight, bias)
    if x.numel() == 0:
        return torch.empty_like(x), _empty_stats(x, num_groups), _empty_stats(x, num_groups)
    return FORWARD[backend](x, num_groups, weight, bias, eps, silu)


@group_norm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("sdxl_kernels::group_norm_silu_backward", mutates_args=())
def group_norm_silu_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dweight/dbias are float32 (C,), or empty (0,) when weight/bias is None."""
    backend = backends.select(OP, PREDICATES, x, weight, bias)
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # kernels read dy with x's strides (e.g. an expanded grad)
    if x.numel() == 0:
        dx, dw, db = torch.empty_like(x), _zeros_or_none(x, weight), _zeros_or_none(x, bias)
    else:
        dx, dw, db = BACKWARD[backend](dy, x, mean, rstd, weight, bias, num_groups, eps, silu)
    return dx, _or_empty(dw, x), _or_empty(db, x)


def _or_empty(grad, x):
    return x.new_empty(0, dtype=torch.float32) if grad is None else grad


def _zeros_or_none(x, p):
    return None if p is None else torch.zeros(x.shape[1], device=x.device, dtype=torch.float32)


@group_norm_silu_backward_op.register_fake
def _(dy, x, mean, rstd, weight, bias, num_groups, eps, silu):
    def param_grad(p):
        return x.new_empty((x.shape[1] if p is not None else 0,), dtype=torch.float32)

    return torch.empty_like(x), param_grad(weight), param_grad(bias)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = group_norm_silu_backward_op(
        dy, x, mean, rstd, weight, bias, ctx.num_groups, ctx.eps, ctx.silu
    )
    dw = dw.to(weight.dtype) if weight is not None else None
    db = db.to(bias.dtype) if bias is not None else None
    return dx, None, dw, db, None, None


group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ---------------------------------------------------------------------------------------------


def _check_param(name, p, x, c):
    if p is None:
        return
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    if p.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},) to match x's {c} channels, got {tuple(p.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")


def check_inputs(x, num_groups, weight, bias, eps, activation) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *spatial), got {x.dim()}-D shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32/float16/bfloat16), got {x.dtype}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    c = x.shape[1]
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels C={c} of x")
    _check_param("weight", weight, x, c)
    _check_param("bias", bias, x, c)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = "silu",
) -> torch.Tensor:
    """`F.silu(F.group_norm(x, num_groups, weight, bias, eps))` in one fused kernel.

    x: (N, C, *spatial), contiguous or channels-last (the output keeps x's memory format), float32/16/bf16.
    weight, bias: (C,) or None. activation: "silu", or None for plain group norm.
    Statistics are computed in float32. Other layouts are copied to contiguous first.
    """
    check_inputs(x, num_groups, weight, bias, eps, activation)
    if not (x.is_contiguous() or is_channels_last(x)):
        x = x.contiguous()
    args = (x, num_groups, weight, bias, float(eps), activation == "silu")
    return backends.call(group_norm_silu_op, _forward, args, (x, weight, bias))[0]


class GroupNormSiLU(nn.GroupNorm):
    """`nn.GroupNorm` followed by SiLU, fused; same parameters and state dict as `nn.GroupNorm`."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation="silu", device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        if activation not in ("silu", None):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
