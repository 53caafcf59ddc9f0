"""The whole models: the SDXL UNet forward and the VAE decode, our kernels on vs off vs torch.compile.

Providers
  eager    model.use_kernels(False): plain PyTorch ops, attention on F.scaled_dot_product_attention (SDPA)
  ours     model.use_kernels(True): group_norm_silu, attention and fourier_embedding from sdxl_kernels, each on
           the backend it picks automatically
  compile  torch.compile of the kernels-off model (CUDA only: compiling on a small CPU takes minutes)
  compile-ours  torch.compile of the kernels-on model (our ops are torch.library custom ops: no graph breaks)

Cases
  CUDA  the SDXL base UNet at 1024² (latent 128×128), batch 2 (classifier-free guidance), bf16, random
        weights, inference forward; the SDXL VAE decode of one 1024² image (latent 1×4×128×128), bf16
  CPU   the tiny preset (UNetConfig.tiny(), latent 32×32, batch 2; VAEConfig.tiny(), latent 32×32), fp32

TFLOP/s: the SDXL base UNet forward counts 6.76 TFLOP per image at 1024² (13.52 per batch-2 call), the figure
of the SDXL paper's accounting; every other case counts torch.utils.flop_counter's FLOPs of one eager call.
Iterations per second (one UNet call = one sampling step at batch 2) are 1000 / ms, listed in a note per case.
Timing: wall clock per call (synchronized), so Python and launch overheads count as they do when sampling.
"""
import pytest
import torch

from . import driver, environment
from .results import RESULTS, Case

DEVICE = environment.bench_device()
UNET_OP, VAE_OP = "sdxl_unet", "sdxl_vae_decode"
SDXL_UNET_FLOPS_PER_IMAGE = 6.76e12
TARGET_SPEEDUP = 1.25  # issue 4: kernels on ≥ 1.25× kernels off (SDPA) at 1024² batch 2 bf16, on the GPU

if DEVICE.type == "cuda":
    UNET_CASE = Case((2, 4, 128, 128), torch.bfloat16)
    VAE_CASE = Case((1, 4, 128, 128), torch.bfloat16)
    PROVIDERS = ("eager", "ours", "compile", "compile-ours")
else:
    UNET_CASE = Case((2, 4, 32, 32), torch.float32)
    VAE_CASE = Case((1, 4, 32, 32), torch.float32)
    PROVIDERS = ("eager", "ours")


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _time(op: str, case: Case, model: torch.nn.Module, call, flops: float | None = None) -> dict[str, float]:
    """Time every provider of PROVIDERS on `call(model)`; rows into RESULTS; returns {provider: ms}."""
    steps = {}
    for provider in PROVIDERS:
        kernels = provider in ("ours", "compile-ours")
        model.use_kernels(kernels)
        fn = torch.compile(model, dynamic=False) if provider.startswith("compile") else model

        def step(fn=fn, kernels=kernels):
            model.use_kernels(kernels)  # the providers take turns on CPU: each call sets its own mode
            with torch.no_grad():
                return call(fn)

        steps[provider] = step
    if flops is None:
        model.use_kernels(False)
        flops = _flops(lambda: call(model))
    timings = driver.time_models(RESULTS, op, case, "fwd", steps, DEVICE, flops=flops)
    ms = {p: t.ms for p, t in timings.items()}
    shape = "×".join(map(str, case.shape))
    RESULTS.note(op, f"{shape} it/s: " + ", ".join(f"{p} {1e3 / v:.3g}" for p, v in ms.items()))
    return ms


def _notes(op: str) -> None:
    RESULTS.note(op, "providers: eager = use_kernels(False) (PyTorch ops, SDPA); ours = use_kernels(True); "
                     "compile = torch.compile of the kernels-off model; × eager = eager ms / ms")
    if DEVICE.type != "cuda":
        RESULTS.note(op, "CPU: the tiny preset only (the full-size model and torch.compile are timed on CUDA)")


@pytest.mark.parametrize("case", [UNET_CASE], ids=str)
def test_unet_forward(case: Case):
    from sdxl_model import UNet, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig.sdxl_base() if DEVICE.type == "cuda" else UNetConfig.tiny()
    with torch.device(DEVICE):
        model = UNet(cfg).to(case.dtype).eval()  # random weights
        b = case.shape[0]
        x = torch.randn(case.shape, dtype=case.dtype)
        t = torch.randint(0, 1000, (b,)).float()
        context = torch.randn(b, 77, cfg.context_dim, dtype=case.dtype)
        y = torch.randn(b, cfg.adm_in_channels, dtype=case.dtype)
    full_size = cfg == UNetConfig.sdxl_base() and tuple(case.shape[2:]) == (128, 128)
    flops = SDXL_UNET_FLOPS_PER_IMAGE * b if full_size else None
    _notes(UNET_OP)
    if full_size:
        RESULTS.note(UNET_OP, "SDXL base UNet (2.57 B parameters, random weights), context 77×2048, ADM 2816; "
                              "TFLOP/s counts 6.76 TFLOP per image")
    ms = _time(UNET_OP, case, model, lambda m: m(x, t, context, y), flops)
    if DEVICE.type == "cuda" and "eager" in ms and "ours" in ms:
        got = ms["eager"] / ms["ours"]
        verdict = "met" if got >= TARGET_SPEEDUP else "NOT met"
        RESULTS.note(UNET_OP, f"target UNet fwd 1024² batch 2 bf16: ours ≥ {TARGET_SPEEDUP}× eager (SDPA): "
                              f"{got:.2f}×, {verdict}")


@pytest.mark.parametrize("case", [VAE_CASE], ids=str)
def test_vae_decode(case: Case):
    from sdxl_model import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    cfg = VAEConfig.sdxl() if DEVICE.type == "cuda" else VAEConfig.tiny()
    with torch.device(DEVICE):
        model = AutoencoderKL(cfg).to(case.dtype).eval()
        z = torch.randn(case.shape, dtype=case.dtype)
    _notes(VAE_OP)
    if DEVICE.type == "cuda":
        RESULTS.note(VAE_OP, "SDXL VAE decode of a 1024² image (random weights)")

    # AutoencoderKL.forward is encode+decode: time (and compile) the decode alone through a small wrapper
    _time(VAE_OP, case, _Decoder(model), lambda m: m(z))


class _Decoder(torch.nn.Module):
    """vae.decode as a module's forward, so torch.compile and use_kernels apply to it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def use_kernels(self, enabled: bool | None = True):
        self.vae.use_kernels(enabled)
        return self

    def forward(self, z):
        return self.vae.decode(z)
