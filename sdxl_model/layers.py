"""Layers shared by the UNet and the VAE: GroupNorm(+SiLU) on the kernel switch, and the ×2 upsampler."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sdxl_kernels
from sdxl_kernels.switch import KernelSwitch


class GroupNormAct(sdxl_kernels.GroupNormSiLU, KernelSwitch):
    """GroupNorm, optionally followed by SiLU; the state dict of `nn.GroupNorm`."""

    KERNEL_KINDS = ("group_norm_silu",)

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
