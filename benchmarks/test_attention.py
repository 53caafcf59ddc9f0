"""attention: ours (`sdxl_kernels.scaled_dot_product_attention`, Triton) vs PyTorch's SDPA, side by side.

Providers
  ours-triton     sdxl_kernels.scaled_dot_product_attention with the triton backend forced (CUDA only: the
                  Triton interpreter on CPU is a debugger, not a timing target)
  sdpa            F.scaled_dot_product_attention with PyTorch's own choice of backend: the baseline (× sdpa)
  sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math
                  the same call inside torch.nn.attention.sdpa_kernel(SDPBackend.X); sdpa-math is the eager
                  matmul-softmax-matmul. A backend that refuses a case (a head dim, cuDNN missing) gets an
                  error row with PyTorch's reason and the run goes on. On CPU only flash and math exist.
Modes
  fwd      under no_grad (what SDXL sampling runs)
  bwd      torch.autograd.grad(o, (q, k, v), do) on a graph built once (retain_graph)
  fwd+bwd  a fresh forward with grad, then that backward
TFLOP/s: forward 4·B·H·Lq·Lk·D (two matmuls, a multiply-add counted as 2), backward 2.5× that (five matmuls,
the count FlashAttention uses), fwd+bwd the sum. No causal cases (SDXL has none), so nothing is halved.

Inputs as diffusers passes them: q, k, v and the output gradient made as [B, L, H, D] (heads split off a
projection's output) and transposed to [B, H, L, D], non-contiguous with a contiguous head dim: layout "blhd".
The main SDXL shape is timed contiguous [B, H, L, D] too: layout "bhld". The shape column is B×H×Lq×Lk×D;
cross-attention has k, v of [B, H, 77, D].

Shapes, bf16 on CUDA: SDXL self-attention 2×10×4096², 2×20×1024² (D 64); its cross-attention over 77 text
tokens; SD1.5's head dims 2×8×4096²×40, 2×8×1024²×80, 2×8×256²×160; long 1×10×16384²×64; and a sweep
2×10×L²×64 for L = 256 … 16384 (fwd, bwd) that benchmarks/plot.py draws. On CPU, fp32 and tiny: 1×2×256²×64,
its cross-attention over 77, and a sweep L = 64, 128, 256.

Before timing, ours must match an fp32 math-SDPA reference on the forward within twice the error of SDPA's
default in the same dtype (plus a small floor); a wrong kernel gets an error row instead of times.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from . import driver, environment, timing
from .driver import Bench, Inputs
from .results import RESULTS, Case

OP = "attention"  # the tables' and files' name
BACKEND_OP = "scaled_dot_product_attention"  # sdxl_kernels.backends' name for the op
DEVICE = environment.bench_device()
MODES = ("fwd", "bwd", "fwd+bwd")
SWEEP_MODES = ("fwd", "bwd")
PROVIDERS = ("ours-triton", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
SDPA_BACKENDS = {  # provider -> SDPBackend member; the ones CPU lacks are left out there
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
CPU_SDPA_BACKENDS = ("sdpa-flash", "sdpa-math")
# sdpa-math materializes the B·H·Lq·Lk scores (and their softmax, kept for backward): beyond SDXL's 64² latent
# (2×10×4096²) it costs seconds and tens of GB, so it runs only up to that.
MATH_MAX_SCORES = 2 * 10 * 4096 * 4096
# do_bench budgets, shorter than the other benchmarks' so the ~230 timings stay within ~2 minutes on an H100
CUDA_WARMUP_MS, CUDA_REP_MS = 10, 50
REF_MAX_ROWS = 1024  # the correctness gate compares this many query rows at most (rows are independent)


def _shape(b, h, lq, d, lk=None):
    return (b, h, lq, lq if lk is None else lk, d)  # B, H, Lq, Lk, D


if DEVICE.type == "cuda":
    DTYPE = torch.bfloat16
    SDXL_SELF = Case(_shape(2, 10, 4096, 64), DTYPE, "blhd")
    CROSS = tuple(Case(_shape(b, h, lq, 64, lk=77), DTYPE, "blhd") for b, h, lq in ((2, 10, 4096), (2, 20, 1024)))
    SD15 = tuple(Case(_shape(2, 8, lq, d), DTYPE, "blhd") for lq, d in ((4096, 40), (1024, 80), (256, 160)))
    MAIN = [
        SDXL_SELF,
        Case(_shape(2, 10, 4096, 64), DTYPE, "bhld"),
        Case(_shape(2, 20, 1024, 64), DTYPE, "blhd"),
        *CROSS,
        *SD15,
        Case(_shape(1, 10, 16384, 64), DTYPE, "blhd"),
    ]
    SWEEP = [Case(_shape(2, 10, n, 64), DTYPE, "blhd") for n in (256, 512, 1024, 2048, 4096, 8192, 16384)]
else:
    DTYPE = torch.float32
    MAIN = [Case(_shape(1, 2, 256, 64), DTYPE, "blhd"), Case(_shape(1, 2, 256, 64, lk=77), DTYPE, "blhd")]
    SWEEP = [Case(_shape(1, 2, n, 64), DTYPE, "blhd") for n in (64, 128, 256)]
CASES = {case: MODES for case in MAIN} | {case: SWEEP_MODES for case in SWEEP if case not in MAIN}


def register_targets() -> None:
    """Issue 3's acceptance figures, on CUDA bf16 (the CPU has no ours to judge)."""
    if DEVICE.type != "cuda":
        RESULTS.note(OP, "targets: judged on CUDA only (ours is not timed on CPU)")
        return
    RESULTS.target(OP, SDXL_SELF, "fwd", 1.1, "SDXL self-attention fwd", min_tflops=450)
    RESULTS.target(OP, SDXL_SELF, "bwd", 1.0, "SDXL self-attention bwd", min_tflops=350)
    for case in (*CROSS, *SD15):
        kind = "cross-attention Lk=77" if case in CROSS else f"SD1.5 head dim {case.shape[-1]}"
        shape = "×".join(map(str, case.shape))
        for mode in ("fwd", "bwd"):
            RESULTS.target(OP, case, mode, 1.0, f"{kind} {shape} {mode}")


# ---- providers ----------------------------------------------------------------------------------------------


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_forced(provider: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[provider])

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def ours(q, k, v):
    import sdxl_kernels

    return sdxl_kernels.scaled_dot_product_attention(q, k, v)


def provider_skip_reason(provider: str, case: Case) -> str | None:
    """None if `provider` applies to `case` on this device, else why not (the table's note); our own
    providers' availability is the driver's to judge."""
    if DEVICE.type == "cpu" and provider in SDPA_BACKENDS and provider not in CPU_SDPA_BACKENDS:
        return "PyTorch has no such SDPA backend for CPU tensors"
    if provider in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, SDPA_BACKENDS[provider]):
            return f"this torch has no SDPBackend.{SDPA_BACKENDS[provider]}"
    if provider == "sdpa-math":
        b, h, lq, lk, _ = case.shape
        if b * h * lq * lk > MATH_MAX_SCORES:
            return (f"skipped on {shape_name(case)}: it materializes B·H·Lq·Lk = {b * h * lq * lk:.2g} scores "
                    f"(runs up to {MATH_MAX_SCORES:.2g}, SDXL's 2×10×4096²)")  # fmt: skip
    return None


def provider_fn(provider: str):
    if provider.startswith("ours-"):
        return ours
    return sdpa if provider == "sdpa" else sdpa_forced(provider)


# ---- inputs, work, steps ------------------------------------------------------------------------------------


def shape_name(case: Case) -> str:
    return "×".join(map(str, case.shape)) + f" {case.layout}"


def make_inputs(case: Case) -> Inputs:
    """q (B, H, Lq, D), k and v (B, H, Lk, D), do like q; "blhd": views of (B, L, H, D) tensors, as diffusers."""
    torch.manual_seed(0)
    b, h, lq, lk, d = case.shape

    def make(n):
        if case.layout == "blhd":
            return torch.randn(b, n, h, d, device=DEVICE, dtype=case.dtype).transpose(1, 2)  # (B, H, n, D)
        return torch.randn(b, h, n, d, device=DEVICE, dtype=case.dtype)

    return Inputs((make(lq), make(lk), make(lk)), grad=make(lq))


def flops(mode: str, case: Case) -> float:
    b, h, lq, lk, d = case.shape
    fwd = 4.0 * b * h * lq * lk * d
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def build_step(bench: Bench, mode: str, provider: str, fn, inputs: Inputs):
    """timing.mode_step(), with PyTorch's warnings on why an SDPA backend was not used added to the error it raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return timing.mode_step(mode, fn, inputs.args, inputs.grad)
        except Exception as exc:
            why = [" ".join(str(w.message).split()) for w in caught]  # "Flash attention kernel not used because…"
            if not why:
                raise
            raise RuntimeError("; ".join([str(exc), *dict.fromkeys(why)])) from exc


# ---- the correctness gate -----------------------------------------------------------------------------------

ATOL_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def check_close(fn, inputs: Inputs):
    """Times of a wrong kernel are worthless: one forward against an fp32 math-SDPA reference first, within 2×
    the error SDPA's default makes in the same dtype (+ a floor). Long cases compare a strided sample of query
    rows (plus the last ones, where a tail block is masked); each row's output depends on its own query only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = inputs.args
    lq = q.shape[2]
    stride = -(-lq // REF_MAX_ROWS)
    rows = torch.tensor(sorted(set(range(0, lq, stride)) | set(range(max(0, lq - 64), lq))), device=q.device)
    with torch.no_grad():
        got = fn(q, k, v)
        base = sdpa(q, k, v)[:, :, rows].float()
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float())
    assert got.shape == q.shape[:-1] + v.shape[-1:] and got.dtype == q.dtype, (got.shape, got.dtype)
    got = got[:, :, rows].float()
    assert torch.isfinite(got).all(), "non-finite outputs"
    err, base_err = (got - want).abs().max().item(), (base - want).abs().max().item()
    limit = 2 * base_err + ATOL_FLOOR[q.dtype]
    assert err <= limit, f"max |ours - fp32 reference| = {err:.3g} > {limit:.3g} (2× SDPA's {base_err:.3g} + floor)"


# ---- which kernels PyTorch's default picked ---------------------------------------------------------------

_SDPA_PICKS: dict[str, list[str]] = {}  # kernel names -> cases where "sdpa" ran them


def note_sdpa_pick(case: Case, mode: str, steps: dict) -> None:
    """Name the kernels "sdpa" launches for this case's forward (CUDA; torch.profiler), so "× sdpa" can be read as
    "× flash", "× cuDNN"...; one note per set of kernels."""
    if DEVICE.type != "cuda" or mode != "fwd" or "sdpa" not in steps:
        return
    fn = steps["sdpa"]
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = {_kernel_name(e.name) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    except Exception:  # the profiler is optional equipment here
        return
    kernels = ", ".join(sorted(names)) or "(none seen)"
    _SDPA_PICKS.setdefault(kernels, []).append(shape_name(case))
    RESULTS.note(OP, f"sdpa (default) fwd runs {kernels} on: {', '.join(_SDPA_PICKS[kernels])}", key=kernels)


def _kernel_name(name: str, limit: int = 60) -> str:
    name = name.removeprefix("void ").split("<", 1)[0].split("(", 1)[0]
    return name if len(name) <= limit else name[: limit - 1] + "…"


# ---- the benchmark ------------------------------------------------------------------------------------------


def tma_path(provider: str, case: Case, inputs: Inputs) -> str | None:
    """Which loads our forward takes for these inputs ("tma" or "pointers"), as the launcher decides."""
    from sdxl_kernels.ops import attention

    return attention.forward_path(*inputs.args)


def bench(cases: dict[Case, tuple[str, ...]] | None = None, **overrides) -> Bench:
    """The attention benchmark over `cases` ({case: modes}; default: this device's CASES)."""
    cases = CASES if cases is None else cases
    fields = dict(
        op=OP, backend_op=BACKEND_OP, providers=PROVIDERS, make_inputs=make_inputs, provider_fn=provider_fn,
        modes=lambda case: cases[case], skip=provider_skip_reason, check=check_close, build=build_step,
        work=lambda mode, case, inputs: {"flops": flops(mode, case)}, one_by_one=True,
        after_build=note_sdpa_pick, warmup_ms=CUDA_WARMUP_MS, rep_ms=CUDA_REP_MS, serves=tma_path,
    )  # fmt: skip
    return Bench(**(fields | overrides))


def notes(results=RESULTS) -> None:
    results.set_baseline(OP, "sdpa")
    results.note(OP, "shape is B×H×Lq×Lk×D; layout blhd: [B, L, H, D] tensors transposed to [B, H, L, D] "
                     "(as diffusers calls SDPA), bhld: contiguous [B, H, L, D]")  # fmt: skip
    if DEVICE.type == "cuda":
        results.note(OP, f"timing: do_bench median with warmup {CUDA_WARMUP_MS} ms, rep {CUDA_REP_MS} ms")


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_attention(case: Case):
    notes()
    register_targets()
    failures = driver.run(bench(), case, RESULTS, DEVICE)
    if failures:
        pytest.fail("\n".join(failures))
