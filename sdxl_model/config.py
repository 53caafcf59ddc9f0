"""Model configuration: dataclasses with named presets, and converters from sgm / diffusers configs.

Converters live at the edge: they read foreign config dicts and return our dataclass; nothing here builds
objects from strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class UNetConfig:
    """Structure of the SDXL UNet (sgm `UNetModel` layout).

    `transformer_depth[level]` is the number of transformer blocks in each SpatialTransformer at that level;
    0 means the level has no attention (ResBlocks only). The middle block always has one SpatialTransformer
    of depth `transformer_depth_middle`.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    transformer_depth_middle: int = 10
    num_head_channels: int = 64
    context_dim: int = 2048
    adm_in_channels: int = 2816
    norm_groups: int = 32
    dropout: float = 0.0
    # derived in __post_init__
    time_embed_dim: int = field(init=False)
    block_channels: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "transformer_depth", tuple(int(d) for d in self.transformer_depth))
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} levels, channel_mult {len(self.channel_mult)}"
            )
        object.__setattr__(self, "time_embed_dim", 4 * self.model_channels)
        object.__setattr__(self, "block_channels", tuple(self.model_channels * m for m in self.channel_mult))
        for level, (ch, depth) in enumerate(zip(self.block_channels, self.transformer_depth)):
            if depth and ch % self.num_head_channels:
                raise ValueError(f"level {level}: {ch} channels is not a multiple of {self.num_head_channels}")
            if ch % self.norm_groups:
                raise ValueError(f"level {level}: {ch} channels is not a multiple of {self.norm_groups} groups")

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    # ---- presets ---------------------------------------------------------------------------------------

    @classmethod
    def sdxl_base(cls) -> UNetConfig:
        """SDXL 1.0 base: 2,567,463,684 parameters."""
        return cls()

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """SDXL 1.0 refiner: 2,259,526,660 parameters."""
        return cls(
            model_channels=384,
            channel_mult=(1, 2, 4, 4),
            transformer_depth=(0, 4, 4, 0),
            transformer_depth_middle=4,
            context_dim=1280,
            adm_in_channels=2560,
        )

    @classmethod
    def tiny(cls) -> UNetConfig:
        """SDXL-base-structured toy model, the sizes of the sgm `tiny_unet` fixture (1,847,492 parameters)."""
        return cls(
            model_channels=32,
            channel_mult=(1, 1, 2),
            transformer_depth=(0, 2, 1),
            transformer_depth_middle=1,
            num_head_channels=8,
            context_dim=32,
            adm_in_channels=128,
        )

    # ---- converters ------------------------------------------------------------------------------------

    @classmethod
    def from_sgm(cls, params: Mapping[str, Any]) -> UNetConfig:
        """From sgm `UNetModel` constructor kwargs (`network_config.params` of an sgm yaml).

        Covers the options SDXL uses: linear projections in the transformers, heads from num_head_channels,
        ADM conditioning through `num_classes="sequential"`.
        """
        if params.get("num_head_channels", -1) in (-1, None):
            raise ValueError("only num_head_channels-based head counts are supported (SDXL uses 64)")
        if not params.get("use_linear_in_transformer", False):
            raise ValueError("only use_linear_in_transformer=True is supported")
        if params.get("num_classes") != "sequential":
            raise ValueError("only the ADM vector conditioning (num_classes='sequential') is supported")
        mult = tuple(params["channel_mult"])
        depth = params.get("transformer_depth", 1)
        depth = [depth] * len(mult) if isinstance(depth, int) else list(depth)
        middle = params.get("transformer_depth_middle")
        middle = depth[-1] if middle is None else middle
        attn_res = set(params["attention_resolutions"])
        per_level = tuple(d if 2**level in attn_res else 0 for level, d in enumerate(depth))
        return cls(
            in_channels=params["in_channels"],
            out_channels=params["out_channels"],
            model_channels=params["model_channels"],
            channel_mult=mult,
            num_res_blocks=params["num_res_blocks"],
            transformer_depth=per_level,
            transformer_depth_middle=middle,
            num_head_channels=params["num_head_channels"],
            context_dim=_single_context_dim(params["context_dim"]),
            adm_in_channels=params["adm_in_channels"],
            dropout=params.get("dropout", 0.0),
        )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers `UNet2DConditionModel` config dict.

        Quirk: diffusers' `attention_head_dim` holds the number of heads per level (unless
        `num_attention_heads` is set); the head width is channels / heads.
        """
        channels = list(config["block_out_channels"])
        mc = channels[0]
        if any(c % mc for c in channels):
            raise ValueError(f"block_out_channels {channels} are not multiples of the first")
        levels = len(channels)
        has_attn = ["CrossAttn" in t for t in config["down_block_types"]]
        layers = config.get("transformer_layers_per_block", 1)
        layers = [layers] * levels if isinstance(layers, int) else list(layers)
        heads = config.get("num_attention_heads") or config["attention_head_dim"]
        heads = [heads] * levels if isinstance(heads, int) else list(heads)
        head_dims = {channels[i] // heads[i] for i in range(levels) if has_attn[i]}
        if len(head_dims) != 1:
            raise ValueError(f"head width differs across levels: {sorted(head_dims)}")
        return cls(
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            model_channels=mc,
            channel_mult=tuple(c // mc for c in channels),
            num_res_blocks=config["layers_per_block"],
            transformer_depth=tuple(n if a else 0 for n, a in zip(layers, has_attn)),
            transformer_depth_middle=layers[-1],
            num_head_channels=head_dims.pop(),
            context_dim=_single_context_dim(config["cross_attention_dim"]),
            adm_in_channels=config["projection_class_embeddings_input_dim"],
            norm_groups=config.get("norm_num_groups", 32),
            dropout=config.get("dropout", 0.0),
        )


def _single_context_dim(value) -> int:
    """sgm may give context_dim per transformer block (the refiner yaml); all entries must agree."""
    if isinstance(value, int):
        return value
    values = set(value)
    if len(values) != 1:
        raise ValueError(f"per-block context dims {list(value)} differ; one context_dim is supported")
    return values.pop()


@dataclass(frozen=True)
class VAEConfig:
    """Structure of the SDXL autoencoder (sgm `AutoencoderKL` with its Encoder/Decoder).

    Attention sits only in the middle blocks (one single-head block each), as in SDXL.
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.13025
    # derived in __post_init__
    block_channels: tuple[int, ...] = field(init=False)
    downsample_factor: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "block_channels", tuple(self.channels * m for m in self.channel_mult))
        object.__setattr__(self, "downsample_factor", 2 ** (len(self.channel_mult) - 1))
        for ch in self.block_channels:
            if ch % self.norm_groups:
                raise ValueError(f"{ch} channels is not a multiple of {self.norm_groups} groups")

    @classmethod
    def sdxl(cls) -> VAEConfig:
        """The SDXL 1.0 VAE (base and refiner share it): 83,653,863 parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """The sizes of the sgm `tiny_vae` fixture."""
        return cls(channels=32, channel_mult=(1, 2), num_res_blocks=1)

    @classmethod
    def from_sgm(cls, ddconfig: Mapping[str, Any], embed_dim: int | None = None) -> VAEConfig:
        """From sgm's `ddconfig` (and AutoencoderKL's `embed_dim`, which defaults to z_channels)."""
        if not ddconfig.get("double_z", True):
            raise ValueError("only double_z=True (a diagonal Gaussian posterior) is supported")
        if list(ddconfig.get("attn_resolutions", [])):
            raise ValueError("only mid-block attention (attn_resolutions=[]) is supported, as in SDXL")
        return cls(
            in_channels=ddconfig["in_channels"],
            out_channels=ddconfig["out_ch"],
            channels=ddconfig["ch"],
            channel_mult=tuple(ddconfig["ch_mult"]),
            num_res_blocks=ddconfig["num_res_blocks"],
            z_channels=ddconfig["z_channels"],
            embed_dim=ddconfig["z_channels"] if embed_dim is None else embed_dim,
        )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers `AutoencoderKL` config dict."""
        channels = list(config["block_out_channels"])
        if any(c % channels[0] for c in channels):
            raise ValueError(f"block_out_channels {channels} are not multiples of the first")
        if not (config.get("use_quant_conv", True) and config.get("use_post_quant_conv", True)):
            raise ValueError("the quant_conv / post_quant_conv layers are required")
        if not config.get("mid_block_add_attention", True):
            raise ValueError("the mid-block attention is required")
        return cls(
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            channels=channels[0],
            channel_mult=tuple(c // channels[0] for c in channels),
            num_res_blocks=config["layers_per_block"],
            z_channels=config["latent_channels"],
            embed_dim=config["latent_channels"],
            norm_groups=config.get("norm_num_groups", 32),
            scale_factor=config.get("scaling_factor", 0.13025),
        )
