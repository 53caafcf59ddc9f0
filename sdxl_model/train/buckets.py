"""Multi-aspect buckets (SDXL paper, Sec. 2.3 and App. I) and the resize + random crop that records what SDXL
conditions on: the original size (h, w), the crop top-left (top, left) and the target (bucket) size (h, w).

Every size in the paper's 40-size table at 1024² is a multiple of 64 with sides in [512, 2048] and
0.9·1024² ≤ h·w ≤ 1024². `make_buckets` derives the list: for each height, the widths in that area band plus
the largest width with h·w ≤ resolution² (so no height is left without a bucket at small resolutions), in
both orientations. At 1024 that is the paper's 40 plus 1344×704, which the table lists one way only (sgm's
demo list has both). All sizes are (height, width), as everywhere in SDXL's conditioning.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from PIL import Image

Bucket = tuple[int, int]  # (height, width)


def make_buckets(
    resolution: int = 1024,
    step: int = 64,
    min_side: int | None = None,
    max_side: int | None = None,
    max_ratio: float = 4.0,
    min_area: float = 0.9,
) -> list[Bucket]:
    """Bucket sizes (h, w), multiples of `step`, around `resolution`² pixels, sorted by aspect ratio h/w.

    min_side / max_side default to resolution/2 and 2·resolution (512 and 2048 at 1024, the paper's range);
    max_ratio bounds max(h, w)/min(h, w); min_area is the lower edge of the area band as a fraction of
    resolution² (the largest width per height is always kept, even below it).
    """
    min_side = resolution // 2 if min_side is None else min_side
    max_side = 2 * resolution if max_side is None else max_side
    if step <= 0 or resolution < step or resolution % step:
        raise ValueError(f"resolution ({resolution}) must be a positive multiple of step ({step})")
    if not 0.0 < min_area <= 1.0:
        raise ValueError(f"min_area must be in (0, 1], got {min_area}")
    area = resolution * resolution
    lo = max(step, -(-min_side // step) * step)  # smallest multiple of step ≥ min_side
    sides = range(lo, max_side + 1, step)
    buckets: set[Bucket] = set()
    for h in sides:
        widest = (area // h) // step * step
        widths = {w for w in sides if min_area * area <= h * w <= area}
        if widest in sides:
            widths.add(widest)
        for w in widths:
            if max(h, w) / min(h, w) <= max_ratio:
                buckets.update({(h, w), (w, h)})
    if not buckets:
        raise ValueError(
            f"no bucket for resolution={resolution}, step={step}, sides [{min_side}, {max_side}], "
            f"max_ratio={max_ratio}"
        )
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(h: int, w: int, buckets: list[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is nearest to h/w in log space (ties: the first in the list)."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {(h, w)}")
    r = math.log(h / w)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - r))


class Crop(NamedTuple):
    image: Image.Image  # (bucket h, bucket w), RGB
    original_size: tuple[int, int]  # (h, w) before any resize
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (h, w) = the bucket


def resized_size(h: int, w: int, bucket: Bucket) -> tuple[int, int]:
    """Size (h, w) after scaling by max(bh/h, bw/w), so the bucket is covered, never a pixel short."""
    bh, bw = bucket
    scale = max(bh / h, bw / w)
    return max(bh, round(h * scale)), max(bw, round(w * scale))


def resize_and_crop(image: Image.Image, bucket: Bucket, generator: torch.Generator | None = None) -> Crop:
    """Resize `image` so it covers `bucket`, then crop to it: uniformly random top-left drawn from `generator`
    (deterministic given its seed), or the centre crop when `generator` is None."""
    w, h = image.size
    bh, bw = bucket
    rh, rw = resized_size(h, w, bucket)
    if (rh, rw) != (h, w):
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    if generator is None:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top = int(torch.randint(0, rh - bh + 1, (), generator=generator))
        left = int(torch.randint(0, rw - bw + 1, (), generator=generator))
    return Crop(image.crop((left, top, left + bw, top + bh)), (h, w), (top, left), (bh, bw))
