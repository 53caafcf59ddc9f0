"""SDXL training: multi-aspect buckets and the data layer (image folders, webdataset shards, the bucket batch
sampler, the latent/text cache) and a synthetic shapes dataset for the tiny demo."""
from .buckets import Crop, make_buckets, nearest_bucket, resize_and_crop
from .data import (
    BucketBatchSampler,
    ImageFolderDataset,
    LatentCache,
    WebDatasetShards,
    collate,
    derive_seed,
)

__all__ = [
    "BucketBatchSampler",
    "Crop",
    "ImageFolderDataset",
    "LatentCache",
    "TrainConfig",
    "VAETrainConfig",
    "WebDatasetShards",
    "collate",
    "derive_seed",
    "make_buckets",
    "make_shapes_dataset",
    "nearest_bucket",
    "resize_and_crop",
    "train",
    "train_vae",
]


def __getattr__(name):
    # imported lazily so `python -m sdxl_model.train.synthetic` does not find its module half-imported
    if name == "make_shapes_dataset":
        from .synthetic import make_shapes_dataset

        return make_shapes_dataset
    if name in ("TrainConfig", "train"):
        from . import config, loop

        return {"TrainConfig": config.TrainConfig, "train": loop.train}[name]
    if name in ("VAETrainConfig", "train_vae"):
        from . import vae_config, vae_loop

        return {"VAETrainConfig": vae_config.VAETrainConfig, "train_vae": vae_loop.train_vae}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
