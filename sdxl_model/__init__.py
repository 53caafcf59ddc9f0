"""The lean SDXL model: config dataclasses (UNet, VAE) and the UNet (sgm parameter names), on top of sdxl_kernels."""
from .config import UNetConfig, VAEConfig
from .unet import UNet, set_default_use_kernels

__all__ = ["UNet", "UNetConfig", "VAEConfig", "set_default_use_kernels"]
