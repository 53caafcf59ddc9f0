"""Two-stage SDXL sampling: the base model alone, or base + refiner by hand-off or by SDEdit; img2img.

Hand-off (`refiner_switch`, diffusers' `denoising_end`): one sigma schedule of `steps` steps; the base runs
sigmas[:k+1] with k = round(refiner_switch · steps), the refiner continues from the same latents on sigmas[k:]
without re-noising. SDEdit (`sdedit_strength`, Meng et al. 2022): the base finishes; the refiner re-noises its
latents to the sigma at `strength` of a fresh schedule and denoises the rest of it. img2img (`image`,
`strength`): the image's latents are noised the same way to sigmas[s] with s = steps − max(1, round(strength ·
steps)), and sampling runs sigmas[s:]; a hand-off still happens at sigmas[k] of the full schedule (a noise
level the refiner is trained for), so when s ≥ k the refiner denoises all of it.

Seeds: image i of a batch draws all its noise (initial, ancestral/SDE, SDEdit re-noise) from its own generator,
seeded with seed[i] (a list) or seed + i (an int), so it equals the same prompt generated alone with that seed.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import graphs, sampling
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


def _check_modes(has_refiner: bool, refiner_switch, sdedit_strength) -> None:
    if refiner_switch is not None and sdedit_strength is not None:
        raise ValueError("give refiner_switch or sdedit_strength, not both")
    if (refiner_switch is not None or sdedit_strength is not None) and not has_refiner:
        raise ValueError("refiner_switch / sdedit_strength need a refiner")
    if refiner_switch is not None and not 0.0 <= refiner_switch <= 1.0:
        raise ValueError(f"refiner_switch must be in [0, 1], got {refiner_switch}")
    if sdedit_strength is not None and not 0.0 < sdedit_strength <= 1.0:
        raise ValueError(f"sdedit_strength must be in (0, 1], got {sdedit_strength}")


def generators(seed: int | Sequence[int], n: int, device) -> list[torch.Generator]:
    """One generator per image: seeds seed, seed+1, … for an int, or the given list (one per image)."""
    one = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
    seeds = [int(seed) + i for i in range(n)] if one else list(seed)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts: give an int or one seed per prompt")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"seeds must be ints, got {s!r}")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def image_tensor(image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PIL image (converted to RGB) or a (3, H, W) / (B, 3, H, W) float tensor in [0, 1] → (B, 3, H, W)
    float32 on the tensor's device, resized (bilinear, antialiased) to `size` = (height, width) if given."""
    if isinstance(image, torch.Tensor):
        x = image.detach()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image: expected (3, H, W) or (B, 3, H, W) with 3 (RGB) channels, "
                             f"got shape {tuple(image.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"image: expected a float tensor with values in [0, 1], got {x.dtype}")
        x = x.float()
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails both
            raise ValueError(f"image: values must be in [0, 1] (not [-1, 1] or [0, 255]), got [{lo}, {hi}]")
    elif hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    else:
        raise TypeError(f"image: expected a PIL image or a tensor, got {type(image).__name__}")
    if size is not None and tuple(int(s) for s in size) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)
    return x


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
    the VAE scale factor is undone ("latent").

    `cuda_graphs`: capture each UNet's step in a CUDA graph (`graphs.GraphedUNet`). None: on for a UNet on
    CUDA (shapes are static within a call), off on the CPU; `graphs_status()` says which and why."""

    base: Stage
    refiner: Stage | None = None
    cuda_graphs: bool | None = None
    _graphed: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.base = Stage.from_components(self.base)
        if self.refiner is not None:
            self.refiner = Stage.from_components(self.refiner)
            if not self.refiner.is_refiner:
                raise ValueError("refiner: got a base model (it has a CLIP-L text encoder)")
        if self.base.is_refiner:
            raise ValueError("base: got a refiner model (it has no CLIP-L text encoder)")
        if self.cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs must be None, True or False, got {self.cuda_graphs!r}")

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

    # ---- CUDA graphs --------------------------------------------------------------------------------------

    def denoiser(self, name: str, unet: torch.nn.Module) -> sampling.EpsDenoiser:
        """The eps denoiser of one stage, its UNet graphed when the `cuda_graphs` switch resolves to on."""
        on, _ = graphs.resolve(self.cuda_graphs, unet)
        if not on:
            return sampling.EpsDenoiser(unet)
        wrapped = self._graphed.get(name)
        if wrapped is None or wrapped.unet is not unet:
            wrapped = self._graphed[name] = graphs.GraphedUNet(unet)
        return sampling.EpsDenoiser(wrapped)

    def graphs_status(self) -> dict[str, str]:
        """Per stage: "on: …" or "off: <why>" (the switch, the device, or a capture that failed)."""
        out = {}
        for name, stage in (("base", self.base), ("refiner", self.refiner)):
            if stage is None:
                continue
            on, why = graphs.resolve(self.cuda_graphs, stage.unet)
            wrapped = self._graphed.get(name)
            if on and wrapped is not None and wrapped.fallback_reason is not None:
                why = f"off: {wrapped.fallback_reason}"
            out[name] = why
        return out

    # ---- sampling -----------------------------------------------------------------------------------------

    @staticmethod
    def _cast(cond: dict, unet) -> dict:
        p = next(unet.parameters())
        return {k: v.to(p.device, p.dtype) for k, v in cond.items()}

    def run_stage(self, name: str, unet, x, sigmas, cond, uncond, *, sampler, cfg, generators, callback, disable):
        """One sampler call of one stage over `sigmas` (a slice of the schedule) with CFG."""
        p = next(unet.parameters())
        guided = sampling.CFGDenoiser(self.denoiser(name, unet), cfg)
        staged = None if callback is None else (lambda info: callback({**info, "stage": name}))
        return run_sampler(sampler, guided, x.to(p.device, p.dtype), sigmas,
                           {"cond": self._cast(cond, unet), "uncond": self._cast(uncond, unet)},
                           generator=generators, callback=staged, disable=disable)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → base-VAE posterior mean × scale_factor, float32 (B, 4, H/f, W/f). The mean,
        not a draw: img2img takes no extra noise from the generators, so a seed's noise is text-to-image's."""
        vae = self.base.vae
        p = next(vae.parameters())
        mean, _ = vae.encode((image * 2 - 1).to(p.device, p.dtype))
        return mean.float() * vae.config.scale_factor

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *, steps: int = 30,
                 sampler: str = "dpmpp_2m", schedule: str = "legacy", cfg: float = 5.0,
                 seed: int | Sequence[int] = 0, size: tuple[int, int] | None = None, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=None, negative_target_size=None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, refiner_switch: float | None = None,
                 sdedit_strength: float | None = None, image=None, strength: float | None = None,
                 output: str = "pil", callback: Callable[[dict], None] | None = None, disable=None):
        """Generate one image per prompt.

        seed      an int (image i uses seed + i) or one int per prompt (diffusers' list of generators)
        size      (height, width), multiples of the VAE's downsampling factor; default (1024, 1024), or the
                  image's size for img2img
        image     img2img: a PIL image, or a (3, H, W) / (B, 3, H, W) float tensor in [0, 1] (B = 1 or one per
                  prompt), resized to `size` if one is given; encoded to the base VAE's posterior mean
        strength  img2img: the share of the schedule to run, 0 < strength ≤ 1 (default 0.3); 1 starts from
                  sigma_max (the image still shifts the start by its latents)
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        if output not in ("pil", "latent", "tensor"):
            raise ValueError(f"output must be 'pil', 'latent' or 'tensor', got {output!r}")
        _check_modes(self.refiner is not None, refiner_switch, sdedit_strength)
        if image is None and strength is not None:
            raise ValueError("strength is the img2img strength: give an image too")
        strength = 0.3 if image is not None and strength is None else strength
        if strength is not None and not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if image is not None:
            image = image_tensor(image, size)
            size = tuple(image.shape[2:])
            if image.shape[0] not in (1, len(prompts)):
                raise ValueError(f"{image.shape[0]} images for {len(prompts)} prompts: give 1 or one per prompt")
            image = image.expand(len(prompts), -1, -1, -1)
        h, w = (int(s) for s in (size or (1024, 1024)))
        f = self.base.vae.config.downsample_factor
        m = f * 2 ** (self.base.unet.config.num_levels - 1)
        if h <= 0 or w <= 0 or h % m or w % m:
            raise ValueError(f"size {h}x{w}: height and width must be positive multiples of {m} (the VAE "
                             f"downsamples by {f}, the UNet by {m // f} more)")
        original_size = _pair(original_size, (h, w))
        target_size = _pair(target_size, (h, w))
        neg_orig = _pair(negative_original_size, original_size)
        neg_crop = _pair(negative_crops_coords_top_left, crops_coords_top_left)
        neg_target = _pair(negative_target_size, target_size)

        unet = self.base.unet
        p = next(unet.parameters())
        gens = generators(seed, len(prompts), p.device)
        sigmas = make_sigmas(steps, schedule, sampling.EpsDenoiser(unet))
        shape = (len(prompts), unet.config.in_channels, h // f, w // f)
        noise = sampling.randn(shape, gens, dtype=torch.float32, device=p.device)
        start = 0 if image is None else steps - max(1, int(round(strength * steps)))
        if image is None:
            x0_scale = (1 + sigmas[0] ** 2) ** 0.5 if schedule == "legacy" else sigmas[0]
            x = noise * x0_scale
        else:
            x = self.encode_image(image).to(p.device) + noise * sigmas[start]
        x = x.to(p.dtype)

        k = steps if refiner_switch is None else int(round(refiner_switch * steps))
        if k > start:
            cond, uncond = self.base_conditioning(
                prompts, negatives, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                target_size=target_size, negative_original_size=neg_orig,
                negative_crops_coords_top_left=neg_crop, negative_target_size=neg_target)
            x = self.run_stage("base", unet, x, sigmas[start: k + 1], cond, uncond, sampler=sampler, cfg=cfg,
                               generators=gens, callback=callback, disable=disable)

        if self.refiner is not None and (k < steps or sdedit_strength is not None):
            r_unet = self.refiner.unet
            cond, uncond = self.refiner_conditioning(
                prompts, negatives, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                negative_original_size=neg_orig, negative_crops_coords_top_left=neg_crop,
                aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)
            if sdedit_strength is not None:
                r_sigmas = make_sigmas(steps, schedule, sampling.EpsDenoiser(r_unet))
                r_sigmas = r_sigmas[steps - max(1, int(round(sdedit_strength * steps))):]
                renoise = sampling.randn(shape, gens, dtype=torch.float32, device=p.device)
                x = x.float() + renoise * r_sigmas[0]
            else:
                r_sigmas = sigmas[max(k, start):]
            x = self.run_stage("refiner", r_unet, x, r_sigmas, cond, uncond, sampler=sampler, cfg=cfg,
                               generators=gens, callback=callback, disable=disable)

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
