"""A synthetic captioned dataset for the tiny training demo: one coloured shape (circle, square, triangle) on a
plain background, at varied sizes and aspect ratios, written as `NNNN.png` + `NNNN.txt` ("a red circle on a
white background"). Deterministic given the seed.

    python -m sdxl_model.train.synthetic OUT --n 64 [--seed 0] [--min-side 48] [--max-side 160]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}


def draw_shape(
    size: tuple[int, int], shape: str, colour: str, background: str, rng: np.random.Generator
) -> Image.Image:
    """One shape of side ~40-80% of the short side at a random position inside an (h, w) image."""
    h, w = size
    img = Image.new("RGB", (w, h), BACKGROUNDS[background])
    side = int(min(h, w) * rng.uniform(0.4, 0.8))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    box = (left, top, left + side - 1, top + side - 1)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(left + side / 2, top), (left, top + side - 1), (left + side - 1, top + side - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return img


def make_shapes_dataset(
    out_dir: str | os.PathLike, n: int = 64, seed: int = 0, min_side: int = 48, max_side: int = 160
) -> list[Path]:
    """Write n PNG + caption pairs into out_dir (created); image sides are drawn uniformly in
    [min_side, max_side] independently, so sizes and aspect ratios vary. Returns the PNG paths."""
    if n < 1 or not 8 <= min_side <= max_side:
        raise ValueError(f"need n ≥ 1 and 8 ≤ min_side ≤ max_side, got n={n}, sides [{min_side}, {max_side}]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    paths = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = colours[int(rng.integers(len(colours)))]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        img = draw_shape((h, w), shape, colour, background, rng)
        path = out / f"{i:04d}.png"
        img.save(path)
        article = "an" if colour[0] in "aeiou" else "a"
        caption = f"{article} {colour} {shape} on a {background} background"
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl_model.train.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--min-side", type=int, default=48, help="smallest image side in pixels (default 48)")
    parser.add_argument("--max-side", type=int, default=160, help="largest image side in pixels (default 160)")
    args = parser.parse_args(argv)
    paths = make_shapes_dataset(args.out, args.n, args.seed, args.min_side, args.max_side)
    print(f"wrote {len(paths)} images with captions to {args.out}")


if __name__ == "__main__":
    main()
