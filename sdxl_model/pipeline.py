"""Two-stage SDXL sampling: the base model alone, or base + refiner by hand-off or by SDEdit.

Hand-off (`refiner_switch`, diffusers' `denoising_end`): one sigma schedule of `steps` steps; the base runs
sigmas[:k+1] with k = round(refiner_switch · steps), the refiner continues from the same latents on sigmas[k:]
without re-noising. SDEdit (`sdedit_strength`, Meng et al. 2022): the base finishes; the refiner re-noises its
latents to the sigma at `strength` of a fresh schedule and denoises the rest of it.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

import torch

from . import sampling
from .conditioning import encode_prompts


@dataclasses.dataclass
class Stage:
    """One model of the pipeline: UNet, VAE and its `SDXLTextEncoder` (CLIP-L + bigG for the base, bigG alone
    for the refiner)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module

    @classmethod
    def from_components(cls, components) -> "Stage":
        """From a `PipelineComponents` (or anything with unet, vae and text_encoders / text_encoder)."""
        if isinstance(components, Stage):
            return components
        enc = getattr(components, "text_encoders", None)
        if enc is None:
            enc = getattr(components, "text_encoder", None)
        if enc is None:
            raise ValueError("the pipeline needs text encoders; the given components have none")
        return cls(unet=components.unet, vae=components.vae, text_encoder=enc)

    @property
    def is_refiner(self) -> bool:
        return getattr(self.text_encoder, "clip_l", None) is None


def _pair(value, default) -> tuple:
    return tuple(default if value is None else value)


def make_sigmas(steps: int, schedule: str, denoiser: sampling.EpsDenoiser) -> torch.Tensor:
    """[steps+1] descending sigmas with a trailing 0: "legacy" (sgm's LegacyDDPM) or "karras"."""
    if schedule == "legacy":
        return sampling.legacy_ddpm_sigmas(steps)
    if schedule == "karras":
        return sampling.karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max)
    if schedule == "exponential":
        return sampling.exponential_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max)
    raise ValueError(f"schedule must be 'legacy', 'karras' or 'exponential', got {schedule!r}")


def run_sampler(name: str, model, x, sigmas, extra_args, generator=None, callback=None, disable=None):
    """Call `sampling.SAMPLERS[name]`, passing `generator` to the samplers that draw noise."""
    if name not in sampling.SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(sampling.SAMPLERS)}")
    fn = sampling.SAMPLERS[name]
    kw = {}
    if "generator" in inspect.signature(fn).parameters:
        kw["generator"] = generator
    return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **kw)


@dataclasses.dataclass
class SDXLPipeline:
    """Text → image with an SDXL base and an optional refiner (see the module docstring).

    `base` / `refiner`: `PipelineComponents` or `Stage`. Calling the pipeline returns a list of PIL images
    (output="pil"), images in [0, 1] as a (B, 3, H, W) float tensor ("tensor"), or the final latents before
    the VAE scale factor is undone ("latent")."""

    base: Stage
    refiner: Stage | None = None

    def __post_init__(self):
        self.base = Stage.from_components(self.base)
        if self.refiner is not None:
            self.refiner = Stage.from_components(self.refiner)
            if not self.refiner.is_refiner:
                raise ValueError("refiner: got a base model (it has a CLIP-L text encoder)")
        if self.base.is_refiner:
            raise ValueError("base: got a refiner model (it has no CLIP-L text encoder)")

    # ---- conditioning -------------------------------------------------------------------------------------

    def base_conditioning(self, prompts, negative, *, original_size, crops_coords_top_left, target_size,
                          negative_original_size, negative_crops_coords_top_left, negative_target_size):
        """(cond, uncond) dicts for the base; an empty negative prompt gets zero text embeddings."""
        ctx, y = encode_prompts(self.base.text_encoder, prompts, original_size=original_size,
                                crop_top_left=crops_coords_top_left, target_size=target_size)
        nctx, ny = encode_prompts(self.base.text_encoder, negative, original_size=negative_original_size,
                                  crop_top_left=negative_crops_coords_top_left, target_size=negative_target_size,
                                  zero_empty=True)
        return {"context": ctx, "y": y}, {"context": nctx, "y": ny}

    def refiner_conditioning(self, prompts, negative, *, original_size, crops_coords_top_left,
                             negative_original_size, negative_crops_coords_top_left, aesthetic_score,
                             negative_aesthetic_score):
        ctx, y = encode_prompts(self.refiner.text_encoder, prompts, original_size=original_size,
                                crop_top_left=crops_coords_top_left, aesthetic_score=aesthetic_score)
        nctx, ny = encode_prompts(self.refiner.text_encoder, negative, original_size=negative_original_size,
                                  crop_top_left=negative_crops_coords_top_left,
                                  aesthetic_score=negative_aesthetic_score)
        return {"context": ctx, "y": y}, {"context": nctx, "y": ny}

    # ---- sampling -----------------------------------------------------------------------------------------

    @staticmethod
    def _cast(cond: dict, unet) -> dict:
        p = next(unet.parameters())
        return {k: v.to(p.device, p.dtype) for k, v in cond.items()}

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *, steps: int = 30,
                 sampler: str = "dpmpp_2m", schedule: str = "legacy", cfg: float = 5.0, seed: int = 0,
                 size: tuple[int, int] = (1024, 1024), original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None, negative_original_size=None, negative_crops_coords_top_left=None,
                 negative_target_size=None, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                 refiner_switch: float | None = None, sdedit_strength: float | None = None,
                 output: str = "pil", callback: Callable[[dict], None] | None = None, disable=None):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        if output not in ("pil", "latent", "tensor"):
            raise ValueError(f"output must be 'pil', 'latent' or 'tensor', got {output!r}")
        if refiner_switch is not None and sdedit_strength is not None:
            raise ValueError("give refiner_switch or sdedit_strength, not both")
        if (refiner_switch is not None or sdedit_strength is not None) and self.refiner is None:
            raise ValueError("refiner_switch / sdedit_strength need a refiner")
        if refiner_switch is not None and not 0.0 <= refiner_switch <= 1.0:
            raise ValueError(f"refiner_switch must be in [0, 1], got {refiner_switch}")
        if sdedit_strength is not None and not 0.0 < sdedit_strength <= 1.0:
            raise ValueError(f"sdedit_strength must be in (0, 1], got {sdedit_strength}")
        h, w = (int(s) for s in size)
        f = self.base.vae.config.downsample_factor
        if h % f or w % f:
            raise ValueError(f"size {h}x{w} must be a multiple of the VAE's downsampling factor {f}")
        original_size = _pair(original_size, (h, w))
        target_size = _pair(target_size, (h, w))
        neg_orig = _pair(negative_original_size, original_size)
        neg_crop = _pair(negative_crops_coords_top_left, crops_coords_top_left)
        neg_target = _pair(negative_target_size, target_size)

        unet = self.base.unet
        p = next(unet.parameters())
        gen = torch.Generator(device=p.device).manual_seed(int(seed))
        base_den = sampling.EpsDenoiser(unet)
        sigmas = make_sigmas(steps, schedule, base_den)
        shape = (len(prompts), unet.config.in_channels, h // f, w // f)
        noise = torch.randn(shape, generator=gen, device=p.device, dtype=torch.float32)
        x0_scale = (1 + sigmas[0] ** 2) ** 0.5 if schedule == "legacy" else sigmas[0]
        x = (noise * x0_scale).to(p.dtype)

        def staged(name):
            if callback is None:
                return None
            return lambda info: callback({**info, "stage": name})

        k = steps if refiner_switch is None else int(round(refiner_switch * steps))
        if k > 0:
            cond, uncond = self.base_conditioning(
                prompts, negatives, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                target_size=target_size, negative_original_size=neg_orig,
                negative_crops_coords_top_left=neg_crop, negative_target_size=neg_target)
            guided = sampling.CFGDenoiser(base_den, cfg)
            x = run_sampler(sampler, guided, x, sigmas[: k + 1],
                            {"cond": self._cast(cond, unet), "uncond": self._cast(uncond, unet)},
                            generator=gen, callback=staged("base"), disable=disable)

        if self.refiner is not None and (k < steps or sdedit_strength is not None):
            r_unet = self.refiner.unet
            r_den = sampling.EpsDenoiser(r_unet)
            cond, uncond = self.refiner_conditioning(
                prompts, negatives, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                negative_original_size=neg_orig, negative_crops_coords_top_left=neg_crop,
                aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)
            rp = next(r_unet.parameters())
            if sdedit_strength is not None:
                r_sigmas = make_sigmas(steps, schedule, r_den)
                start = steps - max(1, int(round(sdedit_strength * steps)))
                r_sigmas = r_sigmas[start:]
                renoise = torch.randn(shape, generator=gen, device=p.device, dtype=torch.float32)
                x = x.float() + renoise * r_sigmas[0]
            else:
                r_sigmas = sigmas[k:]
            x = run_sampler(sampler, sampling.CFGDenoiser(r_den, cfg), x.to(rp.device, rp.dtype), r_sigmas,
                            {"cond": self._cast(cond, r_unet), "uncond": self._cast(uncond, r_unet)},
                            generator=gen, callback=staged("refiner"), disable=disable)

        if output == "latent":
            return x
        images = self.decode(x)
        return images if output == "tensor" else to_pil(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents / scale_factor (0.13025 for SDXL) → VAE → images in [0, 1], (B, 3, H, W) float32."""
        vae = self.base.vae
        p = next(vae.parameters())
        z = latents.to(p.device, p.dtype) / vae.config.scale_factor
        img = vae.decode(z)
        return ((img.float() + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, H, W, 3) uint8 on the CPU."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_pil(images: torch.Tensor):
    from PIL import Image

    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]
