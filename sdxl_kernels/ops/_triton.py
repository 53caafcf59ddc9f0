"""Triton, when installed: `triton` and `tl` are None otherwise, and ops keep their other backends."""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with Linux torch wheels
    triton = None
    tl = None


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def interpret_upcast(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot multiplies bf16 bit patterns (Triton issue 11584): upcast there."""
    from ..backends import triton_interpret

    return triton_interpret() and dtype == torch.bfloat16
