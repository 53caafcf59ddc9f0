"""The VAE against sgm and diffusers: fixture outputs, key/shape maps of the full-size model, the diffusers key
map, tiling, sampling and bad input."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sdxl_model import AutoencoderKL, VAEConfig, set_default_use_kernels
from sdxl_model.vae import convert_diffusers_vae_state_dict, diffusers_vae_key_map, tiled_apply

from .conftest import fixture_path

SGM_PREFIX = "first_stage_model."
SDXL_VAE_PARAMS = 83_653_863
KERNELS = pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])


def tiny_sgm_vae() -> AutoencoderKL:
    kwargs = json.loads(fixture_path("sgm", "tiny_vae.config.json").read_text())["kwargs"]
    model = AutoencoderKL(VAEConfig.from_sgm(kwargs["ddconfig"], kwargs["embed_dim"])).eval()
    raw = load_file(fixture_path("sgm", "tiny_vae.safetensors"))  # float16, upcast: the values the oracle ran
    model.load_state_dict({k.removeprefix(SGM_PREFIX): v.float() for k, v in raw.items()}, strict=True)
    return model


def tiny_diffusers_vae() -> AutoencoderKL:
    folder = fixture_path("diffusers", "tiny_vae")
    cfg = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    model = AutoencoderKL(cfg).eval()
    state = convert_diffusers_vae_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), cfg)
    model.load_state_dict(state, strict=True)
    return model


def shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def meta_sdxl_vae() -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(VAEConfig.sdxl())


# ---- oracle outputs ------------------------------------------------------------------------------------


@KERNELS
def test_matches_sgm_fixture(kernels):
    io = load_file(fixture_path("sgm", "tiny_vae.io.safetensors"))
    model = tiny_sgm_vae().use_kernels(kernels)
    with torch.no_grad():
        moments = model.moments(io["image"])
        mean, logvar = model.encode(io["image"])
        got = {
            "moments": moments,
            "mean": mean,
            "logvar": logvar,
            "decoded": model.decode(io["latent"]),
            "decoded_from_mean": model.decode(io["mean"]),
        }
    for name, value in got.items():
        torch.testing.assert_close(value, io[name], atol=1e-4, rtol=0, msg=name)


@KERNELS
def test_matches_diffusers_fixture(kernels):
    io = load_file(fixture_path("diffusers", "tiny_vae.io.safetensors"))
    model = tiny_diffusers_vae().use_kernels(kernels)
    assert model.config.norm_groups == 8
    with torch.no_grad():
        mean, logvar = model.encode(io["image"])
        decoded = model.decode(io["latent"])
    torch.testing.assert_close(mean, io["posterior_mean"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logvar, io["posterior_logvar"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.exp(0.5 * logvar), io["posterior_std"], atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded, io["decoded"], atol=1e-4, rtol=0)


def test_kernel_switch_reaches_every_norm():
    model = tiny_sgm_vae().use_kernels(False)
    switches = [m for m in model.modules() if hasattr(m, "_kernels")]
    assert switches and all(m.kernels is False for m in switches)
    model.use_kernels(True)
    assert all(m.kernels is True for m in switches)
    model.use_kernels(None)  # follow the process-wide default
    try:
        set_default_use_kernels(False)
        assert all(m.kernels is False for m in switches)
    finally:
        set_default_use_kernels(True)
    assert all(m.kernels is True for m in switches)


# ---- full-size structure -------------------------------------------------------------------------------


def test_full_size_matches_sgm_keys():
    listing = json.loads(fixture_path("sgm", "sd_xl_base_1.0.keys.json").read_text())
    expected = {k.removeprefix(SGM_PREFIX): v for k, v in listing["tensors"].items() if k.startswith(SGM_PREFIX)}
    ddconfig = listing["config"]["model"]["params"]["first_stage_config"]["params"]
    assert VAEConfig.from_sgm(ddconfig["ddconfig"], ddconfig["embed_dim"]) == VAEConfig.sdxl()
    model = meta_sdxl_vae()
    assert shapes(model) == expected
    assert sum(p.numel() for p in model.parameters()) == SDXL_VAE_PARAMS == listing["param_counts"]["vae"]


def test_diffusers_key_map_covers_full_size_listing():
    listing = json.loads(fixture_path("diffusers", "sdxl_vae.keys.json").read_text())
    cfg = VAEConfig.from_diffusers(json.loads(fixture_path("diffusers", "sdxl_vae_config.json").read_text()))
    assert cfg == VAEConfig.sdxl()
    key_map = diffusers_vae_key_map(cfg)
    assert set(key_map) == set(listing["keys"])
    ours = shapes(meta_sdxl_vae())
    assert sorted(key_map.values()) == sorted(ours)
    for src, dst in key_map.items():
        want = ours[dst]
        got = listing["keys"][src]
        assert got == want or (len(got) == 2 and got + [1, 1] == want), (src, dst, got, want)
    assert listing["num_parameters"] == SDXL_VAE_PARAMS


def test_diffusers_conversion_reports_missing_and_unexpected():
    cfg = VAEConfig.tiny()
    state = {k: torch.zeros(1) for k in diffusers_vae_key_map(cfg)}
    state.pop("encoder.conv_in.weight")
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['encoder.conv_in.weight'\].*unexpected \['encoder.extra.weight'\]"):
        convert_diffusers_vae_state_dict(state, cfg)


# ---- sampling and dtypes -------------------------------------------------------------------------------


def test_sample_is_reparameterised_draw():
    g = torch.Generator().manual_seed(3)
    mean, logvar = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g)
    z = AutoencoderKL.sample(mean, logvar, torch.Generator().manual_seed(11))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(z, mean + torch.exp(0.5 * logvar) * eps)


def test_logvar_is_clamped():
    model = tiny_sgm_vae()
    with torch.no_grad():
        model.quant_conv.bias[4:] = torch.tensor([100.0, -100.0, 0.0, 0.0])
        model.quant_conv.weight[4:6] = 0
        _, logvar = model.encode(torch.rand(1, 3, 8, 8) * 2 - 1)
    assert logvar[:, 0].eq(20).all() and logvar[:, 1].eq(-30).all()


@pytest.mark.parametrize("where", ["input", "weights"])
def test_refuses_float16(where):
    model = tiny_sgm_vae()
    img, z = torch.rand(1, 3, 8, 8), torch.randn(1, 4, 4, 4)
    if where == "weights":
        model.half()
    else:
        img, z = img.half(), z.half()
    with pytest.raises(TypeError, match="bfloat16 or torch.float32"):
        model.encode(img)
    with pytest.raises(TypeError, match="float16"):
        model.decode(z)


@KERNELS
def test_bfloat16_runs_close_to_float32(kernels):
    io = load_file(fixture_path("sgm", "tiny_vae.io.safetensors"))
    model = tiny_sgm_vae().use_kernels(kernels)
    with torch.no_grad():
        ref = model.decode(io["latent"])
        got = model.to(torch.bfloat16).decode(io["latent"].bfloat16()).float()
    assert got.isfinite().all()
    # bf16 keeps 8 bits of mantissa; a few layers deep that is ~1e-2 of the output's scale
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


# ---- bad input -----------------------------------------------------------------------------------------


def test_bad_shapes_are_named():
    model = tiny_sgm_vae()
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        model.encode(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.rand(1, 3, 9, 8))
    with pytest.raises(ValueError, match=r"expected \(B, 4, h, w\)"):
        model.decode(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"expected \(B, 4, h, w\)"):
        model.decode(torch.randn(4, 4, 4))


# ---- tiling --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, size", [(8, (21, 37)), (0.5, (22, 38))], ids=["up8", "down2"])
def test_tiled_apply_is_exact_for_local_maps(scale, size):
    """A map without spatial context (resampling then pointwise) must come out identical everywhere: the
    blend weights of overlapping tiles sum to one, also where the last tile, flush with the border, overlaps
    its neighbour by more than `overlap`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g)
    w = torch.randn(5, 3, 1, 1, generator=g)

    def fn(t):
        return F.conv2d(F.interpolate(t, scale_factor=scale, mode="nearest"), w).tanh()

    torch.testing.assert_close(tiled_apply(fn, x, tile=8, overlap=4, scale=scale), fn(x), atol=1e-6, rtol=1e-6)


@KERNELS
def test_tiled_decode_and_encode(kernels):
    model = tiny_sgm_vae().use_kernels(kernels)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 16, 24, generator=g)
    img = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        # one tile covering everything is the untiled result
        torch.testing.assert_close(model.decode(z, tile=32), model.decode(z), atol=0, rtol=0)
        torch.testing.assert_close(model.encode(img, tile=64)[0], model.encode(img)[0], atol=0, rtol=0)
        # tiles of 8 latents stepping by 4: rows/cols 0-3 are covered by the first tile alone, so there the
        # output is exactly the first tile's own decode (GroupNorm and attention statistics are per tile,
        # which is why tiled output is not the untiled one near and across seams)
        tiled = model.decode(z, tile=8, overlap=4)
        first = model.decode(z[..., :8, :8])
        assert tiled.shape == (1, 3, 32, 48) and tiled.isfinite().all()
        torch.testing.assert_close(tiled[..., :8, :8], first[..., :8, :8], atol=0, rtol=0)
        mean_tiled, _ = model.encode(img, tile=16, overlap=8)
        assert mean_tiled.shape == (1, 4, 16, 24)
        torch.testing.assert_close(mean_tiled[..., :4, :4], model.encode(img[..., :16, :16])[0][..., :4, :4],
                                   atol=0, rtol=0)
        # the default overlap (a quarter tile) is rounded to the downsampling factor
        assert model.encode(img, tile=14)[0].shape == (1, 4, 16, 24)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(img, tile=15)
    with pytest.raises(ValueError, match="overlap must be in"):
        model.decode(z, tile=8, overlap=8)
