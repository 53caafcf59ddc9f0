"""`sdxl train-vae`: every `VAETrainConfig` field as a flag (the same generator as `sdxl train`), over a preset
and an optional TOML/JSON config file."""
from __future__ import annotations

import argparse
import sys

from .cli import add_command, config_from_flags, run_command, standalone_main
from .vae_config import PRESETS, VAETrainConfig

HELP = {
    "data": "image folder (searched recursively) or webdataset shard URLs (e.g. 'shards/{000..009}.tar')",
    "out": "output folder: checkpoints/, log.jsonl, vae.safetensors, vae_ema.safetensors, vae_diffusers/, "
           "eval.json, eval_grid.png",
    "model": "VAE to fine-tune: an official single file (first_stage_model.*), a diffusers vae/ folder or a "
             "pipeline folder (default: random init)",
    "tiny_models": "the tiny VAE structure (VAEConfig.tiny(), the CPU demo) instead of the SDXL one",
    "resolution": "crop side in pixels: each image is resized to cover it, then randomly cropped",
    "bucket_step": "0: one square crop of --resolution; else multi-aspect buckets with sides multiples of this",
    "num_workers": "DataLoader worker processes",
    "eval_data": "held-out image folder for PSNR/SSIM before and after (default: the last --eval-images files "
                 "of the --data folder, which are then left out of training)",
    "eval_images": "images evaluated (centre crops)",
    "inception_weights": "TorchScript Inception feature extractor (images in [0, 1] → features) for rFID; "
                         "without it rFID is skipped",
    "recon": "reconstruction loss: l1 or l2",
    "kl_weight": "weight of the KL term (sgm: 1e-6)",
    "perceptual_weights": "TorchScript perceptual distance f(x, x̂) → (B,) on [-1, 1] images (e.g. LPIPS); "
                          "without it the perceptual term is off (nothing is downloaded)",
    "perceptual_weight": "weight of the perceptual term",
    "disc_start": "optimizer step at which the PatchGAN discriminator and the adversarial loss start (0: never)",
    "disc_weight": "scale of the adaptive adversarial weight (LDM discriminator_weight)",
    "disc_factor": "factor on the adversarial terms once started (LDM disc_factor)",
    "disc_layers": "strided layers of the PatchGAN discriminator",
    "disc_channels": "channels of the discriminator's first layer",
    "batch_size": "images per process and micro-step",
    "grad_accum": "micro-steps per optimizer step (effective batch = batch × accum × processes)",
    "max_steps": "optimizer steps to train to (a resumed run continues up to it)",
    "lr": "AdamW learning rate of the autoencoder",
    "disc_lr": "AdamW learning rate of the discriminator",
    "warmup_steps": "linear learning-rate warm-up steps (autoencoder)",
    "weight_decay": "AdamW weight decay",
    "adam_betas": "AdamW betas (LDM: 0.5 0.9)",
    "grad_clip": "clip the autoencoder's gradient norm to this (0: off)",
    "ema_decay": "EMA decay of the VAE weights (0: no EMA); the EMA weights are the export to use",
    "ema_on_cpu": "keep the EMA weights in CPU memory",
    "precision": "auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 or fp32; the losses are always fp32",
    "use_kernels": "sdxl_kernels (fused GroupNorm+SiLU, attention) on the hot path (--no-use-kernels: eager)",
    "distributed": "under torchrun: ddp or fsdp (FSDP2 fully_shard of the encoder and decoder)",
    "device": "auto (CUDA when available, rank r on cuda:LOCAL_RANK), cpu or cuda",
    "seed": "seed of the data order, crops, posterior draws and (random) initial weights",
    "save_every": "steps between checkpoints (also written on SIGTERM/SIGINT and at the end)",
    "keep_checkpoints": "complete checkpoints kept in OUT/checkpoints",
    "eval_every": "steps between evaluations logged to log.jsonl (0: only before and after training)",
    "log_every": "steps between log lines when there is no progress bar",
    "progress": "progress bar with loss and images/s",
}

def add_parser(sub) -> argparse.ArgumentParser:
    return add_command(sub, "train-vae", VAETrainConfig, PRESETS, HELP, choices={"recon": ("l1", "l2")},
                       help="train or fine-tune the SDXL autoencoder (with EMA)",
                       description="Train the SDXL VAE (AutoencoderKL) on an image folder or webdataset shards: "
                                   "L1/L2 + KL, optional perceptual and PatchGAN terms, EMA.",
                       preset_help="starting settings: tiny (random tiny VAE, 32² crops, the CPU demo) or sdxl "
                                   "(the SDXL VAE at 256² crops; --model to fine-tune)")


def _done(cfg: VAETrainConfig, result) -> str:
    use = "vae_ema.safetensors" if cfg.ema_decay > 0 else "vae.safetensors"
    return (f"trained to step {result.step}: use {result.out / use} (diffusers layout: "
            f"{result.out / 'vae_diffusers'}); evaluation in {result.out / 'eval.json'}")


def run(args: argparse.Namespace) -> int:
    from .vae_loop import train_vae

    return run_command(args, "sdxl train-vae", lambda a: config_from_flags(a, VAETrainConfig, PRESETS), train_vae,
                       _done)


def main(argv=None) -> int:
    return standalone_main("train-vae", add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
