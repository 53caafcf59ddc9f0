"""What every benchmark shares: the device under test, the timers, and the result tables.

Timing
  memory-bound kernels on CUDA  `triton.testing.do_bench`, median: device events around each call, L2 flushed
                                between calls, so the figure is the kernels' time on the GPU
  everything on CPU, and        `torch.utils.benchmark.Timer.blocked_autorange`, median: wall clock per call,
  launch-bound ops anywhere     accelerator synchronized, so Python, dispatch and launch overheads count

Rows (one per op, case, mode and provider)
  {op, shape, dtype, layout, mode, provider, ms, gbps, pct_of_copy, speedup_vs_eager, launches, error}
  gbps              the op's minimal memory traffic / ms (each test says what it counts)
  pct_of_copy       gbps / the GB/s of `dst.copy_(src)` over x's bytes, measured in the same run (a copy moves
                    2 · bytes): how close the op gets to what the memory system delivers
  speedup_vs_eager  eager's ms / ms, same case and mode
  launches          CUDA kernels (and copies) one call puts on the device (torch.profiler), CUDA only
  error             why a provider produced no time (e.g. torch.compile failed); the run goes on

Every session that measured something writes `<out>/<device-slug>-<op>.json` (environment + rows) and `.md`
(the table), overwriting the last run's; out is $SDXL_BENCH_OUT or benchmarks/results/.

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
import subprocess
from typing import Callable

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
OUT_ENV = "SDXL_BENCH_OUT"
DEVICE_ENV = "SDXL_BENCH_DEVICE"

PROVIDERS = ("copy", "eager", "compile", "ours-triton", "ours-cuda", "ours-cpu")
MODES = ("copy", "fwd", "bwd", "fwd+bwd")

CUDA_WARMUP_MS = 25
CUDA_REP_MS = 100
WALL_MIN_RUN_S = 0.2
WALL_WARMUP_CALLS = 3


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


def time_kernels_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms of fn(): device time on CUDA (do_bench), wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, return_mode="median"))
    return time_wall_ms(fn)


def time_wall_ms(fn: Callable[[], object], min_run_s: float = WALL_MIN_RUN_S) -> float:
    """Median wall-clock ms of fn(), accelerator synchronized; includes Python and launch overheads."""
    from torch.utils import benchmark

    for _ in range(WALL_WARMUP_CALLS):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_s).median * 1e3


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


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


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

    @property
    def case(self) -> tuple:
        return self.op, tuple(self.shape), self.dtype, self.layout


@dataclasses.dataclass
class Target:
    """An acceptance figure: every `ours-*` provider of this case and mode at least `min_speedup` × eager."""

    op: str
    case: Case
    mode: str
    min_speedup: float
    label: str


class Results:
    """Rows of one pytest session, and the files they become."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.notes: dict[str, list[str]] = {}
        self.targets: list[Target] = []
        self.written: list[pathlib.Path] = []
        self.env: dict | None = None  # environment() of the last write

    def add(
        self,
        op: str,
        case: Case,
        mode: str,
        provider: str,
        ms: float | None = None,
        nbytes: float | None = None,
        launches: int | None = None,
        error: str | None = None,
    ) -> Row:
        row = Row(
            op=op,
            shape=list(case.shape),
            dtype=dtype_name(case.dtype),
            layout=case.layout,
            mode=mode,
            provider=provider,
            ms=ms,
            gbps=gbps(nbytes, ms) if ms and nbytes else None,
            launches=launches,
            error=error,
        )
        self.rows.append(row)
        return row

    def note(self, op: str, text: str) -> None:
        notes = self.notes.setdefault(op, [])
        if text not in notes:
            notes.append(text)

    def target(self, op: str, case: Case, mode: str, min_speedup: float, label: str) -> None:
        if not any(t.op == op and t.case == case and t.mode == mode for t in self.targets):
            self.targets.append(Target(op, case, mode, min_speedup, label))

    # -- derived figures, computed once every row is in, whatever order the tests ran in

    def finalize(self) -> None:
        copy = {r.case: r for r in self.rows if r.provider == "copy" and r.gbps}
        eager = {(r.case, r.mode): r for r in self.rows if r.provider == "eager" and r.ms}
        for r in self.rows:
            if r.gbps and r.case in copy and r.provider != "copy":
                r.pct_of_copy = 100.0 * r.gbps / copy[r.case].gbps
            base = eager.get((r.case, r.mode))
            if base is not None and r.ms:
                r.speedup_vs_eager = base.ms / r.ms

    def target_lines(self, op: str) -> list[str]:
        lines = []
        for t in (t for t in self.targets if t.op == op):
            key = (op, tuple(t.case.shape), dtype_name(t.case.dtype), t.case.layout)
            ours = [r for r in self.rows if r.case == key and r.mode == t.mode and r.provider.startswith("ours-")]
            if not ours:
                lines.append(f"target {t.label}: ours ≥ {t.min_speedup:g}× eager — not measured (no backend of ours here)")
            for r in ours:
                got = r.speedup_vs_eager
                verdict = "not measured" if got is None else ("met" if got >= t.min_speedup else "NOT met")
                shown = "-" if got is None else f"{got:.2f}×"
                lines.append(f"target {t.label}: {r.provider} ≥ {t.min_speedup:g}× eager — {shown}, {verdict}")
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
            json_path.write_text(json.dumps(doc, indent=1) + "\n")
            md_path = out / f"{slug}-{op}.md"
            md_path.write_text(self.markdown(op, env) + "\n")
            self.written += [json_path, md_path]
        return self.written

    def markdown(self, op: str, env: dict) -> str:
        rows = sorted((r for r in self.rows if r.op == op), key=_row_order)
        with_launches = any(r.launches is not None for r in rows)
        head = ["shape", "layout", "dtype", "mode", "provider", "ms", "GB/s", "% of copy", "× eager"]
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
                "error" if r.error else _fmt(r.ms, "{:.4g}"),
                _fmt_num(r.gbps),
                _fmt(r.pct_of_copy, "{:.0f}%"),
                _fmt(r.speedup_vs_eager, "{:.2f}×"),
            ]
            cells += [_fmt(r.launches, "{}")] if with_launches else []
            lines.append("| " + " | ".join(cells) + " |")
        notes = self.notes.get(op, []) + self.target_lines(op)
        notes += [f"{r.provider} {r.mode} {'×'.join(map(str, r.shape))} {r.layout}: {_first_line(r.error)}"
                  for r in rows if r.error]  # fmt: skip
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        return "\n".join(lines)


def _row_order(r: Row):
    def index(seq, item):
        return seq.index(item) if item in seq else len(seq)

    return r.shape, r.layout, r.dtype, index(MODES, r.mode), index(PROVIDERS, r.provider)


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
    timing = (
        f"do_bench median (warmup {CUDA_WARMUP_MS} ms, rep {CUDA_REP_MS} ms) for kernels; "
        if device.type == "cuda"
        else ""
    ) + f"torch.utils.benchmark.Timer blocked_autorange median (≥{WALL_MIN_RUN_S} s) for wall clock"
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
