"""The SDXL autoencoder with sgm's parameter names (`AutoencoderKL`, `Encoder`, `Decoder` in sgm's
diffusionmodules/model.py).

`AutoencoderKL(config)`: `encode(img) -> (mean, logvar)`, `decode(z) -> img`. Parameter names match sgm's
checkpoints after stripping `first_stage_model.`, so a released state dict loads with strict=True; diffusers
folders go through `diffusers_vae_key_map` / `convert_diffusers_vae_state_dict`.

The latent scale factor (`config.scale_factor`, 0.13025 for SDXL) is *not* applied here: the pipeline
multiplies encoded latents by it and divides before decoding, as sgm's DiffusionEngine does.

float16 is refused: the SDXL VAE's decoder activations exceed float16's range (65504) and turn into inf/NaN,
the best-known SDXL failure. Run it in bfloat16 (same exponent range as float32) or float32.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import sdxl_kernels
from sdxl_kernels.switch import KernelSwitch

from .config import VAEConfig
from .keys import mismatch
from .layers import GroupNormAct, Upsample

NORM_EPS = 1e-6  # every GroupNorm of the VAE
LOGVAR_RANGE = (-30.0, 20.0)  # the clamp sgm's DiagonalGaussianDistribution and diffusers apply


def _norm(cfg: VAEConfig, channels: int, silu: bool = True) -> GroupNormAct:
    return GroupNormAct(cfg.norm_groups, channels, eps=NORM_EPS, activation="silu" if silu else None)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3, GroupNorm-SiLU-conv3, plus the skip (a 1x1 `nin_shortcut` when widths differ)."""

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(cfg, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(cfg, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))  # dropout is 0 in SDXL and omitted
        return self.nin_shortcut(x) + h


class AttnBlock(KernelSwitch, nn.Module):
    """Single-head self-attention over the H·W pixels, q/k/v/proj_out as 1x1 convs, scale C^-1/2, residual."""

    KERNEL_KINDS = ("attention",)

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels, silu=False)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_ = self.norm(x)
        q, k, v = (proj(x_).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # (B,1,HW,C)
        sdpa = sdxl_kernels.scaled_dot_product_attention if self.kernels else F.scaled_dot_product_attention
        out = sdpa(q, k, v)  # (B, 1, HW, C)
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 conv without padding (sgm's asymmetric downsample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution: `block` (ResnetBlocks), then `downsample` or `upsample` if present (sgm's names; the
    empty `attn` lists of sgm hold no parameters and are left out)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, kind: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, kind, resample)
        self._resample = kind if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self._resample)(x) if self._resample else x


class MidBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments before quant_conv (B, 2·z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.channels
        last = len(cfg.block_channels) - 1
        for level, out_ch in enumerate(cfg.block_channels):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, ch, out_ch))
                ch = out_ch
            self.down.append(Level(blocks, Downsample(ch) if level != last else None, "downsample"))
        self.mid = MidBlock(cfg, ch)
        self.norm_out = _norm(cfg, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(self.norm_out(self.mid(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h·f, w·f). `up[i]` is resolution level i
    (stored lowest level first as in sgm, run from the last)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_channels[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(cfg, ch)
        levels = []
        for level in reversed(range(len(cfg.block_channels))):
            out_ch = cfg.block_channels[level]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cfg, ch, out_ch))
                ch = out_ch
            levels.insert(0, Level(blocks, Upsample(ch) if level != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(self.norm_out(h))


class AutoencoderKL(KernelSwitch, nn.Module):
    """The SDXL VAE: a KL-regularised autoencoder with a diagonal Gaussian posterior.

    encode: image (B, in_channels, H, W) in [-1, 1], H and W multiples of `config.downsample_factor`
            -> (mean, logvar), each (B, embed_dim, H/f, W/f)
    decode: latent (B, embed_dim, h, w) -> image (B, out_channels, h·f, w·f)
    `use_kernels(enabled)` (KernelSwitch) routes every GroupNorm(+SiLU) and attention inside it.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        cfg = self.config = config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    # ---- checks ----------------------------------------------------------------------------------------

    def _check_dtype(self, x: torch.Tensor, what: str) -> None:
        weight_dtype = self.conv_dtype
        if torch.float16 in (x.dtype, weight_dtype):
            raise TypeError(
                f"{what}: the SDXL VAE does not run in float16 (input {x.dtype}, weights {weight_dtype}): its "
                "activations exceed float16's range and the output becomes NaN. Use torch.bfloat16 or "
                "torch.float32 for the VAE (e.g. vae.to(torch.bfloat16) and cast the latents to match)."
            )

    @property
    def conv_dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def check_image(self, img: torch.Tensor) -> None:
        cfg, f = self.config, self.config.downsample_factor
        if img.ndim != 4 or img.shape[1] != cfg.in_channels:
            raise ValueError(f"image: expected (B, {cfg.in_channels}, H, W), got {tuple(img.shape)}")
        if img.shape[2] % f or img.shape[3] % f:
            raise ValueError(f"image: height and width must be multiples of {f} (the VAE's downsampling), "
                             f"got {tuple(img.shape[2:])}")
        self._check_dtype(img, "image")

    def check_latent(self, z: torch.Tensor) -> None:
        cfg = self.config
        if z.ndim != 4 or z.shape[1] != cfg.embed_dim:
            raise ValueError(f"latent: expected (B, {cfg.embed_dim}, h, w), got {tuple(z.shape)}")
        self._check_dtype(z, "latent")

    # ---- encode / decode -------------------------------------------------------------------------------

    def moments(self, img: torch.Tensor) -> torch.Tensor:
        """quant_conv(encoder(img)): (B, 2·embed_dim, H/f, W/f), mean then (unclamped) logvar."""
        self.check_image(img)
        return self.quant_conv(self.encoder(img))

    def encode(self, img: torch.Tensor, tile: int | None = None, overlap: int | None = None):
        """Posterior (mean, logvar) of img, logvar clamped to [-30, 20]. With `tile` (pixels, a multiple of
        the downsampling factor) the image is encoded in overlapping tiles blended linearly across seams."""
        if tile is None:
            moments = self.moments(img)
        else:
            self.check_image(img)
            f = self.config.downsample_factor
            overlap = tile // 4 // f * f if overlap is None else overlap
            if tile % f or overlap % f:
                raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of {f}")
            moments = tiled_apply(lambda t: self.quant_conv(self.encoder(t)), img, tile, overlap, 1 / f)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the diagonal Gaussian N(mean, exp(logvar)): mean + exp(logvar/2)·ε."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor, tile: int | None = None, overlap: int | None = None) -> torch.Tensor:
        """decoder(post_quant_conv(z)). With `tile` (latent pixels) the latent is decoded in overlapping
        tiles blended linearly across seams; the scale factor is not applied here (the pipeline does)."""
        self.check_latent(z)
        if tile is None:
            return self.decoder(self.post_quant_conv(z))
        overlap = tile // 4 if overlap is None else overlap
        return tiled_apply(lambda t: self.decoder(self.post_quant_conv(t)), z, tile, overlap,
                           self.config.downsample_factor)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(img)[0])


# ---- tiling ------------------------------------------------------------------------------------------------


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of width `tile` stepping by tile - overlap, the last flush with the end."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, ramp: int, left: bool, right: bool, device, dtype) -> torch.Tensor:
    """Blend weights along one axis of an output tile: linear from ~0 to 1 over `ramp` pixels on each side
    that meets a neighbour, 1 on image borders; always > 0 so every pixel has some weight."""
    i = torch.arange(n, device=device, dtype=dtype) + 0.5
    w = torch.ones(n, device=device, dtype=dtype)
    if ramp > 0:
        if left:
            w = torch.minimum(w, i / ramp)
        if right:
            w = torch.minimum(w, (n - i) / ramp)
    return w


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                scale: float) -> torch.Tensor:
    """fn over overlapping square tiles of x (B, C, H, W), blended: out = Σ w_t·fn(tile_t) / Σ w_t.

    fn maps (B, C, h, w) -> (B, C', h·scale, w·scale). Tiles step by tile - overlap; weights ramp linearly
    over the overlap (in output pixels), so away from seams each pixel is one tile's output.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    h, w = x.shape[-2:]
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = weight = None
    ramp = round(overlap * scale)
    for y0 in ys:
        for x0 in xs:
            piece = fn(x[..., y0:y0 + tile, x0:x0 + tile])  # (B, C', th·scale, tw·scale)
            if out is None:
                out = x.new_zeros(*piece.shape[:2], round(h * scale), round(w * scale), dtype=torch.float32)
                weight = x.new_zeros(round(h * scale), round(w * scale), dtype=torch.float32)
            oy, ox = round(y0 * scale), round(x0 * scale)
            ph, pw = piece.shape[-2:]
            wy = _ramp(ph, ramp, y0 > 0, y0 + tile < h, x.device, torch.float32)
            wx = _ramp(pw, ramp, x0 > 0, x0 + tile < w, x.device, torch.float32)
            wt = wy[:, None] * wx[None, :]  # (ph, pw)
            out[..., oy:oy + ph, ox:ox + pw] += piece.float() * wt
            weight[oy:oy + ph, ox:ox + pw] += wt
    return (out / weight).to(x.dtype)


# ---- diffusers layout ------------------------------------------------------------------------------------


def diffusers_vae_key_map(config: VAEConfig) -> dict[str, str]:
    """diffusers `AutoencoderKL` parameter name -> ours (sgm's). diffusers numbers decoder levels from the
    lowest resolution up (`up_blocks.0` is our `up.{L-1}`) and stores attention projections as Linear."""
    m: dict[str, str] = {}
    levels = len(config.block_channels)

    def params(src: str, dst: str) -> None:
        m[f"{src}.weight"], m[f"{src}.bias"] = f"{dst}.weight", f"{dst}.bias"

    def resnet(src: str, dst: str, shortcut: bool) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            params(f"{src}.{name}", f"{dst}.{name}")
        if shortcut:
            params(f"{src}.conv_shortcut", f"{dst}.nin_shortcut")

    def mid(part: str) -> None:
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", False)
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", False)
        attn = f"{part}.mid_block.attentions.0"
        for src, dst in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            params(f"{attn}.{src}", f"{part}.mid.attn_1.{dst}")

    for part in ("encoder", "decoder"):
        params(f"{part}.conv_in", f"{part}.conv_in")
        params(f"{part}.conv_norm_out", f"{part}.norm_out")
        params(f"{part}.conv_out", f"{part}.conv_out")
        mid(part)
    ch = config.channels
    for level, out_ch in enumerate(config.block_channels):
        for i in range(config.num_res_blocks):
            resnet(f"encoder.down_blocks.{level}.resnets.{i}", f"encoder.down.{level}.block.{i}", ch != out_ch)
            ch = out_ch
        if level != levels - 1:
            params(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv")
    ch = config.block_channels[-1]
    for j, level in enumerate(reversed(range(levels))):
        out_ch = config.block_channels[level]
        for i in range(config.num_res_blocks + 1):
            resnet(f"decoder.up_blocks.{j}.resnets.{i}", f"decoder.up.{level}.block.{i}", ch != out_ch)
            ch = out_ch
        if level != 0:
            params(f"decoder.up_blocks.{j}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    params("quant_conv", "quant_conv")
    params("post_quant_conv", "post_quant_conv")
    return m


def convert_diffusers_vae_state_dict(state: Mapping[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict renamed to ours; Linear attention weights (C, C) become 1x1 convs
    (C, C, 1, 1). Missing and unexpected keys are reported together."""
    key_map = diffusers_vae_key_map(config)
    wrong = mismatch(key_map, state)
    if wrong:
        raise KeyError(f"not a diffusers AutoencoderKL state dict for {config}: {wrong}")
    out = {}
    for src, dst in key_map.items():
        t = state[src]
        if ".mid.attn_1." in dst and dst.endswith(".weight") and ".norm." not in dst and t.ndim == 2:
            t = t[:, :, None, None]
        out[dst] = t
    return out
