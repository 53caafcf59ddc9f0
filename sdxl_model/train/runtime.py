"""Pieces every training loop here shares: the stop flag SIGTERM/SIGINT raise, ranks agreeing on it, the
progress bar, image grids, and atomic single-file exports."""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from ..progress import Progress
from . import distributed as D


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the end of the current step and returns."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            pass
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def image_grid(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → one (H·rows, W·cols, 3) uint8 image."""
    b, _, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    canvas = torch.zeros(3, rows * h, cols * w)
    for i in range(b):
        r, c = divmod(i, cols)
        canvas[:, r * h: (r + 1) * h, c * w: (c + 1) * w] = images[i].float().cpu()
    return (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def agree(flag: bool, info: D.DistInfo) -> bool:
    """True on every rank if any rank got the signal."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def atomic_save(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    ckpt_io.save_weights(model, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def progress_bar(enabled: bool, total: int, info: D.DistInfo, start: int, desc: str = "train") -> Progress | None:
    """The training progress line (sdxl_model.progress) on the main rank, None elsewhere or when disabled."""
    if not (enabled and info.is_main):
        return None
    return Progress(total, desc=desc, initial=start)