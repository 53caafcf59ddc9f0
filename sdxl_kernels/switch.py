"""KernelSwitch: the one way a module turns sdxl_kernels on or off.

    class MyAttention(KernelSwitch, nn.Module):
        KERNEL_KINDS = ("attention",)          # what forward routes, in patch()'s words
        def forward(self, q, k, v):
            sdpa = sdxl_kernels.scaled_dot_product_attention if self.kernels else F.scaled_dot_product_attention
            ...

    model.use_kernels(False)               # every switch inside model: plain PyTorch
    model.use_kernels(None)                # back to the process-wide default
    set_default_use_kernels(False)         # the default of every switch left at None

`patch()` recognises switches with `isinstance(m, KernelSwitch)` and turns on those whose kinds it was asked
to patch; `unpatch()` restores their previous setting. The backend a switched-on module then gets per call is
still `sdxl_kernels.backends`' choice (`set_backend`, `SDXL_KERNELS_BACKEND`, `last_backend`).
"""
from __future__ import annotations

from torch import nn

KINDS = ("attention", "group_norm_silu", "embedding")  # what a switch can route (patch()'s flags)

_default = True


def set_default_use_kernels(enabled: bool) -> None:
    """The process-wide default of every switch whose `use_kernels` was not called (or called with None)."""
    global _default
    _default = bool(enabled)


def default_use_kernels() -> bool:
    return _default


class KernelSwitch:
    """Mixin for an `nn.Module` whose forward can run on sdxl_kernels or plain PyTorch.

    KERNEL_KINDS names what the module's own forward routes (a subset of KINDS; empty for a container whose
    children do the routing). `kernels` is the setting in force: the module's own (`_kernels`), else the
    process-wide default."""

    KERNEL_KINDS: tuple[str, ...] = ()
    _kernels: bool | None = None  # None: follow the process-wide default

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = set(cls.KERNEL_KINDS) - set(KINDS)
        if unknown:
            raise TypeError(f"{cls.__name__}.KERNEL_KINDS: unknown kinds {sorted(unknown)}; expected a subset of {KINDS}")

    @property
    def kernels(self) -> bool:
        return _default if self._kernels is None else self._kernels

    def use_kernels(self, enabled: bool | None = True):
        """Set every switch in this module's tree (itself included): True runs sdxl_kernels, False plain
        PyTorch, None follows `set_default_use_kernels`. Returns self."""
        enabled = None if enabled is None else bool(enabled)
        modules = self.modules() if isinstance(self, nn.Module) else (self,)
        for m in modules:
            if isinstance(m, KernelSwitch):
                m._kernels = enabled
        return self
