"""SDXLPipeline (base alone, hand-off, SDEdit) and the `sdxl generate` CLI, with random tiny models on the CPU."""
from __future__ import annotations

import struct

import pytest
import torch

pytest.importorskip("transformers")
from sdxl_model import sampling, text as T  # noqa: E402
from sdxl_model.conditioning import POOLED_DIM, encode_prompts, micro_conditioning  # noqa: E402

pytestmark = pytest.mark.skipif(T.default_vocab_path() is None, reason="CLIP BPE vocabulary not installed")


@pytest.fixture(scope="module")
def stages():
    from sdxl_model.presets import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def pipe(stages):
    from sdxl_model import SDXLPipeline

    return SDXLPipeline(*stages)


KW = dict(steps=4, size=(32, 32), sampler="euler", schedule="karras", cfg=4.0, output="latent")


def test_handoff_equals_explicit_two_slices(pipe, stages):
    base, refiner = stages
    got = pipe("a cat", "blurry", seed=3, refiner_switch=0.5, **KW)

    # the same computation spelled out: one schedule, base on sigmas[:k+1], refiner on sigmas[k:], no re-noise
    size = (32, 32)
    bden, rden = sampling.EpsDenoiser(base.unet), sampling.EpsDenoiser(refiner.unet)
    sigmas = sampling.karras_sigmas(4, bden.sigma_min, bden.sigma_max)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((1, 4, 16, 16), generator=gen) * sigmas[0]
    c, y = encode_prompts(base.text_encoder, ["a cat"], original_size=size, target_size=size)
    uc, uy = encode_prompts(base.text_encoder, ["blurry"], original_size=size, target_size=size, zero_empty=True)
    x = sampling.sample_euler(sampling.CFGDenoiser(bden, 4.0), x, sigmas[:3],
                              extra_args={"cond": {"context": c, "y": y}, "uncond": {"context": uc, "y": uy}})
    c, y = encode_prompts(refiner.text_encoder, ["a cat"], original_size=size, aesthetic_score=6.0)
    uc, uy = encode_prompts(refiner.text_encoder, ["blurry"], original_size=size, aesthetic_score=2.5)
    x = sampling.sample_euler(sampling.CFGDenoiser(rden, 4.0), x, sigmas[2:],
                              extra_args={"cond": {"context": c, "y": y}, "uncond": {"context": uc, "y": uy}})
    assert torch.equal(got, x)


def test_stages_called_in_order_and_sdedit_runs(pipe):
    seen = []
    img = pipe("a cat", seed=0, sdedit_strength=0.5, callback=lambda d: seen.append((d["stage"], d["i"])),
               **{**KW, "output": "tensor"})
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all() and 0 <= img.min() and img.max() <= 1
    assert seen == [("base", i) for i in range(4)] + [("refiner", i) for i in range(2)]
    plain = pipe("a cat", seed=0, **{**KW, "output": "tensor"})  # the refiner is not used without a mode
    assert not torch.equal(img, plain)


def test_deterministic_per_seed(pipe):
    a = pipe("a cat", seed=1, refiner_switch=0.75, **KW)
    b = pipe("a cat", seed=1, refiner_switch=0.75, **KW)
    c = pipe("a cat", seed=2, refiner_switch=0.75, **KW)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_micro_conditioning_reaches_y(pipe, stages):
    base, refiner = stages
    ys = {"base": [], "refiner": []}
    hooks = [s.unet.register_forward_pre_hook(lambda m, args, key=k: ys[key].append(args[3].clone()))
             for k, s in (("base", base), ("refiner", refiner))]
    try:
        pipe("a cat", "", seed=0, refiner_switch=0.5, original_size=(512, 768), crops_coords_top_left=(16, 8),
             target_size=(1024, 2048), negative_original_size=(256, 256), aesthetic_score=7.0,
             negative_aesthetic_score=1.5, **KW)
    finally:
        for h in hooks:
            h.remove()
    y = ys["base"][0]  # rows: [uncond; cond]
    torch.testing.assert_close(y[1, POOLED_DIM:], micro_conditioning((512, 768), (16, 8), (1024, 2048))[0])
    torch.testing.assert_close(y[0, POOLED_DIM:], micro_conditioning((256, 256), (16, 8), (1024, 2048))[0])
    assert torch.all(y[0, :POOLED_DIM] == 0)  # empty negative prompt: zero text embedding for the base
    from sdxl_model.conditioning import refiner_micro_conditioning

    r = ys["refiner"][0]
    torch.testing.assert_close(r[1, POOLED_DIM:], refiner_micro_conditioning((512, 768), (16, 8), 7.0)[0])
    torch.testing.assert_close(r[0, POOLED_DIM:], refiner_micro_conditioning((256, 256), (16, 8), 1.5)[0])


def test_pipeline_rejects_bad_input(pipe, stages):
    from sdxl_model import SDXLPipeline

    with pytest.raises(ValueError, match="not both"):
        pipe("a cat", refiner_switch=0.5, sdedit_strength=0.3, **KW)
    with pytest.raises(ValueError, match="base model"):
        SDXLPipeline(stages[0], stages[0])
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe("a cat", **{**KW, "sampler": "nope"})


# ---- img2img ---------------------------------------------------------------------------------------------------

def _image(seed: int = 0, size=(32, 32), batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, *size), generator=g)  # smooth enough for a VAE, never all zeros


def _count_unet_calls(stages):
    counts = {"base": 0, "refiner": 0}
    hooks = [s.unet.register_forward_pre_hook(lambda m, a, k=k: counts.__setitem__(k, counts[k] + 1))
             for k, s in zip(("base", "refiner"), stages)]
    return counts, hooks


def test_img2img_equals_explicit_encode_noise_denoise(pipe, stages):
    base, _ = stages
    img = _image(1)
    got = pipe("a cat", "blurry", seed=7, image=img, strength=0.5, **KW)

    # spelled out: posterior mean × scale factor, noised to sigmas[s], s = 4 − round(0.5·4) = 2; Euler on sigmas[2:]
    den = sampling.EpsDenoiser(base.unet)
    sigmas = sampling.karras_sigmas(4, den.sigma_min, den.sigma_max)
    mean, _ = base.vae.encode(img * 2 - 1)
    z = mean * base.vae.config.scale_factor
    x = z + torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(7)) * sigmas[2]
    size = (32, 32)
    c, y = encode_prompts(base.text_encoder, ["a cat"], original_size=size, target_size=size)
    uc, uy = encode_prompts(base.text_encoder, ["blurry"], original_size=size, target_size=size, zero_empty=True)
    want = sampling.sample_euler(sampling.CFGDenoiser(den, 4.0), x, sigmas[2:],
                                 extra_args={"cond": {"context": c, "y": y}, "uncond": {"context": uc, "y": uy}})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_img2img_strength_one_is_text_to_image_plus_the_image_latents(pipe, stages):
    base, _ = stages
    img = _image(2)
    seen = {"t2i": [], "i2i": []}
    pipe("a cat", seed=4, callback=lambda d: seen["t2i"].append(d), **KW)
    pipe("a cat", seed=4, image=img, strength=1.0, callback=lambda d: seen["i2i"].append(d), **KW)
    # the same full schedule, step for step
    assert [float(d["sigma"]) for d in seen["i2i"]] == [float(d["sigma"]) for d in seen["t2i"]]
    # karras starts from noise · sigma_max in both; img2img adds the image's scaled posterior mean
    mean, _ = base.vae.encode(img * 2 - 1)
    diff = seen["i2i"][0]["x"] - seen["t2i"][0]["x"]
    torch.testing.assert_close(diff, mean * base.vae.config.scale_factor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strength, switch, want", [
    (1.0, None, {"base": 10, "refiner": 0}),
    (0.3, None, {"base": 3, "refiner": 0}),
    (0.04, None, {"base": 1, "refiner": 0}),  # at least one step
    (0.5, 0.8, {"base": 3, "refiner": 2}),  # sigmas[5:9] on the base, hand-off at sigmas[8] of the full schedule
    (0.1, 0.8, {"base": 0, "refiner": 1}),  # starts past the hand-off: the refiner does all of it
])
def test_img2img_strength_sets_the_steps_run(pipe, stages, strength, switch, want):
    counts, hooks = _count_unet_calls(stages)
    try:
        pipe("a cat", seed=0, image=_image(), strength=strength, refiner_switch=switch,
             **{**KW, "steps": 10})
    finally:
        for h in hooks:
            h.remove()
    assert counts == want  # one UNet call per Euler step (CFG batches uncond and cond)


def test_img2img_size_from_image_pil_and_resize(pipe):
    from PIL import Image

    from sdxl_model.pipeline import image_tensor

    arr = (torch.rand(24, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    pil = Image.fromarray(arr.numpy())
    x = image_tensor(pil)
    assert x.shape == (1, 3, 24, 40)
    torch.testing.assert_close(x, arr.permute(2, 0, 1)[None].float() / 255)
    kw = {k: v for k, v in KW.items() if k != "size"}
    assert pipe("a cat", image=pil, strength=0.5, **kw).shape == (1, 4, 12, 20)  # tiny VAE: factor 2
    assert pipe("a cat", image=pil, strength=0.5, size=(16, 32), **kw).shape == (1, 4, 8, 16)
    assert image_tensor(pil, (16, 32)).shape == (1, 3, 16, 32)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(image=torch.rand(1, 4, 32, 32)), ValueError, "3 \\(RGB\\) channels"),
    (dict(image=torch.rand(1, 3, 32, 32) * 2 - 1), ValueError, "values must be in \\[0, 1\\]"),
    (dict(image=torch.rand(1, 3, 32, 32) * 255), ValueError, "values must be in \\[0, 1\\]"),
    (dict(image=torch.full((1, 3, 32, 32), float("nan"))), ValueError, "values must be in"),
    (dict(image=torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError, "float tensor"),
    (dict(image="cat.png"), TypeError, "PIL image or a tensor"),
    (dict(image=torch.rand(1, 3, 36, 32), size=None), ValueError, "positive multiples of 8 \\(the VAE"),
    (dict(image=torch.rand(3, 3, 32, 32)), ValueError, "3 images for 1 prompts"),
    (dict(image=torch.rand(1, 3, 32, 32), strength=0.0), ValueError, "strength must be in"),
    (dict(image=torch.rand(1, 3, 32, 32), strength=1.5), ValueError, "strength must be in"),
    (dict(strength=0.5), ValueError, "give an image"),
    (dict(seed=[1, 2]), ValueError, "2 seeds for 1 prompts"),
    (dict(seed=[1.5]), TypeError, "seeds must be ints"),
    (dict(size=(30, 32)), ValueError, "positive multiples of 8 \\(the VAE"),
])
def test_img2img_and_seeds_reject_bad_input(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe("a cat", **{**KW, **kwargs})


# ---- seeds per image ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [dict(), dict(refiner_switch=0.5), dict(sdedit_strength=0.5),
                                  dict(image=_image(3), strength=0.75)], ids=["base", "handoff", "sdedit", "img2img"])
def test_batch_image_equals_the_same_prompt_alone(pipe, mode):
    kw = {**KW, "sampler": "euler_ancestral", **mode}  # ancestral: fresh noise every step, from each image's seed
    batch = pipe(["a cat", "a dog"], ["", "blurry"], seed=[11, 5], **kw)
    cat = pipe("a cat", "", seed=11, **kw)
    dog = pipe("a dog", "blurry", seed=5, **kw)
    _assert_batching_close(batch[0:1], cat)
    _assert_batching_close(batch[1:2], dog)
    other = pipe("a dog", "blurry", seed=6, **kw)
    assert (other - dog).abs().max() > 0.1 * dog.abs().max()  # the seed matters: the equality is not vacuous


def _assert_batching_close(got, want):
    # batch 4 vs 2 in the UNet's matmuls changes float32 sums in the last bits (measured ~1.5e-6 of the
    # latents' scale after 4 steps at CFG 4); a different seed changes them by about their whole scale
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_int_seed_means_seed_plus_index(pipe):
    kw = {**KW, "sampler": "euler_ancestral"}
    batch = pipe(["a cat", "a cat"], seed=20, **kw)
    _assert_batching_close(batch[0:1], pipe("a cat", seed=20, **kw))
    _assert_batching_close(batch[1:2], pipe("a cat", seed=21, **kw))
    assert (batch[0] - batch[1]).abs().max() > 0.1 * batch[0].abs().max()


# ---- CUDA graphs --------------------------------------------------------------------------------------------

def _unet_args(cfg, batch=2, size=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g)
    y = torch.randn(batch, cfg.adm_in_channels, generator=g)
    return tuple(a.to(device, dtype) for a in (x, t, ctx, y))


@pytest.fixture
def fake_capture(monkeypatch):
    """GraphedUNet.capture replaced by a recorder whose replay runs the UNet eagerly on the static buffers."""
    from sdxl_model import graphs

    keys = []

    def capture(self, args):
        static = tuple(a.clone() for a in args)
        out = torch.empty_like(self.unet(*static))

        def replay():
            out.copy_(self.unet(*static))

        keys.append(graphs.signature(*args))
        return graphs.Captured(graphs.signature(*args), static, out, replay)

    monkeypatch.setattr(graphs.GraphedUNet, "capture", capture)
    return keys


def test_graphs_switch_is_off_on_cpu_and_says_why(stages):
    from sdxl_model import SDXLPipeline

    status = SDXLPipeline(*stages).graphs_status()
    assert set(status) == {"base", "refiner"}
    assert all(v.startswith("off:") and "cpu" in v and "CUDA" in v for v in status.values())
    assert SDXLPipeline(*stages, cuda_graphs=False).graphs_status()["base"] == "off: cuda_graphs=False"
    forced = SDXLPipeline(*stages, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs the UNet on a CUDA device"):
        forced("a cat", **KW)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        SDXLPipeline(*stages, cuda_graphs="yes")


def test_graphed_unet_keys_on_signature_and_replays_fresh_inputs(stages, fake_capture):
    from sdxl_model.graphs import GraphedUNet

    unet = stages[0].unet
    g = GraphedUNet(unet)
    a1, a2 = _unet_args(unet.config, seed=1), _unet_args(unet.config, seed=2)
    with torch.no_grad():
        out1 = g(*a1)
        out2 = g(*a2)  # same signature: replayed, inputs copied into the static buffers
        assert len(fake_capture) == 1
        torch.testing.assert_close(out1, unet(*a1), rtol=0, atol=0)
        torch.testing.assert_close(out2, unet(*a2), rtol=0, atol=0)  # out1 was not overwritten by the replay
        assert not torch.equal(out1, out2)
        b = _unet_args(unet.config, batch=4, seed=3)
        torch.testing.assert_close(g(*b), unet(*b), rtol=0, atol=0)  # new batch: re-captured
        c = _unet_args(unet.config, size=16, seed=4)
        torch.testing.assert_close(g(*c), unet(*c), rtol=0, atol=0)  # new spatial size: re-captured
        g(*a1)  # one graph kept: back to the first signature captures again
    assert len(fake_capture) == 4 and g.captures == 4
    assert [k[0][0] for k in fake_capture] == [(2, 4, 8, 8), (4, 4, 8, 8), (2, 4, 16, 16), (2, 4, 8, 8)]
    assert g.fallback_reason is None
    g(*a1)  # autograd on: eager, no capture
    assert len(fake_capture) == 4


def test_graphed_unet_falls_back_to_eager_with_a_logged_reason(stages, monkeypatch, caplog):
    from sdxl_model import graphs

    unet = stages[0].unet
    args = _unet_args(unet.config)
    calls = []

    def failing(self, a):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.GraphedUNet, "capture", failing)
    g = graphs.GraphedUNet(unet)
    with torch.no_grad(), caplog.at_level("WARNING", logger="sdxl_model.graphs"):
        out = g(*args)
        out_again = g(*args)
        torch.testing.assert_close(out, unet(*args), rtol=0, atol=0)
        torch.testing.assert_close(out_again, out, rtol=0, atol=0)
    assert calls == [1]  # no second attempt
    assert "stream is capturing" in g.fallback_reason
    assert any("running eagerly" in r.message and "stream is capturing" in r.message for r in caplog.records)


def test_real_capture_of_cpu_inputs_falls_back(stages, caplog):
    from sdxl_model.graphs import GraphedUNet

    unet = stages[0].unet
    args = _unet_args(unet.config)
    g = GraphedUNet(unet)
    with torch.no_grad(), caplog.at_level("WARNING", logger="sdxl_model.graphs"):
        torch.testing.assert_close(g(*args), unet(*args), rtol=0, atol=0)
    assert "CUDA graphs need every input on one CUDA device" in g.fallback_reason
    assert caplog.records


def test_pipeline_with_graphs_forced_on_equals_eager(stages, monkeypatch, fake_capture):
    from sdxl_model import SDXLPipeline, graphs

    monkeypatch.setattr(graphs, "resolve", lambda setting, module: (True, "on: forced by the test"))
    graphed = SDXLPipeline(*stages)
    kw = {**KW, "sampler": "euler_ancestral", "refiner_switch": 0.5}
    got = graphed(["a cat", "a dog"], seed=[1, 2], **kw)
    assert len(fake_capture) == 2  # one graph per stage, reused across the steps
    assert graphed(["a cat", "a dog"], seed=[1, 2], **kw).shape == got.shape and len(fake_capture) == 2
    monkeypatch.undo()
    want = SDXLPipeline(*stages, cuda_graphs=False)(["a cat", "a dog"], seed=[1, 2], **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graphed_unet_matches_eager(dtype):
    from sdxl_model import SDXLPipeline
    from sdxl_model.presets import tiny_components
    from sdxl_model.graphs import GraphedUNet

    base, refiner = tiny_components(seed=0)
    unet = base.unet.to("cuda", dtype)
    g = GraphedUNet(unet)
    with torch.no_grad():
        for seed in (1, 2):
            args = _unet_args(unet.config, dtype=dtype, device="cuda", seed=seed)
            # the same kernels replayed; assert_close's default tolerance for the dtype in case a library picks
            # another algorithm under capture
            torch.testing.assert_close(g(*args), unet(*args))
    assert g.fallback_reason is None and g.captures == 1

    refiner.unet.to("cuda", dtype)
    kw = {**KW, "sampler": "euler_ancestral", "refiner_switch": 0.5}
    graphed = SDXLPipeline(base, refiner)
    assert all(v.startswith("on:") for v in graphed.graphs_status().values())
    got = graphed(["a cat", "a dog"], seed=[1, 2], **kw)
    assert all(v.startswith("on:") for v in graphed.graphs_status().values())  # no fallback happened
    want = SDXLPipeline(base, refiner, cuda_graphs=False)(["a cat", "a dog"], seed=[1, 2], **kw)
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 * float(want.abs().max()) if dtype == torch.bfloat16 else 1e-5)


# ---- CLI ------------------------------------------------------------------------------------------------------

def test_cli_tiny_preset_writes_png(tmp_path):
    from sdxl_model.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--preset", "tiny", "--steps", "4", "--size", "64x64", "--out", str(out),
                 "--quiet"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (64, 64)


def test_cli_img2img_batch_writes_one_png_per_seed_with_parameters(tmp_path):
    from PIL import Image

    from sdxl_model.cli import main

    src = tmp_path / "in.png"
    Image.fromarray((_image(0, (40, 48))[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(src)
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--preset", "tiny", "--steps", "4", "--image", str(src), "--strength", "0.5",
                 "--seed", "5", "--batch", "2", "--out", str(out), "--quiet"]) == 0
    assert not out.exists()
    for i in range(2):
        im = Image.open(tmp_path / f"x-{i}.png")
        assert im.size == (48, 40)  # the image's size: no --size given
        text = im.text["parameters"]
        assert f"Seed: {5 + i}," in text and f"Image: {src}," in text and "Strength: 0.5" in text
        assert f"Batch: {i + 1}/2 (seeds 5..6)" in text


def test_png_fallback_writer_roundtrip():
    from PIL import Image
    import io

    from sdxl_model.cli import encode_png

    rgb = bytes(range(3 * 4 * 2))
    png = encode_png(rgb, 4, 2, {"parameters": "a cat"})
    im = Image.open(io.BytesIO(png))
    assert im.size == (4, 2) and im.tobytes() == rgb and im.text["parameters"] == "a cat"


@pytest.mark.parametrize("extra, message", [
    (["--base", "{tmp}/missing.safetensors"], "no such file"),
    (["--preset", "tiny", "--size", "60x64"], "multiples of 8"),
    (["--preset", "tiny", "--refiner-switch", "0.8", "--sdedit-strength", "0.3"], "not both"),
    (["--base", "{tmp}/base.safetensors", "--refiner", "{tmp}/base.safetensors"], "base checkpoint, not a refiner"),
    (["--base", "{tmp}/refiner.safetensors"], "refiner checkpoint"),
    (["--preset", "tiny", "--strength", "0.5"], "give --image too"),
    (["--preset", "tiny", "--image", "{tmp}/in.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--preset", "tiny", "--image", "{tmp}/missing.png"], "no such file"),
    (["--preset", "tiny", "--image", "{tmp}/in.png"], "multiples of 8"),  # 36×32: the tiny UNet needs 8
    (["--preset", "tiny", "--batch", "0"], "--batch must be positive"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, extra, message):
    from safetensors.torch import save_file

    from sdxl_model.checkpoint import UNET_PREFIX
    from sdxl_model.cli import main

    # only the ADM projection: enough for the kind detection, which runs before any weights are loaded
    save_file({UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(4, 2816)}, str(tmp_path / "base.safetensors"))
    save_file({UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(4, 2560)}, str(tmp_path / "refiner.safetensors"))
    from PIL import Image

    Image.new("RGB", (32, 36), (200, 100, 50)).save(tmp_path / "in.png")
    argv = ["generate", "a cat", *[a.format(tmp=tmp_path) for a in extra], "--out", str(tmp_path / "o.png")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
