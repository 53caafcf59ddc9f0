"""`sdxl generate`: text → PNG with an SDXL base and an optional refiner, offline. (`sdxl train`: see
sdxl_model/train/cli.py; `sdxl train-vae`: sdxl_model/train/vae_cli.py.)

    sdxl generate "a cat" --base sd_xl_base_1.0.safetensors --refiner sd_xl_refiner_1.0.safetensors
    sdxl generate "a cat" --preset tiny --steps 4 --size 64x64   # random tiny weights: a smoke test, writes noise
    sdxl generate "a cat, oil painting" --base ... --image photo.png --strength 0.5   # img2img
    sdxl generate "a cat" --base ... --seed 7 --batch 4   # seeds 7..10 → out-0.png … out-3.png

Bad input (a missing file, a base given as refiner, a size not a multiple of 8, both --refiner-switch and
--sdedit-strength, --strength without --image) exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import struct
import sys
import zlib
from pathlib import Path

import torch

from . import sampling
from .progress import Progress
from .presets import tiny_components


class UsageError(Exception):
    """Bad command-line input: reported on stderr, exit status 2."""


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must look like WIDTHxHEIGHT (e.g. 1024x1024), got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise UsageError(f"--size {text}: width and height must be positive multiples of 8")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl", description="SDXL text-to-image (offline).")
    sub = parser.add_subparsers(dest="command", required=True)
    from .train import cli as train_cli
    from .train import vae_cli

    train_cli.add_parser(sub)
    vae_cli.add_parser(sub)
    g = sub.add_parser("generate", help="generate an image from a prompt")
    g.add_argument("prompt")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", type=Path, help="SDXL base checkpoint (single file or diffusers folder)")
    src.add_argument("--preset", choices=["tiny"],
                     help="tiny: random tiny base + refiner on the CPU (a smoke test; the image is noise)")
    g.add_argument("--refiner", type=Path, help="SDXL refiner checkpoint")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--sampler", default="dpmpp_2m", choices=sorted(sampling.SAMPLERS))
    g.add_argument("--schedule", default="karras", choices=["legacy", "karras", "exponential"])
    g.add_argument("--cfg", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image i of --batch uses seed + i")
    g.add_argument("--batch", type=int, default=1, help="images to generate (written as OUT-0.png, OUT-1.png, …)")
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 8 (default 1024x1024; 64x64 with "
                   "--preset tiny; the image's size with --image)")
    g.add_argument("--image", type=Path, default=None, help="img2img: start from this image (resized to --size "
                   "if given)")
    g.add_argument("--strength", type=float, default=None,
                   help="img2img: share of the schedule to run, in (0, 1] (default 0.3)")
    g.add_argument("--refiner-switch", type=float, default=None,
                   help="hand off to the refiner at this fraction of the steps (default 0.8 with a refiner)")
    g.add_argument("--sdedit-strength", type=float, default=None,
                   help="instead of a hand-off: the base finishes, the refiner re-noises to this strength")
    g.add_argument("--out", type=Path, default=Path("out.png"))
    g.add_argument("--no-kernels", action="store_true", help="plain PyTorch instead of sdxl_kernels")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


# ---- models ------------------------------------------------------------------------------------------------

def _check_checkpoint(path: Path, role: str) -> None:
    """Exists, and is not the other kind (checked from names and shapes, before loading gigabytes)."""
    if not path.exists():
        raise UsageError(f"--{role} {path}: no such file or folder")
    kind = _file_kind(path)
    if role == "refiner" and kind == "base":
        raise UsageError(f"--refiner {path} is an SDXL base checkpoint, not a refiner")
    if role == "base" and kind == "refiner":
        raise UsageError(f"--base {path} is an SDXL refiner checkpoint; pass it as --refiner")


def _load(path: Path, role: str):
    from .checkpoint import load_pipeline_components

    _check_checkpoint(path, role)
    try:
        comps = load_pipeline_components(path)
    except (ValueError, KeyError, OSError) as e:
        raise UsageError(f"--{role} {path}: {e}") from None
    if role == "refiner" and comps.kind == "base":
        raise UsageError(f"--refiner {path} is an SDXL base checkpoint, not a refiner")
    if role == "base" and comps.kind == "refiner":
        raise UsageError(f"--base {path} is an SDXL refiner checkpoint; pass it as --refiner")
    if comps.text_encoders is None:
        raise UsageError(f"--{role} {path}: the checkpoint holds no text encoders")
    return comps


def _file_kind(path: Path) -> str | None:
    """"base" / "refiner" / None from a single file's tensor names and shapes (folders: None)."""
    if path.is_dir():
        return None
    from . import checkpoint as ck

    try:
        file, _, _ = ck._resolve_file(path)
        return ck.detect_kind(ck._TensorSource(file, False).shapes)
    except Exception as e:  # unreadable: report it as bad input
        raise UsageError(f"{path}: cannot read the checkpoint: {e}") from None


# ---- output ------------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: bytes, width: int, height: int, text: dict[str, str] | None = None) -> bytes:
    """A minimal 8-bit RGB PNG (filter 0 per row, zlib) with optional tEXt chunks."""
    stride = 3 * width
    raw = b"".join(b"\x00" + rgb[r * stride:(r + 1) * stride] for r in range(height))
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():
        out += _png_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
    return out + _png_chunk(b"IDAT", zlib.compress(raw, 6)) + _png_chunk(b"IEND", b"")


def write_png(path: Path, image_hwc_uint8: torch.Tensor, parameters: str) -> None:
    h, w, _ = image_hwc_uint8.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image, PngImagePlugin
    except ImportError:
        path.write_bytes(encode_png(image_hwc_uint8.contiguous().numpy().tobytes(), w, h, {"parameters": parameters}))
        return
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.fromarray(image_hwc_uint8.numpy()).save(path, pnginfo=info)


class _Progress:
    """The pipeline's callback as a progress line (sdxl_model.progress), with the stage of each step."""

    def __init__(self, total: int, quiet: bool):
        self.bar = Progress(total, enabled=not quiet)

    def __call__(self, info: dict) -> None:
        self.bar.desc = info.get("stage", "")
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


# ---- main --------------------------------------------------------------------------------------------------

def generate(args) -> int:
    from .pipeline import SDXLPipeline
    from .pipeline import to_uint8
    from .unet import set_default_use_kernels

    if args.size is None and args.image is None:
        args.size = "64x64" if args.preset == "tiny" else "1024x1024"
    size = None if args.size is None else _parse_size(args.size)
    image = _load_image(args.image, args.strength)
    if args.image is not None and args.strength is None:
        args.strength = 0.3
    if args.batch < 1:
        raise UsageError(f"--batch must be positive, got {args.batch}")
    if args.refiner_switch is not None and args.sdedit_strength is not None:
        raise UsageError("give --refiner-switch or --sdedit-strength, not both")
    if args.steps < 1:
        raise UsageError(f"--steps must be positive, got {args.steps}")
    if args.refiner_switch is not None and not 0 <= args.refiner_switch <= 1:
        raise UsageError(f"--refiner-switch must be in [0, 1], got {args.refiner_switch}")
    if args.sdedit_strength is not None and not 0 < args.sdedit_strength <= 1:
        raise UsageError(f"--sdedit-strength must be in (0, 1], got {args.sdedit_strength}")
    if args.no_kernels:
        set_default_use_kernels(False)
    if args.preset == "tiny":
        if args.refiner is not None:
            raise UsageError("--preset tiny builds its own refiner; drop --refiner")
        base, refiner = tiny_components(args.seed)
    else:
        if args.refiner is None and (args.refiner_switch is not None or args.sdedit_strength is not None):
            raise UsageError("--refiner-switch / --sdedit-strength need --refiner")
        _check_checkpoint(args.base, "base")
        if args.refiner is not None:
            _check_checkpoint(args.refiner, "refiner")
        base = _load(args.base, "base")
        refiner = _load(args.refiner, "refiner") if args.refiner is not None else None
    pipe = SDXLPipeline(base, refiner)
    switch = args.refiner_switch
    if refiner is not None and switch is None and args.sdedit_strength is None:
        switch = 0.8
    progress = _Progress(_total_steps(args.steps, args.strength, args.sdedit_strength), args.quiet)
    try:
        images = pipe([args.prompt] * args.batch, args.negative, steps=args.steps, sampler=args.sampler,
                      schedule=args.schedule, cfg=args.cfg, seed=args.seed, size=size, refiner_switch=switch,
                      sdedit_strength=args.sdedit_strength, image=image, strength=args.strength, output="tensor",
                      callback=progress)
    except ValueError as e:  # the pipeline's input checks (e.g. a size the UNet cannot take)
        raise UsageError(str(e)) from None
    progress.close()
    pixels = to_uint8(images)
    height, width = images.shape[2:]
    for i, out in enumerate(_out_paths(args.out, args.batch)):
        params = (f"{args.prompt}\nNegative prompt: {args.negative}\nSteps: {args.steps}, Sampler: {args.sampler}, "
                  f"Schedule: {args.schedule}, CFG scale: {args.cfg}, Seed: {args.seed + i}, "
                  f"Size: {width}x{height}, Refiner switch: {switch}, SDEdit strength: {args.sdedit_strength}, "
                  f"Image: {args.image}, Strength: {args.strength}")
        if args.batch > 1:
            params += f", Batch: {i + 1}/{args.batch} (seeds {args.seed}..{args.seed + args.batch - 1})"
        write_png(out, pixels[i], params)
        if not args.quiet:
            print(f"wrote {out}", file=sys.stderr)
    return 0


def _load_image(path: Path | None, strength: float | None):
    """--image as an RGB PIL image; --strength checked (it needs --image)."""
    if path is None:
        if strength is not None:
            raise UsageError("--strength is the img2img strength: give --image too")
        return None
    if strength is not None and not 0 < strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {strength}")
    if not path.is_file():
        raise UsageError(f"--image {path}: no such file")
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise UsageError(f"--image {path}: cannot read the image: {e}") from None


def _total_steps(steps: int, strength: float | None, sdedit_strength: float | None) -> int:
    """Sampler steps of a run, for the progress line (a hand-off splits them, it adds none)."""
    total = steps if strength is None else max(1, int(round(strength * steps)))
    if sdedit_strength is not None:
        total += max(1, int(round(sdedit_strength * steps)))
    return total


def _out_paths(out: Path, n: int) -> list[Path]:
    """out itself for one image; OUT-0.png … OUT-(n-1).png for a batch."""
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "train":
            from .train import cli as train_cli

            return train_cli.run(args)
        if args.command == "train-vae":
            from .train import vae_cli

            return vae_cli.run(args)
    except UsageError as e:
        print(f"sdxl: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
