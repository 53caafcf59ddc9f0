"""`TrainConfig`: every knob of `sdxl train`, with named presets, read from TOML or JSON and overridden by flags."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass
from typing import Any


class ConfigFile:
    """Files and comparisons for a config dataclass: `to_dict`/`to_json`, `from_dict`/`from_file` (TOML or
    JSON over a base), and `differences` outside the class's RESUMABLE_CHANGES. Shared by every trainer's
    config (`TrainConfig`, `VAETrainConfig`)."""

    RESUMABLE_CHANGES: tuple[str, ...] = ()

    def check_common(self, at_least_one: tuple[str, ...]) -> None:
        """The checks every trainer's config shares: AdamW betas as a tuple, precision, device, distributed
        mode, and the integer fields that must be ≥ 1."""
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        for name, allowed in (("precision", ("auto", "bf16", "fp32")), ("device", ("auto", "cpu", "cuda")),
                              ("distributed", ("ddp", "fsdp"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base=None):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(names)}")
        start = base.to_dict() if base is not None else {}
        return cls(**{**start, **values})

    @classmethod
    def from_file(cls, path: str | pathlib.Path, base=None):
        """A TOML (.toml) or JSON file of fields, applied over `base` (or the defaults)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        text = path.read_text()
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser as a package (a declared dependency)
                import tomli as tomllib

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
        return cls.from_dict(values, base)

    def differences(self, other) -> dict[str, tuple]:
        """Fields (other than RESUMABLE_CHANGES) whose values differ: {name: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in self.RESUMABLE_CHANGES and a[k] != b[k]}


@dataclass
class TrainConfig(ConfigFile):
    """One training run. Presets: `TrainConfig.tiny()` (random tiny SDXL-structured models, the CPU demo) and
    `TrainConfig.sdxl()` (fine-tuning a real checkpoint given by `model`)."""

    # data and output
    data: str = ""  # image folder (name.png + name.txt), or webdataset shards ("shards/{000..009}.tar")
    out: str = "runs/sdxl"
    model: str = ""  # checkpoint to fine-tune (official single file or diffusers folder); "" = random init (tiny)
    tiny_models: bool = False  # random tiny base models instead of `model`
    resolution: int = 1024  # bucket area = resolution²
    bucket_step: int = 64
    min_side: int = 0  # 0: resolution / 2
    max_side: int = 0  # 0: 2 · resolution
    random_crop: bool = True
    holdout: int = 0  # the last N files of a data folder are not trained on (kept for evaluation)
    cache_dir: str = ""  # cache VAE moments and text embeddings here (crops fixed across epochs)
    num_workers: int = 0
    # objective
    offset_noise: float = 0.05
    text_dropout: float = 0.05  # probability of zeroing a sample's text conditioning (sgm ucg_rate)
    micro_dropout: float = 0.0  # probability of zeroing a sample's size/crop/target embedding
    min_snr_gamma: float = 0.0  # 0: plain eps MSE; else min-SNR-γ weighting
    refiner: bool = False  # train a refiner: only the lowest `refiner_noise_levels` noise levels
    refiner_noise_levels: int = 200
    aesthetic_score: float = 6.0  # refiner conditioning for the training images
    # optimisation
    batch_size: int = 1  # per process and micro-step
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    ema_decay: float = 0.9999  # 0: no EMA
    ema_on_cpu: bool = False
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto": bf16 on CUDA, fp32 on the CPU
    gradient_checkpointing: bool = False
    use_kernels: bool = True  # sdxl_kernels on the hot path; False: eager PyTorch (for comparison)
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    device: str = "auto"  # "auto": CUDA when available (rank r on cuda:LOCAL_RANK), else the CPU; or "cpu"
    # bookkeeping
    seed: int = 0
    save_every: int = 500  # steps between checkpoints (also written on SIGTERM / SIGINT and at the end)
    keep_checkpoints: int = 2
    sample_every: int = 0  # steps between sample grids (0: off)
    sample_prompts: tuple[str, ...] = ("a red circle", "a blue square")
    sample_steps: int = 20
    log_every: int = 10
    progress: bool = True

    # Fields that may change between a checkpoint and its resumption; every other field must match.
    RESUMABLE_CHANGES = ("out", "max_steps", "save_every", "keep_checkpoints", "sample_every", "sample_prompts",
                         "sample_steps", "log_every", "progress", "num_workers", "data", "cache_dir")

    @classmethod
    def tiny(cls, **overrides) -> TrainConfig:
        """Random tiny SDXL-structured models on 64² images (16-pixel buckets): the CPU demo."""
        base = dict(tiny_models=True, resolution=64, bucket_step=16, min_side=32, max_side=128, batch_size=4, lr=1e-3,
                    warmup_steps=10, ema_decay=0.99, max_steps=300, save_every=100, log_every=10,
                    sample_prompts=("a red circle", "a blue square", "a green triangle", "a yellow circle"))
        return cls(**{**base, **overrides})

    @classmethod
    def sdxl(cls, **overrides) -> TrainConfig:
        """Fine-tuning an SDXL base checkpoint (`model`) at 1024² buckets, the paper's multi-aspect stage."""
        base = dict(resolution=1024, bucket_step=64, lr=1e-5, warmup_steps=100, batch_size=1,
                    gradient_checkpointing=True, ema_decay=0.9999)
        return cls(**{**base, **overrides})

    def __post_init__(self):
        self.sample_prompts = tuple(self.sample_prompts)
        self.check_common(("batch_size", "grad_accum", "max_steps", "save_every", "resolution", "bucket_step"))
        for name in ("text_dropout", "micro_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 1 <= self.refiner_noise_levels <= 1000:
            raise ValueError(f"refiner_noise_levels must be in [1, 1000], got {self.refiner_noise_levels}")


PRESETS = {"tiny": TrainConfig.tiny, "sdxl": TrainConfig.sdxl}
