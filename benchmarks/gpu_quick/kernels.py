"""kernels: our ops vs what users run today, at the SDXL shapes, through the pytest benchmarks' declarations.

Planned ~90-130 s on an H100/H200 (cap 140 s): attention 13 cases × (ours + 4-5 SDPA backends) × 2-3 modes at
do_bench 10 ms warm-up / 50 ms repetitions (~230 timings, ~0.3 s each with the builds), GroupNorm+SiLU 8 cases × 3
modes × 2-3 providers at 25/100 ms, fourier 2 cases by wall clock. No torch.compile here (that is the compile
suite's). The same `Bench` declarations as benchmarks/test_*.py, so a row here means what it means there.

attention        TFLOP/s, × sdpa (PyTorch's own pick); the length sweep 2×10×L²×64 is the chart's
group_norm_silu  GB/s and % of the copy of the same bytes (measured in the same case)
fourier          ms per call (wall clock, launch-bound) and launches per call
"""
from __future__ import annotations

import torch

from .. import timing
from ..driver import run as run_bench
from ..results import Case, Results

BF = torch.bfloat16


def _attn(label, b, h, lq, lk, d, layout="blhd", modes=("fwd", "bwd", "fwd+bwd")):
    return Case((b, h, lq, lk, d), BF, layout, label=label), modes


ATTENTION_GPU = [
    _attn("sdxl-self-4096", 2, 10, 4096, 4096, 64),
    _attn("sdxl-self-4096-bhld", 2, 10, 4096, 4096, 64, layout="bhld"),
    _attn("sdxl-self-1024", 2, 20, 1024, 1024, 64),
    _attn("cross-77-4096", 2, 10, 4096, 77, 64),
    _attn("cross-77-1024", 2, 20, 1024, 77, 64),
    _attn("sd15-d40", 2, 8, 4096, 4096, 40, modes=("fwd", "bwd")),
    _attn("sd15-d80", 2, 8, 1024, 1024, 80, modes=("fwd", "bwd")),
    _attn("sd15-d160", 2, 8, 256, 256, 160, modes=("fwd", "bwd")),
    *(_attn(f"len-{n}", 2, 10, n, n, 64, modes=("fwd", "bwd")) for n in (256, 1024, 16384)),
]
ATTENTION_DRY = [  # the same classes, tiny: the interpreter runs ours
    _attn("sdxl-self-4096", 1, 2, 64, 64, 64, modes=("fwd", "bwd")),  # fwd+bwd: the same code, twice
    _attn("sdxl-self-4096-bhld", 1, 2, 64, 64, 64, layout="bhld", modes=("fwd",)),
    _attn("sdxl-self-1024", 1, 2, 32, 32, 64, modes=("fwd",)),
    _attn("cross-77-4096", 1, 2, 64, 77, 64, modes=("fwd", "bwd")),
    _attn("cross-77-1024", 1, 2, 32, 77, 64, modes=("fwd",)),
    _attn("sd15-d40", 1, 2, 32, 32, 40, modes=("fwd",)),
    _attn("sd15-d80", 1, 2, 32, 32, 80, modes=("fwd",)),
    _attn("sd15-d160", 1, 2, 16, 16, 160, modes=("fwd",)),
    *(_attn(f"len-{n}", 1, 2, n, n, 64, modes=("fwd", "bwd")) for n in (16, 128)),
]
GN_GPU = [((2, 320, 128, 128), "unet-128"), ((2, 640, 64, 64), "unet-64"), ((2, 1280, 32, 32), "unet-32"),
          ((1, 512, 256, 256), "vae-256")]  # fmt: skip
GN_DRY = [((1, 320, 8, 8), "unet-128"), ((1, 640, 4, 4), "unet-64"), ((1, 1280, 2, 2), "unet-32"),
          ((1, 512, 4, 4), "vae-256")]  # fmt: skip


def dry_timers() -> None:
    """A dry run's timers: one warm-up call and two rounds (its figures mean nothing; the code path is the point)."""
    timing.WALL_WARMUP_CALLS, timing.WALL_MIN_CALLS, timing.WALL_MIN_RUN_S = 1, 2, 0.0


def run(ctx) -> list[str]:
    from .. import test_attention, test_fourier_embedding, test_group_norm_silu

    if ctx.dry_run:
        dry_timers()
    device = ctx.device
    results = Results(sink=ctx.log.sink())
    failures = []
    attn_cases = dict(ATTENTION_DRY if ctx.dry_run else ATTENTION_GPU)
    test_attention.notes(results)
    attn = test_attention.bench(attn_cases, providers=tuple(p for p in test_attention.PROVIDERS if p != "sdpa-math")
                                if not ctx.dry_run else test_attention.PROVIDERS)  # fmt: skip
    for case in attn_cases:
        failures += run_bench(attn, case, results, device, interpreter=ctx.dry_run)
    dtype = BF
    layouts = ("nchw", "channels_last")
    providers = tuple(p for p in test_group_norm_silu.PROVIDERS if p != "compile")
    gn = test_group_norm_silu.bench(providers=providers)
    # dry run: the interpreter runs a GroupNorm in ~0.5 s (one program per group), so Triton serves the first
    # case there and the C++ CPU kernels every case
    gn_cpu = test_group_norm_silu.bench(providers=tuple(p for p in providers if p != "ours-triton"))
    for i, (shape, label) in enumerate(GN_DRY if ctx.dry_run else GN_GPU):
        for j, layout in enumerate(layouts):
            bench = gn if not ctx.dry_run or i == j == 0 else gn_cpu
            failures += run_bench(bench, Case(shape, dtype, layout, label=f"{label}-{layout}"), results, device,
                                  interpreter=ctx.dry_run)  # fmt: skip
    fourier = test_fourier_embedding.bench()
    for case in test_fourier_embedding.CASES:
        labelled = Case(case.shape, case.dtype, case.layout, label="micro-conditioning" if case.shape[1:] == (6, 256)
                        else "timestep")  # fmt: skip
        failures += run_bench(fourier, labelled, results, device, interpreter=ctx.dry_run)
    for op, notes in results.notes.items():
        for text in notes:
            ctx.log.write({"op": op, "note": text}, kind="note")
    return failures
