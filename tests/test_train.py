"""The training loop's parts against independent references, and the loop itself on the tiny preset (CPU)."""
import errno
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sdxl_model import load_weights, sampling
from sdxl_model.conditioning import POOLED_DIM
from sdxl_model.train import make_shapes_dataset, state
from sdxl_model.train.config import TrainConfig
from sdxl_model.train.ema import EMA
from sdxl_model.train.loop import ConfigMismatch, train
from sdxl_model.train.objective import NoiseDraw, apply_dropout, diffusion_loss, draw


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, n=24, seed=3, min_side=40, max_side=120)
    return root


def tiny(tmp_path, data, **kw):
    base = dict(data=str(data), out=str(tmp_path / "out"), progress=False, max_steps=4, save_every=2,
                batch_size=2, device="cpu")  # bitwise comparisons hold on the CPU
    return TrainConfig.tiny(**{**base, **kw})


# ---- config -------------------------------------------------------------------------------------------------


def test_config_from_toml_and_json(tmp_path):
    (tmp_path / "c.toml").write_text('lr = 0.5\nadam_betas = [0.8, 0.9]\nsample_prompts = ["x"]\n')
    cfg = TrainConfig.from_file(tmp_path / "c.toml", base=TrainConfig.tiny())
    assert cfg.lr == 0.5 and cfg.adam_betas == (0.8, 0.9) and cfg.sample_prompts == ("x",) and cfg.tiny_models
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text('{"learning_rate": 1}')
    with pytest.raises(ValueError, match="unknown config field"):
        TrainConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    assert TrainConfig.tiny().differences(TrainConfig.tiny(max_steps=9, out="x")) == {}
    assert set(TrainConfig.tiny().differences(TrainConfig.tiny(lr=1.0))) == {"lr"}


# ---- objective ----------------------------------------------------------------------------------------------


class LinearEps(torch.nn.Module):
    """A stand-in UNet whose output depends on every input: eps = a·x + b·t + c·mean(context) + d·mean(y)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.7, 1e-3, 0.2, 0.3]))

    def forward(self, x, t, context, y):
        a, b, c, d = self.w
        extra = b * t.float() + c * context.float().mean((1, 2)) + d * y.float().mean(1)
        return a * x + extra[:, None, None, None]


def test_diffusion_loss_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    ctx, y = torch.randn(3, 5, 6, generator=gen), torch.randn(3, POOLED_DIM + 16, generator=gen)
    d = draw(x0.shape, torch.Generator().manual_seed(1), offset_noise=0.1, text_dropout=0.5, micro_dropout=0.5)
    model = LinearEps()
    loss = diffusion_loss(model, x0, ctx, y, d)

    # Independent float64 computation of sgm's eps objective: ‖ε̂(c_in·(x0 + σn), t) - n‖² per sample.
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    sig = ((1 - alphas) / alphas).sqrt()[d.timesteps]
    n = d.noise.double()
    xt = x0.double() + sig[:, None, None, None] * n
    keep_t, keep_m = (~d.drop_text).double(), (~d.drop_micro).double()
    c64 = ctx.double() * keep_t[:, None, None]
    y64 = torch.cat([y[:, :POOLED_DIM].double() * keep_t[:, None], y[:, POOLED_DIM:].double() * keep_m[:, None]], 1)
    a, b, c, dd = model.w.detach().double()
    eps = a * xt / (sig**2 + 1).sqrt()[:, None, None, None] + (
        b * d.timesteps.double() + c * c64.mean((1, 2)) + dd * y64.mean(1))[:, None, None, None]
    expected = ((eps - n) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss.double(), expected.mean(), rtol=1e-5, atol=1e-6)

    snr = sig**-2
    weighted = diffusion_loss(model, x0, ctx, y, d, min_snr_gamma=5.0)
    torch.testing.assert_close(weighted.double(), (expected * snr.clamp(max=5.0) / snr).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0


def test_draw_offset_noise_levels_and_dropout_rates():
    g = torch.Generator().manual_seed(0)
    d = draw((4000, 4, 2, 2), g, offset_noise=0.5, num_levels=200, text_dropout=0.25, micro_dropout=0.0)
    assert d.timesteps.min() >= 0 and d.timesteps.max() <= 199 and d.timesteps.unique().numel() > 150
    # offset noise: per (sample, channel) a shared shift, so the spatial mean has variance 1/4 + 0.5²
    spatial_mean = d.noise.mean((2, 3))
    assert abs(spatial_mean.var().item() - (0.25 + 0.25)) < 0.05
    assert abs(d.drop_text.float().mean().item() - 0.25) < 0.03 and not d.drop_micro.any()
    plain = draw((4000, 4, 2, 2), torch.Generator().manual_seed(0))
    assert abs(plain.noise.mean((2, 3)).var().item() - 0.25) < 0.03


def test_dropout_zeroes_text_and_micro_separately():
    ctx, y = torch.ones(2, 3, 4), torch.ones(2, POOLED_DIM + 8)
    d = NoiseDraw(torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 1, 1), torch.tensor([True, False]),
                  torch.tensor([False, True]))
    c2, y2 = apply_dropout(ctx, y, d)
    assert c2[0].eq(0).all() and c2[1].eq(1).all()
    assert y2[0, :POOLED_DIM].eq(0).all() and y2[0, POOLED_DIM:].eq(1).all()
    assert y2[1, :POOLED_DIM].eq(1).all() and y2[1, POOLED_DIM:].eq(0).all()


def test_training_sigmas_are_the_ones_the_objective_uses():
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    torch.testing.assert_close(sampling.training_sigmas().double(), ((1 - alphas) / alphas).sqrt())


# ---- EMA ----------------------------------------------------------------------------------------------------


def test_ema_follows_the_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    shadow = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    for n in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        dec = min(0.9, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            shadow[k] = dec * shadow[k] + (1 - dec) * v.double()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v.double(), shadow[k], rtol=1e-6, atol=1e-6)


# ---- checkpoints ------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_pruning(tmp_path):
    w = {"unet": {"a": torch.arange(3.0)}}
    for step in (1, 2, 3):
        state.save_checkpoint(tmp_path, step, w, {"step": step}, "{}", keep=2)
    names = [p.name for p in state.complete_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000003"]
    weights, ts, cfg = state.load_checkpoint(state.latest_checkpoint(tmp_path))
    assert torch.equal(weights["unet"]["a"], torch.arange(3.0)) and ts == {"step": 3} and cfg == {}


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    state.save_checkpoint(tmp_path, 1, {"unet": {"a": torch.ones(2)}}, {"step": 1}, "{}")
    real = state.save_file
    calls = []

    def full(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(state, "save_file", full)
    with pytest.raises(OSError, match="step-00000001"):
        state.save_checkpoint(tmp_path, 2, {"unet": {"a": torch.zeros(2)}, "ema": {"a": torch.zeros(2)}},
                              {"step": 2}, "{}")
    assert state.latest_checkpoint(tmp_path).name == "step-00000001"
    assert not list(state.checkpoint_dir(tmp_path).glob(".step-*")), "the half-written folder is removed"
    weights, ts, _ = state.load_checkpoint(state.latest_checkpoint(tmp_path))
    assert torch.equal(weights["unet"]["a"], torch.ones(2)) and ts["step"] == 1


def test_incomplete_checkpoint_is_ignored(tmp_path):
    state.save_checkpoint(tmp_path, 1, {"unet": {"a": torch.ones(2)}}, {"step": 1}, "{}")
    half = state.checkpoint_dir(tmp_path) / "step-00000002"
    half.mkdir()
    (half / "unet.safetensors").write_bytes(b"partial")
    assert state.latest_checkpoint(tmp_path).name == "step-00000001"


# ---- the loop ---------------------------------------------------------------------------------------------


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, shapes):
    """Across an epoch boundary (24 images in batches of 2 over several buckets: ~13 batches per epoch)."""
    kw = dict(max_steps=16, save_every=5, text_dropout=0.3, micro_dropout=0.2, grad_accum=1)
    full = train(tiny(tmp_path / "a", shapes, **kw))
    part = train(tiny(tmp_path / "b", shapes, **{**kw, "max_steps": 10}))
    assert part.step == 10
    rest = train(tiny(tmp_path / "b", shapes, **kw), resume=True)
    assert rest.step == 16 and rest.losses == full.losses[10:]
    for name in ("unet", "unet_ema"):
        a = load_file(str(tmp_path / "a" / "out" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "out" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_export_is_official_layout_and_loads(tmp_path, shapes):
    res = train(tiny(tmp_path, shapes, max_steps=2))
    path = res.out / "unet_ema.safetensors"
    keys = load_file(str(path)).keys()
    assert all(k.startswith("model.diffusion_model.") for k in keys)
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["tiny_models"]
    from sdxl_model.presets import tiny_components

    unet = tiny_components(0)[0].unet
    load_weights(unet, path)
    ema = load_file(str(path))
    assert torch.equal(unet.state_dict()["out.2.weight"], ema["model.diffusion_model.out.2.weight"])


def test_resume_with_another_config_is_refused_before_any_step(tmp_path, shapes):
    train(tiny(tmp_path, shapes, max_steps=2))
    log_lines = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    with pytest.raises(ConfigMismatch, match="lr"):
        train(tiny(tmp_path, shapes, max_steps=4, lr=0.5), resume=True)
    assert (tmp_path / "out" / "log.jsonl").read_text().splitlines() == log_lines


def test_kernels_track_eager_step_for_step(tmp_path, shapes):
    ours = train(tiny(tmp_path / "k", shapes, max_steps=6, use_kernels=True))
    eager = train(tiny(tmp_path / "e", shapes, max_steps=6, use_kernels=False))
    for a, b in zip(ours.losses, eager.losses):
        assert math.isclose(a, b, rel_tol=1e-5), (ours.losses, eager.losses)  # measured ≤ 1.5e-7


def test_corrupt_image_is_skipped_and_named(tmp_path, shapes, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    (data / "broken.txt").write_text("nothing")
    (data / "0000.txt").unlink()  # a missing caption: empty caption and a warning
    with caplog.at_level("WARNING"):
        res = train(tiny(tmp_path, data, max_steps=2))
    assert res.step == 2
    assert "broken.png" in caplog.text and "caption" in caplog.text


def test_empty_folder_and_missing_model_are_clear_errors(tmp_path, shapes):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        train(tiny(tmp_path, tmp_path / "empty"))
    with pytest.raises(ValueError, match="checkpoint to fine-tune"):
        train(TrainConfig(data=str(shapes), out=str(tmp_path / "o"), progress=False))


def test_sample_grid_is_written(tmp_path, shapes):
    train(tiny(tmp_path, shapes, max_steps=2, sample_every=2, sample_steps=2, sample_prompts=("a", "b", "c")))
    from PIL import Image

    img = Image.open(tmp_path / "out" / "samples" / "step-00000002.png")
    assert img.size == (128, 128)  # 3 images of 64² in a 2 × 2 grid


def test_refiner_mode_trains_on_low_noise_with_aesthetic_score(tmp_path, shapes):
    res = train(tiny(tmp_path, shapes, max_steps=2, refiner=True, refiner_noise_levels=50))
    assert res.step == 2 and all(math.isfinite(x) for x in res.losses)


def test_latent_and_text_cache_skip_the_encoders_on_the_second_epoch(tmp_path, shapes, monkeypatch):
    from sdxl_model.train.loop import Trainer

    plain = Trainer(tiny(tmp_path / "p", shapes, max_steps=3, random_crop=False)).run()
    trainer = Trainer(tiny(tmp_path / "c", shapes, max_steps=3, random_crop=False, cache_dir=str(tmp_path / "cache")))
    first = trainer.run()
    # Epoch 0 with the cache computes the same moments and embeddings (one image at a time) as without it.
    for a, b in zip(first.losses, plain.losses):
        assert math.isclose(a, b, rel_tol=1e-4), (first.losses, plain.losses)
    vae, text = trainer.models.vae, trainer.models.text_encoder
    calls = {"vae": 0, "text": 0}
    monkeypatch.setattr(vae, "encode", lambda *a, **k: calls.__setitem__("vae", calls["vae"] + 1) or 1 / 0)
    monkeypatch.setattr(text, "forward", lambda *a, **k: calls.__setitem__("text", calls["text"] + 1) or 1 / 0)
    # A new run over the same cache: every image and caption of the first 3 batches is cached.
    again = Trainer(tiny(tmp_path / "c2", shapes, max_steps=3, random_crop=False, cache_dir=str(tmp_path / "cache")),
                    models=trainer.models).run()
    assert calls == {"vae": 0, "text": 0}
    assert again.step == 3


def test_webdataset_shards(tmp_path, shapes):
    import webdataset as wds

    files = sorted(shapes.glob("*.png"))
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s}.tar")) as sink:
            for p in files[s::2]:
                sink.write({"__key__": p.stem, "png": p.read_bytes(), "txt": p.with_suffix(".txt").read_text()})
    res = train(tiny(tmp_path, str(tmp_path / "shard-{0..1}.tar"), max_steps=3))
    assert res.step == 3 and all(math.isfinite(x) for x in res.losses)


def test_a_bucket_with_a_single_image(tmp_path):
    """Four square images and one 4:1 panorama (a bucket of its own): every epoch has a batch of one."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(64, 64)] * 4 + [(128, 32)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"image {i}")
    from sdxl_model.train.loop import Trainer

    trainer = Trainer(tiny(tmp_path, data, max_steps=7, max_side=128))
    sizes = {trainer.dataset.buckets[b] for b in trainer.dataset.bucket_ids}
    assert len(sizes) == 2
    seen = []
    real = trainer.micro_loss
    trainer.micro_loss = lambda batch, index: seen.append(tuple(batch["pixels"].shape)) or real(batch, index)
    res = trainer.run()
    assert res.step == 7 and any(s[0] == 1 for s in seen) and any(s[0] == 2 for s in seen)
