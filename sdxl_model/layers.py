"""Layers shared by the UNet and the VAE: the per-module kernel switch and GroupNorm(+SiLU) on it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sdxl_kernels

_default_kernels = True


def set_default_use_kernels(enabled: bool) -> None:
    """The process-wide default of every model whose `use_kernels` was not called (or called with None)."""
    global _default_kernels
    _default_kernels = bool(enabled)


class _KernelSwitch(nn.Module):
    """A module whose forward can use sdxl_kernels or plain torch; `use_kernels` on the UNet or the VAE
    flips every one inside it."""

    _kernels: bool | None = None  # None: follow the process-wide default

    @property
    def kernels(self) -> bool:
        return _default_kernels if self._kernels is None else self._kernels


class GroupNormAct(sdxl_kernels.GroupNormSiLU, _KernelSwitch):
    """GroupNorm, optionally followed by SiLU; the state dict of `nn.GroupNorm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels:
            return super().forward(x)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.activation == "silu" else y


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv (sgm's `Upsample`, in the UNet and the VAE)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
