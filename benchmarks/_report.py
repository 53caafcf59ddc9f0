"""What every benchmark shares: the device under test, the timers, and the result tables.

Timing (time_providers)
  memory-bound kernels on CUDA  `triton.testing.do_bench`, median: device events around each call, L2 flushed
                                between calls, so the figure is the kernels' time on the GPU
  launch-bound ops on CUDA      `torch.utils.benchmark.Timer.blocked_autorange`, median: wall clock per call,
                                synchronized, so Python, dispatch and launch overheads count
  everything on CPU             wall clock of single calls, providers taking turns, median

Rows (one per op, case, mode and provider)
  {op, shape, dtype, layout, mode, provider, ms, gbps, pct_of_copy, speedup_vs_eager, launches, error,
   ms_min, others_cpu, tflops, speedup_vs_baseline, baseline}
  ms                the median
  gbps              the op's minimal memory traffic / ms (each test says what it counts); memory-bound ops
  pct_of_copy       gbps / the GB/s of `dst.copy_(src)` over x's bytes, measured in the same run (a copy moves
                    2 · bytes): how close the op gets to what the memory system delivers
  tflops            the op's floating-point operations / ms (each test says what it counts); compute-bound ops
  speedup_vs_eager  eager's ms / ms, same case and mode (None where the op has no "eager" provider)
  speedup_vs_baseline, baseline
                    the baseline provider's ms / ms, same case and mode, and which provider that is: "eager"
                    unless the op names another with Results.set_baseline (attention: "sdpa", PyTorch's own
                    choice of SDPA backend); the table's "× <baseline>" column and the targets use this
  launches          CUDA kernels (and copies) one call puts on the device (torch.profiler), CUDA only
  error             why a provider produced no time (e.g. torch.compile failed); the run goes on
  ms_min            the fastest single call (CPU only): the figure to trust when the machine was busy; the
                    median then carries scheduler stalls of the worker threads
  others_cpu        the share of all CPUs other processes used while the case was timed (CPU only; from
                    /proc/stat); rows over BUSY_SHARE, or with a median over NOISY_RATIO × min, get a †

Every session that measured something writes `<out>/<device-slug>-<op>.json` (environment + rows) and `.md`
(the table), overwriting the last run's; out is $SDXL_BENCH_OUT or benchmarks/results/.
SDXL_BENCH_DEVICE=cpu times the CPU on a GPU machine; SDXL_BENCH_THREADS=n sets torch's CPU threads.

Nothing here imports triton or sdxl_kernels at import time: tests/conftest.py must get to set TRITON_INTERPRET
before triton's first import when tests/ and benchmarks/ are collected in one session.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import time
from typing import Callable

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
OUT_ENV = "SDXL_BENCH_OUT"
DEVICE_ENV = "SDXL_BENCH_DEVICE"
THREADS_ENV = "SDXL_BENCH_THREADS"

PROVIDERS = (
    "copy",
    "eager",
    "compile",
    "sdpa",
    "sdpa-flash",
    "sdpa-efficient",
    "sdpa-cudnn",
    "sdpa-math",
    "ours-triton",
    "ours-cuda",
    "ours-cpu",
)
MODES = ("copy", "fwd", "bwd", "fwd+bwd")

CUDA_WARMUP_MS = 25
CUDA_REP_MS = 100
WALL_MIN_RUN_S = 0.3
WALL_MIN_CALLS = 15
WALL_MAX_CALLS = 20000
WALL_WARMUP_CALLS = 3
NOISY_RATIO = 2.0  # a median this many times the fastest single call is flagged in the table
BUSY_SHARE = 0.1  # so is a measurement while other processes took more than this share of the CPUs


def configure_threads() -> None:
    """SDXL_BENCH_THREADS=n times the CPU with n threads instead of torch's default."""
    n = os.environ.get(THREADS_ENV, "").strip()
    if n:
        torch.set_num_threads(int(n))


def bench_device() -> torch.device:
    """CUDA when there is a GPU; SDXL_BENCH_DEVICE=cpu runs the CPU benchmarks on a GPU machine."""
    if os.environ.get(DEVICE_ENV, "").strip().lower() == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration of one op."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "-"  # "nchw", "channels_last", or "-" where memory format does not apply

    def __str__(self) -> str:  # the pytest id
        parts = ["x".join(map(str, self.shape)), dtype_name(self.dtype)]
        return "-".join(parts + ([self.layout] if self.layout != "-" else []))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- which providers apply ---------------------------------------------------------------------------------


def skip_reason(provider: str, device: torch.device) -> str | None:
    """None if `provider` can be timed on `device`, else why not. Only our own backends can be absent."""
    if not provider.startswith("ours-"):
        return None
    from sdxl_kernels import backends

    name = provider.removeprefix("ours-")
    if name == "triton":
        if device.type != "cuda":
            return "Triton is timed on CUDA only (the CPU interpreter is a debugger, not a benchmark)"
        if not backends.triton_available():
            return "triton is not installed"
        if backends.triton_interpret():
            return "TRITON_INTERPRET is set"
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


# ---- timers -------------------------------------------------------------------------------------------------


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
    load = _OthersCpu()
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


class _OthersCpu:
    """The share of all CPUs that other processes used since construction, from /proc/stat minus our own CPU
    time; None where /proc/stat is missing. One other busy process on a 2-core machine is 0.5."""

    def __init__(self) -> None:
        self.jiffies, self.times = self._stat(), os.times()

    @staticmethod
    def _stat() -> tuple[int, int] | None:  # (busy, total) jiffies over all CPUs
        try:
            fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def share(self) -> float | None:
        end, times = self._stat(), os.times()
        if self.jiffies is None or end is None or end[1] <= self.jiffies[1]:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        ours = (times.user - self.times.user) + (times.system - self.times.system)
        busy = (end[0] - self.jiffies[0]) / tick
        return max(0.0, busy - ours) / ((end[1] - self.jiffies[1]) / tick)


def _pinned(op: str, provider: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with forced_backend(op, provider):
            return fn()

    return run


def pick_providers(op: str, names, reason: Callable[[str], str | None], make: Callable[[str], object]) -> dict:
    """{provider: make(provider)} for every provider reason() lets through; the others become notes."""
    providers = {}
    for provider in names:
        why = reason(provider)
        if why is None:
            providers[provider] = make(provider)
        else:
            RESULTS.note(op, f"{provider}: not measured, {why}")
    return providers


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


# ---- results ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    op: str
    shape: list[int]
    dtype: str
    layout: str
    mode: str
    provider: str
    ms: float | None = None
    gbps: float | None = None
    pct_of_copy: float | None = None
    speedup_vs_eager: float | None = None
    launches: int | None = None
    error: str | None = None
    ms_min: float | None = None
    others_cpu: float | None = None
    tflops: float | None = None
    speedup_vs_baseline: float | None = None
    baseline: str | None = None

    @property
    def case(self) -> tuple:
        return self.op, tuple(self.shape), self.dtype, self.layout


@dataclasses.dataclass
class Target:
    """An acceptance figure: every `ours-*` provider of this case and mode at least `min_speedup` × the op's
    baseline provider (eager unless set_baseline said otherwise), and at least `min_tflops` TFLOP/s; either
    may be None."""

    op: str
    case: Case
    mode: str
    min_speedup: float | None
    label: str
    min_tflops: float | None = None

    def wanted(self, baseline: str) -> str:  # "≥ 450 TFLOP/s and ≥ 1.1× sdpa"
        parts = [] if self.min_tflops is None else [f"≥ {self.min_tflops:g} TFLOP/s"]
        parts += [] if self.min_speedup is None else [f"≥ {self.min_speedup:g}× {baseline}"]
        return " and ".join(parts)

    def verdict(self, row: Row, baseline: str) -> str:
        """What `row` got, and whether that meets the target (by how much it falls short if not)."""
        checks = []  # (got, wanted, shown, what)
        if self.min_tflops is not None:
            shown = "-" if row.tflops is None else f"{row.tflops:.0f} TFLOP/s"
            checks.append((row.tflops, self.min_tflops, shown, "TFLOP/s"))
        if self.min_speedup is not None:
            got = row.speedup_vs_baseline
            checks.append((got, self.min_speedup, "-" if got is None else f"{got:.2f}×", f"× {baseline}"))
        shown = ", ".join(c[2] for c in checks)
        if any(got is None for got, *_ in checks):
            return f"{shown}, not measured"
        short = [f"{what} {1 - got / want:.0%} short" for got, want, _, what in checks if got < want]
        return f"{shown}, " + (f"NOT met ({'; '.join(short)})" if short else "met")


class Results:
    """Rows of one pytest session, and the files they become."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.notes: dict[str, list[str]] = {}
        self.targets: list[Target] = []
        self.baselines: dict[str, str] = {}  # op -> the provider its "× baseline" column divides by
        self._keyed_notes: dict[tuple[str, str], str] = {}
        self.written: list[pathlib.Path] = []
        self.env: dict | None = None  # environment() of the last write

    def add(
        self,
        op: str,
        case: Case,
        mode: str,
        provider: str,
        timing: Timing | None = None,
        nbytes: float | None = None,
        launches: int | None = None,
        error: str | None = None,
        flops: float | None = None,
    ) -> Row:
        row = Row(
            op=op,
            shape=list(case.shape),
            dtype=dtype_name(case.dtype),
            layout=case.layout,
            mode=mode,
            provider=provider,
            ms=timing.ms if timing else None,
            gbps=gbps(nbytes, timing.ms) if timing and nbytes else None,
            launches=launches,
            error=error,
            ms_min=timing.ms_min if timing else None,
            others_cpu=timing.others_cpu if timing else None,
            tflops=tflops(flops, timing.ms) if timing and flops else None,
        )
        self.rows.append(row)
        return row

    def note(self, op: str, text: str, *, key: str | None = None) -> None:
        """Add a note to op's table once; a note with a `key` replaces the last one given that key in place."""
        notes = self.notes.setdefault(op, [])
        old = self._keyed_notes.get((op, key)) if key is not None else None
        if old is not None and old in notes:
            notes[notes.index(old)] = text
        elif text not in notes:
            notes.append(text)
        if key is not None:
            self._keyed_notes[(op, key)] = text

    def set_baseline(self, op: str, provider: str) -> None:
        """The provider op's speedups are measured against ("eager" when never set)."""
        self.baselines[op] = provider

    def baseline(self, op: str) -> str:
        return self.baselines.get(op, "eager")

    def target(
        self,
        op: str,
        case: Case,
        mode: str,
        min_speedup: float | None,
        label: str,
        *,
        min_tflops: float | None = None,
    ) -> None:
        if not any(t.op == op and t.case == case and t.mode == mode for t in self.targets):
            self.targets.append(Target(op, case, mode, min_speedup, label, min_tflops))

    # -- derived figures, computed once every row is in, whatever order the tests ran in

    def finalize(self) -> None:
        copy = {r.case: r for r in self.rows if r.provider == "copy" and r.gbps}
        timed = {(r.case, r.mode, r.provider): r for r in self.rows if r.ms}
        for r in self.rows:
            if r.gbps and r.case in copy and r.provider != "copy":
                r.pct_of_copy = 100.0 * r.gbps / copy[r.case].gbps
            eager = timed.get((r.case, r.mode, "eager"))
            if eager is not None and r.ms:
                r.speedup_vs_eager = eager.ms / r.ms
            r.baseline = self.baseline(r.op)
            base = timed.get((r.case, r.mode, r.baseline))
            if base is not None and r.ms:
                r.speedup_vs_baseline = base.ms / r.ms

    def target_lines(self, op: str) -> list[str]:
        lines, baseline = [], self.baseline(op)
        for t in (t for t in self.targets if t.op == op):
            key = (op, tuple(t.case.shape), dtype_name(t.case.dtype), t.case.layout)
            rows = [r for r in self.rows if r.case == key and r.mode == t.mode]
            ours = [r for r in rows if r.provider.startswith("ours-")]
            if not ours:
                lines.append(f"target {t.label}: ours {t.wanted(baseline)}: not measured here")
            for r in ours:
                lines.append(f"target {t.label}: {r.provider} {t.wanted(baseline)}: {t.verdict(r, baseline)}")
        return lines

    def ops(self) -> list[str]:
        return list(dict.fromkeys(r.op for r in self.rows))

    # -- output

    def write(self, device: torch.device) -> list[pathlib.Path]:
        """<out>/<device-slug>-<op>.json and .md for every op measured; returns the paths written."""
        self.finalize()
        out = pathlib.Path(os.environ.get(OUT_ENV) or RESULTS_DIR)
        out.mkdir(parents=True, exist_ok=True)
        env = self.env = environment(device)
        slug = slugify(env["device"])
        self.written = []
        for op in self.ops():
            rows = [r for r in self.rows if r.op == op]
            doc = {**env, "op": op, "notes": self.notes.get(op, []) + self.target_lines(op)}
            doc["rows"] = [dataclasses.asdict(r) for r in rows]
            json_path = out / f"{slug}-{op}.json"
            json_path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
            md_path = out / f"{slug}-{op}.md"
            md_path.write_text(self.markdown(op, env) + "\n")
            self.written += [json_path, md_path]
        return self.written

    def markdown(self, op: str, env: dict) -> str:
        rows = sorted((r for r in self.rows if r.op == op), key=_row_order)
        with_launches = any(r.launches is not None for r in rows)
        with_min = any(r.ms_min is not None for r in rows)
        with_tflops = any(r.tflops is not None for r in rows)
        with_gbps = any(r.gbps is not None for r in rows) or not with_tflops
        head = ["shape", "layout", "dtype", "mode", "provider", "ms"]
        head += ["GB/s", "% of copy"] if with_gbps else []
        head += ["TFLOP/s"] if with_tflops else []
        head += [f"× {self.baseline(op)}"]
        head += ["min ms"] if with_min else []
        head += ["launches"] if with_launches else []
        lines = [
            f"### {op} on {env['device']}",
            "",
            f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, python {env['python']}, "
            f"{env['cpu_threads']} CPU threads (load {env['load_avg_1m']}); {env['timestamp']}.  ",
            f"Timing: {env['timing']}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + "|",
        ]
        for r in rows:
            cells = [
                "×".join(map(str, r.shape)),
                r.layout,
                r.dtype,
                r.mode,
                r.provider,
                "error" if r.error else _fmt(r.ms, "{:.4g}") + ("†" if _noisy(r) else ""),
            ]
            cells += [_fmt_num(r.gbps), _fmt(r.pct_of_copy, "{:.0f}%")] if with_gbps else []
            cells += [_fmt_num(r.tflops)] if with_tflops else []
            cells += [_fmt(r.speedup_vs_baseline, "{:.2f}×")]
            cells += [_fmt(r.ms_min, "{:.4g}")] if with_min else []
            cells += [_fmt(r.launches, "{}")] if with_launches else []
            lines.append("| " + " | ".join(cells) + " |")
        notes = self.notes.get(op, []) + self.target_lines(op)
        if any(_noisy(r) for r in rows):
            rerun = ", or rerun with SDXL_BENCH_THREADS=1" if env["cpu_threads"] > 1 else ""
            notes.append(f"† a busy machine (other processes took over {BUSY_SHARE:.0%} of the CPUs, or the "
                         f"median is over {NOISY_RATIO:g}× the fastest call): compare min ms{rerun}")  # fmt: skip
        notes += [f"{r.provider} {r.mode} {'×'.join(map(str, r.shape))} {r.layout}: {_first_line(r.error)}"
                  for r in rows if r.error]  # fmt: skip
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        return "\n".join(lines)


def _row_order(r: Row):
    def index(seq, item):
        return seq.index(item) if item in seq else len(seq)

    return r.shape, r.layout, r.dtype, index(MODES, r.mode), index(PROVIDERS, r.provider)


def _noisy(r: Row) -> bool:
    spread = bool(r.ms and r.ms_min and r.ms > NOISY_RATIO * r.ms_min)
    return spread or (r.others_cpu or 0.0) > BUSY_SHARE


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _fmt_num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error_text(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- environment --------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """What the numbers depend on; deliberately no hostname."""
    import sdxl_kernels
    from sdxl_kernels import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        timing = (
            f"kernels: do_bench median (warmup {CUDA_WARMUP_MS} ms, rep {CUDA_REP_MS} ms); wall clock: "
            f"torch.utils.benchmark.Timer blocked_autorange median (≥{WALL_MIN_RUN_S} s)"
        )
    else:
        timing = (
            f"wall clock of single calls, providers taking turns call by call; median over ≥{WALL_MIN_CALLS} "
            f"rounds and ≥{WALL_MIN_RUN_S} s per provider, after {WALL_WARMUP_CALLS} warm-up calls"
        )
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # CPU noise
        "sdxl_kernels": sdxl_kernels.__version__,
        "extension_built": backends.cpu_extension_available(),
        "extension_cuda": backends.cuda_extension_available(),
        "git_commit": _git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": timing,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2]
                break
    except OSError:
        pass
    model = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$", " ", model, flags=re.IGNORECASE)
    return " ".join(["CPU", *model.split()])  # 'CPU Intel Xeon Platinum 8481C'


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=pathlib.Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


RESULTS = Results()


def warm_up(op: str, case, mode: str, provider: str, step: Callable[[], object], peaks: dict | None = None) -> bool:
    """Run `step` once (torch.compile compiles, optimizers allocate their states) and, given `peaks` (CUDA),
    record its memory high-water mark. A failure (an OOM, a compile error) becomes the provider's error row and
    the run goes on; returns whether the step works."""
    error = None
    try:
        step()
        if peaks is not None:
            peaks[provider] = peak_bytes(step)
    except Exception as exc:
        error = error_text(exc)
    if error is None:
        return True
    RESULTS.add(op, case, mode, provider, error=error)  # outside the except block: the failed frames are gone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return False
