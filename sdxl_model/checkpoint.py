"""Checkpoint IO at the loading edge: official single-file and diffusers layouts into our modules.

Our modules use sgm's parameter names, so the official single-file layout loads after stripping its
component prefix (`model.diffusion_model.` for the UNet, `first_stage_model.` for the VAE). The diffusers
layout goes through an explicit key map derived from the config (`diffusers_unet_key_map`, and
`diffusers_vae_key_map` in vae.py). The text encoders are transformers models: CLIP-L loads by name (with or
without `text_model.`), bigG through the open_clip key map of text.py (`openclip_bigg_key_map`). `load_pipeline_components` builds both models on the meta device and
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

from . import text as _T
from .config import UNetConfig, VAEConfig
from .keys import check_state_shapes, first_names
from .unet import UNet
from .vae import AutoencoderKL, diffusers_vae_key_map

PathLike = str | os.PathLike

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Components of a full single-file checkpoint that are not the UNet; ignored when loading a UNet.
OTHER_COMPONENT_PREFIXES = ("first_stage_model.", "conditioner.", "cond_stage_model.", "denoiser.", "model_ema.")
# Every component prefix of a full single-file checkpoint; a VAE load ignores all but VAE_PREFIX.
ALL_COMPONENT_PREFIXES = (UNET_PREFIX,) + OTHER_COMPONENT_PREFIXES
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # + text_model.* (HF CLIPTextModel names), base only
BIGG_BASE_PREFIX = "conditioner.embedders.1.model."  # open_clip layout, base
BIGG_REFINER_PREFIX = "conditioner.embedders.0.model."  # open_clip layout, refiner
TEXT_WEIGHT_NAMES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


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


# ---- public API ------------------------------------------------------------------------------------------


def load_weights(model: nn.Module, path: PathLike, *, allow_pickle: bool = False) -> nn.Module:
    """Load a checkpoint into `model` (a `UNet`, an `AutoencoderKL` or text encoders), strictly, casting to the
    model's dtypes.

    Text encoders — an `SDXLTextEncoder`, or one of its parts alone (`transformers.CLIPTextModel` = CLIP-L,
    `CLIPTextModelWithProjection` = bigG): the official single file (base: CLIP-L at
    `conditioner.embedders.0.transformer.[text_model.]*`, bigG in open_clip layout at `conditioner.embedders.1.model.*`,
    converted with `openclip_bigg_to_hf`; refiner: bigG only, at `conditioner.embedders.0.model.*`), a diffusers
    pipeline folder (`text_encoder/`, `text_encoder_2/` with `model.safetensors`) or model folder, or a lone
    transformers-named file. The `text_model.` level is optional (transformers 5 drops it for CLIPTextModel);
    `position_ids` and open_clip's `logit_scale` are ignored. A strict error names the encoder.

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
    if _text_kind(model) is not None:
        return _load_text(model, Path(path), allow_pickle)
    if not isinstance(model, UNet):
        raise TypeError(f"load_weights supports UNet, AutoencoderKL and text-encoder models (SDXLTextEncoder, "
                        f"transformers CLIPTextModel / CLIPTextModelWithProjection), got {type(model).__name__}")
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
            f"('input_blocks...'); first keys: {first_names(shapes, 3)}"
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
            f"'decoder...'); first keys: {first_names(shapes, 3)}"
        )
    return {k: k for k in shapes}


# ---- text encoders ---------------------------------------------------------------------------------------
#
# Our names for a text encoder are its transformers state-dict names (CLIPTextModel: `embeddings.*`,
# `encoder.*`, `final_layer_norm.*` in transformers 5; CLIPTextModelWithProjection: `text_model.*` +
# `text_projection.weight`). Checkpoint names are compared without the optional `text_model.` level, so both
# transformers 4 and 5 layouts load. `position_ids` (a non-persistent buffer, present in older files) is ignored.

_CLIP_CLASSES = {"CLIPTextModel": "clip_l", "CLIPTextModelWithProjection": "bigg"}
_TEXT_LABEL = {"clip_l": "text encoder CLIP-L (CLIPTextModel)",
               "bigg": "text encoder OpenCLIP bigG (CLIPTextModelWithProjection)"}


def _text_kind(model) -> str | None:
    """"sdxl" for an SDXLTextEncoder, "clip_l" / "bigg" for a lone transformers model, else None."""
    if isinstance(model, _T.SDXLTextEncoder):
        return "sdxl"
    return _CLIP_CLASSES.get(type(model).__name__)


def _text_parts(model) -> dict[str, nn.Module]:
    """{"clip_l" | "bigg": transformers model} of a text-encoder model."""
    kind = _text_kind(model)
    if kind == "sdxl":
        parts = {"clip_l": model.clip_l, "bigg": model.clip_bigg}
        return {k: v for k, v in parts.items() if v is not None}
    return {kind: model}


def _strip_tm(name: str) -> str:
    return name.removeprefix("text_model.")


def _hf_full(name: str) -> str:
    """A CLIPTextModelWithProjection name with the `text_model.` level (as openclip_bigg_key_map produces)."""
    return name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name


def _ignored_text_key(name: str) -> bool:
    return name.endswith("position_ids")


def _hf_part_names(shapes: Mapping[str, tuple], prefix: str, sub: nn.Module):
    """HF-named tensors under `prefix` of a file → ({model name: file name}, {model name: shape})."""
    by_norm = {_strip_tm(k): k for k in sub.state_dict()}
    names, found = {}, {}
    for k, shape in shapes.items():
        if not k.startswith(prefix) or _ignored_text_key(k):
            continue
        rel = k[len(prefix):]
        ours = by_norm.get(_strip_tm(rel), rel)
        names[ours] = k
        found[ours] = tuple(shape)
    return names, found, {}


def _openclip_part_names(shapes: Mapping[str, tuple], prefix: str, sub: nn.Module):
    """open_clip-layout bigG tensors under `prefix` → ({model name: file name}, {model name: shape},
    {model name: how to derive it: ("qkv", i) | ("t",)}); fused in_proj rows split in q, k, v, text_projection
    transposed, logit_scale dropped. Unknown names stay as they are (reported as unexpected)."""
    kmap = _T.openclip_bigg_key_map(sub.config.num_hidden_layers)
    model_names = {_hf_full(k): k for k in sub.state_dict()}
    names, found, how = {}, {}, {}
    for k, shape in shapes.items():
        if not k.startswith(prefix):
            continue
        rel = k[len(prefix):]
        shape = tuple(shape)
        if rel not in kmap:
            names[rel], found[rel] = k, shape
            continue
        dsts = kmap[rel]
        for i, d in enumerate(dsts):
            ours = model_names.get(d, d)
            names[ours] = k
            if len(dsts) == 3:
                found[ours] = (shape[0] // 3,) + shape[1:] if shape and shape[0] % 3 == 0 else shape
                how[ours] = ("qkv", i)
            elif rel == "text_projection":
                found[ours] = shape[::-1]
                how[ours] = ("t",)
            else:
                found[ours] = shape
    return names, found, how


def _resolve_text_folder(path: Path, part: str) -> Path:
    """The weights file of a diffusers text-encoder folder (`text_encoder/` or `text_encoder_2/` of a pipeline
    folder, or the model folder itself)."""
    sub = "text_encoder" if part == "clip_l" else "text_encoder_2"
    folder = path / sub if (path / sub).is_dir() else path
    if not (folder / "config.json").exists():
        raise ValueError(f"{path}: no {sub}/ folder (config.json + {TEXT_WEIGHT_NAMES[0]}) for the "
                         f"{_TEXT_LABEL[part]}")
    for name in TEXT_WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name
    if (folder / (TEXT_WEIGHT_NAMES[0] + ".index.json")).exists():
        raise ValueError(f"{folder}: sharded text-encoder weights are not supported yet")
    raise ValueError(f"{folder}: none of {', '.join(TEXT_WEIGHT_NAMES)} found")


_TEXT_CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "hidden_act", "projection_dim", "max_position_embeddings", "vocab_size")


def _check_text_config(file: Path, sub: nn.Module, label: str) -> None:
    """A diffusers folder's config.json must describe the model (head count, activation: no shape shows them)."""
    cfg_file = file.parent / "config.json"
    if not cfg_file.exists():
        return
    theirs = json.loads(cfg_file.read_text())
    fields = [f for f in _TEXT_CONFIG_FIELDS if f != "projection_dim" or type(sub).__name__.endswith("Projection")]
    diff = [f"{f}={theirs[f]!r} (model {getattr(sub.config, f)!r})" for f in fields
            if f in theirs and theirs[f] != getattr(sub.config, f)]
    if diff:
        raise ValueError(f"{cfg_file}: describes another {label} than the model; differs in {', '.join(diff)}")


def _load_text(model: nn.Module, path: Path, allow_pickle: bool) -> nn.Module:
    """Text encoders from an official single file or a diffusers folder; see `load_weights`."""
    parts = _text_parts(model)
    plans = {}  # part -> (source, names, found, how, where)
    if path.is_dir():
        for part, sub in parts.items():
            file = _resolve_text_folder(path, part)
            _check_text_config(file, sub, _TEXT_LABEL[part])
            source = _TensorSource(file, allow_pickle)
            names, found, how = _hf_part_names(source.shapes, "", sub)
            plans[part] = (source, names, found, how, str(file))
    else:
        file, _, _ = _resolve_file(path)
        source = _TensorSource(file, allow_pickle)
        shapes = source.shapes
        lora = _looks_like_lora(shapes)
        if lora is not None:
            raise ValueError(f"{file}: this looks like a LoRA / adapter (e.g. {lora!r}), not full text-encoder weights")
        official = any(k.startswith("conditioner.") for k in shapes)
        base_file = any(k.startswith(CLIP_L_PREFIX) for k in shapes) or any(
            k.startswith(BIGG_BASE_PREFIX) for k in shapes)
        for part, sub in parts.items():
            if not official:  # a bare transformers state dict of one encoder
                if len(parts) > 1:
                    raise ValueError(f"{file}: no 'conditioner.embedders.*' tensors; an SDXLTextEncoder loads from "
                                     "an official single file or a diffusers pipeline folder")
                names, found, how = _hf_part_names(shapes, "", sub)
                where = str(file)
            elif part == "clip_l":
                if not base_file:
                    raise ValueError(f"{file}: holds no CLIP-L text encoder ({CLIP_L_PREFIX}*): a refiner checkpoint "
                                     "has only OpenCLIP bigG; build the encoder with SDXLTextEncoder.sdxl_refiner()")
                names, found, how = _hf_part_names(shapes, CLIP_L_PREFIX, sub)
                where = f"{file} [{CLIP_L_PREFIX}*]"
            else:
                prefix = BIGG_BASE_PREFIX if base_file else BIGG_REFINER_PREFIX
                names, found, how = _openclip_part_names(shapes, prefix, sub)
                where = f"{file} [{prefix}*]"
            plans[part] = (source, names, found, how, where)
    errors = []
    for part, (source, names, found, how, where) in plans.items():
        expected = {k: tuple(v.shape) for k, v in parts[part].state_dict().items()}
        hint = None
        if not found:
            hint = "no tensors of this encoder found there"
        try:
            check_state_shapes(expected, found, source=f"{_TEXT_LABEL[part]} from {where}", hint=hint)
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("\n".join(errors))
    for part, (source, names, found, how, where) in plans.items():
        def reader(ours, theirs, how=how, source=source):
            def read():
                t = source.get(theirs)
                h = how.get(ours)
                if h is None:
                    return t
                if h[0] == "qkv":
                    return t.chunk(3, dim=0)[h[1]]
                return t.t().contiguous()
            return read
        sub = parts[part]
        _copy_into(sub, {ours: reader(ours, theirs) for ours, theirs in names.items()})
        _materialize_position_ids(sub)
    return model


def _materialize_position_ids(sub: nn.Module) -> None:
    """A meta-built transformers CLIP keeps its non-persistent `position_ids` buffer on meta; rebuild it."""
    for mod in sub.modules():
        ids = getattr(mod, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            ref = next(sub.parameters())
            mod.register_buffer("position_ids", torch.arange(ids.shape[-1], device=ref.device).expand(ids.shape),
                                persistent=False)


def _prefix_of(model: nn.Module) -> str:
    if isinstance(model, UNet):
        return UNET_PREFIX
    if isinstance(model, AutoencoderKL):
        return VAE_PREFIX
    raise TypeError(f"save_weights supports UNet, AutoencoderKL and text-encoder models, got {type(model).__name__}")


def official_text_state(model: nn.Module, *, bigg_at_1: bool | None = None) -> dict[str, torch.Tensor]:
    """The official single-file tensors (`conditioner.embedders.*`) of a text-encoder model (an SDXLTextEncoder
    or a lone CLIPTextModel / CLIPTextModelWithProjection); works on the meta device. bigG goes to
    `embedders.1` (base) when `bigg_at_1`, else `embedders.0` (refiner); default: whether the model has CLIP-L.
    The unused open_clip `logit_scale` is written with its initial value; `position_ids` are left out."""
    parts = _text_parts(model)
    if bigg_at_1 is None:
        bigg_at_1 = "clip_l" in parts
    state = {}
    for part, sub in parts.items():
        sd = {k: v.detach() for k, v in sub.state_dict().items() if not _ignored_text_key(k)}
        if part == "clip_l":
            state.update({CLIP_L_PREFIX + _T.clip_l_checkpoint_key(_strip_tm(k)): v.contiguous()
                          for k, v in sd.items()})
        else:
            prefix = BIGG_BASE_PREFIX if bigg_at_1 else BIGG_REFINER_PREFIX
            oc = _T.hf_to_openclip_bigg({_hf_full(k): v for k, v in sd.items()}, sub.config.num_hidden_layers)
            state.update({prefix + k: v.contiguous() for k, v in oc.items()})
    return state


def save_weights(model: nn.Module, path: PathLike) -> None:
    """Save a UNet (`model.diffusion_model.*`), a VAE (`first_stage_model.*`) or text encoders
    (`conditioner.embedders.*`) in the official single-file layout (safetensors). Use `save_components` for
    several models in one file."""
    save_components([model], path)


def save_components(models, path: PathLike) -> None:
    """Several models (a UNet, a VAE, text encoders) in one official-layout single file, each under its own
    prefix. Text encoders: an `SDXLTextEncoder` (base: CLIP-L at `conditioner.embedders.0.transformer.text_model.*`,
    bigG in open_clip layout at `conditioner.embedders.1.model.*`; refiner: bigG at `conditioner.embedders.0.model.*`),
    or a lone `CLIPTextModel` / `CLIPTextModelWithProjection` (bigG goes to embedders.1 when a CLIP-L is saved
    with it, else embedders.0)."""
    models = list(models)
    has_clip_l = any(_text_kind(m) == "clip_l" or (_text_kind(m) == "sdxl" and m.clip_l is not None)
                     for m in models)
    state = {}
    for model in models:
        kind = _text_kind(model)
        if kind is None:
            prefix = _prefix_of(model)
            state.update({prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()})
            continue
        state.update(official_text_state(model, bigg_at_1=has_clip_l))
    if any(v.is_meta for v in state.values()):
        raise ValueError("cannot save a model whose weights are still on the meta device")
    save_file(state, str(path), metadata={"format": "pt"})


def diffusers_vae_config(config: VAEConfig) -> dict:
    """The diffusers `AutoencoderKL` config.json of a VAE config (the inverse of `VAEConfig.from_diffusers`)."""
    levels = len(config.block_channels)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": list(config.block_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "force_upcast": True,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.embed_dim,
        "layers_per_block": config.num_res_blocks,
        "mid_block_add_attention": True,
        "norm_num_groups": config.norm_groups,
        "scaling_factor": config.scale_factor,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def save_diffusers_vae(model: AutoencoderKL, folder: PathLike) -> Path:
    """Write `model` as a diffusers `AutoencoderKL` model folder: config.json and
    diffusion_pytorch_model.safetensors, renamed through `diffusers_vae_key_map` (inverted) with the mid-block
    attention projections stored as Linear (C, C), as diffusers keeps them. Loads back with `load_weights`."""
    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"save_diffusers_vae needs an AutoencoderKL, got {type(model).__name__}")
    cfg = model.config
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError(f"diffusers has one latent width; this VAE has z_channels={cfg.z_channels}, "
                         f"embed_dim={cfg.embed_dim}")
    ours = model.state_dict()
    to_ours = diffusers_vae_key_map(cfg)
    if set(to_ours.values()) != set(ours):
        raise ValueError("the diffusers key map does not cover this VAE's state dict")
    state = {}
    for theirs, name in to_ours.items():
        t = ours[name].detach()
        if _is_vae_attn_proj(name):
            t = t[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) Linear
        state[theirs] = t.contiguous()
    if any(v.is_meta for v in state.values()):
        raise ValueError("cannot save a model whose weights are still on the meta device")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / DIFFUSERS_WEIGHT_NAMES[0]), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(diffusers_vae_config(cfg), indent=2) + "\n")
    return folder


# ---- whole pipelines -------------------------------------------------------------------------------------

ADM_WIDTHS = {2816: "base", 2560: "refiner"}


@dataclasses.dataclass
class PipelineComponents:
    """The models of an SDXL checkpoint. kind: "base", "refiner", or None where neither the ADM width nor the
    file's other contents tell (e.g. small test models). layout: "single_file" or "diffusers".

    text_encoder: CLIP ViT-L (`transformers.CLIPTextModel`; the base only), text_encoder_2: OpenCLIP bigG
    (`transformers.CLIPTextModelWithProjection`; base and refiner) — diffusers' names; None when the checkpoint
    holds no such encoder (or loading them was turned off). `text_encoders` wraps them as one `SDXLTextEncoder`."""

    unet: UNet
    vae: AutoencoderKL
    kind: str | None
    layout: str
    text_encoder: nn.Module | None = None
    text_encoder_2: nn.Module | None = None

    @property
    def text_encoders(self) -> "_T.SDXLTextEncoder | None":
        """Both encoders as one `SDXLTextEncoder` (prompts -> context, pooled); None without bigG."""
        if self.text_encoder_2 is None:
            return None
        return _T.SDXLTextEncoder(self.text_encoder, self.text_encoder_2)


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
    text_encoder_config=None,
    text_encoder_2_config=None,
    load_text_encoders: bool = True,
) -> PipelineComponents:
    """UNet and VAE of an SDXL checkpoint — an official single file or a diffusers pipeline folder (`unet/`,
    `vae/`, optionally `model_index.json`) — built on the meta device and loaded by assignment (no second copy
    of the weights in RAM). Base vs refiner is detected from the keys (single file) or from unet/config.json
    (folder; `model_index.json`'s pipeline class as a fallback). Configs default to the SDXL presets (single
    file) or the folders' config.json; pass them for other models. The VAE runs in `vae_dtype` (default
    `dtype`, but float32 when dtype is float16: the SDXL VAE overflows in float16).

Text encoders (in `dtype`), when the checkpoint has them and `load_text_encoders`: CLIP-L from
`conditioner.embedders.0.transformer.*` / `text_encoder/` (base), bigG from `conditioner.embedders.{1 base,
0 refiner}.model.*` / `text_encoder_2/`. Their configs (`transformers.CLIPTextConfig`) default to the SDXL
ones (single file, see `sdxl_model.text.clip_l_config` / `clip_bigg_config`) or the folders' config.json.
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
    text_configs = {}  # part -> CLIPTextConfig of the encoders the checkpoint holds
    if load_text_encoders:
        if layout == "diffusers":
            for part, sub, given in (("clip_l", "text_encoder", text_encoder_config),
                                     ("bigg", "text_encoder_2", text_encoder_2_config)):
                cfg_file = path / sub / "config.json"
                if cfg_file.exists():
                    text_configs[part] = given if given is not None else \
                        _T._transformers().CLIPTextConfig.from_dict(json.loads(cfg_file.read_text()))
        else:
            names = list(_TensorSource(file, allow_pickle).shapes)
            has_l = any(k.startswith(CLIP_L_PREFIX) for k in names)
            has_g = any(k.startswith(BIGG_BASE_PREFIX if has_l else BIGG_REFINER_PREFIX) for k in names)
            if has_l:
                text_configs["clip_l"] = text_encoder_config if text_encoder_config is not None else _T.clip_l_config()
            if has_g:
                text_configs["bigg"] = text_encoder_2_config if text_encoder_2_config is not None else \
                    _T.clip_bigg_config()
    with torch.device("meta"):
        unet = UNet(unet_config).to(dtype)
        vae = AutoencoderKL(vae_config).to(vae_dtype)
        clip_l = _T.build_clip_l(text_configs["clip_l"]).to(dtype) if "clip_l" in text_configs else None
        bigg = _T.build_clip_bigg(text_configs["bigg"]).to(dtype) if "bigg" in text_configs else None
    load_weights(unet, path, allow_pickle=allow_pickle)
    load_weights(vae, path, allow_pickle=allow_pickle)
    for enc in (clip_l, bigg):
        if enc is not None:
            load_weights(enc, path, allow_pickle=allow_pickle)
            enc.eval()
    return PipelineComponents(unet=unet.eval(), vae=vae.eval(), kind=kind, layout=layout,
                              text_encoder=clip_l, text_encoder_2=bigg)
