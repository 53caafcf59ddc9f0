"""SDXL conditioning: the ADM vector `y` (pooled text embedding + Fourier-embedded micro-conditioning) and the
prompt encoder that yields `(context, y)` for the UNet.

Base:    y = [pooled bigG (1280) | F(original h, w) | F(crop top, left) | F(target h, w)]        = 2816
Refiner: y = [pooled bigG (1280) | F(original h, w) | F(crop top, left) | F(aesthetic score)]     = 2560
with F = 256-dim sinusoidal embedding per scalar (sgm `ConcatTimestepEmbedderND(256)`, cos half first). All
Fourier columns are written by one `sdxl_kernels.fourier_embedding` call straight into their slice of y.
`encode_prompts(encoder, prompts, ...)` runs a `text.SDXLTextEncoder` and returns `(context, y)`.
"""
from __future__ import annotations

from typing import Sequence

import torch

import sdxl_kernels

POOLED_DIM = 1280
FOURIER_DIM = 256
BASE_MICRO_DIM = 6 * FOURIER_DIM  # 1536
REFINER_MICRO_DIM = 5 * FOURIER_DIM  # 1280
BASE_ADM_DIM = POOLED_DIM + BASE_MICRO_DIM  # 2816
REFINER_ADM_DIM = POOLED_DIM + REFINER_MICRO_DIM  # 2560


def _as_pairs(value, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 1:
        if t.numel() != 2:
            raise ValueError(f"{name} must be a pair (a, b) or a [B, 2] tensor, got shape {tuple(t.shape)}")
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must be a pair (a, b) or a [B, 2] tensor, got shape {tuple(t.shape)}")
    return t


def _as_scalars(value, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise ValueError(f"{name} must be a number or a [B] tensor, got shape {tuple(t.shape)}")
    return t.unsqueeze(1)


def _broadcast_cat(parts: Sequence[torch.Tensor], names: Sequence[str], batch: int | None) -> torch.Tensor:
    sizes = {p.shape[0] for p in parts} - {1}
    if batch is not None:
        sizes |= {batch}
    if len(sizes) > 1:
        raise ValueError(f"batch sizes of {', '.join(names)} disagree: {[p.shape[0] for p in parts]}"
                         + (f" (expected {batch})" if batch is not None else ""))
    b = sizes.pop() if sizes else 1
    return torch.cat([p.expand(b, -1) for p in parts], dim=1)


def _embed_into(values: torch.Tensor, out: torch.Tensor | None, width: int) -> torch.Tensor:
    if out is not None:
        if out.shape != (values.shape[0], width):
            raise ValueError(f"out must have shape {(values.shape[0], width)}, got {tuple(out.shape)}")
        values = values.to(out.device)
    return sdxl_kernels.fourier_embedding(values, FOURIER_DIM, out=out)


def micro_conditioning(original_size, crop_top_left, target_size, *, out: torch.Tensor | None = None,
                       batch: int | None = None) -> torch.Tensor:
    """Base micro-conditioning [B, 1536]: F(orig h), F(orig w), F(crop top), F(crop left), F(target h),
    F(target w). Each argument is an (a, b) pair (broadcast over the batch) or a [B, 2] tensor. `out` (e.g. a
    column slice of y) is written in place and returned."""
    values = _broadcast_cat(
        [_as_pairs(original_size, "original_size"), _as_pairs(crop_top_left, "crop_top_left"),
         _as_pairs(target_size, "target_size")],
        ["original_size", "crop_top_left", "target_size"], batch)
    return _embed_into(values, out, BASE_MICRO_DIM)


def refiner_micro_conditioning(original_size, crop_top_left, aesthetic_score, *,
                               out: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
    """Refiner micro-conditioning [B, 1280]: F(orig h), F(orig w), F(crop top), F(crop left), F(score)."""
    values = _broadcast_cat(
        [_as_pairs(original_size, "original_size"), _as_pairs(crop_top_left, "crop_top_left"),
         _as_scalars(aesthetic_score, "aesthetic_score")],
        ["original_size", "crop_top_left", "aesthetic_score"], batch)
    return _embed_into(values, out, REFINER_MICRO_DIM)


def build_adm_vector(pooled: torch.Tensor, original_size=(1024, 1024), crop_top_left=(0, 0),
                     target_size=(1024, 1024), *, aesthetic_score: float | torch.Tensor | None = None,
                     refiner: bool = False) -> torch.Tensor:
    """The full ADM vector y: [B, 2816] for the base, or [B, 2560] for the refiner (`refiner=True`, using
    `aesthetic_score` — default 6.0 — instead of `target_size`). `pooled` is [B, 1280]; y has its dtype and
    device (the Fourier part is computed in float32 and cast when y is not float32)."""
    if pooled.ndim != 2 or pooled.shape[1] != POOLED_DIM:
        raise ValueError(f"pooled must be [B, {POOLED_DIM}], got {tuple(pooled.shape)}")
    b = pooled.shape[0]
    width = REFINER_ADM_DIM if refiner else BASE_ADM_DIM
    y = torch.empty(b, width, dtype=pooled.dtype, device=pooled.device)
    y[:, :POOLED_DIM] = pooled
    target = y[:, POOLED_DIM:] if y.dtype == torch.float32 else None
    if refiner:
        score = 6.0 if aesthetic_score is None else aesthetic_score
        micro = refiner_micro_conditioning(original_size, crop_top_left, score, out=target, batch=b)
    else:
        if aesthetic_score is not None:
            raise ValueError("aesthetic_score is a refiner input; pass refiner=True")
        micro = micro_conditioning(original_size, crop_top_left, target_size, out=target, batch=b)
    if target is None:
        y[:, POOLED_DIM:] = micro.to(y.device, y.dtype)
    return y


def encode_prompts(encoder, prompts: str | Sequence[str], *, original_size=(1024, 1024), crop_top_left=(0, 0),
                   target_size=(1024, 1024), aesthetic_score: float | torch.Tensor | None = None,
                   zero_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts + micro-conditioning → (context, y) for the UNet. `encoder` is a `text.SDXLTextEncoder`; the
    refiner (no CLIP-L) gets the refiner vector with `aesthetic_score` (default 6.0; sgm uses 2.5 for the
    negative prompt). `zero_empty=True` zeros the text embeddings of empty prompts — use it for the base's
    negative prompt (sgm `force_uc_zero_embeddings=["txt"]`); the micro-conditioning part of y stays."""
    if isinstance(prompts, str):
        prompts = [prompts]
    context, pooled = encoder(prompts, zero_empty=zero_empty)
    refiner = getattr(encoder, "clip_l", None) is None
    if refiner:
        y = build_adm_vector(pooled, original_size, crop_top_left, refiner=True, aesthetic_score=aesthetic_score)
    else:
        if aesthetic_score is not None:
            raise ValueError("aesthetic_score is a refiner input; the base encoder takes target_size")
        y = build_adm_vector(pooled, original_size, crop_top_left, target_size)
    return context, y
