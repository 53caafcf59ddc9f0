"""The UNet against sgm: fixture outputs, checkpoint key map, parameter counts, and the kernel switch."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import sdxl_kernels
from sdxl_model import UNet, UNetConfig, set_default_use_kernels
from sdxl_model.unet import SpatialTransformer

from .conftest import fixture_path

SGM_PREFIX = "model.diffusion_model."
TINY_FIXTURES = ["tiny_unet", "tiny_refiner_unet"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sgm_weights(name: str) -> dict[str, torch.Tensor]:
    """The fixture's float16 weights, prefix stripped, upcast to float32 (the values the oracle ran)."""
    raw = load_file(fixture_path("sgm", f"{name}.safetensors"))
    return {k.removeprefix(SGM_PREFIX): v.float() for k, v in raw.items()}


def tiny_sgm_unet(name: str) -> UNet:
    kwargs = json.loads(fixture_path("sgm", f"{name}.config.json").read_text())["kwargs"]
    model = UNet(UNetConfig.from_sgm(kwargs)).eval()
    model.load_state_dict(sgm_weights(name), strict=True)
    return model


def random_inputs(cfg: UNetConfig, batch=2, h=16, w=24, tokens=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 999
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    y = torch.randn(batch, cfg.adm_in_channels, generator=g)
    return x.to(dtype), t, context.to(dtype), y.to(dtype)


def randomize_(model: torch.nn.Module, seed=0) -> torch.nn.Module:
    """Non-trivial values for every parameter, norm affines near 1, so no branch is silently zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # norm affines (weight near 1) and biases
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(noise / max(1, p[0].numel()) ** 0.5)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TINY_FIXTURES)
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_matches_sgm_fixture(name, kernels, device):
    io = load_file(fixture_path("sgm", f"{name}.io.safetensors"))
    model = tiny_sgm_unet(name).use_kernels(kernels).to(device)
    with torch.no_grad():
        out = model(*(io[k].to(device) for k in ("x", "timesteps", "context", "y"))).cpu()
    assert out.shape == io["out"].shape
    torch.testing.assert_close(out, io["out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out, io["out_f64ref"], atol=1e-4, rtol=0)


def test_float64_matches_f64_reference():
    """In float64 the torch path is much closer to sgm's float64 run than float32 tolerance."""
    io = load_file(fixture_path("sgm", "tiny_unet.io.safetensors"))
    model = tiny_sgm_unet("tiny_unet").use_kernels(False).double()
    with torch.no_grad():
        out = model(*(io[k].double() for k in ("x", "timesteps", "context", "y")))
    # the reference's timestep embedding was float32, cast up: allow that rounding only
    torch.testing.assert_close(out, io["out_f64ref"].double(), atol=2e-6, rtol=0)


def test_strict_loading_rejects_foreign_keys():
    weights = sgm_weights("tiny_unet")
    model = UNet(UNetConfig.tiny())
    missing = dict(weights)
    missing.pop("middle_block.1.proj_out.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(missing, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict(weights | {"input_blocks.1.0.in_layers.1.weight": torch.ones(32)}, strict=True)


@pytest.mark.parametrize(
    "sgm_name, preset, n_params",
    [
        ("sd_xl_base_1.0", UNetConfig.sdxl_base, 2_567_463_684),
        ("sd_xl_refiner_1.0", UNetConfig.sdxl_refiner, 2_259_526_660),
    ],
)
def test_full_size_key_map_and_count(sgm_name, preset, n_params):
    listing = json.loads(fixture_path("sgm", f"{sgm_name}.keys.json").read_text())
    expected = {k.removeprefix(SGM_PREFIX): v for k, v in listing["tensors"].items() if k.startswith(SGM_PREFIX)}
    with torch.device("meta"):
        model = UNet(preset())
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == n_params == listing["param_counts"]["unet"]


def test_diffusers_tiny_config_parameter_count():
    """Same architecture, other names: the diffusers tiny UNet's parameter count."""
    cfg = UNetConfig.from_diffusers(json.loads(fixture_path("diffusers", "tiny_unet", "config.json").read_text()))
    with torch.device("meta"):
        model = UNet(cfg)
    assert sum(p.numel() for p in model.parameters()) == 556_820


# ---- kernel switch ---------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the sdxl_kernels entry points the UNet reaches."""
    calls = {"group_norm_silu": 0, "fourier_embedding": 0, "scaled_dot_product_attention": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    norm_forward = counting("group_norm_silu", sdxl_kernels.GroupNormSiLU.forward)
    monkeypatch.setattr(sdxl_kernels.GroupNormSiLU, "forward", norm_forward)
    for name in ("fourier_embedding", "scaled_dot_product_attention"):
        monkeypatch.setattr(sdxl_kernels, name, counting(name, getattr(sdxl_kernels, name)))
    return calls


def test_use_kernels_routes_every_call(kernel_calls):
    cfg = UNetConfig.tiny()
    model = UNet(cfg).eval()
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    n_attn = 2 * sum(len(m.transformer_blocks) for m in model.modules() if isinstance(m, SpatialTransformer))
    with torch.no_grad():
        model.use_kernels(False)(*random_inputs(cfg))
        assert kernel_calls == {"group_norm_silu": 0, "fourier_embedding": 0, "scaled_dot_product_attention": 0}
        model.use_kernels(True)(*random_inputs(cfg))
    assert kernel_calls == {"group_norm_silu": n_norms, "fourier_embedding": 1, "scaled_dot_product_attention": n_attn}


def test_global_default(kernel_calls):
    cfg = UNetConfig.tiny()
    model = UNet(cfg).eval()
    try:
        set_default_use_kernels(False)
        with torch.no_grad():
            model(*random_inputs(cfg))
        assert sum(kernel_calls.values()) == 0
        model.use_kernels(True)  # an explicit choice wins over the default
        with torch.no_grad():
            model(*random_inputs(cfg))
        assert kernel_calls["fourier_embedding"] == 1
        model.use_kernels(None)  # back to following the default
        assert not model.kernels
    finally:
        set_default_use_kernels(True)
    assert model.kernels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_kernels_agree_with_torch(dtype, device):
    """Forward and every gradient, kernels vs torch, each against a float64 torch reference; in low
    precision the kernel path may be at most 2x worse than eager torch in the same dtype."""
    # 4 channels per group and 4x4 at the deepest level keep the low-precision gradients well conditioned
    cfg = dataclasses.replace(UNetConfig.tiny(), norm_groups=8)
    ref = randomize_(UNet(cfg)).double().use_kernels(False)
    inputs = random_inputs(cfg, batch=1, h=16, w=16, tokens=5, seed=1)

    def run(kernels, dt):
        model = UNet(cfg).to(device, dt).use_kernels(kernels)
        model.load_state_dict(ref.state_dict())
        x, t, c, y = (v.to(device, dt if i != 1 else None, copy=True) for i, v in enumerate(inputs))
        x.requires_grad_(True)
        out = model(x, t, c, y)
        out.float().square().mean().backward()
        grads = [x.grad] + [p.grad for p in model.parameters()]
        return out.cpu().double(), [g.cpu().double() for g in grads]

    out_ref, grads_ref = run(False, torch.float64)
    # some gradients vanish in exact arithmetic (a bias right before a one-channel-per-group GroupNorm):
    # measure those against the overall gradient scale instead of their own ~1e-18
    floor = 1e-2 * max(r.abs().max().item() for r in grads_ref)
    for kernels in (True, False):
        out, grads = run(kernels, dtype)
        err = (out - out_ref).abs().max().item()
        gerr = max(((g - r).abs().max() / max(r.abs().max(), floor)).item() for g, r in zip(grads, grads_ref))
        if kernels:
            out_k, gerr_k = err, gerr
        else:
            out_t, gerr_t = err, gerr
    if dtype == torch.float32:
        assert out_k < 1e-4 and out_t < 1e-4
        assert gerr_k < 1e-5 and gerr_t < 1e-5
    else:
        assert out_k <= 2 * out_t + 1e-3
        assert gerr_k <= 2 * gerr_t + 1e-3


# ---- memory options --------------------------------------------------------------------------------------


def test_gradient_checkpointing_same_gradients():
    cfg = UNetConfig.tiny()
    model = randomize_(UNet(cfg))
    x, t, c, y = random_inputs(cfg, batch=1, h=8, w=8)

    def grads():
        model.zero_grad()
        model(x, t, c, y).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_channels_last(kernels):
    io = load_file(fixture_path("sgm", "tiny_unet.io.safetensors"))
    model = tiny_sgm_unet("tiny_unet").use_kernels(kernels).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(io["x"].to(memory_format=torch.channels_last), io["timesteps"], io["context"], io["y"])
    torch.testing.assert_close(out, io["out"], atol=1e-4, rtol=0)


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, bad, match",
    [
        ("x", torch.zeros(2, 3, 16, 24), r"x: expected \(B, 4, H, W\)"),
        ("x", torch.zeros(2, 4, 18, 24), "multiples of 4"),
        ("timesteps", torch.zeros(3), r"timesteps: expected shape \(2,\)"),
        ("context", torch.zeros(2, 7, 64), r"context: expected \(2, tokens, 32\)"),
        ("y", torch.zeros(2, 112), r"y: expected \(2, 128\)"),
    ],
)
def test_bad_inputs_name_the_expected_shape(field, bad, match):
    cfg = UNetConfig.tiny()
    inputs = dict(zip(("x", "timesteps", "context", "y"), random_inputs(cfg)))
    inputs[field] = bad
    with pytest.raises(ValueError, match=match):
        UNet(cfg)(**inputs)
