"""The lean SDXL: configs, the UNet and the VAE (sgm parameter names), the text encoders and micro-conditioning,
and offline checkpoint IO, all on top of sdxl_kernels."""
from .checkpoint import PipelineComponents, load_pipeline_components, load_weights, save_components, save_weights
from .conditioning import build_adm_vector, encode_prompts, micro_conditioning, refiner_micro_conditioning
from .config import UNetConfig, VAEConfig
from .pipeline import SDXLPipeline, Stage
from .text import CLIPTokenizer, SDXLTextEncoder
from .unet import UNet, set_default_use_kernels
from .vae import AutoencoderKL
from . import sampling

__all__ = [
    "AutoencoderKL",
    "CLIPTokenizer",
    "PipelineComponents",
    "SDXLPipeline",
    "SDXLTextEncoder",
    "UNet",
    "Stage",
    "UNetConfig",
    "VAEConfig",
    "build_adm_vector",
    "encode_prompts",
    "load_pipeline_components",
    "load_weights",
    "micro_conditioning",
    "refiner_micro_conditioning",
    "save_components",
    "save_weights",
    "set_default_use_kernels",
]
