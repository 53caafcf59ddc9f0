"""A diffusers SDXL UNet forward: `sdxl_kernels.patch` vs the unpatched model vs torch.compile.

Providers
  eager    the diffusers model as built: nn.GroupNorm + SiLU, AttnProcessor2_0 (F.scaled_dot_product_attention)
  ours     a copy of it after `sdxl_kernels.patch` (fused GroupNorm+SiLU, our attention, our Fourier embeddings),
           each op on the backend it picks automatically
  compile  torch.compile of the unpatched model (CUDA only: compiling on a small CPU takes minutes)

Cases
  CUDA  diffusers UNet2DConditionModel from the fixture's full SDXL base config (sdxl_unet_config.json), random
        weights, bf16, 1024² (latent 2×4×128×128: batch 2 for classifier-free guidance), 77 tokens, inference
  CPU   the fixture's tiny SDXL-structured UNet config (tiny_unet/config.json), latent 2×4×32×32, fp32

diffusers is not on the GPU machine's image: carry its wheel (see the device tool's README) or the test skips.
TFLOP/s: 6.76 TFLOP per image for the full-size case (the SDXL paper's accounting, as benchmarks/test_unet.py);
torch.utils.flop_counter's count of one eager call otherwise.
"""
import copy
import json
import pathlib

import pytest
import torch

from . import driver, environment
from .results import RESULTS, Case

DEVICE = environment.bench_device()
OP = "diffusers_sdxl_unet"
FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "diffusers"
SDXL_UNET_FLOPS_PER_IMAGE = 6.76e12
TARGET_SPEEDUP = 1.3  # issue 7: patched ≥ 1.3× unpatched eager (SDPA) at 1024² bf16, on the GPU

if DEVICE.type == "cuda":
    CASE, CONFIG = Case((2, 4, 128, 128), torch.bfloat16), "sdxl_unet_config.json"
    PROVIDERS = ("eager", "ours", "compile")
else:
    CASE, CONFIG = Case((2, 4, 32, 32), torch.float32), "tiny_unet/config.json"
    PROVIDERS = ("eager", "ours")


def _inputs(config: dict, case: Case) -> tuple[tuple, dict]:
    b = case.shape[0]
    time_dim = 6 * config["addition_time_embed_dim"]
    text_dim = config["projection_class_embeddings_input_dim"] - time_dim
    with torch.device(DEVICE):
        sample = torch.randn(case.shape, dtype=case.dtype)
        t = torch.randint(0, 1000, (b,)).float()
        context = torch.randn(b, 77, config["cross_attention_dim"], dtype=case.dtype)
        cond = {"text_embeds": torch.randn(b, text_dim, dtype=case.dtype),
                "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * b, dtype=case.dtype)}
    return (sample, t), {"encoder_hidden_states": context, "added_cond_kwargs": cond}


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@pytest.mark.parametrize("case", [CASE], ids=str)
def test_diffusers_unet_forward(case: Case):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (carry its wheel on a GPU)")
    import sdxl_kernels

    path = FIXTURES / CONFIG
    if not path.exists():
        pytest.skip(f"{path} is absent (expected ../shared/fixtures beside the project root)")
    config = json.loads(path.read_text())
    torch.manual_seed(0)
    with torch.device(DEVICE):
        eager = diffusers.UNet2DConditionModel.from_config(config).to(case.dtype).eval()  # random weights
    patched = copy.deepcopy(eager)
    report = sdxl_kernels.patch(patched)
    args, kwargs = _inputs(config, case)
    models = {"eager": eager, "ours": patched}
    if "compile" in PROVIDERS:
        models["compile"] = torch.compile(eager, dynamic=False)

    steps = {}
    for provider, model in models.items():
        def step(model=model):
            with torch.no_grad():
                return model(*args, **kwargs).sample

        steps[provider] = step

    full_size = CONFIG == "sdxl_unet_config.json" and tuple(case.shape[2:]) == (128, 128)
    flops = SDXL_UNET_FLOPS_PER_IMAGE * case.shape[0] if full_size else lambda working: _flops(working["eager"])
    timings = driver.time_models(RESULTS, OP, case, "fwd", steps, DEVICE, flops=flops)
    ms = {p: t.ms for p, t in timings.items()}
    counts = ", ".join(f"{k} {n}" for k, n in report.counts().items() if n)
    RESULTS.note(OP, f"diffusers {diffusers.__version__} UNet2DConditionModel from {CONFIG}, random weights; "
                     f"patch replaced {counts}, left {len(report.left)}")
    RESULTS.note(OP, "providers: eager = the unpatched diffusers model (SDPA); ours = sdxl_kernels.patch of a copy; "
                     "compile = torch.compile of the unpatched model; × eager = eager ms / ms")
    its = ", ".join(f"{p} {1e3 / v:.3g}" for p, v in ms.items())
    RESULTS.note(OP, "×".join(map(str, case.shape)) + f" it/s: {its}")
    if DEVICE.type != "cuda":
        RESULTS.note(OP, "CPU: the tiny config only (the full-size model and torch.compile are timed on CUDA)")
    elif "eager" in ms and "ours" in ms:
        got = ms["eager"] / ms["ours"]
        verdict = "met" if got >= TARGET_SPEEDUP else "NOT met"
        RESULTS.note(OP, f"target diffusers UNet fwd 1024² batch 2 bf16: patched ≥ {TARGET_SPEEDUP}× unpatched "
                         f"(SDPA): {got:.2f}×, {verdict}")
