"""ceilings: what the card delivers, the yardsticks of every other figure (planned ~15 s).

copy    dst.copy_(src) over a 4 GiB buffer, do_bench median; GB/s counts read + write (2 · bytes)
matmul  an 8192³ bf16 matmul of random data, do_bench median; TFLOP/s = 2·n³ / time
Dry run: 64 MiB and 512³ float32 on the CPU, timed by wall clock.
"""
from __future__ import annotations

import torch

from .. import timing


def measure(fn, device) -> float:
    return timing.time_providers("ceilings", {"x": fn}, device, wall=device.type != "cuda")["x"].ms


def run(ctx) -> list[str]:
    device = ctx.device
    dry = ctx.dry_run
    nbytes = (64 if dry else 4096) * 2**20
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device)
    ctx.row(op="copy", provider="torch", mode="ceiling", shape=[nbytes], ms=ms, gbps=2 * nbytes / (ms * 1e-3) / 1e9)
    del src, dst
    n, dtype = (512, torch.float32) if dry else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = measure(lambda: a @ b, device)
    ctx.row(op="matmul", provider="torch", mode="ceiling", shape=[n, n, n], dtype=str(dtype).removeprefix("torch."),
            ms=ms, tflops=2 * n**3 / (ms * 1e-3) / 1e12)  # fmt: skip
    return []
