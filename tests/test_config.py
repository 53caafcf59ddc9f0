"""UNetConfig presets against the sgm and diffusers configs they come from."""
import json

import pytest

from sdxl_model import UNetConfig, VAEConfig

from .conftest import fixture_path


def sgm_network_params(name: str) -> dict:
    keys = json.loads(fixture_path("sgm", f"{name}.keys.json").read_text())
    return keys["config"]["model"]["params"]["network_config"]["params"]


def load_json(*parts: str) -> dict:
    return json.loads(fixture_path(*parts).read_text())


@pytest.mark.parametrize(
    "sgm_name, preset", [("sd_xl_base_1.0", UNetConfig.sdxl_base), ("sd_xl_refiner_1.0", UNetConfig.sdxl_refiner)]
)
def test_from_sgm_full(sgm_name, preset):
    assert UNetConfig.from_sgm(sgm_network_params(sgm_name)) == preset()


@pytest.mark.parametrize(
    "file, preset",
    [("sdxl_unet_config.json", UNetConfig.sdxl_base), ("sdxl_refiner_unet_config.json", UNetConfig.sdxl_refiner)],
)
def test_from_diffusers_full(file, preset):
    assert UNetConfig.from_diffusers(load_json("diffusers", file)) == preset()


def test_presets_fields():
    base, refiner = UNetConfig.sdxl_base(), UNetConfig.sdxl_refiner()
    assert base.block_channels == (320, 640, 1280) and base.time_embed_dim == 1280
    assert base.transformer_depth == (0, 2, 10) and base.transformer_depth_middle == 10
    assert (base.context_dim, base.adm_in_channels) == (2048, 2816)
    assert refiner.block_channels == (384, 768, 1536, 1536) and refiner.time_embed_dim == 1536
    assert refiner.transformer_depth == (0, 4, 4, 0) and refiner.transformer_depth_middle == 4
    assert (refiner.context_dim, refiner.adm_in_channels) == (1280, 2560)


def test_from_sgm_tiny():
    assert UNetConfig.from_sgm(load_json("sgm", "tiny_unet.config.json")["kwargs"]) == UNetConfig.tiny()
    refiner = UNetConfig.from_sgm(load_json("sgm", "tiny_refiner_unet.config.json")["kwargs"])
    assert refiner.channel_mult == (1, 1, 1, 1)
    # sgm puts attention at downsampling factors 2 and 4 only, although transformer_depth is 1 everywhere
    assert refiner.transformer_depth == (0, 1, 1, 0) and refiner.transformer_depth_middle == 1
    assert (refiner.context_dim, refiner.adm_in_channels, refiner.num_head_channels) == (32, 112, 8)


def test_from_diffusers_tiny():
    cfg = UNetConfig.from_diffusers(load_json("diffusers", "tiny_unet", "config.json"))
    assert cfg.block_channels == (8, 16, 32) and cfg.model_channels == 8
    assert cfg.num_head_channels == 8  # heads [1, 2, 4] over channels [8, 16, 32]
    assert cfg.transformer_depth == (0, 1, 2) and cfg.transformer_depth_middle == 2
    assert (cfg.norm_groups, cfg.context_dim, cfg.adm_in_channels) == (4, 64, 128)


def test_rejects_inconsistent_configs():
    with pytest.raises(ValueError, match="levels"):
        UNetConfig(transformer_depth=(0, 2))
    with pytest.raises(ValueError, match="multiple"):
        UNetConfig(num_head_channels=48)  # 640 channels at level 1
    params = dict(sgm_network_params("sd_xl_refiner_1.0"), context_dim=[1280, 2048, 1280, 1280])
    with pytest.raises(ValueError, match="context"):
        UNetConfig.from_sgm(params)


def test_frozen_and_hashable():
    cfg = UNetConfig.tiny()
    with pytest.raises(AttributeError):
        cfg.model_channels = 64
    assert hash(cfg) == hash(UNetConfig.tiny())


# ---- VAEConfig -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sgm_name", ["sd_xl_base_1.0", "sd_xl_refiner_1.0"])
def test_vae_from_sgm_full(sgm_name):
    keys = json.loads(fixture_path("sgm", f"{sgm_name}.keys.json").read_text())
    params = keys["config"]["model"]["params"]["first_stage_config"]["params"]
    assert VAEConfig.from_sgm(params["ddconfig"], params["embed_dim"]) == VAEConfig.sdxl()


def test_vae_from_diffusers_full():
    cfg = VAEConfig.from_diffusers(load_json("diffusers", "sdxl_vae_config.json"))
    assert cfg == VAEConfig.sdxl()
    assert cfg.block_channels == (128, 256, 512, 512) and cfg.downsample_factor == 8


def test_vae_tiny():
    kwargs = load_json("sgm", "tiny_vae.config.json")["kwargs"]
    assert VAEConfig.from_sgm(kwargs["ddconfig"], kwargs["embed_dim"]) == VAEConfig.tiny()
    cfg = VAEConfig.from_diffusers(load_json("diffusers", "tiny_vae", "config.json"))
    assert cfg.block_channels == (32, 64) and cfg.num_res_blocks == 1 and cfg.norm_groups == 8
    assert cfg.downsample_factor == 2 and cfg.z_channels == 4


def test_vae_rejects_unsupported():
    ddconfig = load_json("sgm", "tiny_vae.config.json")["kwargs"]["ddconfig"]
    with pytest.raises(ValueError, match="attn_resolutions"):
        VAEConfig.from_sgm(dict(ddconfig, attn_resolutions=[16]))
    with pytest.raises(ValueError, match="double_z"):
        VAEConfig.from_sgm(dict(ddconfig, double_z=False))
