"""Backend registry: which implementation serves each op, and which one served the last call.

Backends, fastest first:
  triton  our Triton kernels (CUDA tensors; CPU tensors too when TRITON_INTERPRET=1 and forced)
  cuda    our CUDA kernels from the C++ extension (CUDA tensors)
  cpu     our C++ kernels from the extension (CPU tensors)
  torch   the plain-PyTorch reference (anything)

Selection per call: an override set with `set_backend(op, name)` wins, then the environment variable
`SDXL_KERNELS_BACKEND` ("torch" for every op, or "group_norm_silu=cpu,fourier_embedding=torch"), then the
first backend in the order above whose predicate accepts the inputs. A forced backend that cannot serve the
inputs raises instead of quietly falling back. `last_backend(op)` names the backend of the last call.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
OPS = ("group_norm_silu", "fourier_embedding", "scaled_dot_product_attention")
ENV_VAR = "SDXL_KERNELS_BACKEND"

_overrides: dict[str, str | None] = {}
_last: dict[str, str] = {}


def _check_names(op: str, name: str | None) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} for {op!r}; expected one of {BACKENDS} or None")


_PARSED_ENV: dict[str, dict[str, str]] = {}


def _parse_env(value: str) -> dict[str, str]:
    """'torch' -> every op; 'op=name,op=name' -> per op. Memoised in a plain dict, which torch.compile traces
    (it warns on functools caches)."""
    hit = _PARSED_ENV.get(value)
    if hit is None:
        hit = _PARSED_ENV[value] = _parse_env_value(value)
    return hit


def _parse_env_value(value: str) -> dict[str, str]:
    value = value.strip()
    if not value:
        return {}
    if "=" not in value:
        _check_names(OPS[0], value)
        return {op: value for op in OPS}
    out = {}
    for item in value.split(","):
        op, _, name = item.partition("=")
        op, name = op.strip(), name.strip()
        _check_names(op, name)
        out[op] = name
    return out


def set_backend(op: str, name: str | None) -> None:
    """Force `op` onto backend `name` ("triton", "cuda", "cpu", "torch"); None restores automatic choice."""
    _check_names(op, name)
    _overrides[op] = name


def get_backend(op: str) -> str | None:
    """The forced backend of `op` (override, then environment), or None when chosen automatically."""
    _check_names(op, None)
    if _overrides.get(op) is not None:
        return _overrides[op]
    return _parse_env(os.environ.get(ENV_VAR, "")).get(op)


def last_backend(op: str) -> str | None:
    """Name of the backend that served the last call of `op` (None before the first call)."""
    _check_names(op, None)
    return _last.get(op)


# ---- what is available -------------------------------------------------------------------------------


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def extension():
    """The compiled `sdxl_kernels._C` module, or None (said once, with the reason)."""
    try:
        return importlib.import_module("sdxl_kernels._C")
    except ImportError as e:
        warnings.warn(
            "sdxl_kernels: the C++/CUDA extension sdxl_kernels._C is not built "
            f"({e}); the 'cpu' and 'cuda' backends are unavailable, Triton and PyTorch paths remain. "
            "Build it with `pip install --no-build-isolation -e .`.",
            stacklevel=3,
        )
        return None


def cpu_extension_available() -> bool:
    return extension() is not None


def cuda_extension_available() -> bool:
    ext = extension()
    return ext is not None and bool(ext.has_cuda())


# ---- selection ----------------------------------------------------------------------------------------

Predicate = Callable[..., "str | None"]  # returns None when it can serve, else the reason it cannot


def select(op: str, predicates: dict[str, Predicate], *args) -> str:
    """Pick the backend for one call of `op` and record it.

    `predicates[name](*args)` returns None if backend `name` can serve these inputs, else a reason; args[0]
    is the tensor whose device decides. Auto order is BACKENDS, "triton" only for CUDA tensors (the
    interpreter serves CPU tensors only when forced); "torch" must always accept.
    """
    forced = get_backend(op)
    if forced is not None:
        if forced not in predicates:
            raise RuntimeError(f"{op}: backend {forced!r} is not implemented for this op")
        reason = predicates[forced](*args)
        if reason is not None:
            raise RuntimeError(f"{op}: forced backend {forced!r} cannot serve these inputs: {reason}")
        _last[op] = forced
        return forced
    for name in _AUTO_CUDA if args[0].is_cuda else _AUTO_OTHER:
        pred = predicates.get(name)
        if pred is not None and pred(*args) is None:
            _last[op] = name
            return name
    raise RuntimeError(f"{op}: no backend can serve these inputs")  # pragma: no cover - torch accepts all


def call(op: Callable, body: Callable, args: tuple, inputs: tuple):
    """`op(*args)` (a torch.library op) when the dispatcher is needed: under torch.compile, or when autograd
    must record the call (grad mode on and an input in `inputs` requires grad). Otherwise `body(*args)`, the
    function the op runs, called directly: the same backend choice and kernels without the dispatcher's
    ~10 µs, which matter for launch-bound ops. Every op's public function goes through here."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return op(*args)
    return body(*args)


_AUTO_CUDA = BACKENDS
_AUTO_OTHER = tuple(b for b in BACKENDS if b != "triton")


def device_reason(t: torch.Tensor, backend: str) -> str | None:
    """Common device test: None if `backend` can run on `t`'s device, else why not (constant strings: this
    runs on every call)."""
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if t.is_cuda or (t.is_cpu and triton_interpret()):
            return None
        return "Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    if backend == "cuda":
        if not t.is_cuda:
            return "the tensors are not on a CUDA device"
        return None if cuda_extension_available() else "the extension was built without CUDA kernels"
    if backend == "cpu":
        if not t.is_cpu:
            return "the tensors are not on the CPU"
        return None if extension() is not None else "the C++ extension sdxl_kernels._C is not built"
    return None
