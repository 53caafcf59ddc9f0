"""Exponential moving average of a model's weights (sgm `LitEma`): shadow ← shadow + (1 - d)(param - shadow)
with d = min(decay, (1 + n)/(10 + n)) after n updates, so early averages are not dominated by the random init."""
from __future__ import annotations

import torch
from torch import nn

from ..keys import compare
from .distributed import shard_like


class EMA:
    """Float32 shadow copies of `model`'s floating-point parameters and buffers, on `device` (None: the model's)."""

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().to(device or v.device, torch.float32, copy=True)
                       for k, v in _weights(model).items()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for k, v in _weights(model).items():
            s = self.shadow[k]
            s.lerp_(v.detach().to(s.device, torch.float32), 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        wrong = compare(self.shadow, state)  # names and shapes
        if wrong:
            raise ValueError(f"EMA state mismatch: {wrong.inline(5)}")
        for k, s in self.shadow.items():
            s.copy_(shard_like(state[k], s))  # a full tensor, sharded like the shadow under FSDP2
        self.num_updates = int(num_updates)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_floating_point()}
