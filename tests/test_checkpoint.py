"""Checkpoint IO: both layouts against the oracle fixtures, the diffusers key map on the full-size models,
strictness and bad input, and the save/load round trip."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdxl_kernels
from sdxl_model import UNet, UNetConfig, load_weights, save_weights
from sdxl_model.checkpoint import UNET_PREFIX, diffusers_unet_key_map

from .conftest import fixture_path, rotating_slice

SGM_TINY = ["tiny_unet", "tiny_refiner_unet"]


def sgm_config(name: str) -> UNetConfig:
    return UNetConfig.from_sgm(json.loads(fixture_path("sgm", f"{name}.config.json").read_text())["kwargs"])


def diffusers_config() -> UNetConfig:
    return UNetConfig.from_diffusers(json.loads(fixture_path("diffusers", "tiny_unet", "config.json").read_text()))


def sgm_file_state(name: str) -> dict[str, torch.Tensor]:
    return load_file(fixture_path("sgm", f"{name}.safetensors"))


# ---- oracle fixtures ------------------------------------------------------------------------------------


@pytest.mark.skipif(not sdxl_kernels.backends.triton_interpret(), reason="the Triton kernels run on CPU tensors "
                    "only under the interpreter (TRITON_INTERPRET=1, set by conftest when there is no GPU)")
@pytest.mark.parametrize("name", SGM_TINY)
def test_sgm_single_file_reproduces_fixture_on_triton_kernels(name, slow):
    """Kernels on, served by the Triton kernels (interpreted): every GroupNorm(+SiLU) and the timestep
    embedding of the UNet run through them; attention in float32 goes to PyTorch's SDPA. The interpreter takes
    ~0.7 s per GroupNorm, so the default run takes one (model, sample) pair of the four, rotating by day
    (samples are independent in eval mode), and `pytest --slow` both models on the whole batch; the other
    backends run both models on the whole batch in test_sgm_single_file_reproduces_fixture every run."""
    pair = rotating_slice(2 * len(SGM_TINY))  # model = pair % 2, sample = pair // 2
    if not slow and SGM_TINY.index(name) != pair % len(SGM_TINY):
        pytest.skip(f"today's rotating slice runs {SGM_TINY[pair % len(SGM_TINY)]} (pytest --slow: both)")
    io = load_file(fixture_path("sgm", f"{name}.io.safetensors"))
    with torch.device("meta"):
        model = UNet(sgm_config(name))
    load_weights(model, fixture_path("sgm", f"{name}.safetensors"))
    sdxl_kernels.set_backend("group_norm_silu", "triton")
    sdxl_kernels.set_backend("fourier_embedding", "triton")
    model.eval().use_kernels(True)
    batch = io["x"].shape[0]
    rows = slice(None) if slow else [pair // len(SGM_TINY) % batch]
    with torch.no_grad():
        out = model(*(io[k][rows] for k in ("x", "timesteps", "context", "y")))
    assert sdxl_kernels.last_backend("group_norm_silu") == "triton"
    assert sdxl_kernels.last_backend("fourier_embedding") == "triton"
    torch.testing.assert_close(out, io["out"][rows], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("name", SGM_TINY)
def test_sgm_single_file_reproduces_fixture(name, kernels):
    """The official layout (fp16 weights, `model.diffusion_model.`) loads into a meta-built model."""
    io = load_file(fixture_path("sgm", f"{name}.io.safetensors"))
    with torch.device("meta"):
        model = UNet(sgm_config(name))
    load_weights(model, fixture_path("sgm", f"{name}.safetensors"))
    p = next(model.parameters())
    assert not p.is_meta and p.dtype == torch.float32 and p.requires_grad
    model.eval().use_kernels(kernels)
    with torch.no_grad():
        out = model(io["x"], io["timesteps"], io["context"], io["y"])
    torch.testing.assert_close(out, io["out"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(  # the folder kind changes only path resolution: one kernel mode suffices for it
    "layout, kernels",
    [("model_folder", True), ("model_folder", False), ("pipeline_folder", False)],
    ids=["model_folder-kernels", "model_folder-torch", "pipeline_folder-torch"],
)
def test_diffusers_folder_reproduces_fixture(layout, kernels, tmp_path):
    folder = fixture_path("diffusers", "tiny_unet")
    if layout == "pipeline_folder":
        shutil.copytree(folder, tmp_path / "unet")
        (tmp_path / "model_index.json").write_text("{}")
        folder = tmp_path
    io = load_file(fixture_path("diffusers", "tiny_unet.io.safetensors"))
    model = UNet(diffusers_config())  # on CPU: copied in place
    load_weights(model, folder)
    model.eval().use_kernels(kernels)
    b = io["sample"].shape[0]
    # diffusers' add embedding input: concat(text_embeds, sinusoid(time_ids).reshape(B, -1)) — our ADM vector y
    y = torch.cat([io["text_embeds"], sdxl_kernels.fourier_embedding(io["time_ids"], 16).reshape(b, -1)], dim=1)
    with torch.no_grad():
        out = model(io["sample"], io["timestep"], io["encoder_hidden_states"], y)
    torch.testing.assert_close(out, io["output"], atol=1e-4, rtol=0)


def test_bare_and_diffusers_single_files_load(tmp_path):
    """A prefix-less sgm state dict and a single diffusers-named file are detected by their keys."""
    ref = UNet(sgm_config("tiny_unet"))
    load_weights(ref, fixture_path("sgm", "tiny_unet.safetensors"))
    bare = {k.removeprefix(UNET_PREFIX): v for k, v in sgm_file_state("tiny_unet").items()}
    save_file(bare, tmp_path / "bare.safetensors")
    to_ours = diffusers_unet_key_map(ref.config)
    save_file({d: bare[o] for d, o in to_ours.items()}, tmp_path / "diffusers.safetensors")
    for file in ("bare.safetensors", "diffusers.safetensors"):
        model = UNet(ref.config)
        load_weights(model, tmp_path / file)
        for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), (file, k)


def test_full_checkpoint_ignores_other_components(tmp_path):
    state = sgm_file_state("tiny_unet")
    state["first_stage_model.decoder.conv_in.weight"] = torch.ones(3)
    state["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(3)
    save_file(state, tmp_path / "full.safetensors")
    load_weights(UNet(sgm_config("tiny_unet")), tmp_path / "full.safetensors")


# ---- the diffusers key map on the full-size models --------------------------------------------------------


@pytest.mark.parametrize("preset, keys_file", [
    (UNetConfig.sdxl_base, "sdxl_unet.keys.json"),
    (UNetConfig.sdxl_refiner, "sdxl_refiner_unet.keys.json"),
])
def test_diffusers_key_map_is_a_bijection_with_matching_shapes(preset, keys_file):
    listing = json.loads(fixture_path("diffusers", keys_file).read_text())
    with torch.device("meta"):
        model = UNet(preset())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = diffusers_unet_key_map(model.config, list(ours))
    assert len(set(mapping.values())) == len(mapping) == len(ours) == listing["num_tensors"]
    assert set(mapping.values()) == set(ours)
    assert {d: ours[o] for d, o in mapping.items()} == {k: tuple(v) for k, v in listing["keys"].items()}


def test_diffusers_config_of_full_size_matches_preset():
    """The full-size diffusers configs convert to our presets, so their folders pass the config check."""
    for preset, name in [(UNetConfig.sdxl_base, "sdxl_unet_config.json"),
                         (UNetConfig.sdxl_refiner, "sdxl_refiner_unet_config.json")]:
        assert UNetConfig.from_diffusers(json.loads(fixture_path("diffusers", name).read_text())) == preset()


# ---- dtype, round trip -------------------------------------------------------------------------------------


def test_fp16_weights_cast_to_model_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        model = UNet(sgm_config("tiny_unet")).to(dtype)
        load_weights(model, fixture_path("sgm", "tiny_unet.safetensors"))
        src = sgm_file_state("tiny_unet")
        for k, v in model.state_dict().items():
            assert v.dtype == dtype
            torch.testing.assert_close(v, src[UNET_PREFIX + k].to(dtype), atol=0, rtol=0)


def test_save_load_round_trip(tmp_path):
    model = UNet(sgm_config("tiny_refiner_unet"))
    load_weights(model, fixture_path("sgm", "tiny_refiner_unet.safetensors"))
    save_weights(model, tmp_path / "unet.safetensors")
    saved = load_file(tmp_path / "unet.safetensors")
    assert all(k.startswith(UNET_PREFIX) for k in saved)
    with torch.device("meta"):
        again = UNet(model.config)
    load_weights(again, tmp_path / "unet.safetensors")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_pickle_allowed_explicitly(tmp_path):
    state = {"state_dict": sgm_file_state("tiny_unet")}
    torch.save(state, tmp_path / "unet.ckpt")
    model = UNet(sgm_config("tiny_unet"))
    load_weights(model, tmp_path / "unet.ckpt", allow_pickle=True)
    torch.testing.assert_close(model.out[2].weight, state["state_dict"][UNET_PREFIX + "out.2.weight"].float())


# ---- bad input -------------------------------------------------------------------------------------------


def test_pickle_refused_by_default(tmp_path):
    torch.save(sgm_file_state("tiny_unet"), tmp_path / "unet.ckpt")
    with pytest.raises(ValueError, match=r"unet\.ckpt.*allow_pickle=True"):
        load_weights(UNet(sgm_config("tiny_unet")), tmp_path / "unet.ckpt")


def test_not_safetensors(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes\.safetensors: not a readable safetensors file"):
        load_weights(UNet(sgm_config("tiny_unet")), bad)


def test_truncated_file(tmp_path):
    data = fixture_path("sgm", "tiny_unet.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_weights(UNet(sgm_config("tiny_unet")), bad)


def test_missing_unexpected_and_misshaped_reported_together(tmp_path):
    state = sgm_file_state("tiny_unet")
    state.pop(UNET_PREFIX + "middle_block.1.proj_out.weight")
    state[UNET_PREFIX + "input_blocks.1.0.in_layers.1.weight"] = torch.ones(32)
    state[UNET_PREFIX + "out.2.bias"] = torch.zeros(5)
    save_file(state, tmp_path / "bad.safetensors")
    model = UNet(sgm_config("tiny_unet"))
    before = model.out[2].weight.clone()
    with pytest.raises(ValueError) as info:
        load_weights(model, tmp_path / "bad.safetensors")
    msg = str(info.value)
    assert "1 missing: middle_block.1.proj_out.weight" in msg
    assert "1 unexpected: input_blocks.1.0.in_layers.1.weight" in msg
    assert "1 with the wrong shape: out.2.bias (checkpoint (5,), model (4,))" in msg
    assert torch.equal(model.out[2].weight, before), "a failed load must leave the model untouched"


def test_sd15_checkpoint_rejected(tmp_path):
    """SD 1.x: convolutional proj_in, 768-wide context, no label_emb."""
    state = {
        UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        UNET_PREFIX + "input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1),
        UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
    }
    save_file(state, tmp_path / "sd15.safetensors")
    with pytest.raises(ValueError, match=r"(?s)missing.*SD 1\.x/2\.x UNet.*the model is a UNet"):
        load_weights(UNet(sgm_config("tiny_unet")), tmp_path / "sd15.safetensors")


def test_lora_rejected(tmp_path):
    state = {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(4.0),
    }
    save_file(state, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match=r"lora\.safetensors: this looks like a LoRA"):
        load_weights(UNet(sgm_config("tiny_unet")), tmp_path / "lora.safetensors")


def test_refiner_for_base_names_both(tmp_path):
    """A refiner-shaped checkpoint (ADM vector 2560) for a base-shaped model (2816): the error names both."""
    small = dict(model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 1), transformer_depth_middle=1,
                 num_head_channels=32, context_dim=32)
    refiner = UNet(UNetConfig(**small, adm_in_channels=2560))
    save_weights(refiner, tmp_path / "refiner.safetensors")
    with torch.device("meta"):
        base = UNet(UNetConfig(**small, adm_in_channels=2816))
    with pytest.raises(ValueError, match=r"(?s)refiner\.safetensors does not match.*1 with the wrong shape: "
                       r"label_emb\.0\.0\.weight.*looks like an SDXL refiner UNet.*2816 \(as the SDXL base\)"):
        load_weights(base, tmp_path / "refiner.safetensors")


def test_full_size_refiner_for_base_message():
    """On the full-size meta models (no memory): the preset names appear in the report."""
    from sdxl_model.checkpoint import _describe_config, _describe_unet, check_state_shapes

    with torch.device("meta"):
        refiner, base = UNet(UNetConfig.sdxl_refiner()), UNet(UNetConfig.sdxl_base())
    found = {k: tuple(v.shape) for k, v in refiner.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    hint = f"the checkpoint looks like {_describe_unet(found)}; the model is {_describe_config(base.config)}"
    with pytest.raises(ValueError, match=r"(?s)missing.*unexpected.*wrong shape.*SDXL refiner UNet.*"
                       r"the model is the SDXL base UNet"):
        check_state_shapes(expected, found, source="refiner.safetensors", hint=hint)


def test_refiner_file_for_base_config(tmp_path):
    """End to end with the tiny fixtures: refiner weights into the base-structured tiny UNet."""
    with pytest.raises(ValueError, match=r"(?s)tiny_refiner_unet\.safetensors does not match.*missing.*unexpected"):
        load_weights(UNet(sgm_config("tiny_unet")), fixture_path("sgm", "tiny_refiner_unet.safetensors"))


def test_diffusers_config_mismatch(tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(fixture_path("diffusers", "tiny_unet"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_head_dim"] = [1, 1, 2]  # head counts: same shapes, other math
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_head_channels=16"):
        load_weights(UNet(diffusers_config()), folder)


def test_folder_without_model(tmp_path):
    with pytest.raises(ValueError, match="diffusers model folder"):
        load_weights(UNet(UNetConfig.tiny()), tmp_path)


def test_diffusers_folder_with_pickled_weights(tmp_path):
    """Older folders ship diffusion_pytorch_model.bin: refused unless allow_pickle, then loaded."""
    src = fixture_path("diffusers", "tiny_unet")
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    state = load_file(src / "diffusion_pytorch_model.safetensors")
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin: refusing to unpickle"):
        load_weights(UNet(diffusers_config()), folder)
    model = load_weights(UNet(diffusers_config()), folder, allow_pickle=True)
    torch.testing.assert_close(model.input_blocks[0][0].weight, state["conv_in.weight"], atol=0, rtol=0)


def test_only_unet_supported_for_now():
    with pytest.raises(TypeError, match="UNet"):
        load_weights(torch.nn.Linear(2, 2), "unused.safetensors")


def _memory_mib() -> dict[str, float]:
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak RSS")
def test_meta_load_needs_no_second_copy(tmp_path):
    """Build on meta, load, touch every weight: peak RSS grows by about the model's bytes, not twice that."""
    cfg = UNetConfig(model_channels=64, transformer_depth=(0, 2, 4), transformer_depth_middle=4, context_dim=256,
                     adm_in_channels=256)
    save_weights(UNet(cfg), tmp_path / "unet.safetensors")
    with torch.device("meta"):
        model = UNet(cfg)
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _memory_mib()["VmRSS"]
    load_weights(model, tmp_path / "unet.safetensors")
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())  # fault every page in
    peak = _memory_mib()["VmHWM"] - before
    assert checksum == checksum  # not NaN
    assert peak <= 1.1 * model_mib + 16, f"peak +{peak:.0f} MiB for a {model_mib:.0f} MiB model"


# ---- the VAE ---------------------------------------------------------------------------------------------

from sdxl_model import AutoencoderKL, VAEConfig  # noqa: E402
from sdxl_model.checkpoint import (  # noqa: E402
    VAE_PREFIX,
    detect_kind,
    load_pipeline_components,
    save_components,
)


def sgm_vae_config() -> VAEConfig:
    kwargs = json.loads(fixture_path("sgm", "tiny_vae.config.json").read_text())["kwargs"]
    return VAEConfig.from_sgm(kwargs["ddconfig"], kwargs["embed_dim"])


def diffusers_vae_config() -> VAEConfig:
    return VAEConfig.from_diffusers(json.loads(fixture_path("diffusers", "tiny_vae", "config.json").read_text()))


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_vae_sgm_single_file_reproduces_fixture(kernels):
    io = load_file(fixture_path("sgm", "tiny_vae.io.safetensors"))
    with torch.device("meta"):
        vae = AutoencoderKL(sgm_vae_config())
    load_weights(vae, fixture_path("sgm", "tiny_vae.safetensors"))
    assert not next(vae.parameters()).is_meta
    vae.eval().use_kernels(kernels)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(io["latent"]), io["decoded"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["model_folder", "pipeline_folder", "single_file"])
def test_vae_diffusers_reproduces_fixture(layout, tmp_path):
    folder = fixture_path("diffusers", "tiny_vae")
    if layout == "pipeline_folder":
        (tmp_path / "vae").symlink_to(folder, target_is_directory=True)
        folder = tmp_path
    elif layout == "single_file":  # a diffusers-named file, detected by its keys
        folder = folder / "diffusion_pytorch_model.safetensors"
    io = load_file(fixture_path("diffusers", "tiny_vae.io.safetensors"))
    vae = AutoencoderKL(diffusers_vae_config())  # on CPU: copied in place
    load_weights(vae, folder)
    vae.eval().use_kernels(False)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(io["latent"]), io["decoded"], atol=1e-4, rtol=0)


def test_vae_bare_state_dict_and_round_trip(tmp_path):
    ref = load_weights(AutoencoderKL(sgm_vae_config()), fixture_path("sgm", "tiny_vae.safetensors"))
    save_weights(ref, tmp_path / "vae.safetensors")
    saved = load_file(tmp_path / "vae.safetensors")
    assert saved and all(k.startswith(VAE_PREFIX) for k in saved)
    save_file({k.removeprefix(VAE_PREFIX): v for k, v in saved.items()}, tmp_path / "bare.safetensors")
    for file in ("vae.safetensors", "bare.safetensors"):
        with torch.device("meta"):
            again = AutoencoderKL(ref.config)
        load_weights(again, tmp_path / file)
        for (k, a), b in zip(ref.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), (file, k)


def test_vae_fp16_weights_cast_to_bf16():
    vae = AutoencoderKL(sgm_vae_config()).to(torch.bfloat16)
    load_weights(vae, fixture_path("sgm", "tiny_vae.safetensors"))
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())


def _unet_and_vae_file(tmp_path):
    """A full checkpoint in the official layout: tiny UNet + tiny VAE + a stray text-encoder tensor."""
    unet = load_weights(UNet(sgm_config("tiny_unet")), fixture_path("sgm", "tiny_unet.safetensors"))
    vae = load_weights(AutoencoderKL(sgm_vae_config()), fixture_path("sgm", "tiny_vae.safetensors"))
    save_components([unet, vae], tmp_path / "full.safetensors")
    state = load_file(tmp_path / "full.safetensors")
    state["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(8)  # bigG at embedders.1: a base
    save_file(state, tmp_path / "full.safetensors")
    return unet, vae, tmp_path / "full.safetensors"


def test_full_checkpoint_loads_each_part(tmp_path):
    unet, vae, file = _unet_and_vae_file(tmp_path)
    with torch.device("meta"):
        unet2, vae2 = UNet(unet.config), AutoencoderKL(vae.config)
    load_weights(unet2, file)
    load_weights(vae2, file)
    for ref, got in ((unet, unet2), (vae, vae2)):
        for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
            assert torch.equal(a, b), k


def test_vae_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)no VAE tensors found \(it holds a UNet\)"):
        load_weights(AutoencoderKL(sgm_vae_config()), fixture_path("sgm", "tiny_unet.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)does not match the model.*wrong shape.*32 base channels, the model 16"):
        load_weights(AutoencoderKL(VAEConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)),
                     fixture_path("sgm", "tiny_vae.safetensors"))
    with pytest.raises(ValueError, match=r"config\.json describes another VAE.*norm_groups=8"):
        load_weights(AutoencoderKL(sgm_vae_config()), fixture_path("diffusers", "tiny_vae"))


# ---- whole pipelines -------------------------------------------------------------------------------------


def test_pipeline_from_single_file(tmp_path):
    unet, vae, file = _unet_and_vae_file(tmp_path)
    parts = load_pipeline_components(file, unet_config=unet.config, vae_config=vae.config, load_text_encoders=False)
    assert (parts.kind, parts.layout, parts.text_encoder, parts.text_encoder_2) == ("base", "single_file", None, None)
    assert not parts.unet.training and not parts.vae.training
    io = load_file(fixture_path("sgm", "tiny_unet.io.safetensors"))
    with torch.no_grad():
        out = parts.unet(io["x"], io["timesteps"], io["context"], io["y"])
        torch.testing.assert_close(out, io["out"], atol=1e-4, rtol=0)
        vio = load_file(fixture_path("sgm", "tiny_vae.io.safetensors"))
        torch.testing.assert_close(parts.vae.decode(vio["latent"]), vio["decoded"], atol=1e-4, rtol=0)


def test_pipeline_single_file_without_kind_needs_config(tmp_path):
    unet = UNet(sgm_config("tiny_unet"))
    save_components([unet, AutoencoderKL(sgm_vae_config())], tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="cannot tell an SDXL base.*pass unet_config"):
        load_pipeline_components(tmp_path / "tiny.safetensors")


@pytest.mark.parametrize("cls, kind", [("StableDiffusionXLPipeline", "base"),
                                       ("StableDiffusionXLImg2ImgPipeline", "refiner")])
def test_pipeline_from_diffusers_folder(cls, kind, tmp_path):
    for part in ("unet", "vae"):
        (tmp_path / part).symlink_to(fixture_path("diffusers", f"tiny_{part}"), target_is_directory=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    parts = load_pipeline_components(tmp_path)
    assert (parts.kind, parts.layout) == (kind, "diffusers")
    assert parts.unet.config == diffusers_config() and parts.vae.config == diffusers_vae_config()
    io = load_file(fixture_path("diffusers", "tiny_vae.io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(parts.vae.decode(io["latent"]), io["decoded"], atol=1e-4, rtol=0)


def test_pipeline_folder_kind_from_unet_config(tmp_path):
    """The ADM width in unet/config.json decides, whatever model_index.json says (full-size configs, meta)."""
    from sdxl_model.checkpoint import ADM_WIDTHS

    for name, kind in (("sdxl_unet_config.json", "base"), ("sdxl_refiner_unet_config.json", "refiner")):
        cfg = UNetConfig.from_diffusers(json.loads(fixture_path("diffusers", name).read_text()))
        assert ADM_WIDTHS[cfg.adm_in_channels] == kind


@pytest.mark.parametrize("keys_file, kind", [("sd_xl_base_1.0.keys.json", "base"),
                                             ("sd_xl_refiner_1.0.keys.json", "refiner")])
def test_detect_kind_of_official_files(keys_file, kind):
    listing = json.loads(fixture_path("sgm", keys_file).read_text())
    shapes = {k: tuple(v) for k, v in listing["tensors"].items()}
    assert detect_kind(shapes) == kind
    no_unet = {k: v for k, v in shapes.items() if not k.startswith(UNET_PREFIX)}
    assert detect_kind(no_unet) == kind  # from the text encoders alone


# ---- the README example ----------------------------------------------------------------------------------


def test_readme_sdxl_model_example_runs():
    """The python block under "## SDXL model (sdxl_model)" in README.md runs as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## SDXL model (sdxl_model)", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "expected one python block in the SDXL model section"
    scope = {}
    exec(compile(blocks[0], "README.md[SDXL model]", "exec"), scope)
    assert not next(scope["unet"].parameters()).is_meta


# ---- text encoders ---------------------------------------------------------------------------------------

from sdxl_model import SDXLTextEncoder  # noqa: E402
from sdxl_model import text as T  # noqa: E402
from sdxl_model.checkpoint import official_text_state  # noqa: E402


def tiny_l_config():
    return T.clip_l_config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           projection_dim=32)


def tiny_g_config():
    return T.clip_bigg_config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                              projection_dim=48)


def tiny_text_encoder(base=True, seed=0):
    torch.manual_seed(seed)
    enc = SDXLTextEncoder(T.build_clip_l(tiny_l_config()) if base else None, T.build_clip_bigg(tiny_g_config()))
    with torch.no_grad():  # non-trivial norms and biases so a mix-up of names would show
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return enc.eval()


def meta_text_encoder(base=True):
    with torch.device("meta"):
        return SDXLTextEncoder(T.build_clip_l(tiny_l_config()) if base else None, T.build_clip_bigg(tiny_g_config()))


def _ids():
    ids = torch.randint(0, 49400, (2, 77))
    ids[:, 0] = T.SOT_ID
    ids[0, 5:] = T.EOT_ID
    ids[1, 9] = T.EOT_ID
    ids[1, 10:] = 0
    return ids


@torch.no_grad()
def assert_same_encoder(ref, got):
    for (k, a), (k2, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids = _ids()
    for a, b in zip(ref.encode_ids(ids if ref.clip_l is not None else None, ids),
                    got.encode_ids(ids if got.clip_l is not None else None, ids)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _full_file(tmp_path, base=True):
    unet = load_weights(UNet(sgm_config("tiny_unet")), fixture_path("sgm", "tiny_unet.safetensors"))
    vae = load_weights(AutoencoderKL(sgm_vae_config()), fixture_path("sgm", "tiny_vae.safetensors"))
    enc = tiny_text_encoder(base)
    file = tmp_path / "full.safetensors"
    save_components([unet, vae, enc], file)
    return unet, vae, enc, file


def test_text_encoders_single_file_base(tmp_path):
    unet, vae, enc, file = _full_file(tmp_path)
    names = list(load_file(file))
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in names
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in names
    assert "conditioner.embedders.1.model.text_projection" in names
    # meta-built encoder, assigned from the file: identical tensors and outputs
    got = load_weights(meta_text_encoder(), file)
    assert not any(t.is_meta for t in list(got.parameters()) + list(got.buffers()))
    assert_same_encoder(enc, got)
    # the whole pipeline: every part, strictly
    parts = load_pipeline_components(file, unet_config=unet.config, vae_config=vae.config,
                                     text_encoder_config=tiny_l_config(), text_encoder_2_config=tiny_g_config())
    assert parts.kind == "base" and not parts.text_encoder.training
    assert type(parts.text_encoder).__name__ == "CLIPTextModel"
    assert type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert_same_encoder(enc, parts.text_encoders)
    for ref, new in ((unet, parts.unet), (vae, parts.vae)):
        for (k, a), b in zip(ref.state_dict().items(), new.state_dict().values()):
            assert torch.equal(a, b), k
    # round trip: save the loaded encoder again, same tensors
    save_components([got], tmp_path / "again.safetensors")
    first, again = load_file(file), load_file(tmp_path / "again.safetensors")
    assert all(torch.equal(first[k], v) for k, v in again.items())
    assert set(again) == {k for k in first if k.startswith("conditioner.")}


def test_text_encoder_single_file_variants(tmp_path):
    """transformers-5 CLIP-L names (no `text_model.`), a stray position_ids, fp16 storage; lone parts."""
    enc = tiny_text_encoder()
    state = official_text_state(enc)
    pre = "conditioner.embedders.0.transformer."
    state = {(pre + k[len(pre) + len("text_model."):] if k.startswith(pre) else k): v.half() for k, v in state.items()}
    state[pre + "embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, tmp_path / "t5.safetensors")
    got = load_weights(meta_text_encoder(), tmp_path / "t5.safetensors")
    assert next(got.parameters()).dtype == torch.float32
    for (k, a), b in zip(enc.state_dict().items(), got.state_dict().values()):
        torch.testing.assert_close(a.half().float(), b, atol=0, rtol=0, msg=k)
    # a lone bigG / CLIP-L from the base file, copied in place into CPU models
    lone_g = load_weights(T.build_clip_bigg(tiny_g_config()), tmp_path / "t5.safetensors")
    assert torch.equal(lone_g.text_projection.weight, got.clip_bigg.text_projection.weight)
    lone_l = load_weights(T.build_clip_l(tiny_l_config()), tmp_path / "t5.safetensors")
    assert torch.equal(lone_l.embeddings.token_embedding.weight, got.clip_l.embeddings.token_embedding.weight)


def test_text_encoder_single_file_refiner(tmp_path):
    unet = UNet(sgm_config("tiny_refiner_unet"))
    vae = AutoencoderKL(sgm_vae_config())
    enc = tiny_text_encoder(base=False)
    file = tmp_path / "refiner.safetensors"
    save_components([unet, vae, enc], file)
    assert {k.split(".model.")[0] for k in load_file(file) if k.startswith("conditioner.")} == {
        "conditioner.embedders.0"}
    assert_same_encoder(enc, load_weights(meta_text_encoder(base=False), file))
    parts = load_pipeline_components(file, unet_config=unet.config, vae_config=vae.config,
                                     text_encoder_2_config=tiny_g_config())
    assert parts.text_encoder is None and parts.text_encoders.clip_l is None
    assert_same_encoder(enc, parts.text_encoders)
    with pytest.raises(ValueError, match=r"holds no CLIP-L text encoder.*sdxl_refiner"):
        load_weights(meta_text_encoder(base=True), file)


def test_text_encoders_diffusers_folder(tmp_path):
    enc = tiny_text_encoder()
    for part in ("unet", "vae"):
        (tmp_path / part).symlink_to(fixture_path("diffusers", f"tiny_{part}"), target_is_directory=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    enc.clip_l.save_pretrained(tmp_path / "text_encoder")
    # text_encoder_2 written by hand in the transformers-4 names (`text_model.*`)
    (tmp_path / "text_encoder_2").mkdir()
    enc.clip_bigg.config.to_json_file(tmp_path / "text_encoder_2" / "config.json")
    sd = {T.clip_l_checkpoint_key(k) if not k.startswith("text_projection") else k: v.contiguous()
          for k, v in enc.clip_bigg.state_dict().items()}
    save_file(sd, tmp_path / "text_encoder_2" / "model.safetensors")
    assert_same_encoder(enc, load_weights(meta_text_encoder(), tmp_path))
    parts = load_pipeline_components(tmp_path)
    assert parts.text_encoder.config.hidden_size == 32 and parts.text_encoder_2.config.projection_dim == 48
    assert_same_encoder(enc, parts.text_encoders)
    # a config.json that disagrees with the model in what no shape shows
    cfg = json.loads((tmp_path / "text_encoder_2" / "config.json").read_text())
    cfg["num_attention_heads"] = 4
    (tmp_path / "text_encoder_2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"another text encoder OpenCLIP bigG.*num_attention_heads=4"):
        load_weights(meta_text_encoder(), tmp_path)


def test_text_encoder_strict_errors_name_the_encoder(tmp_path):
    state = official_text_state(tiny_text_encoder())
    pre_l, pre_g = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."
    del state[pre_l + "final_layer_norm.bias"]
    state[pre_g + "ln_final.weight"] = torch.ones(65)
    state[pre_g + "transformer.resblocks.1.attn.in_proj_weight"] = torch.ones(100, 64)
    state[pre_l + "extra.weight"] = torch.ones(2)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as e:
        load_weights(meta_text_encoder(), tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "text encoder CLIP-L (CLIPTextModel)" in msg and "text encoder OpenCLIP bigG" in msg
    l_part, g_part = msg.split("text encoder OpenCLIP bigG")
    assert "1 missing: final_layer_norm.bias" in l_part and "1 unexpected: text_model.extra.weight" in l_part
    assert "wrong shape" in g_part and "text_model.final_layer_norm.weight (checkpoint (65,), model (64,))" in g_part
    assert "self_attn.q_proj.weight (checkpoint (100, 64), model (64, 64))" in g_part
    # a file with no text encoder at all
    save_file({"x": torch.ones(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no 'conditioner.embedders"):
        load_weights(meta_text_encoder(), tmp_path / "other.safetensors")


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_full_size_text_encoders_official_layout_matches_sgm(which):
    """The meta-built SDXLTextEncoder presets, through the save-side key map, give exactly the
    `conditioner.*` names and shapes of the official files."""
    listing = json.loads(fixture_path("sgm", f"sd_xl_{which}_1.0.keys.json").read_text())
    want = {k: list(v) for k, v in listing["tensors"].items() if k.startswith("conditioner.")}
    enc = getattr(SDXLTextEncoder, f"sdxl_{which}")(device="meta")
    got = {k: list(v.shape) for k, v in official_text_state(enc).items()}
    assert got == want
