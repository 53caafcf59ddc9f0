"""Timers: kernel time on CUDA (do_bench), wall clock per call (blocked_autorange), CPU calls taking turns.

  memory-bound kernels on CUDA  `triton.testing.do_bench`, median: device events around each call, L2 flushed
                                between calls, so the figure is the kernels' time on the GPU
  launch-bound ops on CUDA      `torch.utils.benchmark.Timer.blocked_autorange`, median: wall clock per call,
                                synchronized, so Python, dispatch and launch overheads count
  everything on CPU             wall clock of single calls, providers taking turns, median
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable

import torch

from .cpu_load import OthersCpu

CUDA_WARMUP_MS = 25
CUDA_REP_MS = 100
WALL_MIN_RUN_S = 0.3
WALL_MIN_CALLS = 15
WALL_MAX_CALLS = 20000
WALL_WARMUP_CALLS = 3


@contextlib.contextmanager
def forced_backend(op: str, provider: str):
    """Inside, `op` runs on the backend `provider` names ("ours-cpu" → "cpu"); other providers leave it alone."""
    if not provider.startswith("ours-"):
        yield
        return
    from sdxl_kernels import backends

    backends.set_backend(op, provider.removeprefix("ours-"))
    try:
        yield
    finally:
        backends.set_backend(op, None)


@dataclasses.dataclass(frozen=True)
class Timing:
    ms: float  # the median: the figure reported
    ms_min: float | None = None  # the fastest single call, where calls are timed one by one (CPU)
    others_cpu: float | None = None  # share of the machine's CPU other processes took meanwhile (CPU)


def time_providers(
    op: str,
    steps: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    wall: bool = False,
    warmup_ms: float = CUDA_WARMUP_MS,
    rep_ms: float = CUDA_REP_MS,
) -> dict[str, Timing]:
    """Median ms of each provider's step, each run on its own backend (see forced_backend).

    CUDA, wall=False  `triton.testing.do_bench`: device time of the kernels, one provider after the other
                      (warmup_ms, rep_ms: do_bench's budgets; a test that shortens them says so in a note).
    CUDA, wall=True   torch.utils.benchmark.Timer.blocked_autorange: wall clock per call over blocks of calls
                      and a synchronize, so launches pipeline as they do in a model.
    CPU               wall clock of single calls, the providers taking turns call by call, then the median per
                      provider. On a small shared machine a descheduled worker thread stalls a call by whole
                      scheduler ticks (milliseconds): taking turns spreads such a stretch over every provider
                      instead of ruining one, and the median of single calls drops the isolated stalls.
    """
    if device.type == "cuda":
        out = {}
        for provider, fn in steps.items():
            with forced_backend(op, provider):
                out[provider] = _time_blocked(fn) if wall else _time_do_bench(fn, warmup_ms, rep_ms)
        return out
    ours = [p for p in steps if p.startswith("ours-")]
    if len(ours) <= 1:  # other providers never call our op, so one backend can stay forced throughout
        with forced_backend(op, ours[0] if ours else "eager"):
            return _time_interleaved(steps)
    pinned = {p: _pinned(op, p, fn) for p, fn in steps.items()}
    return _time_interleaved(pinned)


def _time_do_bench(fn, warmup_ms: float = CUDA_WARMUP_MS, rep_ms: float = CUDA_REP_MS) -> Timing:
    from triton.testing import do_bench

    return Timing(float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")))


def _time_blocked(fn) -> Timing:
    from torch.utils import benchmark

    for _ in range(WALL_WARMUP_CALLS):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return Timing(timer.blocked_autorange(min_run_time=WALL_MIN_RUN_S).median * 1e3)


def _time_interleaved(steps: dict[str, Callable[[], object]]) -> dict[str, Timing]:
    clock = time.perf_counter
    for fn in steps.values():
        for _ in range(WALL_WARMUP_CALLS):
            fn()
    load = OthersCpu()
    times: dict[str, list[float]] = {p: [] for p in steps}
    end = clock() + WALL_MIN_RUN_S * len(steps)
    rounds = 0
    while rounds < WALL_MIN_CALLS or (clock() < end and rounds < WALL_MAX_CALLS):
        for provider, fn in steps.items():
            t0 = clock()
            fn()
            times[provider].append(clock() - t0)
        rounds += 1
    others = load.share()
    return {p: Timing(statistics.median(t) * 1e3, min(t) * 1e3, others) for p, t in times.items()}



def _pinned(op: str, provider: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with forced_backend(op, provider):
            return fn()

    return run



def mode_step(mode: str, fn: Callable[..., torch.Tensor], inputs: tuple, grad_out: torch.Tensor):
    """The callable a timer repeats for `mode` on fn(*inputs); building it runs fn once (that is where
    torch.compile compiles and where a backend refuses a case).

    fwd      inference, under no_grad
    bwd      torch.autograd.grad of one output over every input, on a graph built once (retain_graph)
    fwd+bwd  a fresh forward with grad, then that backward
    """
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return fn(*inputs)

        fwd()
        return fwd
    leaves = tuple(t.detach().requires_grad_() for t in inputs)  # detach keeps the inputs' strides
    if mode == "bwd":
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
        return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    fwd_bwd = lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out)  # noqa: E731
    fwd_bwd()
    return fwd_bwd


def count_launches(fn: Callable[[], object], device: torch.device) -> int | None:
    """Kernels and copies one call of fn() puts on the GPU, by torch.profiler; None off CUDA or if it fails."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # the profiler is optional equipment here
        return None
    return n or None  # 0 means the profiler saw no device activity, not that there was none


def peak_bytes(step: Callable[[], object]) -> int:
    """CUDA memory high-water mark of one call of `step`."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12

