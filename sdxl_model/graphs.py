"""CUDA-graph capture of the UNet step: one graph per input signature, replayed with static input buffers.

A sampling step at fixed size calls the UNet with the same shapes every time, so its forward can be captured
once (after a warm-up on a side stream, which also runs Triton's compile and autotuning) and replayed: the
~thousand kernel launches of an SDXL UNet become one. A new shape, dtype or device re-captures; a capture
that fails (an op that syncs or allocates on the host, a CPU tensor) falls back to eager for good, and the
reason is logged and kept in `GraphedUNet.fallback_reason`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

Key = tuple  # ((shape, dtype, device) for x, timesteps, context, y)


def signature(*tensors: torch.Tensor) -> Key:
    """What a captured graph is valid for: every input's shape, dtype and device."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def resolve(setting: bool | None, module: torch.nn.Module) -> tuple[bool, str]:
    """The pipeline's `cuda_graphs` switch for one UNet: (on, why). None means on when the UNet is on CUDA
    (a pipeline call has static shapes); True on a UNet that is not on CUDA is an error."""
    device = next(module.parameters()).device
    if setting is False:
        return False, "off: cuda_graphs=False"
    if device.type != "cuda":
        if setting:
            raise ValueError(f"cuda_graphs=True needs the UNet on a CUDA device; it is on {device}")
        return False, f"off: the UNet is on {device} (CUDA graphs need a CUDA device)"
    return True, "on: " + ("cuda_graphs=True" if setting else f"the UNet is on {device} and shapes are static")


@dataclasses.dataclass
class Captured:
    """One captured forward: copy inputs into `inputs`, `replay()`, read `output`."""

    key: Key
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    replay: Callable[[], None]


def capture_cuda(fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], warmup: int) -> Captured:
    """Warm `fn` up on a side stream, then capture fn(*static inputs) into a torch.cuda.CUDAGraph."""
    devices = {a.device for a in args}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"inputs on {sorted(map(str, devices))}: CUDA graphs need every input on one CUDA device")
    static = tuple(a.detach().clone() for a in args)
    side = torch.cuda.Stream(device=static[0].device)
    side.wait_stream(torch.cuda.current_stream(static[0].device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*static)
    torch.cuda.current_stream(static[0].device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return Captured(signature(*args), static, out, graph.replay)


class GraphedUNet:
    """unet(x, timesteps, context, y) through a CUDA graph captured for the current input signature.

    Inference only: with autograd on it calls the UNet eagerly. The returned tensor is a copy of the graph's
    output buffer, so it stays valid across replays. Keeps one graph (the last signature); a new signature
    frees it and captures again. Weights are read in place at replay (changing their values is seen), but the
    code path is frozen at capture: after `use_kernels(...)` or swapping modules, make a new GraphedUNet."""

    def __init__(self, unet: Callable[..., torch.Tensor], warmup: int = 2):
        self.unet = unet
        self.warmup = warmup
        self.graph: Captured | None = None
        self.captures = 0
        self.fallback_reason: str | None = None

    def capture(self, args: tuple[torch.Tensor, ...]) -> Captured:
        return capture_cuda(self.unet, args, self.warmup)

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        self.graph = None
        log.warning("CUDA graphs off for this UNet, running eagerly: %s", reason)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor):
        args = (x, timesteps, context, y)
        if self.fallback_reason is not None or torch.is_grad_enabled():
            return self.unet(*args)
        key = signature(*args)
        if self.graph is None or self.graph.key != key:
            self.graph = None  # release the old graph's memory pool before capturing the next
            try:
                self.graph = self.capture(args)
            except Exception as exc:  # noqa: BLE001 - any capture failure means eager, with the reason logged
                self._fall_back(f"capture failed for {key}: {type(exc).__name__}: {exc}")
                return self.unet(*args)
            self.captures += 1
        for buf, a in zip(self.graph.inputs, args):
            buf.copy_(a)
        self.graph.replay()
        return self.graph.output.clone()
