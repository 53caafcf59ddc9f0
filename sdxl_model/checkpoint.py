"""Checkpoint IO at the loading edge: official single-file and diffusers layouts into our modules.

Our modules use sgm's parameter names, so the official single-file layout loads after stripping its
component prefix (`model.diffusion_model.` for the UNet, `first_stage_model.` for the VAE). The diffusers
layout goes through an explicit key map derived from the config (`diffusers_unet_key_map`, and
`diffusers_vae_key_map` in vae.py). `load_pipeline_components` builds both models on the meta device and
loads a whole checkpoint (single file or diffusers pipeline folder), telling base from refiner. Loading is strict: every missing, unexpected or
mis-shaped tensor is reported together in one ValueError; nothing is silently skipped.

Only safetensors files are read by default; pickled files (`.ckpt`, `.bin`, `.pt`, `.pth`) need
`allow_pickle=True` and are then read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import UNetConfig, VAEConfig
from .unet import UNet
from .vae import AutoencoderKL, diffusers_vae_key_map

PathLike = str | os.PathLike

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Components of a full single-file checkpoint that are not the UNet; ignored when loading a UNet.
OTHER_COMPONENT_PREFIXES = ("first_stage_model.", "conditioner.", "cond_stage_model.", "denoiser.", "model_ema.")
# Every component prefix of a full single-file checkpoint; a VAE load ignores all but VAE_PREFIX.
ALL_COMPONENT_PREFIXES = (UNET_PREFIX,) + OTHER_COMPONENT_PREFIXES
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_SHOW = 5  # names shown per category in error messages


# ---- the diffusers <-> sgm key map -----------------------------------------------------------------------

_RESNET = {  # diffusers ResnetBlock2D -> sgm ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_INV = {v: k for k, v in _RESNET.items()}
_TOP_LEVEL = {  # sgm module -> diffusers module
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _resnet_name(diffusers_block: str, rest: str) -> str:
    """`in_layers.2.weight` inside a ResBlock -> `<block>.conv1.weight`."""
    for sgm, diff in _RESNET_INV.items():
        if rest.startswith(sgm + "."):
            return f"{diffusers_block}.{diff}{rest[len(sgm):]}"
    raise KeyError(rest)


def sgm_to_diffusers_unet_key(key: str, config: UNetConfig) -> str:
    """One sgm UNet parameter name (no `model.diffusion_model.` prefix) -> its diffusers name.

    sgm numbers the stages flat: input_blocks.0 is conv_in, then per level `num_res_blocks` stages of
    [ResBlock, SpatialTransformer?] and one Downsample stage (all but the last level); output_blocks run
    from the deepest level up with `num_res_blocks + 1` stages each, the last of a level holding the
    Upsample (at index 2 after an attention, else 1). Diffusers numbers blocks per level instead.
    """
    for sgm, diff in _TOP_LEVEL.items():
        if key.startswith(sgm + "."):
            return diff + key[len(sgm):]
    per_level = config.num_res_blocks + 1  # sgm stages per level, in both directions
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.+)", key)
    if m is None:
        raise KeyError(f"not a UNet parameter name: {key}")
    group, stage, layer, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if group == "middle_block":  # middle_block.{0: ResBlock, 1: SpatialTransformer, 2: ResBlock}.rest
        if stage == 1:
            return f"mid_block.attentions.0.{rest}"
        return _resnet_name(f"mid_block.resnets.{stage // 2}", rest)
    layer = int(layer)
    if group == "input_blocks":
        level, j = divmod(stage - 1, per_level)
        if j == config.num_res_blocks:  # Downsample stage: input_blocks.k.0.op
            return f"down_blocks.{level}.downsamplers.0.conv{rest.removeprefix('op')}"
        if layer == 0:
            return _resnet_name(f"down_blocks.{level}.resnets.{j}", rest)
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    up, j = divmod(stage, per_level)
    has_attn = config.transformer_depth[config.num_levels - 1 - up] > 0
    if layer == 0:
        return _resnet_name(f"up_blocks.{up}.resnets.{j}", rest)
    if layer == 1 and has_attn:
        return f"up_blocks.{up}.attentions.{j}.{rest}"
    return f"up_blocks.{up}.upsamplers.0.{rest}"  # Upsample: `conv.weight` in both layouts


def diffusers_unet_key_map(config: UNetConfig, sgm_keys=None) -> dict[str, str]:
    """{diffusers name: our (sgm) name} for every tensor of `UNet(config)`.

    `sgm_keys` defaults to the state dict names of a UNet built on the meta device (no memory used).
    """
    if sgm_keys is None:
        with torch.device("meta"):
            sgm_keys = list(UNet(config).state_dict())
    mapping = {sgm_to_diffusers_unet_key(k, config): k for k in sgm_keys}
    if len(mapping) != len(sgm_keys):
        raise AssertionError("diffusers key map is not one-to-one")  # a bug in the map, not in the input
    return mapping


# ---- reading tensors -------------------------------------------------------------------------------------


class _TensorSource:
    """Lazy access to the tensors of one file: names and shapes first, data on demand (safetensors mmap)."""

    def __init__(self, path: Path, allow_pickle: bool):
        self.path = path
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        if path.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise ValueError(
                    f"{path}: refusing to unpickle a '{path.suffix}' file (pickles can run arbitrary code); "
                    "convert it to .safetensors, or pass allow_pickle=True to load it with "
                    "torch.load(weights_only=True)"
                )
            self._tensors = _load_pickled(path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            try:
                self._handle = safe_open(str(path), framework="pt", device="cpu")
                self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: not a readable safetensors file (truncated or another format?): {e}") from e

    def get(self, name: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name]
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{self.path}: cannot read tensor {name!r}: {e}") from e


def _load_pickled(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad / unsafe pickles
        raise ValueError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # Lightning-style .ckpt
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _resolve_file(path: Path, component: str = "unet") -> tuple[Path, bool, dict | None]:
    """(weights file, is_diffusers_layout, diffusers config or None) for a file, a diffusers model folder or a
    pipeline folder holding `component/` (unet or vae)."""
    if path.is_file():
        return path, False, None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path / component).is_dir() and not (path / "config.json").exists():
        path = path / component  # a pipeline folder
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"{path}: a folder must be a diffusers model folder (config.json + "
                         f"{DIFFUSERS_WEIGHT_NAMES[0]}) or a pipeline folder with {component}/")
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (path / name).exists():
            return path / name, True, json.loads(config_file.read_text())
    if (path / (DIFFUSERS_WEIGHT_NAMES[0] + ".index.json")).exists():
        raise ValueError(f"{path}: sharded diffusers weights are not supported yet")
    raise ValueError(f"{path}: none of {', '.join(DIFFUSERS_WEIGHT_NAMES)} found")


def _resolve_unet_file(path: Path) -> tuple[Path, bool, dict | None]:
    return _resolve_file(path, "unet")


# ---- naming and validation -------------------------------------------------------------------------------


def _looks_like_lora(names) -> str | None:
    for n in names:
        if "lora_" in n or "lora." in n or n.endswith(".alpha"):
            return n
    return None


def _describe_unet(shapes: Mapping[str, tuple]) -> str | None:
    """Best guess of what a (prefix-stripped, sgm-named) UNet state dict is, for error messages."""
    proj_in = shapes.get("input_blocks.1.1.proj_in.weight") or shapes.get("input_blocks.4.1.proj_in.weight")
    if proj_in is not None and len(proj_in) == 4:
        return "an SD 1.x/2.x UNet (convolutional proj_in; SDXL uses linear projections)"
    label = shapes.get("label_emb.0.0.weight")
    if label is None:
        if "input_blocks.0.0.weight" in shapes:
            return "a UNet without the ADM vector input (label_emb), not SDXL (SD 1.x/2.x?)"
        return None
    return {2816: "an SDXL base UNet (ADM vector of 2816)", 2560: "an SDXL refiner UNet (ADM vector of 2560)"}.get(
        label[1], f"a UNet with an ADM vector of {label[1]}"
    )


def _describe_config(cfg: UNetConfig) -> str:
    if cfg == UNetConfig.sdxl_base():
        return "the SDXL base UNet"
    if cfg == UNetConfig.sdxl_refiner():
        return "the SDXL refiner UNet"
    family = {2816: " (as the SDXL base)", 2560: " (as the SDXL refiner)"}.get(cfg.adm_in_channels, "")
    return f"a UNet expecting an ADM vector of {cfg.adm_in_channels}{family} and context of {cfg.context_dim}"


def _first(names, n=_SHOW) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_state_shapes(
    expected: Mapping[str, tuple], found: Mapping[str, tuple], *, source: str, hint: str | None = None
) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped tensor (counts + first names)."""
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    wrong = {k for k in expected.keys() & found.keys() if tuple(expected[k]) != tuple(found[k])}
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source} does not match the model:"]
    if missing:
        lines.append(f"  {len(missing)} missing: {_first(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected: {_first(unexpected)}")
    if wrong:
        shown = sorted(wrong)[:_SHOW]
        detail = ", ".join(f"{k} (checkpoint {tuple(found[k])}, model {tuple(expected[k])})" for k in shown)
        lines.append(f"  {len(wrong)} with the wrong shape: {detail}" + (", ..." if len(wrong) > _SHOW else ""))
    if hint:
        lines.append(f"  {hint}")
    raise ValueError("\n".join(lines))


# ---- public API ------------------------------------------------------------------------------------------


def load_weights(model: nn.Module, path: PathLike, *, allow_pickle: bool = False) -> nn.Module:
    """Load a checkpoint into `model` (a `UNet` or an `AutoencoderKL`), strictly, casting to the model's dtypes.

    For an `AutoencoderKL` the same rules apply with the VAE's layouts: the official single file
    (`first_stage_model.*`; UNet and text-encoder tensors in the same file are ignored), a bare VAE state dict
    in our (sgm) names, a diffusers-named file, a diffusers `vae/` model folder or a pipeline folder with `vae/`.
    The rest of this docstring describes the UNet case.

    path: a single file — the official layout (`model.diffusion_model.*`; other components such as the VAE
    and text encoders in the same file are ignored), a bare UNet state dict in our (sgm) names, or one in
    diffusers names — or a diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors`),
    or a pipeline folder with `unet/`. The layout is detected automatically.

    A model on the meta device gets the loaded tensors assigned (build on meta, then load): safetensors hands
    out copy-on-write views of the memory-mapped file, so a same-dtype load needs no second copy in RAM, and
    the weights land on the CPU. Otherwise the parameters are copied in place, one tensor at a time, onto
    whatever device they live on. Returns the model.
    """
    if isinstance(model, AutoencoderKL):
        return _load_vae(model, Path(path), allow_pickle)
    if not isinstance(model, UNet):
        raise TypeError(f"load_weights supports UNet and AutoencoderKL models, got {type(model).__name__}")
    path = Path(path)
    file, diffusers_folder, diffusers_config = _resolve_unet_file(path)
    if diffusers_config is not None:
        _check_diffusers_config(diffusers_config, model.config, path)
    source = _TensorSource(file, allow_pickle)
    names = _unet_names(source.shapes, model.config, file, diffusers_folder)  # our name -> name in file
    found = {ours: source.shapes[theirs] for ours, theirs in names.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hint = None
    what = _describe_unet(found)
    if what:
        hint = f"the checkpoint looks like {what}; the model is {_describe_config(model.config)}"
    check_state_shapes(expected, found, source=str(file), hint=hint)
    _copy_into(model, {ours: (lambda theirs=theirs: source.get(theirs)) for ours, theirs in names.items()})
    return model


def _check_diffusers_config(config: Mapping, ours: UNetConfig, folder: Path) -> None:
    """The folder's config must describe the model: head counts, for one, change the math but no shape."""
    try:
        theirs = UNetConfig.from_diffusers(config)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: config.json is not an SDXL-style UNet2DConditionModel config: {e}") from e
    if theirs != ours:
        diff = [
            f"{f}={getattr(theirs, f)!r} (model {getattr(ours, f)!r})"
            for f in ours.__dataclass_fields__
            if getattr(theirs, f) != getattr(ours, f)
        ]
        raise ValueError(
            f"{folder}: config.json describes {_describe_config(theirs)}, the model is {_describe_config(ours)}; "
            f"differs in {', '.join(diff)}"
        )


def _unet_names(shapes: Mapping[str, tuple], cfg: UNetConfig, file: Path, diffusers: bool) -> dict[str, str]:
    """{our name: name in the file} for the UNet tensors of a file, by layout detection; foreign keys are
    kept under their own name so the strict check reports them as unexpected."""
    lora = _looks_like_lora(shapes)
    if lora is not None:
        raise ValueError(
            f"{file}: this looks like a LoRA / adapter (e.g. {lora!r}), not full UNet weights; "
            "load_weights expects a complete UNet checkpoint"
        )
    if any(k.startswith(UNET_PREFIX) for k in shapes):  # official single file
        return {
            k.removeprefix(UNET_PREFIX): k
            for k in shapes
            if k.startswith(UNET_PREFIX) or not k.startswith(OTHER_COMPONENT_PREFIXES)
        }
    if diffusers or "conv_in.weight" in shapes or any(k.startswith("down_blocks.") for k in shapes):
        to_ours = diffusers_unet_key_map(cfg)
        return {to_ours.get(k, k): k for k in shapes}
    if not any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in shapes):
        raise ValueError(
            f"{file}: no UNet tensors found; expected the official layout ('{UNET_PREFIX}input_blocks...'), "
            f"a diffusers UNet ('conv_in.weight', 'down_blocks...') or a bare UNet state dict "
            f"('input_blocks...'); first keys: {_first(shapes, 3)}"
        )
    return {k: k for k in shapes}


def _copy_into(model: nn.Module, tensors: Mapping[str, Callable[[], torch.Tensor]]) -> None:
    """Tensors (read lazily, one at a time) into the model: assigned when it is on the meta device, else
    copied in place. Each is cast to the dtype of the tensor it replaces."""
    targets = model.state_dict()
    if any(t.is_meta for t in targets.values()):
        state = {}
        for name, target in targets.items():
            state[name] = tensors[name]().to(dtype=target.dtype)
        model.load_state_dict(state, strict=True, assign=True)
        return
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name]())


def _load_vae(model: AutoencoderKL, path: Path, allow_pickle: bool) -> AutoencoderKL:
    file, diffusers_folder, diffusers_config = _resolve_file(path, "vae")
    if diffusers_config is not None:
        _check_diffusers_vae_config(diffusers_config, model.config, path)
    source = _TensorSource(file, allow_pickle)
    names = _vae_names(source.shapes, model.config, file, diffusers_folder)  # our name -> name in file
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # diffusers stores the mid-block attention projections as Linear (C, C); ours are 1x1 convs (C, C, 1, 1)
    as_conv = {ours for ours, theirs in names.items()
               if _is_vae_attn_proj(ours) and len(source.shapes[theirs]) == 2 and len(expected.get(ours, ())) == 4}
    found = {ours: source.shapes[theirs] + ((1, 1) if ours in as_conv else ()) for ours, theirs in names.items()}
    hint = None
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in found):
        hint = "the checkpoint holds UNet tensors; the model is an AutoencoderKL"
    elif "encoder.conv_in.weight" in found and "encoder.conv_in.weight" in expected:
        ch = found["encoder.conv_in.weight"][0]
        if ch != expected["encoder.conv_in.weight"][0]:
            hint = f"the checkpoint's VAE has {ch} base channels, the model {model.config.channels}"
    check_state_shapes(expected, found, source=str(file), hint=hint)

    def reader(ours: str, theirs: str):
        def read():
            t = source.get(theirs)
            return t[:, :, None, None] if ours in as_conv else t
        return read

    _copy_into(model, {ours: reader(ours, theirs) for ours, theirs in names.items()})
    return model


def _is_vae_attn_proj(name: str) -> bool:
    return ".mid.attn_1." in name and name.endswith(".weight") and ".norm." not in name


def _check_diffusers_vae_config(config: Mapping, ours: VAEConfig, folder: Path) -> None:
    try:
        theirs = VAEConfig.from_diffusers(config)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: config.json is not an SDXL-style AutoencoderKL config: {e}") from e
    diff = [f"{f}={getattr(theirs, f)!r} (model {getattr(ours, f)!r})" for f in ours.__dataclass_fields__
            if getattr(theirs, f) != getattr(ours, f)]
    if diff:
        raise ValueError(f"{folder}: config.json describes another VAE than the model; differs in {', '.join(diff)}")


_VAE_BARE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _vae_names(shapes: Mapping[str, tuple], cfg: VAEConfig, file: Path, diffusers: bool) -> dict[str, str]:
    """{our name: name in the file} for the VAE tensors of a file, by layout detection (see _unet_names)."""
    lora = _looks_like_lora(shapes)
    if lora is not None:
        raise ValueError(f"{file}: this looks like a LoRA / adapter (e.g. {lora!r}), not full VAE weights")
    if any(k.startswith(VAE_PREFIX) for k in shapes):  # official single file
        return {
            k.removeprefix(VAE_PREFIX): k
            for k in shapes
            if k.startswith(VAE_PREFIX) or not k.startswith(ALL_COMPONENT_PREFIXES)
        }
    diffusers_names = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")
    if diffusers or any(k.startswith(diffusers_names) for k in shapes):
        to_ours = diffusers_vae_key_map(cfg)
        return {to_ours.get(k, k): k for k in shapes}
    if not any(k.startswith(_VAE_BARE_PREFIXES) for k in shapes):
        unet = any(k.startswith((UNET_PREFIX, "input_blocks.", "down_blocks.")) for k in shapes)
        what = " (it holds a UNet)" if unet else ""
        raise ValueError(
            f"{file}: no VAE tensors found{what}; expected the official layout ('{VAE_PREFIX}encoder...'), "
            f"a diffusers AutoencoderKL ('encoder.down_blocks...') or a bare VAE state dict ('encoder...', "
            f"'decoder...'); first keys: {_first(shapes, 3)}"
        )
    return {k: k for k in shapes}


def _prefix_of(model: nn.Module) -> str:
    if isinstance(model, UNet):
        return UNET_PREFIX
    if isinstance(model, AutoencoderKL):
        return VAE_PREFIX
    raise TypeError(f"save_weights supports UNet and AutoencoderKL models, got {type(model).__name__}")


def save_weights(model: nn.Module, path: PathLike) -> None:
    """Save a UNet (`model.diffusion_model.*`) or a VAE (`first_stage_model.*`) in the official single-file
    layout (safetensors). Use `save_components` for several models in one file."""
    save_components([model], path)


def save_components(models, path: PathLike) -> None:
    """Several models (a UNet, a VAE) in one official-layout single file, each under its own prefix."""
    state = {}
    for model in models:
        prefix = _prefix_of(model)
        state.update({prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()})
    if any(v.is_meta for v in state.values()):
        raise ValueError("cannot save a model whose weights are still on the meta device")
    save_file(state, str(path), metadata={"format": "pt"})


# ---- whole pipelines -------------------------------------------------------------------------------------

ADM_WIDTHS = {2816: "base", 2560: "refiner"}


@dataclasses.dataclass
class PipelineComponents:
    """The models of an SDXL checkpoint. kind: "base", "refiner", or None where neither the ADM width nor the
    file's other contents tell (e.g. small test models). layout: "single_file" or "diffusers".

    text_encoder / text_encoder_2 are None for now: TODO load CLIP ViT-L and OpenCLIP bigG (the conditioning
    module's encoders) from `conditioner.embedders.*` / `text_encoder*/` once those loaders exist."""

    unet: UNet
    vae: AutoencoderKL
    kind: str | None
    layout: str
    text_encoder: nn.Module | None = None
    text_encoder_2: nn.Module | None = None


def detect_kind(shapes: Mapping[str, tuple]) -> str | None:
    """"base" / "refiner" / None from the tensor names and shapes of an official single file: the ADM vector
    width (`label_emb.0.0.weight`: 2816 base, 2560 refiner), else the text encoders present (the base has
    CLIP-L at embedders.0 and bigG at embedders.1, the refiner only bigG at embedders.0)."""
    label = shapes.get(UNET_PREFIX + "label_emb.0.0.weight") or shapes.get("label_emb.0.0.weight")
    if label is not None and label[1] in ADM_WIDTHS:
        return ADM_WIDTHS[label[1]]
    names = list(shapes)
    if any(k.startswith("conditioner.embedders.1.model.") for k in names):
        return "base"
    if any(k.startswith("conditioner.embedders.0.model.") for k in names):
        return "refiner"
    return None


def _preset(kind: str | None, what: str) -> UNetConfig:
    if kind == "base":
        return UNetConfig.sdxl_base()
    if kind == "refiner":
        return UNetConfig.sdxl_refiner()
    raise ValueError(f"{what}: cannot tell an SDXL base (ADM vector 2816) from a refiner (2560); pass unet_config")


def load_pipeline_components(
    path: PathLike,
    *,
    unet_config: UNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> PipelineComponents:
    """UNet and VAE of an SDXL checkpoint — an official single file or a diffusers pipeline folder (`unet/`,
    `vae/`, optionally `model_index.json`) — built on the meta device and loaded by assignment (no second copy
    of the weights in RAM). Base vs refiner is detected from the keys (single file) or from unet/config.json
    (folder; `model_index.json`'s pipeline class as a fallback). Configs default to the SDXL presets (single
    file) or the folders' config.json; pass them for other models. The VAE runs in `vae_dtype` (default
    `dtype`, but float32 when dtype is float16: the SDXL VAE overflows in float16). Text encoders: None (TODO).
    """
    path = Path(path)
    if vae_dtype is None:
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    if path.is_dir():
        layout = "diffusers"
        for part in ("unet", "vae"):
            if not (path / part / "config.json").exists():
                raise ValueError(f"{path}: not a diffusers pipeline folder (no {part}/config.json)")
        if unet_config is None:
            unet_config = UNetConfig.from_diffusers(json.loads((path / "unet" / "config.json").read_text()))
        if vae_config is None:
            vae_config = VAEConfig.from_diffusers(json.loads((path / "vae" / "config.json").read_text()))
        kind = ADM_WIDTHS.get(unet_config.adm_in_channels)
        index = path / "model_index.json"
        if kind is None and index.exists():
            cls = json.loads(index.read_text()).get("_class_name", "")
            kind = "refiner" if "Img2Img" in cls else "base" if cls.startswith("StableDiffusionXL") else None
    else:
        layout = "single_file"
        file, _, _ = _resolve_file(path)
        kind = detect_kind(_TensorSource(file, allow_pickle).shapes)
        if unet_config is None:
            unet_config = _preset(kind, str(path))
        if vae_config is None:
            vae_config = VAEConfig.sdxl()
    with torch.device("meta"):
        unet = UNet(unet_config).to(dtype)
        vae = AutoencoderKL(vae_config).to(vae_dtype)
    load_weights(unet, path, allow_pickle=allow_pickle)
    load_weights(vae, path, allow_pickle=allow_pickle)
    return PipelineComponents(unet=unet.eval(), vae=vae.eval(), kind=kind, layout=layout)
