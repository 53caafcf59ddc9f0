"""The SDXL UNet with sgm's parameter names (`UNetModel` in sgm's openaimodel.py).

`UNet(config)(x, timesteps, context, y) -> eps`. Parameter names match sgm's checkpoints after stripping
`model.diffusion_model.`, so a released state dict loads with strict=True.

Every GroupNorm(+SiLU), the timestep embedding and attention go through either `sdxl_kernels` or plain
torch, chosen per model with `UNet.use_kernels(enabled)`; the torch path is the reference the kernels are
tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import sdxl_kernels
from sdxl_kernels.switch import KernelSwitch, set_default_use_kernels  # noqa: F401 (re-exported)

from .config import UNetConfig
from .layers import GroupNormAct, Upsample

RESNET_EPS = 1e-5  # ResBlock and final GroupNorms
TRANSFORMER_NORM_EPS = 1e-6  # SpatialTransformer GroupNorm
LAYER_NORM_EPS = 1e-5


class Attention(KernelSwitch, nn.Module):
    """Multi-head attention; self-attention when `context` is None. sgm `CrossAttention` names."""

    KERNEL_KINDS = ("attention",)

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, L, query_dim), context: (B, S, context_dim)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b = x.shape[0]
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, L|S, D)
        sdpa = sdxl_kernels.scaled_dot_product_attention if self.kernels else F.scaled_dot_product_attention
        out = sdpa(q, k, v)  # (B, H, L, D)
        out = out.transpose(1, 2).reshape(b, x.shape[1], -1)  # (B, L, H*D)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear to 2·inner, split into (value, gate), value * gelu(gate) (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the context, GEGLU feed-forward; residual each."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, head_dim)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, linear proj_in, `depth` transformer blocks over the H·W tokens, linear proj_out, residual."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int, cfg: UNetConfig):
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNormAct(cfg.norm_groups, channels, eps=TRANSFORMER_NORM_EPS, activation=None)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, cfg.dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        h_ = self.proj_in(h_)
        for block in self.transformer_blocks:
            h_ = block(h_, context)
        h_ = self.proj_out(h_)
        return x + h_.transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected embedding, GroupNorm-SiLU-dropout-conv, plus the skip."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, cfg: UNetConfig):
        super().__init__()
        # index 1 keeps sgm's SiLU slot (fused into index 0) so the conv stays at `in_layers.2`
        self.in_layers = nn.Sequential(
            GroupNormAct(cfg.norm_groups, channels, eps=RESNET_EPS),
            nn.Identity(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNormAct(cfg.norm_groups, out_channels, eps=RESNET_EPS),
            nn.Identity(),
            nn.Dropout(cfg.dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class UNetStage(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: layers applied in order, each taking what
    it needs (ResBlock: emb, SpatialTransformer: context)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(KernelSwitch, nn.Module):
    """The SDXL denoiser: eps = UNet(x, timesteps, context, y).

    x: (B, in_channels, H, W) with H, W divisible by 2**(levels-1); timesteps: (B,) float or int;
    context: (B, S, context_dim) text tokens; y: (B, adm_in_channels) pooled text + micro-conditioning.
    `use_kernels(enabled)` (KernelSwitch) routes every GroupNorm(+SiLU), attention and the timestep embedding.
    """

    KERNEL_KINDS = ("embedding",)  # its own forward: the timestep embedding

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self._checkpointing = False
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        # sgm's num_classes="sequential": the ADM vector y through one nested MLP (keys label_emb.0.{0,2})
        adm = nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Sequential(adm)

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads = ch // cfg.num_head_channels
            return SpatialTransformer(ch, heads, cfg.num_head_channels, depth, cfg.context_dim, cfg)

        self.input_blocks = nn.ModuleList([UNetStage([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]
        ch = mc
        for level, (out_ch, depth) in enumerate(zip(cfg.block_channels, cfg.transformer_depth)):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, ted, out_ch, cfg)]
                ch = out_ch
                if depth:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(UNetStage(layers))
                skip_channels.append(ch)
            if level != cfg.num_levels - 1:
                self.input_blocks.append(UNetStage([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = UNetStage(
            [ResBlock(ch, ted, ch, cfg), transformer(ch, cfg.transformer_depth_middle), ResBlock(ch, ted, ch, cfg)]
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(cfg.num_levels)):
            out_ch, depth = cfg.block_channels[level], cfg.transformer_depth[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, out_ch, cfg)]
                ch = out_ch
                if depth:
                    layers.append(transformer(ch, depth))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetStage(layers))

        self.out = nn.Sequential(
            GroupNormAct(cfg.norm_groups, ch, eps=RESNET_EPS),
            nn.Identity(),
            nn.Conv2d(mc, cfg.out_channels, 3, padding=1),
        )

    # ---- switches --------------------------------------------------------------------------------------

    def gradient_checkpointing(self, enabled: bool = True) -> UNet:
        """Recompute each input/middle/output stage in the backward pass instead of storing activations."""
        self._checkpointing = bool(enabled)
        return self

    # ---- forward ---------------------------------------------------------------------------------------

    def timestep_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Sinusoidal embedding (B,) -> (B, model_channels), cos half first (sgm `timestep_embedding`)."""
        dim = self.config.model_channels
        if self.kernels:
            return sdxl_kernels.fourier_embedding(timesteps.float(), dim)
        return sdxl_kernels.fourier_embedding_ref(timesteps, dim)

    def _stage(self, stage: UNetStage, h, emb, context):
        if self._checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, context, use_reentrant=False)
        return stage(h, emb, context)

    def check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor):
        """Raise a ValueError naming the expected shape when an input does not fit this UNet."""
        cfg = self.config
        factor = 2 ** (cfg.num_levels - 1)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected (B, {cfg.in_channels}, H, W) latents, got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x: latent height and width must be multiples of {factor} (the UNet downsamples "
                f"{cfg.num_levels - 1} times), got {tuple(x.shape[2:])}"
            )
        b = x.shape[0]
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps: expected shape ({b},), got {tuple(timesteps.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context: expected ({b}, tokens, {cfg.context_dim}), got {tuple(context.shape)}")
        if y.shape != (b, cfg.adm_in_channels):
            raise ValueError(f"y: expected ({b}, {cfg.adm_in_channels}) (pooled text + micro-conditioning), "
                             f"got {tuple(y.shape)}")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, timesteps, context, y)
        t_emb = self.timestep_embedding(timesteps).to(x.dtype)  # (B, model_channels)
        emb = self.time_embed(t_emb) + self.label_emb(y)  # (B, time_embed_dim)
        skips = []
        h = x
        for stage in self.input_blocks:
            h = self._stage(stage, h, emb, context)
            skips.append(h)
        h = self._stage(self.middle_block, h, emb, context)
        for stage in self.output_blocks:
            h = self._stage(stage, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

