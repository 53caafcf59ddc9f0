"""The SDXL training objective (sgm's `StandardDiffusionLoss` with discrete sigma sampling and eps prediction).

Per sample: a noise level index t uniform over the 1000 DDPM steps (a refiner: over the lowest N), σ = σ_t of
the training schedule, noise n = ε + offset · δ with ε ~ N(0, I) and δ ~ N(0, 1) per (sample, channel)
broadcast over space (offset noise), the noised latent x_t = x_0 + σ n, and the UNet input c_in · x_t with
c_in = 1/√(σ² + 1) at timestep t. With c_skip = 1, c_out = -σ the denoiser is D = x_t - σ ε̂; sgm's eps
weighting w = σ⁻² makes w‖D - x_0‖² = ‖ε̂ - n‖², the MSE on the noise. min-SNR-γ (Hang et al. 2023)
multiplies by min(SNR, γ)/SNR with SNR = σ⁻².

Conditioning dropout (sgm `ucg_rate`): a sample's text (context and pooled embedding) or its micro-conditioning
embedding is zeroed with the given probability, which trains the unconditional model CFG uses.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import sampling
from ..conditioning import POOLED_DIM


@dataclasses.dataclass(frozen=True)
class NoiseDraw:
    """What the objective drew for one micro-batch; all on the CPU, from one generator."""

    timesteps: torch.Tensor  # (B,) int64
    noise: torch.Tensor  # (B, C, H, W) float32, offset noise included
    drop_text: torch.Tensor  # (B,) bool
    drop_micro: torch.Tensor  # (B,) bool


def draw(shape, generator: torch.Generator, *, offset_noise: float = 0.0, num_levels: int = 1000,
         text_dropout: float = 0.0, micro_dropout: float = 0.0) -> NoiseDraw:
    """Noise levels, noise and dropout decisions for a latent batch of `shape`, in a fixed order."""
    b, c = shape[0], shape[1]
    t = torch.randint(0, num_levels, (b,), generator=generator)
    noise = torch.randn(shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(b, c, *([1] * (len(shape) - 2)), generator=generator)
    u = torch.rand(b, 2, generator=generator)
    return NoiseDraw(t, noise, u[:, 0] < text_dropout, u[:, 1] < micro_dropout)


def apply_dropout(context: torch.Tensor, y: torch.Tensor, d: NoiseDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero dropped samples' text (context, and y's pooled part) and micro-conditioning (y's rest)."""
    keep_text = (~d.drop_text).to(context.device, context.dtype)
    keep_micro = (~d.drop_micro).to(y.device, y.dtype)
    context = context * keep_text[:, None, None]
    y = torch.cat([y[:, :POOLED_DIM] * keep_text[:, None], y[:, POOLED_DIM:] * keep_micro[:, None]], dim=1)
    return context, y


def diffusion_loss(unet, latents: torch.Tensor, context: torch.Tensor, y: torch.Tensor, d: NoiseDraw, *,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean weighted eps-MSE over the batch, in float32 whatever the UNet computes in."""
    sigmas = sampling.training_sigmas().to(torch.float32)[d.timesteps].to(latents.device)  # (B,)
    s = sigmas[:, None, None, None]
    noise = d.noise.to(latents.device)
    x_t = latents.float() + s * noise
    c_in = 1.0 / torch.sqrt(s * s + 1.0)
    context, y = apply_dropout(context, y, d)
    eps = unet(x_t * c_in, d.timesteps.to(latents.device), context, y)
    per_sample = (eps.float() - noise).square().flatten(1).mean(1)  # (B,)
    if min_snr_gamma:
        snr = sigmas.double().pow(-2)
        per_sample = per_sample * (snr.clamp(max=min_snr_gamma) / snr).float()
    return per_sample.mean()
