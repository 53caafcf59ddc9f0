"""Rows of one benchmark session and the files they become (`<out>/<device-slug>-<op>.json` and `.md`).

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
(the table), overwriting the last run's; out is $SDXL_BENCH_OUT or benchmarks/results/. A `sink` given to
Results gets each row the moment it is added (the GPU quick pass appends it to its results.jsonl).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Callable

import torch

from . import environment as envmod
from . import markdown
from . import timing as timing_mod


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration of one op."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "-"  # "nchw", "channels_last", or "-" where memory format does not apply
    label: str | None = dataclasses.field(default=None, compare=False)  # the shape class ("sdxl-self-4096")

    def __str__(self) -> str:  # the pytest id
        parts = ["x".join(map(str, self.shape)), dtype_name(self.dtype)]
        return "-".join(parts + ([self.layout] if self.layout != "-" else []))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    label: str | None = None  # the case's shape class, where it has one
    path: str | None = None  # which code path of our kernel served it (attention: "tma" / "pointers")

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

    def __init__(self, sink: Callable[[Row], None] | None = None) -> None:
        self.sink = sink  # called with each row as it is added
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
        timing: timing_mod.Timing | None = None,
        nbytes: float | None = None,
        launches: int | None = None,
        error: str | None = None,
        flops: float | None = None,
        path: str | None = None,
    ) -> Row:
        row = Row(
            op=op,
            shape=list(case.shape),
            dtype=dtype_name(case.dtype),
            layout=case.layout,
            mode=mode,
            provider=provider,
            ms=timing.ms if timing else None,
            gbps=timing_mod.gbps(nbytes, timing.ms) if timing and nbytes else None,
            launches=launches,
            error=error,
            ms_min=timing.ms_min if timing else None,
            others_cpu=timing.others_cpu if timing else None,
            tflops=timing_mod.tflops(flops, timing.ms) if timing and flops else None,
            label=case.label,
            path=path,
        )
        self.rows.append(row)
        if self.sink is not None:
            self.sink(row)
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
        out = pathlib.Path(os.environ.get(envmod.OUT_ENV) or envmod.RESULTS_DIR)
        out.mkdir(parents=True, exist_ok=True)
        env = self.env = envmod.environment(device)
        slug = envmod.slugify(env["device"])
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
        return markdown.table(self, op, env)


def error_text(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


RESULTS = Results()
