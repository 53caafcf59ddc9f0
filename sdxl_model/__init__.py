"""The lean SDXL model: config dataclasses (UNet, VAE), the UNet and the VAE (sgm parameter names), on top of
sdxl_kernels."""
from .config import UNetConfig, VAEConfig
from .checkpoint import load_weights, save_weights
from .unet import UNet, set_default_use_kernels
from .vae import AutoencoderKL

__all__ = ["AutoencoderKL", "UNet", "UNetConfig", "VAEConfig", "load_weights", "save_weights", "set_default_use_kernels"]
