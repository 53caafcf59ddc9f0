"""Plain-PyTorch references of every op, written from the formulas and independent of the kernels.

They compute in `compute_dtype` (float64 by default) and return the input's dtype unless told otherwise.
"""
from __future__ import annotations

import math

import torch


def group_norm_silu_ref(
    x: torch.Tensor,  # (N, C, *spatial)
    num_groups: int,
    weight: torch.Tensor | None = None,  # (C,)
    bias: torch.Tensor | None = None,  # (C,)
    eps: float = 1e-5,
    activation: str | None = "silu",
    compute_dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    n, c = x.shape[:2]
    xg = x.to(compute_dtype).reshape(n, num_groups, -1)  # (N, G, C/G * S)
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)  # two-pass, biased
    z = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    bshape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        z = z * weight.to(compute_dtype).reshape(bshape)
    if bias is not None:
        z = z + bias.to(compute_dtype).reshape(bshape)
    if activation == "silu":
        z = z / (1 + torch.exp(-z))
    return z.to(out_dtype or x.dtype)


def fourier_frequencies(
    dim: int, max_period: float = 10000.0, downscale_freq_shift: float = 0.0, dtype=torch.float32, device=None
) -> torch.Tensor:
    """freq_j = exp(-ln(max_period) * j / (half - shift)), j < half = dim // 2 (sgm: shift 0; diffusers: 1)."""
    half = dim // 2
    j = torch.arange(half, dtype=dtype, device=device)
    return torch.exp(-math.log(max_period) * j / (half - downscale_freq_shift))


def fourier_embedding_ref(
    values: torch.Tensor,  # (B,) or (B, N)
    dim: int,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # (B, dim) or (B, N * dim)
    v = values.to(compute_dtype)
    freqs = fourier_frequencies(dim, max_period, downscale_freq_shift, compute_dtype, values.device)
    args = v.unsqueeze(-1) * freqs  # (B, [N,] half)
    first, second = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat([first, second], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.reshape(values.shape[0], -1)  # (B, N * dim)


def attention_ref(
    q: torch.Tensor,  # (..., H, Lq, D)
    k: torch.Tensor,  # (..., H_kv, Lk, D), H_kv dividing H
    v: torch.Tensor,  # (..., H_kv, Lk, Dv)
    causal: bool = False,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # (..., H, Lq, Dv)
    """softmax(scale · q kᵀ) v with plain matmuls; causal masks key j > query i (top-left aligned, as
    PyTorch's is_causal). Heads of k/v are repeated when fewer than q's (grouped-query attention)."""
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    if q.dim() >= 3 and kc.shape[-3] != qc.shape[-3]:
        group = qc.shape[-3] // kc.shape[-3]
        kc, vc = kc.repeat_interleave(group, dim=-3), vc.repeat_interleave(group, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (qc @ kc.transpose(-2, -1)) * scale  # (..., H, Lq, Lk)
    if causal:
        lq, lk = scores.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vc).to(out_dtype or q.dtype)
