"""The training data layer: buckets against the SDXL paper's table, crops against slicing an independently
resized image, the folder and webdataset readers on real files (incl. corrupt ones), the bucket batch sampler's
epoch / DDP / resume contracts, the latent cache, and the synthetic shapes generator."""
import io
import logging
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_model.train import (
    BucketBatchSampler,
    ImageFolderDataset,
    LatentCache,
    WebDatasetShards,
    collate,
    make_buckets,
    make_shapes_dataset,
    nearest_bucket,
    resize_and_crop,
)
from sdxl_model.train.buckets import resized_size
from sdxl_model.train.synthetic import COLOURS, SHAPES
from sdxl_model.train.synthetic import main as synthetic_main

# SDXL paper, App. I: the 40 multi-aspect sizes at ~1024² (one orientation each, as printed).
PAPER_TABLE = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
]
# sgm's scripts/demo/sampling.py SD_XL_BASE_RATIOS (w, h), which has 1344×704 both ways.
SGM_DEMO = [
    (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152), (896, 1088),
    (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832),
    (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640), (1600, 640),
    (1664, 576), (1728, 576),
]


# ------------------------------------------------------------------------------------------------ buckets


def test_buckets_match_the_paper_table():
    buckets = make_buckets(1024)
    assert set(PAPER_TABLE) <= set(buckets)
    assert {(h, w) for w, h in SGM_DEMO} <= set(buckets)
    assert set(buckets) - set(PAPER_TABLE) == {(1344, 704)}  # the table lists 704×1344 one way only
    for pair in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                 (1536, 640), (640, 1536)]:
        assert pair in buckets


@pytest.mark.parametrize("resolution,step", [(1024, 64), (512, 64), (128, 16), (64, 8), (96, 32)])
def test_bucket_properties(resolution, step):
    buckets = make_buckets(resolution, step)
    assert len(buckets) == len(set(buckets))
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert h * w <= resolution * resolution
        assert (w, h) in buckets
        assert resolution // 2 <= min(h, w) and max(h, w) <= 2 * resolution
        assert max(h, w) / min(h, w) <= 4.0
    assert (resolution, resolution) in buckets
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)
    # every height keeps its widest bucket: the largest multiple of step with h·w ≤ resolution²
    for h in {b[0] for b in buckets}:
        rule = (resolution * resolution // h) // step * step
        if rule <= 2 * resolution and max(h, rule) / min(h, rule) <= 4.0:
            assert max(w for hh, w in buckets if hh == h) == rule


def test_bucket_arguments():
    assert all(max(h, w) / min(h, w) <= 2.0 for h, w in make_buckets(1024, max_ratio=2.0))
    assert all(640 <= min(b) and max(b) <= 1536 for b in make_buckets(1024, min_side=640, max_side=1536))
    with pytest.raises(ValueError, match="multiple of step"):
        make_buckets(1000, 64)


def test_nearest_bucket():
    buckets = make_buckets(1024)
    for i, (h, w) in enumerate(buckets):
        assert nearest_bucket(h, w, buckets) == i
        assert nearest_bucket(h // 4, w // 4, buckets) == i  # ratio, not size
    assert buckets[nearest_bucket(1080, 1920, buckets)] == (768, 1344)  # 16:9 → 0.5625 vs 0.5714
    assert buckets[nearest_bucket(5000, 100, buckets)] == (2048, 512)  # clamps to the most extreme
    # independent brute force over awkward sizes
    for h, w in [(37, 1001), (999, 1000), (333, 500), (1234, 987)]:
        dist = [abs(math.log(h / w) - math.log(bh / bw)) for bh, bw in buckets]
        assert dist[nearest_bucket(h, w, buckets)] == min(dist)
    with pytest.raises(ValueError):
        nearest_bucket(0, 10, buckets)


def _noise_image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,bucket", [((100, 150), (64, 64)), ((150, 100), (64, 96)), ((40, 30), (64, 48)),
                                         ((64, 48), (64, 48)), ((97, 211), (48, 80))])
def test_resize_and_crop_equals_slicing_the_resized_image(size, bucket):
    h, w = size
    bh, bw = bucket
    img = _noise_image(h, w)
    rh, rw = resized_size(h, w, bucket)
    assert rh >= bh and rw >= bw and (rh == bh or rw == bw)  # covers the bucket, tight on one side
    resized = np.asarray(img.resize((rw, rh), Image.Resampling.BICUBIC)) if (rh, rw) != (h, w) else np.asarray(img)
    seen = set()
    for seed in range(12):
        crop = resize_and_crop(img, bucket, torch.Generator().manual_seed(seed))
        top, left = crop.crop_top_left
        assert 0 <= top <= rh - bh and 0 <= left <= rw - bw
        assert crop.original_size == (h, w) and crop.target_size == bucket
        assert crop.image.size == (bw, bh)
        np.testing.assert_array_equal(np.asarray(crop.image), resized[top : top + bh, left : left + bw])
        again = resize_and_crop(img, bucket, torch.Generator().manual_seed(seed))
        assert again.crop_top_left == crop.crop_top_left
        seen.add(crop.crop_top_left)
    if (rh, rw) != (bh, bw):
        assert len(seen) > 1
    centre = resize_and_crop(img, bucket, None)
    assert centre.crop_top_left == ((rh - bh) // 2, (rw - bw) // 2)


# ------------------------------------------------------------------------------------------------ folder dataset


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, n=24, seed=0)
    return root


BUCKETS = make_buckets(128, 16)


def test_folder_dataset_samples(shapes_dir):
    ds = ImageFolderDataset(shapes_dir, BUCKETS, seed=3)
    assert len(ds) == 24 and ds.skipped == [] and ds.missing_captions == []
    assert [r.key for r in ds.records] == [f"{i:04d}" for i in range(24)]
    for i in (0, 5, 17):
        s = ds[i]
        path = shapes_dir / f"{s['key']}.png"
        src = Image.open(path).convert("RGB")
        assert s["original_size"] == (src.height, src.width)
        bh, bw = s["target_size"]
        assert (bh, bw) == BUCKETS[nearest_bucket(src.height, src.width, BUCKETS)] == BUCKETS[ds.bucket_ids[i]]
        assert s["pixels"].shape == (3, bh, bw) and s["pixels"].dtype == torch.float32
        assert s["caption"] == (shapes_dir / f"{s['key']}.txt").read_text().strip()
        # independent decode → resize → slice at the recorded crop → [-1, 1]
        rh, rw = resized_size(src.height, src.width, (bh, bw))
        top, left = s["crop_top_left"]
        resized = np.asarray(src.resize((rw, rh), Image.Resampling.BICUBIC), dtype=np.float32)
        ref = resized[top : top + bh, left : left + bw]
        torch.testing.assert_close(s["pixels"], torch.from_numpy(ref).permute(2, 0, 1) / 127.5 - 1, atol=1e-6, rtol=0)
        assert s["pixels"].min() >= -1 and s["pixels"].max() <= 1


def test_folder_dataset_crops_per_epoch(shapes_dir):
    ds = ImageFolderDataset(shapes_dir, BUCKETS, seed=0)
    fixed = ImageFolderDataset(shapes_dir, BUCKETS, seed=0, new_crop_each_epoch=False)
    n = 10
    e0 = [ds[i]["crop_top_left"] for i in range(n)]
    assert e0 == [ds[i]["crop_top_left"] for i in range(n)]  # deterministic
    ds.set_epoch(1)
    fixed.set_epoch(1)
    e1 = [ds[i]["crop_top_left"] for i in range(n)]
    assert e1 != e0
    assert [fixed[i]["crop_top_left"] for i in range(n)] == e0
    centre = ImageFolderDataset(shapes_dir, BUCKETS, random_crop=False)
    s = centre[0]
    rh, rw = resized_size(*s["original_size"], s["target_size"])
    assert s["crop_top_left"] == ((rh - s["target_size"][0]) // 2, (rw - s["target_size"][1]) // 2)


def test_folder_dataset_corrupt_and_missing_caption(tmp_path, caplog):
    make_shapes_dataset(tmp_path, n=4, seed=1)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "garbage.png").write_bytes(b"this is not a png" * 10)
    (tmp_path / "sub" / "garbage.txt").write_text("never read")
    (tmp_path / "0002.txt").unlink()
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path, BUCKETS)
    assert len(ds) == 4
    assert ds.skipped == [tmp_path / "sub" / "garbage.png"]
    assert "garbage.png" in caplog.text
    assert ds.missing_captions == [tmp_path / "0002.png"] and "0002.png" in caplog.text
    assert ds[2]["caption"] == "" and ds[1]["caption"] != ""
    with pytest.raises(ValueError, match="0002.png"):
        ImageFolderDataset(tmp_path, BUCKETS, require_captions=True)


def test_folder_dataset_truncated_image_replaced_within_bucket(tmp_path, caplog):
    for name in ("a", "b", "c"):
        _noise_image(64, 64, seed=ord(name)).save(tmp_path / f"{name}.jpg", quality=95)
        (tmp_path / f"{name}.txt").write_text(name)
    data = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[: len(data) // 2])  # header intact, scan data cut
    ds = ImageFolderDataset(tmp_path, BUCKETS)
    assert len(ds) == 3 and ds.skipped == []  # the header reads fine
    with caplog.at_level(logging.WARNING):
        s = ds[1]
    assert "b.jpg" in caplog.text and ds.skipped == [tmp_path / "b.jpg"]
    assert s["key"] == "c" and s["target_size"] == BUCKETS[ds.bucket_ids[1]] == (128, 128)


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "nope", BUCKETS)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path, BUCKETS)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match="could be read"):
        ImageFolderDataset(tmp_path, BUCKETS)


def test_dataloader_batches(shapes_dir):
    ds = ImageFolderDataset(shapes_dir, BUCKETS)
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size=3, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    keys = []
    for batch in loader:
        b = batch["pixels"].shape[0]
        assert batch["pixels"].shape[2:] == tuple(batch["target_size"][0].tolist())
        for name in ("original_size", "crop_top_left", "target_size"):
            assert batch[name].shape == (b, 2) and batch[name].dtype == torch.long
        assert (batch["target_size"] == batch["target_size"][0]).all()
        assert len(batch["caption"]) == b
        keys += batch["key"]
    assert sorted(keys) == sorted(r.key for r in ds.records)
    with pytest.raises(ValueError, match="one bucket"):
        collate([ds[0], {**ds[0], "pixels": torch.zeros(3, 8, 8)}])


# ------------------------------------------------------------------------------------------------ sampler


def _bucket_ids(n=53, seed=0):
    ids = np.random.default_rng(seed).integers(0, 5, n).tolist()
    return ids + [7]  # bucket 7 holds a single image


def _flat(batches):
    return [i for b in batches for i in b]


def test_sampler_epoch_contract():
    ids = _bucket_ids()
    sampler = BucketBatchSampler(ids, batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(_flat(batches)) == list(range(len(ids)))  # every sample exactly once
    assert all(len({ids[i] for i in b}) == 1 for b in batches)  # one bucket per batch
    assert all(1 <= len(b) <= 4 for b in batches)
    assert [len(b) for b in batches if ids[b[0]] == 7] == [1]  # the singleton bucket is a batch of one
    assert len({ids[b[0]] for b in batches[:6]}) > 1  # buckets interleave rather than run in blocks
    assert batches == list(BucketBatchSampler(ids, batch_size=4, seed=0))
    assert batches != list(BucketBatchSampler(ids, batch_size=4, seed=1))
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != batches and sorted(_flat(epoch1)) == list(range(len(ids)))


def test_sampler_drop_last_singleton_warns():
    ids = _bucket_ids()
    with pytest.warns(UserWarning, match="never used"):
        sampler = BucketBatchSampler(ids, batch_size=4, seed=0, drop_last=True)
    batches = list(sampler)
    assert all(len(b) == 4 for b in batches) and len(batches) == len(sampler)
    assert len(ids) - 1 not in _flat(batches)
    assert len(set(_flat(batches))) == len(_flat(batches))


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_ddp_disjoint_and_complete(world_size):
    # 6 buckets × 8 images, batch 4 → 12 batches: divisible by 2 and 3
    ids = [b for b in range(6) for _ in range(8)]
    ranks = [list(BucketBatchSampler(ids, 4, seed=5, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(r) for r in ranks}) == 1
    flat = [_flat(r) for r in ranks]
    assert sorted(sum(flat, [])) == list(range(len(ids)))  # union = all, and no sample twice
    assert all(set(a).isdisjoint(b) for i, a in enumerate(flat) for b in flat[i + 1 :])
    # the global list is dealt round-robin
    single = BucketBatchSampler(ids, 4, seed=5)
    assert single.global_batches(0)[:world_size] == [r[0] for r in ranks]


def test_sampler_ddp_uneven_batch_count():
    ids = [0] * 8 + [1] * 5 + [2]  # 2 + 2 + 1 = 5 batches at batch 4
    total = BucketBatchSampler(ids, 4, seed=0).num_global_batches()
    assert total == 5
    ranks = [list(BucketBatchSampler(ids, 4, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (total + 1) // 2
    counts = Counter(_flat(ranks[0]) + _flat(ranks[1]))
    assert set(counts) == set(range(len(ids)))
    repeated = [i for i, c in counts.items() if c > 1]
    assert sorted(repeated) == sorted(ranks[0][0])  # exactly the first batch is repeated to fill the round
    with pytest.warns(UserWarning, match="never used"):
        dropped = [list(BucketBatchSampler(ids, 4, seed=0, rank=r, world_size=2, drop_last=True)) for r in range(2)]
    assert len(dropped[0]) == len(dropped[1]) == 1  # 3 full batches, trimmed to 2
    assert set(_flat(dropped[0])).isdisjoint(_flat(dropped[1]))


def test_sampler_resume_continues_exactly():
    ids = _bucket_ids()
    full = BucketBatchSampler(ids, 4, seed=2, rank=1, world_size=2)
    full.set_epoch(3)
    expected = list(full)
    run = BucketBatchSampler(ids, 4, seed=2, rank=1, world_size=2)
    run.set_epoch(3)
    it = iter(run)
    head = [next(it) for _ in range(5)]
    state = run.state_dict()
    assert state["epoch"] == 3 and state["batch_index"] == 5
    resumed = BucketBatchSampler(ids, 4, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the loop's usual call at the top of the epoch keeps the restored position
    assert head + list(resumed) == expected
    assert list(resumed) == expected  # the restored position is used once
    resumed.set_epoch(4)
    full.set_epoch(4)
    assert list(resumed) == list(full)
    # a position given by the loop (batches consumed) overrides the sampler's own counter
    assert run.state_dict(consumed=2)["batch_index"] == 2
    other = BucketBatchSampler(ids, 4, seed=9, rank=1, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_sampler_resume_through_dataloader(shapes_dir):
    ds = ImageFolderDataset(shapes_dir, BUCKETS)
    sampler = BucketBatchSampler(ds.bucket_ids, 2, seed=0)
    expected = [b["key"] for b in torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)]
    sampler2 = BucketBatchSampler(ds.bucket_ids, 2, seed=0)
    sampler2.load_state_dict(sampler.state_dict(consumed=4))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler2, collate_fn=collate)
    assert [b["key"] for b in loader] == expected[4:]


# ------------------------------------------------------------------------------------------------ webdataset


def _png_bytes(h, w, seed):
    buf = io.BytesIO()
    _noise_image(h, w, seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import webdataset as wds

    root = tmp_path_factory.mktemp("shards")
    sizes = [(64, 64), (64, 128), (128, 64), (64, 64), (64, 128), (64, 64)]
    urls, keys = [], []
    for s in range(4):
        url = str(root / f"shard-{s:02d}.tar")
        with wds.TarWriter(url) as sink:
            for j, (h, w) in enumerate(sizes):
                key = f"s{s}_{j}"
                sample = {"__key__": key, "png": _png_bytes(h, w, 10 * s + j), "txt": f"caption {key}"}
                if s == 1 and j == 2:
                    sample = {"__key__": key, "jpg": b"\xff\xd8not a jpeg", "txt": "bad"}
                elif s == 2 and j == 0:
                    del sample["txt"]
                    keys.append(key)
                else:
                    keys.append(key)
                sink.write(sample)
        urls.append(url)
    return urls, keys


def test_webdataset_shards(shards, caplog):
    urls, keys = shards
    ds = WebDatasetShards(urls, BUCKETS, batch_size=2, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = list(torch.utils.data.DataLoader(ds, batch_size=None))
    seen = [k for b in batches for k in b["key"]]
    assert sorted(seen) == sorted(keys)  # each good sample once, the corrupt one skipped
    assert ds.skipped == [f"{urls[1]}:s1_2"]  # num_workers=0: the loader iterates this very object
    assert "s1_2" in caplog.text and "shard-01.tar" in caplog.text
    for b in batches:
        assert (b["target_size"] == b["target_size"][0]).all()
        assert b["pixels"].shape[2:] == tuple(b["target_size"][0].tolist())
        for cap, key in zip(b["caption"], b["key"]):
            assert cap == ("" if key == "s2_0" else f"caption {key}")
    assert sum(len(b["key"]) == 2 for b in batches) >= len(batches) - 3  # ≤ one partial batch per bucket
    again = [b["key"] for b in WebDatasetShards(urls, BUCKETS, batch_size=2, seed=0)]
    assert again == [b["key"] for b in batches]
    direct = WebDatasetShards(urls, BUCKETS, batch_size=2, seed=0)
    list(direct)
    assert direct.skipped == [f"{urls[1]}:s1_2"] and direct.missing_captions == [f"{urls[2]}:s2_0"]


def test_webdataset_shards_split_by_rank(shards):
    urls, keys = shards
    per_rank = [
        [k for b in WebDatasetShards(urls, BUCKETS, 2, seed=1, rank=r, world_size=2) for k in b["key"]]
        for r in range(2)
    ]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)
    with pytest.raises(ValueError, match="shard"):
        WebDatasetShards(urls[:1], BUCKETS, 2, world_size=2)


def test_loaders_with_workers(shards, shapes_dir):
    """Worker processes: shards are split between workers (each sample once), folder batches stay whole."""
    urls, keys = shards
    wds_loader = torch.utils.data.DataLoader(WebDatasetShards(urls, BUCKETS, 2, seed=0), batch_size=None, num_workers=2)
    assert sorted(k for b in wds_loader for k in b["key"]) == sorted(keys)
    ds = ImageFolderDataset(shapes_dir, BUCKETS)
    sampler = BucketBatchSampler(ds.bucket_ids, 3, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    in_process = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    in_process = [b["crop_top_left"] for b in in_process]
    assert all(torch.equal(a["crop_top_left"], b) for a, b in zip(loader, in_process, strict=True))


# ------------------------------------------------------------------------------------------------ cache


def test_latent_cache_round_trip(tmp_path):
    cache = LatentCache(tmp_path, model_id="vae-test")
    calls = []
    moments = torch.randn(8, 8, 6)
    mean, logvar = moments.chunk(2)  # views of one tensor, as the VAE gives them

    def encode():
        calls.append(1)
        return {"mean": mean, "logvar": logvar}

    key = cache.key("/data/a.png|123|456", (3, 0), (64, 48))
    first = cache.get_or_compute(key, encode)
    second = cache.get_or_compute(key, encode)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    for out in (first, second):
        assert torch.equal(out["mean"], mean) and torch.equal(out["logvar"], logvar)
    assert LatentCache(tmp_path, "vae-test").get(key) is not None  # persists across instances
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []
    # the key covers every part and the model
    variants = {
        key,
        cache.key("/data/a.png|123|456", (3, 1), (64, 48)),  # another crop
        cache.key("/data/a.png|124|456", (3, 0), (64, 48)),  # the file changed
        LatentCache(tmp_path, "vae-other").key("/data/a.png|123|456", (3, 0), (64, 48)),  # another model
    }
    assert len(variants) == 4
    assert key == LatentCache(tmp_path / "x", "vae-test").key("/data/a.png|123|456", (3, 0), (64, 48))


def test_latent_cache_recomputes_corrupt_entry(tmp_path, caplog):
    cache = LatentCache(tmp_path, model_id="text")
    key = cache.key("a red circle")
    cache.put(key, {"context": torch.ones(2, 3)})
    cache.path(key).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        out = cache.get_or_compute(key, lambda: {"context": torch.zeros(2, 3)})
    assert "unreadable" in caplog.text and torch.equal(out["context"], torch.zeros(2, 3))
    assert torch.equal(cache.get(key)["context"], torch.zeros(2, 3))


def test_cache_keys_from_dataset_hit_on_a_second_epoch(shapes_dir, tmp_path):
    ds = ImageFolderDataset(shapes_dir, BUCKETS, new_crop_each_epoch=False)
    cache = LatentCache(tmp_path, "vae")
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(4):
            s = ds[i]
            key = cache.key(s["source_id"], s["crop_top_left"], s["target_size"])
            cache.get_or_compute(key, lambda: {"mean": s["pixels"][:1]})
    assert (cache.misses, cache.hits) == (4, 4)


# ------------------------------------------------------------------------------------------------ synthetic


def test_shapes_dataset(tmp_path):
    paths = make_shapes_dataset(tmp_path / "a", n=20, seed=4, min_side=48, max_side=160)
    again = make_shapes_dataset(tmp_path / "b", n=20, seed=4, min_side=48, max_side=160)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    other = make_shapes_dataset(tmp_path / "c", n=20, seed=5)
    assert [p.read_bytes() for p in paths] != [p.read_bytes() for p in other]
    sizes = set()
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB"))
        h, w = img.shape[:2]
        assert 48 <= h <= 160 and 48 <= w <= 160
        sizes.add((h, w))
        caption = p.with_suffix(".txt").read_text().strip()
        words = caption.split()
        colour, shape = words[1], words[2]
        assert colour in COLOURS and shape in SHAPES and caption.endswith("background")
        frac = (img == np.array(COLOURS[colour], dtype=np.uint8)).all(-1).mean()
        assert frac > 0.05  # the named colour is really there
    assert len({round(h / w, 1) for h, w in sizes}) > 5


def test_shapes_cli(tmp_path, capsys):
    synthetic_main([str(tmp_path / "out"), "--n", "3", "--seed", "1"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "0000.png", "0000.txt", "0001.png", "0001.txt", "0002.png", "0002.txt"
    ]
    assert "wrote 3 images" in capsys.readouterr().out


def test_holdout_splits_the_folder(tmp_path):
    from sdxl_model.train import ImageFolderDataset, make_buckets, make_shapes_dataset

    make_shapes_dataset(tmp_path, n=10, seed=2)
    buckets = make_buckets(64, 16, 32, 128)
    train = ImageFolderDataset(tmp_path, buckets, holdout=3)
    held = ImageFolderDataset(tmp_path, buckets, holdout=3, split="holdout")
    every = ImageFolderDataset(tmp_path, buckets)
    names = lambda ds: [r.path.name for r in ds.records]  # noqa: E731
    assert len(train) == 7 and len(held) == 3 and names(train) + names(held) == names(every)
    with pytest.raises(ValueError, match="holdout=10"):
        ImageFolderDataset(tmp_path, buckets, holdout=10)
    with pytest.raises(ValueError, match="split"):
        ImageFolderDataset(tmp_path, buckets, split="test")
