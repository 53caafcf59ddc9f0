"""Training data: image folders and webdataset shards bucketed by aspect ratio, the bucket batch sampler
(deterministic, DDP-sharded, resumable), `collate`, and the on-disk cache of VAE / text-encoder outputs.

A sample is a dict:
    pixels         float32 (3, H, W) in [-1, 1], (H, W) = the bucket
    caption        str ("" when the caption file is missing)
    original_size  (h, w) of the source image before any resize      -- SDXL size conditioning
    crop_top_left  (top, left) of the crop in the resized image      -- SDXL crop conditioning
    target_size    (h, w) = the bucket                               -- SDXL target-size conditioning
    key            str: the path relative to root without extension (folders) or the webdataset __key__
    source_id      str: identifies the source bytes (absolute path|mtime_ns|size, or url|key), for cache keys
`collate` stacks pixels to (B, 3, H, W), the three size fields to (B, 2) int64 tensors, the strings to lists.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import safetensors.torch
import torch
from PIL import Image, ImageOps

from .buckets import Bucket, nearest_bucket, resize_and_crop

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap height and width


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (seed, epoch, index, key...), stable across processes and Python runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def load_rgb(fp) -> Image.Image:
    """Decode fully (so truncated files fail here), apply EXIF orientation, flatten alpha onto white."""
    with Image.open(fp) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.array(img, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def make_sample(img: Image.Image, bucket: Bucket, generator, caption: str, key: str, source_id: str) -> dict:
    crop = resize_and_crop(img, bucket, generator)
    return {
        "pixels": to_tensor(crop.image),
        "caption": caption,
        "original_size": crop.original_size,
        "crop_top_left": crop.crop_top_left,
        "target_size": crop.target_size,
        "key": key,
        "source_id": source_id,
    }


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples of one bucket: pixels (B, 3, H, W); original_size, crop_top_left, target_size (B, 2) int64;
    caption, key, source_id as lists."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    shapes = {tuple(s["pixels"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch must come from one bucket; got pixel shapes {sorted(shapes)}")
    batch = {"pixels": torch.stack([s["pixels"] for s in samples])}
    for name in ("original_size", "crop_top_left", "target_size"):
        batch[name] = torch.tensor([list(s[name]) for s in samples], dtype=torch.long)
    for name in ("caption", "key", "source_id"):
        batch[name] = [s[name] for s in samples]
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    key: str  # relative path without extension
    caption: str
    size: tuple[int, int]  # (h, w) after EXIF orientation
    bucket_id: int


def _read_size(path: Path) -> tuple[int, int]:
    """(h, w) from the header only (no decode), EXIF orientation applied."""
    with Image.open(path) as img:
        w, h = img.size
        # PNG keeps EXIF after the header; getexif() would decode the whole image to find it
        if img.format != "PNG" or "exif" in img.info:
            if img.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSED_ORIENTATIONS:
                h, w = w, h
    return h, w


class ImageFolderDataset(torch.utils.data.Dataset):
    """`name.png|jpg|jpeg|webp` with captions in `name.txt`, found recursively under `root` in sorted order.

    At construction every image header is read once (size only) to assign the nearest-aspect bucket. An image
    that cannot be opened is skipped with a warning naming it and listed in `skipped`; one that opens but fails
    to decode later (truncated) is warned about, listed in `skipped` of the process that hit it, and replaced by
    the next readable image of the same bucket, so the batch keeps its bucket and the run continues. A missing
    caption gives "" with a warning and is listed in `missing_captions`, or raises with `require_captions`.

    Crops are drawn from a generator seeded by (seed, epoch, index): deterministic, different each epoch
    (`set_epoch`), or fixed across epochs with `new_crop_each_epoch=False` (what a latent cache wants), or the
    centre crop with `random_crop=False`. `bucket_ids[i]` feeds `BucketBatchSampler`. `holdout=N` sets the
    last N files (in sorted order) aside: `split="train"` reads the others, `split="holdout"` only those N.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        buckets: Sequence[Bucket],
        *,
        seed: int = 0,
        random_crop: bool = True,
        new_crop_each_epoch: bool = True,
        require_captions: bool = False,
        caption_ext: str = ".txt",
        holdout: int = 0,
        split: str = "train",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.buckets = [tuple(b) for b in buckets]
        if not self.buckets:
            raise ValueError("buckets is empty")
        self.seed = seed
        self.random_crop = random_crop
        self.new_crop_each_epoch = new_crop_each_epoch
        self.epoch = 0
        self.skipped: list[Path] = []
        self.missing_captions: list[Path] = []

        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        if holdout:
            if not 0 < holdout < len(paths):
                raise ValueError(f"holdout={holdout} needs more than {holdout} images; {self.root} has {len(paths)}")
            paths = paths[:-holdout] if split == "train" else paths[-holdout:]
        elif split == "holdout":
            raise ValueError("split='holdout' needs holdout > 0")
        records = []
        for path in paths:
            try:
                h, w = _read_size(path)
            except Exception as e:  # PIL raises many types for bad files
                self.skipped.append(path)
                log.warning("skipping unreadable image %s: %s", path, e)
                continue
            caption_path = path.with_suffix(caption_ext)
            if caption_path.is_file():
                caption = caption_path.read_text(encoding="utf-8").strip()
            else:
                self.missing_captions.append(path)
                caption = ""
            key = path.relative_to(self.root).with_suffix("").as_posix()
            records.append(ImageRecord(path, key, caption, (h, w), nearest_bucket(h, w, self.buckets)))
        if self.missing_captions:
            shown = ", ".join(str(p) for p in self.missing_captions[:5])
            more = len(self.missing_captions) - 5
            msg = f"{len(self.missing_captions)} image(s) without a {caption_ext} caption: {shown}"
            msg += f" and {more} more" if more > 0 else ""
            if require_captions:
                raise ValueError(msg)
            log.warning("%s; using empty captions", msg)
        if not records:
            raise ValueError(f"none of the {len(paths)} image(s) under {self.root} could be read")
        self.records = records
        self.bucket_ids = [r.bucket_id for r in records]
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Crops depend on the epoch; with DataLoader workers, call before the epoch's iterator is created and
        keep persistent_workers=False so the workers see it."""
        self.epoch = epoch

    def _crop_generator(self, index: int) -> torch.Generator | None:
        if not self.random_crop:
            return None
        return _generator(self.seed, self.epoch if self.new_crop_each_epoch else 0, index)

    def source_id(self, index: int) -> str:
        r = self.records[index]
        st = r.path.stat()
        return f"{r.path.resolve()}|{st.st_mtime_ns}|{st.st_size}"

    def _replacement(self, index: int) -> int:
        bucket = self.records[index].bucket_id
        n = len(self.records)
        for k in range(1, n):
            j = (index + k) % n
            if self.records[j].bucket_id == bucket and j not in self._bad:
                return j
        raise RuntimeError(
            f"no readable image left in bucket {self.buckets[bucket]} (last tried {self.records[index].path})"
        )

    def __getitem__(self, index: int) -> dict:
        while True:
            record = self.records[index]
            try:
                img = load_rgb(record.path)
                break
            except Exception as e:
                self._bad.add(index)
                self.skipped.append(record.path)
                log.warning("skipping unreadable image %s: %s", record.path, e)
                index = self._replacement(index)
        return make_sample(
            img, self.buckets[record.bucket_id], self._crop_generator(index), record.caption, record.key,
            self.source_id(index),
        )


# ---------------------------------------------------------------------------------------------------------------
# Bucket batch sampler
# ---------------------------------------------------------------------------------------------------------------


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices, each from one bucket, buckets interleaved at random; use as `batch_sampler=`.

    Per epoch, identically on every rank: shuffle each bucket's indices with a generator seeded by
    (seed, epoch), cut them into batches of `batch_size`, shuffle the list of all batches. The last batch of a
    bucket is smaller when the bucket does not divide (a one-image bucket gives a batch of one; no padding, so
    no sample repeats), or dropped with `drop_last` (a bucket smaller than a batch is then never used; warned
    at construction). The list is dealt round-robin: rank r takes batches r, r + W, r + 2W, ... (W =
    world_size), so ranks never share a sample. Every rank needs the same number of steps: when the number of
    batches is not a multiple of W, `drop_last` drops the last few batches, otherwise the first few batches
    are repeated to fill the round (like torch's DistributedSampler; fewer than W batches repeat).

    Resume: `state_dict(consumed)` records (epoch, batch index) and `load_state_dict` makes the next `__iter__`
    continue at exactly that batch (later iterations of the same epoch start from its beginning again). The
    sampler counts the batches it has handed out, which runs ahead of training when DataLoader workers
    prefetch: pass the number of batches the loop consumed this epoch.
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(bucket_ids) == 0:
            raise ValueError("no samples to batch")
        self.bucket_ids = [int(b) for b in bucket_ids]
        self.batch_size, self.seed, self.rank, self.world_size, self.drop_last = (
            batch_size, seed, rank, world_size, drop_last
        )
        self.epoch = 0
        self._position = 0  # batches of this epoch already handed out (or restored)
        self._resume_at = 0  # where the next __iter__ starts; a restored position is used once
        self._by_bucket: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_ids):
            self._by_bucket.setdefault(b, []).append(i)
        if drop_last:
            small = {b: len(ix) for b, ix in self._by_bucket.items() if len(ix) < batch_size}
            if small:
                warnings.warn(
                    f"drop_last: bucket(s) {small} (bucket id: images) hold fewer images than batch_size="
                    f"{batch_size} and are never used",
                    stacklevel=2,
                )
        if self.num_global_batches() < world_size:
            raise ValueError(
                f"{self.num_global_batches()} batch(es) per epoch cannot feed {world_size} rank(s) "
                f"(batch_size={batch_size}, drop_last={drop_last}, {len(self.bucket_ids)} samples)"
            )

    def num_global_batches(self) -> int:
        per = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: -(-n // self.batch_size))
        return sum(per(len(ix)) for ix in self._by_bucket.values())

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches for `epoch`, in step order, before dealing (after dropping or repeating)."""
        g = _generator("buckets", self.seed, epoch)
        batches = []
        for b in sorted(self._by_bucket):
            ix = self._by_bucket[b]
            perm = [ix[k] for k in torch.randperm(len(ix), generator=g).tolist()]
            for s in range(0, len(perm), self.batch_size):
                batch = perm[s : s + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        remainder = len(batches) % self.world_size
        if remainder and self.drop_last:
            batches = batches[: len(batches) - remainder]
        elif remainder:
            batches += batches[: self.world_size - remainder]
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        return self.global_batches(epoch)[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = self.num_global_batches()
        return n // self.world_size if self.drop_last else -(-n // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch starts at its first batch, the same one keeps a restored position."""
        if epoch != self.epoch:
            self.epoch, self._position, self._resume_at = epoch, 0, 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches(self.epoch)
        start, self._resume_at = self._resume_at, 0
        self._position = start
        for i in range(start, len(batches)):
            self._position = i + 1
            yield batches[i]

    def state_dict(self, consumed: int | None = None) -> dict:
        """{"epoch", "batch_index", ...}; batch_index = `consumed` if given, else the batches handed out."""
        return {
            "epoch": self.epoch,
            "batch_index": self._position if consumed is None else int(consumed),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": len(self.bucket_ids),
        }

    def load_state_dict(self, state: dict) -> None:
        for name, mine in (("seed", self.seed), ("batch_size", self.batch_size),
                           ("world_size", self.world_size), ("num_samples", len(self.bucket_ids))):
            if state[name] != mine:
                raise ValueError(f"sampler state has {name}={state[name]} but this run has {name}={mine}")
        self.epoch = int(state["epoch"])
        self._position = self._resume_at = int(state["batch_index"])


# ---------------------------------------------------------------------------------------------------------------
# Webdataset shards
# ---------------------------------------------------------------------------------------------------------------


class WebDatasetShards(torch.utils.data.IterableDataset):
    """Batches straight from webdataset tar shards (`KEY.jpg|jpeg|png|webp` + `KEY.txt`); use with
    `DataLoader(ds, batch_size=None)`. Yields collated batches of `batch_size` from one bucket: samples go to
    their nearest bucket's buffer and a buffer is emitted when full; at the end of a pass the partial buffers are
    emitted (or dropped with `drop_last`).

    Shards are shuffled per epoch with (seed, epoch), then split: rank r takes shards r, r + W, ... and each
    DataLoader worker a slice of those, so no sample is seen twice per epoch. Ranks can end an epoch after
    different numbers of batches: under DDP run by steps with `repeat=True` (epochs roll on forever). Bad
    images are warned about with their shard and key and listed in `skipped`; missing captions give "".
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        buckets: Sequence[Bucket],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_crop: bool = True,
        drop_last: bool = False,
        shuffle_shards: bool = True,
        repeat: bool = False,
    ):
        from webdataset.shardlists import expand_urls

        self.urls = expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        if not self.urls:
            raise ValueError("no webdataset shards given")
        if len(self.urls) < world_size:
            raise ValueError(f"{len(self.urls)} shard(s) cannot feed {world_size} ranks; need at least one each")
        self.buckets = [tuple(b) for b in buckets]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.random_crop, self.drop_last, self.shuffle_shards, self.repeat = (
            random_crop, drop_last, shuffle_shards, repeat
        )
        self.epoch = 0
        self.skipped: list[str] = []
        self.missing_captions: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self, epoch: int) -> list[str]:
        """This rank's and this DataLoader worker's shards for `epoch`."""
        urls = list(self.urls)
        if self.shuffle_shards:
            urls = [urls[k] for k in torch.randperm(len(urls), generator=_generator("shards", self.seed, epoch))]
        urls = urls[self.rank :: self.world_size]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            urls = urls[info.id :: info.num_workers]
        return urls

    def _decode(self, raw: dict, epoch: int) -> dict | None:
        url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
        data = next((raw[e] for e in ("jpg", "jpeg", "png", "webp") if e in raw), None)
        if data is None:
            self.skipped.append(f"{url}:{key}")
            log.warning("skipping sample %s in %s: no jpg/jpeg/png/webp entry", key, url)
            return None
        try:
            img = load_rgb(io.BytesIO(data))
        except Exception as e:
            self.skipped.append(f"{url}:{key}")
            log.warning("skipping unreadable image %s in %s: %s", key, url, e)
            return None
        if "txt" in raw:
            caption = raw["txt"].decode("utf-8").strip()
        else:
            self.missing_captions.append(f"{url}:{key}")
            log.warning("sample %s in %s has no txt caption; using an empty caption", key, url)
            caption = ""
        h, w = img.height, img.width
        bucket = self.buckets[nearest_bucket(h, w, self.buckets)]
        g = _generator(self.seed, epoch, url, key) if self.random_crop else None
        return make_sample(img, bucket, g, caption, key, f"{url}|{key}")

    def _one_pass(self, epoch: int) -> Iterator[dict]:
        import webdataset as wds

        def handler(e: Exception) -> bool:
            log.warning("webdataset read error (continuing): %s", e)
            return True

        buffers: dict[Bucket, list[dict]] = {}
        for raw in wds.tarfile_samples([{"url": u} for u in self.shards(epoch)], handler=handler):
            sample = self._decode(raw, epoch)
            if sample is None:
                continue
            buf = buffers.setdefault(sample["target_size"], [])
            buf.append(sample)
            if len(buf) == self.batch_size:
                yield collate(buf)
                buffers[sample["target_size"]] = []
        if not self.drop_last:
            for bucket in sorted(buffers):
                if buffers[bucket]:
                    yield collate(buffers[bucket])

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        while True:
            yield from self._one_pass(epoch)
            if not self.repeat:
                return
            epoch += 1


# ---------------------------------------------------------------------------------------------------------------
# Latent / text-encoder cache
# ---------------------------------------------------------------------------------------------------------------


class LatentCache:
    """Tensors per sample on disk as safetensors, keyed by `key(*parts)` = sha256 of (model_id, parts).

    Use one cache per model: the VAE with parts (source_id, crop_top_left, target_size), storing the posterior
    moments {"mean", "logvar"} rather than a draw, so `AutoencoderKL.sample(mean, logvar, generator)` still
    gives a fresh latent each epoch; the text encoders with parts (caption,), storing {"context", "pooled"}.
    The crop is part of the key, so a cache only hits on later epochs when crops repeat: build the dataset with
    `new_crop_each_epoch=False` (or `random_crop=False`). Writes go to a unique temporary file, fsync, rename:
    a killed run leaves either the whole entry or none; an unreadable entry is warned about and recomputed.
    """

    def __init__(self, root: str | os.PathLike, model_id: str):
        self.root = Path(root)
        self.model_id = model_id
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def key(self, *parts) -> str:
        return hashlib.sha256(repr((self.model_id, parts)).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:
            log.warning("cache entry %s is unreadable (%s); recomputing", path, e)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        data = safetensors.torch.save(cpu, metadata={"model_id": self.model_id})
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def get_or_compute(self, key: str, fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The cached tensors for `key`, or `fn()` computed once, stored, and returned (as stored, on the CPU)."""
        cached = self.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        tensors = fn()
        self.put(key, tensors)
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
