"""Drop-in patching of foreign models: diffusers, sgm/ldm-style and plain `nn.Module`s onto our kernels.

    report = sdxl_kernels.patch(pipe.unet)   # in place; print(report) says what was replaced and what was left
    sdxl_kernels.unpatch(pipe.unet)          # the original modules, processors and classes, exactly

What `patch` recognises (by structure and class name; diffusers is never imported):
  group_norm_silu  nn.GroupNorm directly followed by nn.SiLU in an nn.Sequential (sgm/ldm ResBlock in_layers /
                   out_layers, UNetModel.out); diffusers ResnetBlock2D's norm1/norm2 + nonlinearity; diffusers
                   Encoder / Decoder / UNet2D(Condition)Model conv_norm_out + conv_act; sgm/ldm VAE ResnetBlock
                   norm1/norm2 + the function nonlinearity()
  group_norm       every other exact nn.GroupNorm (our op with activation=None)
  attention        diffusers `Attention` on the default AttnProcessor2_0 → `SDPAAttnProcessor` (set_processor);
                   sgm/ldm CrossAttention / MemoryEfficientCrossAttention (to_q/to_k/to_v/to_out, heads); sgm/ldm
                   VAE AttnBlock / MemoryEfficientAttnBlock (norm, 1×1 conv q/k/v/proj_out)
  embedding        diffusers `Timesteps` and sgm `Timestep` → `fourier_embedding`
  native           modules with a `KernelSwitch` (this project's own, or yours): switched on when every kind
                   their forward routes (KERNEL_KINDS) is being patched

How: parameters never move and module paths never change, so the state dict is untouched. A GroupNorm becomes
our `GroupNormSiLU` by a class swap (same object, same Parameters, hooks kept); the SiLU after it in a
Sequential becomes nn.Identity; blocks whose forward must change (ResnetBlock2D, where `nonlinearity` also
acts on the time embedding, sgm's ResnetBlock, and attention) get a subclass of their own class with one
forward overridden, again by a class swap. Linear layers are never touched, so LoRA adapters (PEFT wraps
to_q/to_k/to_v/to_out, time_emb_proj, ...) load and run before or after patching. Every change is recorded
on the model and `unpatch` undoes them in reverse. A patched model cannot be pickled whole (the subclasses
are made at run time): unpatch before `torch.save(model)`, or save its state dict, which is the original's.

`use_kernels()` is the fallback for code that cannot be patched structurally: for its duration
`torch.nn.functional.scaled_dot_product_attention` and `torch.nn.functional.group_norm` route to ours.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .ops import attention as _attention
from .ops.attention import scaled_dot_product_attention
from .ops.fourier_embedding import fourier_embedding
from .ops.group_norm_silu import GroupNormSiLU, check_inputs, group_norm_silu
from .switch import KernelSwitch

KINDS = ("group_norm_silu", "group_norm", "attention", "embedding", "native")
_STATE = "_sdxl_kernels_patch"  # instance attribute of a patched model: the report and the undo log
_ORIGINAL = "_sdxl_kernels_original"  # class attribute of our run-time subclasses: the class they replace

# ---- the report -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Replaced:
    kind: str  # one of KINDS
    path: str  # module path in the patched model ("" for the model itself)
    what: str


@dataclasses.dataclass(frozen=True)
class Left:
    kind: str
    path: str
    reason: str


@dataclasses.dataclass
class PatchReport:
    """What `patch` replaced (by kind, with module paths) and what it left, with the reason."""

    replaced: list[Replaced] = dataclasses.field(default_factory=list)
    left: list[Left] = dataclasses.field(default_factory=list)
    already_patched: bool = False  # True when the model had been patched before: nothing was changed

    def counts(self) -> dict[str, int]:
        return {k: sum(r.kind == k for r in self.replaced) for k in KINDS}

    def paths(self, kind: str) -> list[str]:
        return [r.path for r in self.replaced if r.kind == kind]

    def __str__(self) -> str:
        head = "already patched (nothing changed); " if self.already_patched else ""
        counts = ", ".join(f"{k} {n}" for k, n in self.counts().items() if n)
        lines = [f"sdxl_kernels.patch: {head}replaced {counts or 'nothing'}; left {len(self.left)}"]
        lines += [f"  + {r.kind:15s} {r.path or '<model>'}: {r.what}" for r in self.replaced]
        lines += [f"  - {r.kind:15s} {r.path or '<model>'}: {r.reason}" for r in self.left]
        return "\n".join(lines)


# ---- the undo log ---------------------------------------------------------------------------------------
# Entries are plain tuples of module references (no closures), so copy.deepcopy of a patched model maps them
# onto the copy and `unpatch` of the copy undoes the copy's changes.
#   ("class", module, old_class, added_attrs)   ("child", parent, name, old_child)
#   ("processor", attention, old_processor)     ("attr", module, name, old_value)


@dataclasses.dataclass
class _State:
    report: PatchReport
    undo: list[tuple]


def _undo(entry: tuple) -> None:
    what = entry[0]
    if what == "class":
        _, m, old_class, attrs = entry
        m.__class__ = old_class
        for name in attrs:
            m.__dict__.pop(name, None)
    elif what == "child":
        _, parent, name, old = entry
        old.train(parent._modules[name].training)  # it sat outside the tree: catch up on train()/eval()
        parent._modules[name] = old
    elif what == "processor":
        _, attn, old = entry
        attn.set_processor(old)
    elif what == "attr":
        _, m, name, old = entry
        setattr(m, name, old)


def _swap_class(m: nn.Module, new_class: type, undo: list, **attrs) -> None:
    undo.append(("class", m, type(m), tuple(attrs)))
    m.__class__ = new_class
    for name, value in attrs.items():
        m.__dict__[name] = value


_SUBCLASSES: dict[tuple[type, Callable], type] = {}


def _overridden(cls: type, forward: Callable) -> type:
    """`cls` with `forward` replaced: same name (reprs and class-name checks see the original), made once."""
    key = (cls, forward)
    if key not in _SUBCLASSES:
        body = {"forward": forward, _ORIGINAL: cls, "__module__": __name__, "__qualname__": cls.__qualname__}
        _SUBCLASSES[key] = type(cls.__name__, (cls,), body)
    return _SUBCLASSES[key]


def _is_ours(m: nn.Module) -> bool:
    return _ORIGINAL in type(m).__dict__


def _original_forward(self):
    return type(self).__dict__[_ORIGINAL].forward.__get__(self)


# ---- recognisers ----------------------------------------------------------------------------------------


def _from_diffusers(m: nn.Module, *names: str) -> bool:
    cls = type(m)
    return cls.__name__ in names and cls.__module__.split(".")[0] == "diffusers"


def _from_sgm(m: nn.Module, *names: str) -> bool:
    """sgm's / ldm's classes (and their copies, e.g. in ComfyUI): the class name, anywhere but diffusers; the
    callers then check the attributes that forward uses."""
    cls = type(m)
    return cls.__name__ in names and cls.__module__.split(".")[0] != "diffusers"


def _instance_forward(m: nn.Module) -> bool:
    """A forward set on the instance (accelerate's hooks do this) would hide a class swap."""
    return "forward" in m.__dict__


def _fuse_norm(gn: nn.GroupNorm, undo: list, activation: str | None) -> None:
    _swap_class(gn, GroupNormSiLU, undo, activation=activation)


def _fusable_pair(gn, act) -> str | None:
    """None when GroupNorm `gn` and activation `act` can become one fused GroupNormSiLU, else why not."""
    if type(gn) is not nn.GroupNorm:
        return f"{type(gn).__name__} is not an exact nn.GroupNorm"
    if type(act) is not nn.SiLU:
        return f"the activation is {type(act).__name__}, not nn.SiLU"
    if _instance_forward(gn):
        return "the GroupNorm has an instance-level forward (a hook wrapper)"
    return None


class _Patcher:
    def __init__(self, attention: bool, group_norm_silu: bool, embeddings: bool):
        self.flags = {"attention": attention, "group_norm_silu": group_norm_silu, "embedding": embeddings}
        self.report = PatchReport()
        self.undo: list[tuple] = []
        self.claimed: set[int] = set()  # GroupNorms that a pattern handled (or must keep)

    def replaced(self, kind, path, what):
        self.report.replaced.append(Replaced(kind, path, what))

    def left(self, kind, path, reason):
        self.report.left.append(Left(kind, path, reason))

    def run(self, model: nn.Module) -> None:
        modules = list(model.named_modules(remove_duplicate=True))
        for path, m in modules:
            self.visit(_join(path), m)
        if self.flags["group_norm_silu"]:
            for path, m in modules:
                if type(m) is nn.GroupNorm and id(m) not in self.claimed:
                    if _instance_forward(m):
                        self.left("group_norm", path, "instance-level forward (a hook wrapper)")
                        continue
                    _fuse_norm(m, self.undo, None)
                    self.replaced("group_norm", path, "nn.GroupNorm -> GroupNormSiLU(activation=None)")

    def visit(self, path: str, m: nn.Module) -> None:
        if _is_ours(m):
            self.left("native", path, "already patched by sdxl_kernels (patched through another model?)")
            return
        if isinstance(m, KernelSwitch):
            self.native(path, m)
            return
        if self.flags["group_norm_silu"]:
            if isinstance(m, nn.Sequential):
                self.sequential(path, m)
            elif _from_diffusers(m, "ResnetBlock2D"):
                self.resnet_block_2d(path, m)
            elif _from_sgm(m, "ResnetBlock"):
                self.sgm_resnet_block(path, m)
            elif _from_sgm(m, "Encoder", "Decoder", "Model") and isinstance(getattr(m, "norm_out", None), nn.GroupNorm):
                self.left("group_norm_silu", _join(path, "norm_out"), "followed by the function nonlinearity() "
                          "inside forward; runs as plain group norm")
            if _from_diffusers(m, "Encoder", "Decoder", "UNet2DConditionModel", "UNet2DModel"):
                self.norm_out(path, m)
        if self.flags["attention"]:
            if _from_diffusers(m, "Attention") and hasattr(m, "set_processor"):
                self.diffusers_attention(path, m)
            elif type(m).__name__ in ("CrossAttention", "MemoryEfficientCrossAttention"):
                self.sgm_attention(path, m)
            elif _from_sgm(m, "AttnBlock", "MemoryEfficientAttnBlock"):
                self.sgm_attn_block(path, m)
        if self.flags["embedding"]:
            if _from_diffusers(m, "Timesteps"):
                self.diffusers_timesteps(path, m)
            elif type(m).__name__ == "Timestep" and isinstance(getattr(m, "dim", None), int):
                self.sgm_timestep(path, m)
            elif type(m).__name__ == "UNetModel" and hasattr(m, "model_channels") and hasattr(m, "time_embed"):
                self.left("embedding", _join(path, "time_embed"), "sgm UNetModel computes its timestep "
                          "embedding with the function timestep_embedding() inside forward; not patchable")

    # -- GroupNorm + SiLU ------------------------------------------------------------------------------

    def sequential(self, path: str, seq: nn.Sequential) -> None:
        names = list(seq._modules)
        for i in range(len(names) - 1):
            gn, act = seq._modules[names[i]], seq._modules[names[i + 1]]
            if type(gn) is not nn.GroupNorm or id(gn) in self.claimed:
                continue
            why = _fusable_pair(gn, act) or ("the SiLU has hooks" if _has_hooks(act) else None)
            if why is not None:
                if isinstance(act, nn.SiLU):
                    self.left("group_norm_silu", _join(path, names[i]), why)
                continue
            self.claimed.add(id(gn))
            _fuse_norm(gn, self.undo, "silu")
            identity = nn.Identity().train(act.training)
            self.undo.append(("child", seq, names[i + 1], act))
            seq._modules[names[i + 1]] = identity
            self.replaced("group_norm_silu", _join(path, names[i]),
                          f"GroupNorm + SiLU ({_join(path, names[i + 1])} -> Identity) fused")

    def resnet_block_2d(self, path: str, m: nn.Module) -> None:
        required = ("norm1", "norm2", "conv1", "conv2", "nonlinearity", "time_emb_proj", "time_embedding_norm",
                    "skip_time_act", "upsample", "downsample", "dropout", "conv_shortcut", "output_scale_factor")
        missing = [a for a in required if not hasattr(m, a)]
        why = (f"unknown ResnetBlock2D layout (no {missing})" if missing else
               "instance-level forward (a hook wrapper)" if _instance_forward(m) else
               _fusable_pair(m.norm1, m.nonlinearity))
        scale_shift = not missing and m.time_embedding_norm == "scale_shift"
        if why is None and not scale_shift:
            why = _fusable_pair(m.norm2, m.nonlinearity)
        if why is not None:
            for norm in ("norm1", "norm2"):
                self.left("group_norm_silu", _join(path, norm), why)
            return
        _swap_class(m, _overridden(type(m), _resnet_block_2d_forward), self.undo)
        pairs = ("norm1",) if scale_shift else ("norm1", "norm2")
        for norm in pairs:
            gn = getattr(m, norm)
            self.claimed.add(id(gn))
            _fuse_norm(gn, self.undo, "silu")
            self.replaced("group_norm_silu", _join(path, norm), "ResnetBlock2D GroupNorm + nonlinearity fused "
                          "(forward overridden; nonlinearity still applied to temb)")
        if scale_shift:
            self.left("group_norm_silu", _join(path, "norm2"), "scale_shift modulation sits between norm2 and "
                      "the SiLU (norm2 runs as plain group norm)")

    def sgm_resnet_block(self, path: str, m: nn.Module) -> None:
        """sgm/ldm VAE ResnetBlock: norm1/norm2 each followed by the function nonlinearity() (x·sigmoid(x))."""
        required = ("norm1", "conv1", "norm2", "dropout", "conv2", "in_channels", "out_channels", "use_conv_shortcut")
        missing = [a for a in required if not hasattr(m, a)]
        why = (f"unknown ResnetBlock layout (no {missing})" if missing else
               "instance-level forward (a hook wrapper)" if _instance_forward(m) else
               next((f"{n} is {type(getattr(m, n)).__name__}, not an exact nn.GroupNorm" for n in ("norm1", "norm2")
                     if type(getattr(m, n)) is not nn.GroupNorm), None))
        if why is not None:
            for norm in ("norm1", "norm2"):
                self.left("group_norm_silu", _join(path, norm), why)
            return
        _swap_class(m, _overridden(type(m), _sgm_resnet_block_forward), self.undo)
        for norm in ("norm1", "norm2"):
            gn = getattr(m, norm)
            self.claimed.add(id(gn))
            _fuse_norm(gn, self.undo, "silu")
            self.replaced("group_norm_silu", _join(path, norm), "sgm ResnetBlock GroupNorm + nonlinearity() fused "
                          "(forward overridden)")

    def norm_out(self, path: str, m: nn.Module) -> None:
        gn, act = getattr(m, "conv_norm_out", None), getattr(m, "conv_act", None)
        if gn is None or act is None:
            return
        why = _fusable_pair(gn, act) or ("conv_act has hooks" if _has_hooks(act) else None)
        if why is not None:
            self.left("group_norm_silu", _join(path, "conv_norm_out"), why)
            return
        # conv_act is used only right after conv_norm_out in these classes' forward
        self.claimed.add(id(gn))
        _fuse_norm(gn, self.undo, "silu")
        self.undo.append(("child", m, "conv_act", act))
        m._modules["conv_act"] = nn.Identity().train(act.training)
        self.replaced("group_norm_silu", _join(path, "conv_norm_out"), "conv_norm_out + conv_act fused "
                      "(conv_act -> Identity)")

    # -- attention --------------------------------------------------------------------------------------

    def diffusers_attention(self, path: str, m: nn.Module) -> None:
        processor = m.processor
        name = type(processor).__name__
        if isinstance(processor, SDPAAttnProcessor):
            self.left("attention", path, "already on SDPAAttnProcessor")
        elif name != "AttnProcessor2_0":
            self.left("attention", path, f"custom processor {name} (only the default AttnProcessor2_0 is "
                      "replaced, so LoRA/IP-adapter/other processors keep their own math)")
        else:
            self.undo.append(("processor", m, processor))
            m.set_processor(SDPAAttnProcessor())
            self.replaced("attention", path, "diffusers Attention: AttnProcessor2_0 -> SDPAAttnProcessor")

    def override_forward(self, kind: str, path: str, m: nn.Module, forward, why_not: str | None, what: str) -> None:
        """Give `m` our `forward` (through a subclass, undone by unpatch) unless `why_not` says its layout does
        not fit or it carries an instance-level forward; report either way."""
        if why_not is None and _instance_forward(m):
            why_not = "instance-level forward (a hook wrapper)"
        if why_not is not None:
            self.left(kind, path, why_not)
            return
        _swap_class(m, _overridden(type(m), forward), self.undo)
        self.replaced(kind, path, what)

    def sgm_attention(self, path: str, m: nn.Module) -> None:
        ok = (all(isinstance(getattr(m, a, None), nn.Module) for a in ("to_q", "to_k", "to_v", "to_out"))
              and isinstance(getattr(m, "heads", None), int))
        name = type(m).__name__
        self.override_forward("attention", path, m, _cross_attention_forward,
                              None if ok else f"{name} without to_q/to_k/to_v/to_out and an int `heads`",
                              f"{name}: forward on sdxl_kernels SDPA (masks and extra arguments go to the "
                              "original forward)")

    def sgm_attn_block(self, path: str, m: nn.Module) -> None:
        """sgm/ldm VAE AttnBlock: single-head attention over the pixels, q/k/v/proj_out 1×1 convs."""
        convs = [getattr(m, a, None) for a in ("q", "k", "v", "proj_out")]
        ok = all(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) for c in convs) and hasattr(m, "norm")
        name = type(m).__name__
        self.override_forward("attention", path, m, _sgm_attn_block_forward,
                              None if ok else f"{name} without norm and 1×1 conv q/k/v/proj_out",
                              f"{name}: forward on sdxl_kernels SDPA")

    # -- embeddings -------------------------------------------------------------------------------------

    def diffusers_timesteps(self, path: str, m: nn.Module) -> None:
        scale = getattr(m, "scale", 1)
        self.override_forward("embedding", path, m, _diffusers_timesteps_forward,
                              None if scale == 1 else f"Timesteps(scale={scale}): our op has no scale",
                              f"Timesteps({getattr(m, 'num_channels', '?')}, flip_sin_to_cos="
                              f"{getattr(m, 'flip_sin_to_cos', '?')}, shift={getattr(m, 'downscale_freq_shift', '?')})"
                              " -> fourier_embedding")

    def sgm_timestep(self, path: str, m: nn.Module) -> None:
        plain = not list(m.children()) and not list(m.parameters(recurse=False))
        self.override_forward("embedding", path, m, _sgm_timestep_forward,
                              None if plain else "Timestep with unexpected children or parameters",
                              f"sgm Timestep({getattr(m, 'dim', '?')}) -> fourier_embedding")

    # -- our own modules --------------------------------------------------------------------------------

    def native(self, path: str, m: KernelSwitch) -> None:
        if not all(self.flags[k] for k in m.KERNEL_KINDS):  # what its own forward routes (none: a container)
            return
        if m.kernels:
            self.left("native", path, f"{type(m).__name__} already runs on sdxl_kernels")
            return
        self.undo.append(("attr", m, "_kernels", m._kernels))
        m._kernels = True
        self.replaced("native", path, f"{type(m).__name__}: kernel switch turned on")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


# ---- the overridden forwards ----------------------------------------------------------------------------


def _resnet_block_2d_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' ResnetBlock2D computation (0.2x–0.4x), written for the fused norms: norm1 (and norm2 unless
    time_embedding_norm is "scale_shift") already apply the SiLU that follows them, while `self.nonlinearity`
    still acts on temb (and after the scale-shift)."""
    x, h = input_tensor, self.norm1(input_tensor)  # (B, C, H, W); h = SiLU(GroupNorm(x))
    resample = self.upsample if self.upsample is not None else self.downsample
    if resample is not None:
        if self.upsample is not None and h.shape[0] >= 64:  # nearest upsampling needs contiguous large batches
            x, h = x.contiguous(), h.contiguous()
        x, h = resample(x), resample(h)
    h = self.conv1(h)
    if self.time_emb_proj is not None:
        temb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError("ResnetBlock2D with time_embedding_norm='scale_shift' needs temb")
        scale, shift = temb.chunk(2, dim=1)
        h = self.nonlinearity(self.norm2(h) * (1 + scale) + shift)  # norm2: plain GroupNorm here
    else:
        if temb is not None and self.time_embedding_norm == "default":
            h = h + temb
        h = self.norm2(h)  # SiLU(GroupNorm(h))
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        x = self.conv_shortcut(x.contiguous() if self.training else x)
    return (x + h) / self.output_scale_factor


def _sgm_resnet_block_forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
    """sgm's VAE ResnetBlock.forward with norm1/norm2 fused with the nonlinearity() after them."""
    h = self.conv1(self.norm1(x))  # norm1: GroupNorm + SiLU
    if temb is not None:
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
    h = self.conv2(self.dropout(self.norm2(h)))  # norm2: GroupNorm + SiLU
    if self.in_channels != self.out_channels:
        x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
    return x + h


def _sgm_attn_block_forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """sgm's VAE AttnBlock: x (B, C, H, W) → x + proj_out(attention over the H·W pixels, one head of C)."""
    h_ = self.norm(x)
    q, k, v = self.q(h_), self.k(h_), self.v(h_)
    b, c, hh, ww = q.shape
    q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(-1, -2) for t in (q, k, v))  # (B, 1, HW, C), strided views
    out = scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
    out = out.transpose(-1, -2).reshape(b, c, hh, ww)
    return x + self.proj_out(out)


def _plain(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0)


def _cross_attention_forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask=None, **kwargs):
    """sgm/ldm CrossAttention on our SDPA. x (B, L, query_dim), context (B, S, context_dim) → (B, L, query_dim).
    A mask or sgm's extra arguments (additional_tokens, n_times_crossframe_attn_in_self) take the original
    forward: their semantics differ between sgm and ldm."""
    if mask is not None or not all(_plain(v) for v in kwargs.values()):
        return _original_forward(self)(x, context, mask, **kwargs)
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, L|S, H*D)
    b, h = x.shape[0], self.heads
    q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, L|S, D)
    scale = getattr(self, "scale", None)
    out = scaled_dot_product_attention(q, k, v, scale=None if scale is None else float(scale))  # (B, H, L, D)
    out = out.transpose(1, 2).reshape(b, x.shape[1], -1)  # (B, L, H*D)
    return self.to_out(out)


def _diffusers_timesteps_forward(self, timesteps: torch.Tensor) -> torch.Tensor:
    """diffusers `get_timestep_embedding` (B,) → (B, num_channels) float32, in one kernel."""
    if timesteps.dim() != 1:
        return _original_forward(self)(timesteps)
    return fourier_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                             downscale_freq_shift=float(self.downscale_freq_shift))


def _sgm_timestep_forward(self, t: torch.Tensor) -> torch.Tensor:
    """sgm `timestep_embedding(t, dim)` (cos first, shift 0) (B,) → (B, dim) float32, in one kernel."""
    if t.dim() != 1:
        return _original_forward(self)(t)
    return fourier_embedding(t, self.dim)


# ---- diffusers attention processor -----------------------------------------------------------------------


class SDPAAttnProcessor:
    """The computation of diffusers' default AttnProcessor2_0 on `sdxl_kernels.scaled_dot_product_attention`:
    spatial_norm, group_norm, norm_cross, norm_q/norm_k, residual_connection and rescale_output_factor are
    honoured, the scale is SDPA's default. With an attention mask our SDPA hands over to PyTorch's."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        residual = hidden_states
        x = hidden_states if attn.spatial_norm is None else attn.spatial_norm(hidden_states, temb)
        image = x.ndim == 4
        if image:
            _, channels, height, width = x.shape
            x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        source = x if encoder_hidden_states is None else encoder_hidden_states
        batch, keys = source.shape[0], source.shape[1]
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            attention_mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = x  # self-attention reads the group-normed input
        else:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)  # (B, L|S, H·D)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.unflatten(-1, (attn.heads, head_dim)).transpose(1, 2) for t in (q, k, v))  # (B, H, L|S, D)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # (B, H, L, D)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, L, H·D)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image:
            out = out.transpose(1, 2).reshape(-1, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---- public API -----------------------------------------------------------------------------------------


def patch(model: nn.Module, *, attention: bool = True, group_norm_silu: bool = True, embeddings: bool = True
          ) -> PatchReport:
    """Put `model` on sdxl_kernels in place: fused GroupNorm+SiLU (and plain GroupNorm), our attention, our
    Fourier embeddings, wherever the structure is recognised (see the module docstring). Outputs equal the
    unpatched model's to kernel precision; the state dict and module paths do not change. Returns the report;
    a second call changes nothing and returns the first report with `already_patched=True`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects an nn.Module, got {type(model).__name__}")
    state = model.__dict__.get(_STATE)
    if state is not None:
        return dataclasses.replace(state.report, already_patched=True)
    patcher = _Patcher(attention, group_norm_silu, embeddings)
    try:
        patcher.run(model)
    except BaseException:
        for entry in reversed(patcher.undo):
            _undo(entry)
        raise
    model.__dict__[_STATE] = _State(patcher.report, patcher.undo)
    return patcher.report


def unpatch(model: nn.Module) -> bool:
    """Undo `patch(model)`: the original classes, modules and attention processors, in reverse order. The
    Parameters were never replaced, so training done while patched is kept. False when `model` was not
    patched."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return False
    for entry in reversed(state.undo):
        _undo(entry)
    return True


def is_patched(model: nn.Module) -> bool:
    return _STATE in model.__dict__


# ---- use_kernels ----------------------------------------------------------------------------------------


def _routed_sdpa(replaced: Callable) -> Callable:
    def scaled_dot_product_attention_(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                      scale=None, enable_gqa=False):
        args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if type(query) is torch.Tensor and backends.select(_attention.OP, _attention.PREDICATES, *args) != "torch":
            return scaled_dot_product_attention(*args[:6], scale=scale, enable_gqa=enable_gqa)
        # our SDPA would call F.scaled_dot_product_attention, i.e. us: go to what we replaced instead
        gqa = {"enable_gqa": True} if enable_gqa else {}
        return replaced(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **gqa)

    return scaled_dot_product_attention_


def _routed_group_norm(replaced: Callable) -> Callable:
    def group_norm_(input, num_groups, weight=None, bias=None, eps=1e-5):
        if type(input) is torch.Tensor and input.dim() >= 2:
            try:
                check_inputs(input, num_groups, weight, bias, eps, None)
            except (TypeError, ValueError):
                pass  # F.group_norm's own error or semantics
            else:
                return group_norm_silu(input, num_groups, weight, bias, eps, activation=None)
        return replaced(input, num_groups, weight, bias, eps)

    return group_norm_


@contextlib.contextmanager
def use_kernels(*, attention: bool = True, group_norm: bool = True) -> Iterator[None]:
    """For the duration, `torch.nn.functional.scaled_dot_product_attention` and `torch.nn.functional.group_norm`
    (hence every nn.GroupNorm) run on sdxl_kernels, for code that cannot be patched structurally. Restored on
    exit, also on an exception; nests (each level restores what it found). The following F.silu is not fused:
    a fused result would have to be returned before the SiLU is seen; use `patch` for that. Process-global:
    other threads see the routing too. Code that bound the functions at import (`from torch.nn.functional import
    group_norm`) is not affected."""
    saved = {"scaled_dot_product_attention": F.scaled_dot_product_attention, "group_norm": F.group_norm}
    try:
        if attention:
            F.scaled_dot_product_attention = _routed_sdpa(saved["scaled_dot_product_attention"])
        if group_norm:
            F.group_norm = _routed_group_norm(saved["group_norm"])
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
