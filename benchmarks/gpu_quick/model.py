"""model: the SDXL base UNet, one sampling step with classifier-free guidance (batch 2) at 1024², bf16.

Planned ~40-80 s on an H100/H200 (cap 90 s): building the 2.57 B-parameter UNet on the GPU with random weights
(~10 s), warm-up (Triton JIT of the UNet's kernel variants, ~20-40 s, most of them already compiled by the kernels
step), then three providers by wall clock per call (~0.3 s each at ~100 ms a call), one peak-memory call each and
one profiled call.

  eager         use_kernels(False): PyTorch ops, SDPA, eager GroupNorm/SiLU
  ours          use_kernels(True): our attention, GroupNorm+SiLU and Fourier embeddings
  ours-graphs   ours captured once in a CUDA graph (sdxl_model.graphs.GraphedUNet) and replayed

Rows: ms, it/s (1000 / ms: one call is one sampling step), TFLOP/s at 6.76 TFLOP per image, peak memory; and
OUTDIR/model_profile.txt with torch.profiler's top 15 kernels by GPU time for ours (also a row).
Dry run: the tiny preset at latent 32², float32, on the CPU; no CUDA graphs there (the row says why).
"""
from __future__ import annotations

import torch

from .. import timing
from ..driver import warm_up
from ..results import Case, Results

SDXL_UNET_FLOPS_PER_IMAGE = 6.76e12
OP = "sdxl_unet"


def build(ctx):
    from sdxl_model import UNet, UNetConfig

    torch.manual_seed(0)
    device = ctx.device
    cfg, dtype, latent = (UNetConfig.tiny(), torch.float32, 32) if ctx.dry_run else (
        UNetConfig.sdxl_base(), torch.bfloat16, 128)  # fmt: skip
    with torch.device(device):
        unet = UNet(cfg).to(dtype).eval()  # random weights
        x = torch.randn(2, 4, latent, latent, dtype=dtype)
        t = torch.tensor([999.0, 999.0])
        context = torch.randn(2, 77, cfg.context_dim, dtype=dtype)
        y = torch.randn(2, cfg.adm_in_channels, dtype=dtype)
    return unet, (x, t, context, y), Case((2, 4, latent, latent), dtype, label=f"unet-{latent * 8}px-batch2")


def profile_table(fn, device: torch.device, rows: int = 15) -> tuple[str, list[dict]]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"  # torch ≥ 2.4 names both
    averages = prof.key_averages()
    table = averages.table(sort_by=attr, row_limit=rows)
    top = sorted(averages, key=lambda e: getattr(e, attr, 0) or 0, reverse=True)[:rows]
    return table, [{"name": e.key[:120], "us": round(float(getattr(e, attr, 0) or 0), 1), "calls": e.count}
                   for e in top]  # fmt: skip


def run(ctx) -> list[str]:
    from sdxl_model.graphs import GraphedUNet

    if ctx.dry_run:
        from .kernels import dry_timers

        dry_timers()
    device = ctx.device
    unet, args, case = build(ctx)
    results = Results(sink=ctx.log.sink())
    flops = SDXL_UNET_FLOPS_PER_IMAGE * 2 if not ctx.dry_run else None
    failures = []

    def step_for(kernels: bool, fn):
        def step():
            unet.use_kernels(kernels)
            with torch.no_grad():
                return fn(*args)

        return step

    steps = {"eager": step_for(False, unet), "ours": step_for(True, unet)}
    if device.type == "cuda":
        unet.use_kernels(True)
        steps["ours-graphs"] = step_for(True, GraphedUNet(unet))
    else:
        results.add(OP, case, "fwd", "ours-graphs", error="CUDA graphs need a CUDA device (dry run on the CPU)")
    peaks = {} if device.type == "cuda" else None
    working = {p: s for p, s in steps.items() if warm_up(results, OP, case, "fwd", p, s, peaks)}
    failures += [f"{p}: warm-up failed" for p in steps if p not in working and p != "eager"]
    timings = {}
    for provider, step in working.items():  # one at a time: a graph replays only its own captured kernels
        timings |= timing.time_providers(OP, {provider: step}, device, wall=True)
    for provider, timed in timings.items():
        row = results.add(OP, case, "fwd", provider, timed, flops=flops)
        ctx.row(op=OP, label=case.label, provider=provider, it_per_s=1e3 / row.ms,
                peak_gib=(peaks or {}).get(provider, 0) / 2**30 if peaks else None, kind_of="it/s")  # fmt: skip
    if "ours" in working:
        table, top = profile_table(working["ours"], device)
        (ctx.out / "model_profile.txt").write_text(table + "\n")
        ctx.row(op=OP, label=case.label, provider="ours", profile_top=top)
    return failures
