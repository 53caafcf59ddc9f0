"""`sdxl train`: every `TrainConfig` field as a flag, over a preset and an optional TOML/JSON config file."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from .config import PRESETS, TrainConfig

HELP = {
    "data": "image folder (name.png + name.txt captions, searched recursively) or webdataset shard URLs "
            "(e.g. 'shards/{000..009}.tar')",
    "out": "output folder: checkpoints/, log.jsonl, samples/, unet.safetensors, unet_ema.safetensors",
    "model": "checkpoint to fine-tune: an official single file or a diffusers folder",
    "tiny_models": "random tiny SDXL-structured models instead of --model (the CPU demo)",
    "resolution": "bucket area is resolution² pixels",
    "bucket_step": "bucket sides are multiples of this",
    "min_side": "smallest bucket side (0: resolution/2)",
    "max_side": "largest bucket side (0: 2·resolution)",
    "random_crop": "random crop inside the resized image (else the centre)",
    "holdout": "the last N images (sorted by path) of a data folder are left out of training, for evaluation",
    "cache_dir": "cache VAE moments and text embeddings here (crops then stay fixed across epochs)",
    "num_workers": "DataLoader worker processes",
    "offset_noise": "offset-noise level (sgm offset_noise_level; the paper's multi-aspect stage uses 0.05)",
    "text_dropout": "probability of zeroing a sample's text conditioning (for classifier-free guidance)",
    "micro_dropout": "probability of zeroing a sample's size/crop/target conditioning",
    "min_snr_gamma": "min-SNR-γ loss weighting (0: off)",
    "refiner": "train a refiner: only the lowest --refiner-noise-levels noise levels, aesthetic-score conditioning",
    "refiner_noise_levels": "noise levels (of 1000) a refiner trains on",
    "aesthetic_score": "aesthetic score the refiner is conditioned on for the training images",
    "batch_size": "images per process and micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "max_steps": "optimizer steps to train to (a resumed run continues up to it)",
    "lr": "AdamW learning rate",
    "warmup_steps": "linear learning-rate warm-up steps",
    "weight_decay": "AdamW weight decay",
    "adam_betas": "AdamW betas",
    "adam_eps": "AdamW epsilon",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "ema_decay": "EMA decay of the UNet weights (0: no EMA)",
    "ema_on_cpu": "keep the EMA weights in CPU memory",
    "precision": "auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 or fp32",
    "gradient_checkpointing": "recompute activations in the backward to save memory",
    "use_kernels": "sdxl_kernels on the hot path (--no-use-kernels: eager PyTorch, for comparison)",
    "distributed": "under torchrun: ddp or fsdp (FSDP2 fully_shard)",
    "device": "auto (CUDA when available, rank r on cuda:LOCAL_RANK), cpu or cuda",
    "seed": "seed of the data order, crops, noise and (tiny) initial weights",
    "save_every": "steps between checkpoints (also written on SIGTERM/SIGINT and at the end)",
    "keep_checkpoints": "complete checkpoints kept in OUT/checkpoints",
    "sample_every": "steps between sample grids in OUT/samples (0: off)",
    "sample_prompts": "prompts of the sample grid",
    "sample_steps": "sampling steps of the sample grid",
    "log_every": "steps between log lines when there is no progress bar",
    "progress": "progress bar with loss, lr and images/s",
}


CHOICES = {"precision": ("auto", "bf16", "fp32"), "distributed": ("ddp", "fsdp"), "device": ("auto", "cpu", "cuda")}  # every trainer


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser, cls, helps: dict[str, str], choices: dict[str, tuple]) -> None:
    """One flag per field of the config dataclass `cls` (default None = not given): bools as --x/--no-x,
    tuples as nargs="+", the rest typed by the annotation; `helps` must document every field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kw = dict(default=None, help=helps[f.name] + f" (default: {f.default!r})")
        if f.name in choices:
            kw["choices"] = choices[f.name]
        if kind is bool:
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(kind) is tuple:
            elem = typing.get_args(kind)[0]
            p.add_argument(_flag(f.name), nargs="+", type=elem, **kw)
        else:
            p.add_argument(_flag(f.name), type=kind, **kw)


def config_from_flags(args: argparse.Namespace, cls, presets: dict):
    """The preset (--preset), then the file (--config), then every flag given."""
    cfg = presets[args.preset]() if args.preset else cls()
    if args.config:
        cfg = cls.from_file(args.config, base=cfg)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    return cls.from_dict(given, base=cfg)


def add_command(sub, name: str, cls, presets: dict, helps: dict[str, str], *, help: str, description: str,
                preset_help: str, choices: dict[str, tuple] | None = None) -> argparse.ArgumentParser:
    """A trainer's subcommand: --preset, --config, --resume, -v, then one flag per field of `cls`."""
    p = sub.add_parser(name, help=help, description=description + " Settings come from --preset, then --config "
                       f"FILE, then the flags; every flag below is a {cls.__name__} field.")
    p.add_argument("--preset", choices=sorted(presets), default=None, help=preset_help)
    p.add_argument("--config", help=f"TOML or JSON file of {cls.__name__} fields, applied over the preset")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in --out (the config must match it)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_config_flags(p, cls, helps, {**CHOICES, **(choices or {})})
    return p


def standalone_main(command: str, add_parser, run, argv=None) -> int:
    """`python -m <module> ARGS` = `sdxl COMMAND ARGS`."""
    parser = argparse.ArgumentParser(prog="sdxl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)]))


def add_parser(sub) -> argparse.ArgumentParser:
    return add_command(sub, "train", TrainConfig, PRESETS, HELP, help="train or fine-tune the SDXL UNet",
                       description="Train the SDXL UNet on an image folder or webdataset shards.",
                       preset_help="starting settings: tiny (random tiny models, the CPU demo) or sdxl "
                                   "(fine-tune --model)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return config_from_flags(args, TrainConfig, PRESETS)


def run_command(args: argparse.Namespace, name: str, make_config, train_fn, done) -> int:
    """The shared body of `sdxl train` / `sdxl train-vae`: logging, config, training, exit status (2: bad
    input, 143: stopped by a signal with a checkpoint written); `done(cfg, result)` is the closing line."""
    from .loop import ConfigMismatch

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = make_config(args)
        result = train_fn(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, ConfigMismatch) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 143 if result.interrupted else 0
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint in {result.out / 'checkpoints'}; continue with --resume",
              file=sys.stderr)
        return 143
    print(done(cfg, result))
    return 0


def run(args: argparse.Namespace) -> int:
    from .loop import train

    return run_command(args, "sdxl train", config_from_args, train, lambda cfg, r: (
        f"trained to step {r.step}: {r.out / 'unet.safetensors'}, {r.out / 'unet_ema.safetensors'}"))


def main(argv=None) -> int:
    return standalone_main("train", add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
