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

from . import driver, environment, timing
from .driver import Bench, Inputs
from .results import RESULTS, Case, Results

OP = "group_norm_silu"
GROUPS = 32
EPS = 1e-5
DEVICE = environment.bench_device()
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


def make_inputs(case: Case) -> Inputs:
    """(x, weight, bias) and dy on DEVICE in the case's dtype; x and dy in the case's memory format."""
    torch.manual_seed(0)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    c = case.shape[1]
    x = (torch.randn(case.shape, device=DEVICE) * 2 + 0.5).to(case.dtype).contiguous(memory_format=fmt)
    weight = (1 + 0.1 * torch.randn(c, device=DEVICE)).to(case.dtype)
    bias = (0.1 * torch.randn(c, device=DEVICE)).to(case.dtype)
    dy = torch.randn_like(x)  # keeps x's memory format
    return Inputs((x, weight, bias), grad=dy)


def traffic(mode: str, case: Case, inputs: Inputs) -> dict:
    x = inputs.args[0]
    e, c = x.element_size(), x.shape[1]
    fwd = 2 * x.numel() * e + 2 * c * e
    bwd = 3 * x.numel() * e + 4 * c * e
    return {"nbytes": {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]}


def check_close(fn, inputs: Inputs):
    """Times of a wrong kernel are worthless: one forward against eager first."""
    x, weight, bias = inputs.args
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


def copy_row(case: Case, inputs: Inputs, results: Results) -> None:
    """The yardstick: a copy of the same bytes as x, read once and written once ("% of copy")."""
    x = inputs.args[0]
    dst = torch.empty_like(x)
    copy = timing.time_providers(OP, {"copy": lambda: dst.copy_(x)}, DEVICE)["copy"]
    results.add(OP, case, "copy", "copy", copy, nbytes=2 * x.numel() * x.element_size())


def bench(cases=None, **overrides) -> Bench:
    fields = dict(
        op=OP, providers=PROVIDERS, make_inputs=make_inputs, provider_fn=provider_fn, modes=lambda case: MODES,
        check=check_close, work=traffic, launches=("fwd",), before=copy_row,
    )  # fmt: skip
    return Bench(**(fields | overrides))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_group_norm_silu(case: Case):
    failures = driver.run(bench(), case, RESULTS, DEVICE)
    if failures:
        pytest.fail("\n".join(failures))
