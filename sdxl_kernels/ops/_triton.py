"""Triton, when installed: `triton` and `tl` are None otherwise, and ops keep their other backends."""
from __future__ import annotations

import dataclasses
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with Linux torch wheels
    triton = None
    tl = None


if triton is not None:
    # Interpreter shims: under TRITON_INTERPRET=1 the kernels take UPCAST=True for bfloat16 (interpret_upcast),
    # and these stand in for what the GPU does natively; compiled with UPCAST=False they are the plain ops.

    @triton.jit
    def _rne_bf16(x):
        """float32 x rounded to the nearest bfloat16 (ties to even), kept in float32. For the interpreter
        only, whose float32 → bfloat16 cast truncates; GPUs round to nearest."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _like(x, ref, UPCAST: tl.constexpr):
        """x in ref's dtype, the operand of a tensor-core dot (UPCAST: the rounded value in float32)."""
        if UPCAST:
            return _rne_bf16(x)
        return x.to(ref.dtype)

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr):
        """acc + a @ b in float32 (acc None: a @ b); UPCAST (interpreter only, bf16) multiplies in float32 because
        the interpreter's bf16 tl.dot is wrong (Triton issue 11584). The operands are already rounded to
        bf16 values, so the result matches the GPU's bf16 × bf16 → fp32 product."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)


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


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compiled variant of a Triton kernel, for the ahead-of-time compile check."""

    fn: object  # the @triton.jit function
    label: str  # config in words, e.g. "bf16 NCHW BLOCK_C=16"
    pointers: dict  # pointer argument → Triton element type ("fp32", "bf16", ...)
    constexprs: dict  # constexpr (or specialised) argument → value
    floats: tuple = ()  # float scalar arguments
    num_warps: int = 4
    maxnreg: int | None = None
    num_stages: int | None = None  # software-pipelining depth; None = Triton's default
    divisible_by_16: tuple = ()  # arguments the JIT sees as multiples of 16 (aligned pointers, strides)
    archs: tuple = (80, 90)  # the archs whose launch configs pick this variant
    candidate: bool = False  # a sweep candidate (configs.candidates), not a table config

    def options(self) -> dict:
        opts = {"num_warps": self.num_warps}
        opts |= {"maxnreg": self.maxnreg} if self.maxnreg else {}
        return opts | ({"num_stages": self.num_stages} if self.num_stages else {})

    def signature(self) -> dict:
        sig = {}
        for name in self.fn.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name in self.pointers:
                sig[name] = "*" + self.pointers[name]
            else:
                sig[name] = "fp32" if name in self.floats else "i32"
        return sig


TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
