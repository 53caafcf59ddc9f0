"""group_norm_silu: ours (each backend this device has), eager `F.silu(F.group_norm(...))`, torch.compile of eager.

Modes
  fwd      inference forward, under no_grad (what SDXL sampling runs)
  bwd      torch.autograd.grad(y, (x, weight, bias), dy) on a graph built once (retain_graph)
  fwd+bwd  a fresh forward with grad, then that backward

Minimal memory traffic, the numerator of GB/s (e = x's element size, C channels, weight and bias in x's dtype):
  fwd      read x, write y                     2·numel·e + 2·C·e  (weight, bias)
  bwd      read x, dy, write dx                3·numel·e + 4·C·e  (weight, bias in; dweight, dbias out)
  fwd+bwd  the sum
A provider that rereads x (two-pass statistics, recomputation) moves more than this and shows a lower GB/s.

Shapes: on CUDA the GroupNorm inputs of SDXL at 1024² in bf16 (UNet blocks at latent 128², 64², 32²; the VAE
decoder at 256²), 32 groups, NCHW and channels-last; on CPU smaller ones in fp32.
"""
import pytest
import torch
import torch.nn.functional as F

from . import _report
from ._report import RESULTS, Case

OP = "group_norm_silu"
GROUPS = 32
EPS = 1e-5
DEVICE = _report.bench_device()
MODES = ("fwd", "bwd", "fwd+bwd")
LAYOUTS = ("nchw", "channels_last")

SDXL_SHAPES = ((2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32), (1, 512, 256, 256))
CPU_SHAPES = ((1, 320, 64, 64), (2, 640, 32, 32))
if DEVICE.type == "cuda":
    CASES = [Case(s, torch.bfloat16, layout) for s in SDXL_SHAPES for layout in LAYOUTS]
else:
    CASES = [Case(s, torch.float32, layout) for s in CPU_SHAPES for layout in LAYOUTS]


def eager(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def ours(x, weight, bias):
    import sdxl_kernels

    return sdxl_kernels.group_norm_silu(x, GROUPS, weight, bias, EPS)


def make_inputs(case: Case):
    """x, weight, bias, dy on DEVICE in the case's dtype; x and dy in the case's memory format."""
    torch.manual_seed(0)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    c = case.shape[1]
    x = (torch.randn(case.shape, device=DEVICE) * 2 + 0.5).to(case.dtype).contiguous(memory_format=fmt)
    weight = (1 + 0.1 * torch.randn(c, device=DEVICE)).to(case.dtype)
    bias = (0.1 * torch.randn(c, device=DEVICE)).to(case.dtype)
    dy = torch.randn_like(x)  # keeps x's memory format
    return x, weight, bias, dy


def traffic(mode: str, x: torch.Tensor) -> int:
    e, c = x.element_size(), x.shape[1]
    fwd = 2 * x.numel() * e + 2 * c * e
    bwd = 3 * x.numel() * e + 4 * c * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def check_close(fn, x, weight, bias):
    """Times of a wrong kernel are worthless: one forward against eager first."""
    with torch.no_grad():
        got, want = fn(x, weight, bias), eager(x, weight, bias)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}[x.dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert got.stride() == x.stride(), "the output must keep x's memory format"


PROVIDERS = ("eager", "compile", "ours-triton", "ours-cuda", "ours-cpu")


def provider_fn(provider: str):
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no shapes turned dynamic
        return torch.compile(eager, dynamic=False)
    return ours if provider.startswith("ours-") else eager


@pytest.mark.parametrize("case", CASES, ids=str)
def test_group_norm_silu(case: Case):
    x, weight, bias, dy = make_inputs(case)
    dst = torch.empty_like(x)  # the yardstick: the same bytes as x, read once and written once
    copy = _report.time_providers(OP, {"copy": lambda: dst.copy_(x)}, DEVICE)["copy"]
    RESULTS.add(OP, case, "copy", "copy", copy, nbytes=2 * x.numel() * x.element_size())
    del dst

    providers = _report.pick_providers(OP, PROVIDERS, lambda p: _report.skip_reason(p, DEVICE), provider_fn)
    failures = []
    for provider in [p for p in providers if p.startswith("ours-")]:
        try:
            with _report.forced_backend(OP, provider):
                check_close(providers[provider], x, weight, bias)
        except Exception as exc:  # a wrong or crashing kernel: its times would be meaningless
            failures.append(f"{provider}: {_report.error_text(exc)}")
            RESULTS.add(OP, case, "fwd", provider, error=_report.error_text(exc))
            del providers[provider]

    for mode in MODES:
        steps = {}
        for provider, fn in providers.items():
            try:
                with _report.forced_backend(OP, provider):
                    steps[provider] = _report.mode_step(mode, fn, (x, weight, bias), dy)
            except Exception as exc:  # torch.compile may fail on a machine; the row says why
                RESULTS.add(OP, case, mode, provider, error=_report.error_text(exc))
                if provider != "compile":
                    failures.append(f"{provider} {mode}: {_report.error_text(exc)}")
        timings = _report.time_providers(OP, steps, DEVICE)
        for provider, timing in timings.items():
            launches = None
            if mode == "fwd":
                with _report.forced_backend(OP, provider):
                    launches = _report.count_launches(steps[provider], DEVICE)
            RESULTS.add(OP, case, mode, provider, timing, nbytes=traffic(mode, x), launches=launches)
        del steps, timings
    if failures:
        pytest.fail("\n".join(failures))
