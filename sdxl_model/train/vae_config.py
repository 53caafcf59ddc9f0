"""`VAETrainConfig`: every knob of `sdxl train-vae`, with named presets, read from TOML or JSON (the same
`ConfigFile` machinery as `TrainConfig`) and overridden by flags."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ConfigFile, TrainConfig


@dataclass
class VAETrainConfig(ConfigFile):
    """One autoencoder training run (LDM/sgm's `AutoencoderKL` recipe: reconstruction + KL + optional
    perceptual and PatchGAN terms, with an EMA of the weights). Presets: `VAETrainConfig.tiny()` (the random
    tiny VAE on 32² crops, the CPU demo) and `VAETrainConfig.sdxl()` (the SDXL VAE at 256² crops; fine-tunes
    `model` when given, else trains from scratch)."""

    # data and output
    data: str = ""  # image folder (searched recursively; captions unused) or webdataset shards
    out: str = "runs/vae"
    model: str = ""  # VAE to fine-tune (official single file, diffusers vae/ or pipeline folder); "" = random init
    tiny_models: bool = False  # the tiny VAE (VAEConfig.tiny()) instead of the SDXL one
    resolution: int = 256  # crop side: images are resized to cover it, then randomly cropped
    bucket_step: int = 0  # 0: one square bucket resolution²; else multi-aspect buckets of this step
    num_workers: int = 0
    eval_data: str = ""  # held-out image folder; "" = the last eval_images files of `data`, kept out of training
    eval_images: int = 8  # images evaluated (centre crops at `resolution`)
    inception_weights: str = ""  # TorchScript Inception feature extractor for rFID; "" = rFID skipped
    # objective
    recon: str = "l1"  # "l1" or "l2"
    kl_weight: float = 1e-6
    perceptual_weights: str = ""  # TorchScript perceptual distance f(x, y) -> (B,); "" = off
    perceptual_weight: float = 1.0
    disc_start: int = 0  # 0: no discriminator; N ≥ 1: adversarial terms from optimizer step N on
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_layers: int = 3
    disc_channels: int = 64
    # optimisation
    batch_size: int = 8  # per process and micro-step
    grad_accum: int = 1
    max_steps: int = 10000
    lr: float = 4.5e-6
    disc_lr: float = 4.5e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.5, 0.9)  # LDM's autoencoder betas
    grad_clip: float = 0.0  # 0: off
    ema_decay: float = 0.9999  # 0: no EMA
    ema_on_cpu: bool = False
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto": bf16 on CUDA, fp32 on the CPU
    use_kernels: bool = True  # sdxl_kernels (fused GroupNorm+SiLU, attention) on the hot path; False: eager
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    device: str = "auto"  # "auto": CUDA when available (rank r on cuda:LOCAL_RANK), else the CPU; or "cpu", "cuda"
    # bookkeeping
    seed: int = 0
    save_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between evaluations logged to log.jsonl (0: only before and after)
    log_every: int = 10
    progress: bool = True

    RESUMABLE_CHANGES = ("out", "max_steps", "save_every", "keep_checkpoints", "eval_every", "log_every",
                         "progress", "num_workers", "data", "inception_weights")

    @classmethod
    def tiny(cls, **overrides) -> VAETrainConfig:
        """The tiny VAE (random init) on 32² crops: the CPU demo."""
        base = dict(tiny_models=True, resolution=32, batch_size=4, lr=2e-3, disc_lr=2e-3, ema_decay=0.99,
                    max_steps=300, save_every=100, eval_images=8)
        return cls(**{**base, **overrides})

    @classmethod
    def sdxl(cls, **overrides) -> VAETrainConfig:
        """The SDXL VAE on 256² crops with the sgm-like loss (L1 + 1e-6·KL, PatchGAN from step 50001)."""
        base = dict(resolution=256, batch_size=8, lr=4.5e-6, disc_lr=4.5e-6, disc_start=50001, ema_decay=0.9999)
        return cls(**{**base, **overrides})

    def __post_init__(self):
        self.check_common(("batch_size", "grad_accum", "max_steps", "save_every", "resolution", "eval_images"))
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"recon must be 'l1' or 'l2', got {self.recon!r}")
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_factor", "disc_start", "bucket_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.bucket_step and self.resolution % self.bucket_step:
            raise ValueError(f"resolution ({self.resolution}) must be a multiple of bucket_step ({self.bucket_step})")

    @property
    def sample_every(self) -> int:
        """The UNet trainer's periodic hook (`Trainer.run` → `sample_grid`): here the evaluation."""
        return self.eval_every

    def data_config(self) -> TrainConfig:
        """The data settings as a `TrainConfig`, so the UNet trainer's `build_data` serves this run too: one
        square bucket resolution² (random crops), or multi-aspect buckets with `bucket_step`."""
        step = self.bucket_step or self.resolution
        sides = {} if self.bucket_step else dict(min_side=self.resolution, max_side=self.resolution)
        holdout = self.eval_images if not self.eval_data and Path(self.data).is_dir() else 0
        return TrainConfig(data=self.data, out=self.out, resolution=self.resolution, bucket_step=step,
                           random_crop=True, num_workers=self.num_workers, batch_size=self.batch_size,
                           seed=self.seed, holdout=holdout, **sides)


PRESETS = {"tiny": VAETrainConfig.tiny, "sdxl": VAETrainConfig.sdxl}
