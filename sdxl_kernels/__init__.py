"""sdxl-kernels: fused GPU/CPU kernels for Stable Diffusion XL, drop-in for the PyTorch functions they replace."""
from .backends import BACKENDS, extension, get_backend, last_backend, set_backend
from .ops.attention import flash_attention, scaled_dot_product_attention
from .ops.fourier_embedding import fourier_embedding
from .ops.group_norm_silu import GroupNormSiLU, group_norm_silu
from .patch import PatchReport, patch, unpatch, use_kernels
from .reference import attention_ref, fourier_embedding_ref, group_norm_silu_ref
from .switch import KernelSwitch, set_default_use_kernels

__version__ = "0.1.0"

extension()  # load the C++/CUDA extension now; warns once if it is not built

__all__ = [
    "BACKENDS",
    "GroupNormSiLU",
    "KernelSwitch",
    "PatchReport",
    "attention_ref",
    "flash_attention",
    "fourier_embedding",
    "fourier_embedding_ref",
    "get_backend",
    "group_norm_silu",
    "group_norm_silu_ref",
    "last_backend",
    "patch",
    "scaled_dot_product_attention",
    "set_backend",
    "set_default_use_kernels",
    "unpatch",
    "use_kernels",
]
