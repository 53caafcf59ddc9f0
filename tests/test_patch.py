"""sdxl_kernels.patch / unpatch / use_kernels on foreign models: the tiny diffusers UNet and VAE (SDXL
structure, the oracle fixture's weights), this project's tiny UNet, and a hand-written ldm/sgm-style block.

Equality is checked against the unpatched model (same weights, same inputs) and, for diffusers, against the
fixture's stored outputs; the fixture README puts the float32 noise floor of these models at about 1e-6."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdxl_kernels
from sdxl_kernels import backends
from sdxl_kernels.patch import SDPAAttnProcessor, is_patched

from .conftest import fixture_path

patch_module = sys.modules["sdxl_kernels.patch"]  # `sdxl_kernels.patch` is the function
ATOL = 1e-5  # ~10× the fixture's float32 noise floor; the kernels differ from ATen only in summation order


def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")


def _snapshot(model: nn.Module) -> dict:
    """Everything unpatch must restore: classes, module objects, processors, and the state dict."""
    return {
        "classes": {p: type(m) for p, m in model.named_modules()},
        "objects": {p: id(m) for p, m in model.named_modules()},
        "processors": {p: m.processor for p, m in model.named_modules() if hasattr(m, "set_processor")},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _assert_same(before: dict, after: dict) -> None:
    assert after["classes"] == before["classes"]
    assert after["objects"] == before["objects"]
    assert all(after["processors"][p] is proc for p, proc in before["processors"].items())
    assert list(after["state"]) == list(before["state"])
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


@pytest.fixture
def count_calls(monkeypatch):
    """Counts calls of F.group_norm and of the sdxl_kernels entry points the patched modules use."""
    calls = {"F.group_norm": 0, "group_norm_silu": 0, "sdpa": 0, "fourier_embedding": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(F, "group_norm", counting("F.group_norm", F.group_norm))
    monkeypatch.setattr(sdxl_kernels.GroupNormSiLU, "forward", counting("group_norm_silu",
                                                                        sdxl_kernels.GroupNormSiLU.forward))
    monkeypatch.setattr(patch_module, "scaled_dot_product_attention",
                        counting("sdpa", patch_module.scaled_dot_product_attention))
    monkeypatch.setattr(patch_module, "fourier_embedding", counting("fourier_embedding",
                                                                     patch_module.fourier_embedding))
    return calls


# ---- diffusers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_io():
    diffusers = _diffusers()
    from safetensors.torch import load_file

    folder = fixture_path("diffusers", "tiny_unet")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
    return unet, load_file(fixture_path("diffusers", "tiny_unet.io.safetensors"))


def _unet_call(unet, io, sample=None):
    sample = io["sample"] if sample is None else sample
    cond = {"text_embeds": io["text_embeds"], "time_ids": io["time_ids"]}
    with torch.no_grad():
        return unet(sample, io["timestep"], encoder_hidden_states=io["encoder_hidden_states"],
                    added_cond_kwargs=cond).sample


@pytest.fixture
def unet(unet_io):
    model = copy.deepcopy(unet_io[0])
    yield model
    sdxl_kernels.unpatch(model)


def _expected_diffusers(model: nn.Module) -> tuple[set, set, set, set]:
    """Independently of patch.py: the GroupNorm+SiLU pairs, plain GroupNorms, Attentions and Timesteps."""
    pairs, attn, steps = set(), set(), set()
    for path, m in model.named_modules():
        name = type(m).__name__
        if name == "ResnetBlock2D":
            pairs |= {f"{path}.norm1", f"{path}.norm2"}
        elif name == "Attention":
            attn.add(path)
        elif name == "Timesteps":
            steps.add(path)
        if isinstance(getattr(m, "conv_norm_out", None), nn.GroupNorm):
            pairs.add(f"{path}.conv_norm_out".lstrip("."))
    norms = {p for p, m in model.named_modules() if isinstance(m, nn.GroupNorm)} - pairs
    return pairs, norms, attn, steps


def test_diffusers_unet_report_and_outputs(unet, unet_io, count_calls):
    io = unet_io[1]
    ref = _unet_call(unet, io)
    assert count_calls["F.group_norm"] > 0  # the counter sees the unpatched model's group norms
    pairs, norms, attn, steps = _expected_diffusers(unet)
    assert len(pairs) == 35 and len(attn) == 34 and len(steps) == 2

    report = sdxl_kernels.patch(unet)
    assert set(report.paths("group_norm_silu")) == pairs
    assert set(report.paths("group_norm")) == norms
    assert set(report.paths("attention")) == attn
    assert set(report.paths("embedding")) == steps
    assert report.left == [] and not report.already_patched
    assert all(isinstance(m.processor, SDPAAttnProcessor) for m in unet.modules() if type(m).__name__ == "Attention")

    calls_before = dict(count_calls)
    out = _unet_call(unet, io)
    calls = {k: count_calls[k] - calls_before[k] for k in count_calls}
    assert calls == {"F.group_norm": 0, "group_norm_silu": len(pairs) + len(norms), "sdpa": len(attn),
                     "fourier_embedding": 2}
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, io["output"], atol=ATOL, rtol=0)


def test_diffusers_unet_resolution_change(unet, unet_io):
    """Patched once, run at another latent size than the fixture's 16×24 (and other than any before)."""
    io = unet_io[1]
    sample = torch.randn(2, 4, 8, 32, generator=torch.Generator().manual_seed(3))
    ref = _unet_call(unet, io, sample)
    sdxl_kernels.patch(unet)
    torch.testing.assert_close(_unet_call(unet, io, sample), ref, atol=ATOL, rtol=0)


def test_diffusers_unpatch_and_patch_twice(unet, unet_io):
    io = unet_io[1]
    before, ref = _snapshot(unet), _unet_call(unet, io)
    first = sdxl_kernels.patch(unet)
    patched = _snapshot(unet)
    second = sdxl_kernels.patch(unet)
    assert second.already_patched and second.replaced == first.replaced
    _assert_same(patched, _snapshot(unet))  # the second call changed nothing
    assert list(patched["state"]) == list(before["state"])  # patching keeps the state dict's keys and order
    assert sdxl_kernels.unpatch(unet) and not is_patched(unet)
    _assert_same(before, _snapshot(unet))
    assert torch.equal(_unet_call(unet, io), ref)  # bit for bit: the original code runs again
    assert not sdxl_kernels.unpatch(unet)


def test_diffusers_vae(count_calls):
    diffusers = _diffusers()
    from safetensors.torch import load_file

    vae = diffusers.AutoencoderKL.from_pretrained(fixture_path("diffusers", "tiny_vae")).eval()
    io = load_file(fixture_path("diffusers", "tiny_vae.io.safetensors"))
    before = _snapshot(vae)
    pairs, norms, attn, _ = _expected_diffusers(vae)
    report = sdxl_kernels.patch(vae)
    assert set(report.paths("group_norm_silu")) == pairs and len(pairs) == 22
    assert set(report.paths("group_norm")) == norms and set(report.paths("attention")) == attn
    assert report.left == []
    assert all(isinstance(m.processor, SDPAAttnProcessor) for m in vae.modules() if type(m).__name__ == "Attention")
    with torch.no_grad():
        mean = vae.encode(io["image"]).latent_dist.mean
        decoded = vae.decode(io["latent"]).sample
        decoded_other = vae.decode(io["latent"][..., :8, :16]).sample  # another resolution
    assert count_calls["F.group_norm"] == 0 and count_calls["sdpa"] == 3
    torch.testing.assert_close(mean, io["posterior_mean"], atol=ATOL, rtol=0)
    torch.testing.assert_close(decoded, io["decoded"], atol=ATOL, rtol=0)
    sdxl_kernels.unpatch(vae)
    _assert_same(before, _snapshot(vae))
    with torch.no_grad():
        torch.testing.assert_close(decoded_other, vae.decode(io["latent"][..., :8, :16]).sample, atol=ATOL, rtol=0)


def test_diffusers_attention_with_mask_and_custom_processor():
    _diffusers()
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=16, heads=4, dim_head=8, residual_connection=True,
                     rescale_output_factor=2.0).eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    mask = torch.randn(2, 1, 7)  # additive, as diffusers prepares it
    with torch.no_grad():
        ref, ref_masked = attn(x, ctx), attn(x, ctx, attention_mask=mask)
        assert sdxl_kernels.patch(attn).paths("attention") == [""]
        torch.testing.assert_close(attn(x, ctx), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(attn(x, ctx, attention_mask=mask), ref_masked, atol=ATOL, rtol=0)
    sdxl_kernels.unpatch(attn)
    attn.set_processor(AttnProcessor())
    report = sdxl_kernels.patch(attn)
    assert report.replaced == [] and "custom processor AttnProcessor" in report.left[0].reason


# ---- this project's UNet ------------------------------------------------------------------------------


def test_sdxl_model_unet_switch():
    from sdxl_model.config import UNetConfig
    from sdxl_model.unet import UNet

    from .test_unet import random_inputs, randomize_

    cfg = UNetConfig.tiny()
    model = randomize_(UNet(cfg)).eval().use_kernels(False)
    inputs = random_inputs(cfg, batch=1, h=8, w=8)
    with torch.no_grad():
        ref = model(*inputs)
        report = sdxl_kernels.patch(model)
        assert report.counts()["native"] > 0 and report.left == []
        assert all(m.kernels for m in model.modules() if hasattr(m, "_kernels"))
        torch.testing.assert_close(model(*inputs), ref, atol=ATOL, rtol=0)
        sdxl_kernels.unpatch(model)
        assert not any(m.kernels for m in model.modules() if hasattr(m, "_kernels"))
        model.use_kernels(True)
        assert sdxl_kernels.patch(model).counts()["native"] == 0  # already on our kernels: nothing to do


@pytest.mark.parametrize("name", ["tiny_unet", "tiny_refiner_unet"])
def test_model_from_the_sgm_fixture_config(name):
    """sgm's tiny UNet rebuilt from its recorded config and weights, patched: the oracle's output."""
    from safetensors.torch import load_file

    from .conftest import fixture_path
    from .test_unet import tiny_sgm_unet

    io = load_file(fixture_path("sgm", f"{name}.io.safetensors"))
    model = tiny_sgm_unet(name).use_kernels(False)
    with torch.no_grad():
        report = sdxl_kernels.patch(model)
        assert report.left == [] and report.counts()["native"] > 0
        out = model(*(io[k] for k in ("x", "timesteps", "context", "y")))
    torch.testing.assert_close(out, io["out"], atol=1e-4, rtol=0)


# ---- an ldm/sgm-style model ---------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """ldm's CrossAttention, written out: einsum scores, softmax, a boolean key mask."""

    def __init__(self, query_dim, context_dim=None, heads=4, dim_head=8):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.scale, self.heads = dim_head**-0.5, heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        h = self.heads
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3) for t in (q, k, v))
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        if mask is not None:
            sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
        return self.to_out(out.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1))


class Timestep(nn.Module):
    """sgm's Timestep: timestep_embedding(t, dim), cos half first, written out."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlockWithAttention(nn.Module):
    """sgm's ResBlock (in_layers / emb_layers / out_layers) followed by GroupNorm + self- and cross-attention."""

    def __init__(self, ch=32, groups=4, ctx_dim=16, emb_dim=24):
        super().__init__()
        self.time = Timestep(emb_dim)
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(ch, ch, 3, padding=1))
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.attn1 = CrossAttention(ch)
        self.attn2 = CrossAttention(ch, ctx_dim)

    def forward(self, x, t, context, mask=None):
        h = self.in_layers(x) + self.emb_layers(self.time(t).to(x.dtype))[:, :, None, None]
        h = x + self.out_layers(h)
        b, c, hh, ww = h.shape
        tokens = self.norm(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = tokens + self.attn1(tokens)
        tokens = tokens + self.attn2(tokens, context, mask)
        return h + tokens.transpose(1, 2).reshape(b, c, hh, ww)


def _sgm_inputs(h=6, w=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 32, h, w, generator=g), torch.randn(2, 7, 16, generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.3
    return x, torch.tensor([999.0, 321.5]), ctx, mask


def _sgm_model():
    from .test_unet import randomize_

    return randomize_(ResBlockWithAttention()).eval()


def test_sgm_style_model(count_calls):
    model = _sgm_model()
    x, t, ctx, mask = _sgm_inputs()
    before = _snapshot(model)
    with torch.no_grad():
        ref, ref_masked, ref_other = model(x, t, ctx), model(x, t, ctx, mask), model(*_sgm_inputs(8, 4)[:3])
        report = sdxl_kernels.patch(model)
        assert set(report.paths("group_norm_silu")) == {"in_layers.0", "out_layers.0"}
        assert report.paths("group_norm") == ["norm"]
        assert set(report.paths("attention")) == {"attn1", "attn2"} and report.paths("embedding") == ["time"]
        assert isinstance(model.in_layers[0], sdxl_kernels.GroupNormSiLU)
        assert isinstance(model.in_layers[1], nn.Identity)
        calls_before = dict(count_calls)
        torch.testing.assert_close(model(x, t, ctx), ref, atol=ATOL, rtol=0)
        assert count_calls["sdpa"] - calls_before["sdpa"] == 2 and count_calls["fourier_embedding"] == 1
        assert count_calls["F.group_norm"] == calls_before["F.group_norm"]
        sdpa_calls = count_calls["sdpa"]
        torch.testing.assert_close(model(x, t, ctx, mask), ref_masked, atol=ATOL, rtol=0)
        assert count_calls["sdpa"] == sdpa_calls + 1  # the masked cross-attention took the original forward
        torch.testing.assert_close(model(*_sgm_inputs(8, 4)[:3]), ref_other, atol=ATOL, rtol=0)
        sdxl_kernels.unpatch(model)
        _assert_same(before, _snapshot(model))
        assert torch.equal(model(x, t, ctx), ref)


class ResnetBlock(nn.Module):
    """sgm's VAE ResnetBlock (sgm/modules/diffusionmodules/model.py), written out."""

    def __init__(self, cin, cout, temb_channels=0):
        super().__init__()
        self.in_channels, self.out_channels, self.use_conv_shortcut = cin, cout, False
        self.norm1 = nn.GroupNorm(8, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        if temb_channels:
            self.temb_proj = nn.Linear(temb_channels, cout)
        self.norm2 = nn.GroupNorm(8, cout, eps=1e-6)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb):
        h = self.norm1(x)
        h = h * torch.sigmoid(h)
        h = self.conv1(h)
        if temb is not None:
            h = h + self.temb_proj(temb * torch.sigmoid(temb))[:, :, None, None]
        h = self.norm2(h)
        h = self.conv2(self.dropout(h * torch.sigmoid(h)))
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h


class AttnBlock(nn.Module):
    """sgm's VAE AttnBlock, written out with einsum instead of SDPA."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(8, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (f(h).flatten(2) for f in (self.q, self.k, self.v))  # (B, C, HW)
        w = torch.einsum("bci,bcj->bij", q, k).mul(c**-0.5).softmax(dim=-1)
        return x + self.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww))


class Decoder(nn.Module):
    """sgm's Decoder in miniature: resnets, mid attention, norm_out + nonlinearity() as a function."""

    def __init__(self):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(16, 32, 12), AttnBlock(32), ResnetBlock(32, 32)
        self.norm_out = nn.GroupNorm(8, 32, eps=1e-6)

    def forward(self, x, temb):
        h = self.block_2(self.attn_1(self.block_1(x, temb)), None)
        h = self.norm_out(h)
        return h * torch.sigmoid(h)


def test_sgm_style_vae_blocks():
    from .test_unet import randomize_

    model = randomize_(Decoder()).eval()
    x, temb = torch.randn(2, 16, 6, 10), torch.randn(2, 12)
    before = _snapshot(model)
    with torch.no_grad():
        ref = model(x, temb)
        report = sdxl_kernels.patch(model)
        pairs = {f"block_{i}.norm{j}" for i in (1, 2) for j in (1, 2)}
        assert set(report.paths("group_norm_silu")) == pairs and report.paths("attention") == ["attn_1"]
        assert set(report.paths("group_norm")) == {"attn_1.norm", "norm_out"}
        assert [(r.kind, r.path) for r in report.left] == [("group_norm_silu", "norm_out")]
        torch.testing.assert_close(model(x, temb), ref, atol=ATOL, rtol=0)
        sdxl_kernels.unpatch(model)
        _assert_same(before, _snapshot(model))
        assert torch.equal(model(x, temb), ref)


def test_patch_flags_and_type_errors():
    model = _sgm_model()
    report = sdxl_kernels.patch(model, attention=False, embeddings=False)
    assert report.counts() == {"group_norm_silu": 2, "group_norm": 1, "attention": 0, "embedding": 0, "native": 0}
    assert type(model.attn1) is CrossAttention and type(model.time) is Timestep
    with pytest.raises(TypeError, match="nn.Module"):
        sdxl_kernels.patch(lambda x: x)


def test_sgm_style_on_triton_bf16():
    """The Triton kernels (interpreter on CPU) serve the patched model: bf16 attention and group norm."""
    if not backends.triton_available():
        pytest.skip("triton is not installed")
    model = _sgm_model().to(torch.bfloat16)
    x, t, ctx, _ = _sgm_inputs(4, 4)
    x, ctx = x.bfloat16(), ctx.bfloat16()
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        eager = model(x, t, ctx)
        expected = ref64(x.double(), t, ctx.double())
        sdxl_kernels.patch(model)
        for op in ("group_norm_silu", "scaled_dot_product_attention", "fourier_embedding"):
            backends.set_backend(op, "triton")
        out = model(x, t, ctx)
    assert backends.last_backend("scaled_dot_product_attention") == "triton"
    err, eager_err = (out.double() - expected).abs().max(), (eager.double() - expected).abs().max()
    assert err <= 2 * eager_err + 1e-2, (err, eager_err)


def test_compile_fullgraph_patched():
    """A patched model traces as one graph: custom ops, the class-swapped forwards, the fused norms."""
    model = _sgm_model()
    x, t, ctx, _ = _sgm_inputs()
    sdxl_kernels.patch(model)
    with torch.no_grad():
        ref = model(x, t, ctx)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, t, ctx), ref, atol=ATOL, rtol=0)
        x2, _, ctx2, _ = _sgm_inputs(8, 4)
        torch.testing.assert_close(compiled(x2, t, ctx2), model(x2, t, ctx2), atol=ATOL, rtol=0)


def test_compile_fullgraph_patched_diffusers_unet(unet, unet_io):
    """The whole patched tiny diffusers UNet as one graph (aot_eager: dynamo + AOT autograd with our ops' fake
    kernels, without inductor's minutes of C++ codegen on a small CPU)."""
    io = unet_io[1]
    sdxl_kernels.patch(unet)
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(_unet_call(compiled, io), io["output"], atol=ATOL, rtol=0)


class DiffusersBlock(nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D

        self.resnet = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=12, groups=4)
        self.attn = Attention(32, heads=2, dim_head=16, norm_num_groups=4, residual_connection=True,
                              _from_deprecated_attn_block=True)

    def forward(self, x, temb):
        return self.attn(self.resnet(x, temb))


class LoRA(nn.Module):
    """What PEFT does to a Linear: base(x) + B(A(x)), on the same input."""

    def __init__(self, base: nn.Linear, rank=2):
        super().__init__()
        self.base_layer, self.lora_A = base, nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def _diffusers_block():
    _diffusers()
    from .test_unet import randomize_

    return randomize_(DiffusersBlock()).eval(), torch.randn(2, 16, 6, 8), torch.randn(2, 12)


def test_compile_fullgraph_patched_diffusers_resnet_and_attention():
    model, x, temb = _diffusers_block()
    with torch.no_grad():
        ref = model(x, temb)
        report = sdxl_kernels.patch(model)
        assert set(report.paths("group_norm_silu")) == {"resnet.norm1", "resnet.norm2"}
        assert report.paths("attention") == ["attn"] and report.paths("group_norm") == ["attn.group_norm"]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, temb), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-patch", "patch-then-lora"])
def test_lora_adapters_survive_patch(lora_first):
    """LoRA wrappers on time_emb_proj and to_q see the same inputs patched or not (ResnetBlock2D applies its
    nonlinearity to temb before time_emb_proj; the fused norms must not change that)."""
    from .test_unet import randomize_

    model, x, temb = _diffusers_block()
    plain = copy.deepcopy(model)

    def add_lora(m):
        m.resnet.time_emb_proj = randomize_(LoRA(m.resnet.time_emb_proj), seed=1)
        m.attn.to_q = randomize_(LoRA(m.attn.to_q), seed=2)

    add_lora(plain)
    if lora_first:
        add_lora(model)
        sdxl_kernels.patch(model)
    else:
        sdxl_kernels.patch(model)
        add_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, temb), plain(x, temb), atol=ATOL, rtol=0)


# ---- use_kernels ----------------------------------------------------------------------------------------


def test_use_kernels_routes_and_restores(count_calls):
    torch_sdpa, torch_gn = F.scaled_dot_product_attention, F.group_norm
    gn = nn.GroupNorm(4, 16)
    with torch.no_grad():
        gn.weight.normal_(1, 0.1), gn.bias.normal_(0, 0.1)
    x = torch.randn(2, 16, 5, 7)
    q, k, v = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    ref_gn, ref_attn = gn(x), torch_sdpa(q, k, v)
    backends._last.pop("group_norm_silu", None)
    with sdxl_kernels.use_kernels():
        assert F.scaled_dot_product_attention is not torch_sdpa and F.group_norm is not torch_gn
        torch.testing.assert_close(gn(x), ref_gn, atol=ATOL, rtol=0)
        assert backends.last_backend("group_norm_silu") in ("cpu", "triton", "torch")  # our op served
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), ref_attn, atol=ATOL, rtol=0)
        mask = torch.randn(9, 11)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   torch_sdpa(q, k, v, attn_mask=mask), atol=ATOL, rtol=0)  # no recursion
        with pytest.raises(RuntimeError, match="divisible by num_groups"):
            F.group_norm(x, 3)  # 3 does not divide 16: F.group_norm's own error
    assert F.scaled_dot_product_attention is torch_sdpa and F.group_norm is torch_gn


def test_use_kernels_nested_and_on_exception():
    torch_sdpa, torch_gn = F.scaled_dot_product_attention, F.group_norm
    with pytest.raises(RuntimeError, match="boom"):
        with sdxl_kernels.use_kernels():
            outer = F.group_norm
            with sdxl_kernels.use_kernels(attention=False):
                assert F.scaled_dot_product_attention is not torch_sdpa and F.group_norm is not outer
            assert F.group_norm is outer
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is torch_sdpa and F.group_norm is torch_gn


def test_use_kernels_triton_attention():
    if not backends.triton_available():
        pytest.skip("triton is not installed")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).bfloat16() for n in (9, 13, 13))
    backends.set_backend("scaled_dot_product_attention", "triton")
    with sdxl_kernels.use_kernels():
        out = F.scaled_dot_product_attention(q, k, v)
    assert backends.last_backend("scaled_dot_product_attention") == "triton"
    expected = sdxl_kernels.attention_ref(q, k, v, compute_dtype=torch.float64).double()
    eager = F.scaled_dot_product_attention(q, k, v)  # PyTorch's own bf16 error
    err, eager_err = (out.double() - expected).abs().max(), (eager.double() - expected).abs().max()
    assert err <= 2 * eager_err + 1e-3, (err, eager_err)


def test_use_kernels_under_compile():
    gn = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 4, 4)
    ref = F.silu(gn(x))
    backends._last.pop("group_norm_silu", None)
    with torch.no_grad(), sdxl_kernels.use_kernels():
        out = torch.compile(lambda t: F.silu(gn(t)), fullgraph=True, backend="aot_eager")(x)
    assert backends.last_backend("group_norm_silu") is not None
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["sdxl_unet_config.json", "sdxl_refiner_unet_config.json", "sdxl_vae_config.json"])
def test_full_size_sdxl_configs_on_meta(name):
    """The full SDXL base/refiner UNets and the VAE (built on the meta device, no memory): every pair, norm,
    attention and embedding recognised, nothing left."""
    diffusers = _diffusers()
    import json

    config = json.loads(fixture_path("diffusers", name).read_text())
    cls = diffusers.AutoencoderKL if "vae" in name else diffusers.UNet2DConditionModel
    with torch.device("meta"):
        model = cls.from_config(config)
    before = _snapshot(model)
    pairs, norms, attn, steps = _expected_diffusers(model)
    report = sdxl_kernels.patch(model)
    assert report.left == []
    assert set(report.paths("group_norm_silu")) == pairs and set(report.paths("group_norm")) == norms
    assert set(report.paths("attention")) == attn and set(report.paths("embedding")) == steps
    sdxl_kernels.unpatch(model)
    assert {p: type(m) for p, m in model.named_modules()} == before["classes"]
