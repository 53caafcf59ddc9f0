"""One benchmark driver: cases × providers × modes → rows, a correctness gate before any timing.

In the spirit of Triton's `perf_report`: a benchmark declares what it measures as a `Bench` (its providers, how
to build inputs for a case, how each provider computes, which modes a case runs, the work a call does) and
`run(bench, case, results)` does the rest, the same way for every op:

  1. inputs for the case, and `bench.before` (e.g. the copy yardstick a memory-bound op is judged by)
  2. the providers this device has (`skip_reason`); the others become notes in the op's table
  3. the gate: each of our providers runs once on its forced backend and must pass `bench.check` and say it
     was served by that backend (`sdxl_kernels.last_backend`); a wrong kernel gets an error row, no times
  4. per mode, each provider's step is built (`bench.build`, `timing.mode_step` by default: building runs it
     once, which is where torch.compile compiles and a backend refuses a case); a refusal is an error row
  5. the steps are timed (`timing.time_providers`: do_bench or wall clock on CUDA, calls taking turns on the
     CPU) and every timing becomes a row with its GB/s or TFLOP/s from `bench.work`

`run` returns the failures of our own providers (a pytest benchmark fails on them; the GPU quick pass records
them and goes on). The pytest benchmarks and `benchmarks.gpu_quick` share these Bench declarations.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from . import timing
from .results import Case, Results, error_text


@dataclasses.dataclass
class Inputs:
    """What one case's providers are called with: fn(*args); `grad` is the output gradient (bwd modes)."""

    args: tuple
    grad: torch.Tensor | None = None


def default_build(bench: "Bench", mode: str, provider: str, fn: Callable, inputs: Inputs) -> Callable[[], object]:
    return timing.mode_step(mode, fn, inputs.args, inputs.grad)


@dataclasses.dataclass
class Bench:
    op: str  # the table's and the files' name
    providers: Sequence[str]
    make_inputs: Callable[[Case], Inputs]
    provider_fn: Callable[[str], Callable]  # provider -> fn(*inputs.args)
    modes: Callable[[Case], Sequence[str]] = lambda case: ("fwd",)
    backend_op: str | None = None  # sdxl_kernels.backends' name for the op, when it differs from `op`
    skip: Callable[[str, Case], str | None] | None = None  # case-specific reasons, after device availability
    check: Callable[[Callable, Inputs], None] | None = None  # raises when a provider's output is wrong
    build: Callable = default_build  # (bench, mode, provider, fn, inputs) -> step
    work: Callable[[str, Case, Inputs], dict] = lambda mode, case, inputs: {}  # {"nbytes": ...} / {"flops": ...}
    wall: bool = False  # CUDA: wall clock per call (launch-bound ops) instead of do_bench
    one_by_one: bool = False  # CUDA: time each provider alone, so one that fails (out of memory) costs its row
    launches: Sequence[str] = ()  # modes whose CUDA launches per call are counted
    before: Callable[[Case, Inputs, Results], None] | None = None
    after_build: Callable[[Case, str, dict], None] | None = None  # (case, mode, {provider: step})
    warmup_ms: float = timing.CUDA_WARMUP_MS
    rep_ms: float = timing.CUDA_REP_MS
    serves: Callable[[str, Case, Inputs], str | None] | None = None  # the path a provider took ("tma", ...)

    @property
    def backend(self) -> str:
        return self.backend_op or self.op


def skip_reason(provider: str, device: torch.device, interpreter: bool = False) -> str | None:
    """None if `provider` can be timed on `device`, else why not. Only our own backends can be absent.
    `interpreter`: Triton under TRITON_INTERPRET counts as present on the CPU (the GPU quick pass's dry run,
    whose figures say nothing and are marked as CPU figures)."""
    if not provider.startswith("ours-"):
        return None
    from sdxl_kernels import backends

    name = provider.removeprefix("ours-")
    if name == "triton":
        if not backends.triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not (interpreter and backends.triton_interpret()):
            return "Triton is timed on CUDA only (the CPU interpreter is a debugger, not a benchmark)"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return "no CUDA device"
        if not backends.cuda_extension_available():
            return "sdxl_kernels._C is not built, or built without CUDA kernels"
        return None
    if name == "cpu":
        if device.type != "cpu":
            return "the benchmarks run on CUDA here (SDXL_BENCH_DEVICE=cpu times the CPU)"
        if not backends.cpu_extension_available():
            return "the C++ extension sdxl_kernels._C is not built"
        return None
    raise ValueError(f"unknown provider {provider!r}")


def pick_providers(
    results: Results, bench: Bench, case: Case, device: torch.device, interpreter: bool = False
) -> dict[str, Callable]:
    """{provider: fn} for every provider that applies to `case` here; the others become notes."""
    out = {}
    for provider in bench.providers:
        why = skip_reason(provider, device, interpreter) or (bench.skip(provider, case) if bench.skip else None)
        if why is None:
            out[provider] = bench.provider_fn(provider)
        else:
            results.note(bench.op, f"{provider}: not measured, {why}")
    return out


def served_by(bench: Bench) -> str | None:
    import sdxl_kernels

    return sdxl_kernels.last_backend(bench.backend)


def gate(bench: Bench, provider: str, fn: Callable, inputs: Inputs) -> None:
    """Our provider on its forced backend: correct (bench.check) and really served by that backend."""
    with timing.forced_backend(bench.backend, provider):
        if bench.check is not None:
            bench.check(fn, inputs)
        else:
            with torch.no_grad():
                fn(*inputs.args)
        served = served_by(bench)
    want = provider.removeprefix("ours-")
    assert served == want, f"served by {served!r}, not {want!r}"


def run(bench: Bench, case: Case, results: Results, device: torch.device, interpreter: bool = False) -> list[str]:
    """Every mode of `case` for every provider of `bench`, rows into `results`; our providers' failures."""
    inputs = bench.make_inputs(case)
    if bench.before is not None:
        bench.before(case, inputs, results)
    providers = pick_providers(results, bench, case, device, interpreter)
    failures = []
    for provider in [p for p in providers if p.startswith("ours-")]:
        try:
            gate(bench, provider, providers[provider], inputs)
        except Exception as exc:  # a wrong or crashing kernel: its times would be meaningless
            failures.append(f"{provider} {case}: {error_text(exc)}")
            results.add(bench.op, case, "fwd", provider, error=error_text(exc))
            del providers[provider]
            _free(device)

    for mode in bench.modes(case):
        steps = {}
        for provider, fn in providers.items():
            try:
                with timing.forced_backend(bench.backend, provider):
                    steps[provider] = bench.build(bench, mode, provider, fn, inputs)
            except Exception as exc:  # an SDPA backend or torch.compile that refuses the case; ours must not
                results.add(bench.op, case, mode, provider, error=error_text(exc))
                if provider.startswith("ours-"):
                    failures.append(f"{provider} {mode} {case}: {error_text(exc)}")
                _free(device)
        if bench.after_build is not None:
            bench.after_build(case, mode, steps)
        work = bench.work(mode, case, inputs)
        for provider, timed in _time(bench, steps, device).items():
            if isinstance(timed, Exception):
                results.add(bench.op, case, mode, provider, error=error_text(timed))
                continue
            launches = None
            if mode in bench.launches:
                with timing.forced_backend(bench.backend, provider):
                    launches = timing.count_launches(steps[provider], device)
            path = bench.serves(provider, case, inputs) if bench.serves and provider.startswith("ours-") else None
            results.add(bench.op, case, mode, provider, timed, launches=launches, path=path, **work)
        del steps
    del inputs
    _free(device)
    return failures


def _time(bench: Bench, steps: dict, device: torch.device) -> dict[str, "timing.Timing | Exception"]:
    opts = dict(wall=bench.wall, warmup_ms=bench.warmup_ms, rep_ms=bench.rep_ms)
    if device.type != "cuda" or not bench.one_by_one:
        try:
            return timing.time_providers(bench.backend, steps, device, **opts)
        except Exception as exc:
            return {provider: exc for provider in steps}
    out = {}
    for provider, fn in steps.items():
        try:
            out |= timing.time_providers(bench.backend, {provider: fn}, device, **opts)
        except Exception as exc:
            out[provider] = exc
            _free(device)
    return out


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(results: Results, op: str, case, mode: str, provider: str, step: Callable[[], object],
            peaks: dict | None = None) -> bool:  # fmt: skip
    """Run `step` once (torch.compile compiles, optimizers allocate their states) and, given `peaks` (CUDA),
    record its memory high-water mark. A failure (an OOM, a compile error) becomes the provider's error row and
    the run goes on; returns whether the step works."""
    error = None
    try:
        step()
        if peaks is not None:
            peaks[provider] = timing.peak_bytes(step)
    except Exception as exc:
        error = error_text(exc)
    if error is None:
        return True
    results.add(op, case, mode, provider, error=error)  # outside the except block: the failed frames are gone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return False


def time_models(
    results: Results,
    op: str,
    case: Case,
    mode: str,
    steps: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    flops: float | Callable[[dict], float] | None = None,
    peaks: dict | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> dict[str, timing.Timing]:
    """The whole-model benchmarks' skeleton: warm every provider's step up (a failure is its error row and
    `on_failure(provider)`), time the ones that work by wall clock per call, one row each with `flops` (a
    number, or a function of the working steps). Returns {provider: Timing}."""
    working = {}
    for provider, step in steps.items():
        if warm_up(results, op, case, mode, provider, step, peaks):
            working[provider] = step
        elif on_failure is not None:
            on_failure(provider)
    work = flops(working) if callable(flops) else flops
    timings = timing.time_providers(op, working, device, wall=True)
    for provider, timed in timings.items():
        results.add(op, case, mode, provider, timed, flops=work)
    return timings
