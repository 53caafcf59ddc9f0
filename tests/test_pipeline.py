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
    from sdxl_model.cli import tiny_components

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


# ---- CLI ------------------------------------------------------------------------------------------------------

def test_cli_tiny_preset_writes_png(tmp_path):
    from sdxl_model.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--preset", "tiny", "--steps", "4", "--size", "64x64", "--out", str(out),
                 "--quiet"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (64, 64)


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
])
def test_cli_bad_input_exits_2(tmp_path, capsys, extra, message):
    from safetensors.torch import save_file

    from sdxl_model.checkpoint import UNET_PREFIX
    from sdxl_model.cli import main

    # only the ADM projection: enough for the kind detection, which runs before any weights are loaded
    save_file({UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(4, 2816)}, str(tmp_path / "base.safetensors"))
    save_file({UNET_PREFIX + "label_emb.0.0.weight": torch.zeros(4, 2560)}, str(tmp_path / "refiner.safetensors"))
    argv = ["generate", "a cat", *[a.format(tmp=tmp_path) for a in extra], "--out", str(tmp_path / "o.png")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
