"""Random-weight model sets for smoke tests and the CPU demos: tiny SDXL-structured base and refiner."""
from __future__ import annotations

import dataclasses

import torch


def _fields(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


def tiny_components(seed: int = 0):
    """Random tiny base and refiner `Stage`s (tiny UNets with the real ADM widths, tiny VAE, tiny CLIPs with the
    real tokenizer and the real pooled width 1280)."""
    from . import text as T
    from .conditioning import BASE_ADM_DIM, REFINER_ADM_DIM
    from .config import UNetConfig, VAEConfig
    from .pipeline import Stage
    from .unet import UNet
    from .vae import AutoencoderKL

    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    clip_l = T.build_clip_l(T.clip_l_config(**small)).eval()
    bigg = T.build_clip_bigg(T.clip_bigg_config(**small, projection_dim=T.POOLED_DIM)).eval()
    tok_l, tok_g = T.CLIPTokenizer.hf(), T.CLIPTokenizer.open_clip()
    base_text = T.SDXLTextEncoder(clip_l, bigg, tokenizer_l=tok_l, tokenizer_g=tok_g).eval()
    refiner_text = T.SDXLTextEncoder(None, bigg, tokenizer_g=tok_g).eval()
    tiny = UNetConfig.tiny()
    base_unet = UNet(UNetConfig(**{**_fields(tiny), "context_dim": 64, "adm_in_channels": BASE_ADM_DIM})).eval()
    ref_unet = UNet(UNetConfig(**{**_fields(tiny), "context_dim": 32, "adm_in_channels": REFINER_ADM_DIM})).eval()
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    return Stage(base_unet, vae, base_text), Stage(ref_unet, vae, refiner_text)
