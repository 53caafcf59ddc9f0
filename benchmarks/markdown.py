"""The markdown tables the benchmark sessions print and write beside their JSON."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import Row

NOISY_RATIO = 2.0  # a median this many times the fastest single call is flagged in the table
BUSY_SHARE = 0.1  # so is a measurement while other processes took more than this share of the CPUs
# the order rows are listed in (others after these)
PROVIDERS = (
    "copy", "eager", "compile", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
    "ours-triton", "ours-cuda", "ours-cpu",
)  # fmt: skip
MODES = ("copy", "fwd", "bwd", "fwd+bwd")


def table(results, op: str, env: dict) -> str:
    """The markdown table of one op's rows, its notes and target verdicts."""
    rows = sorted((r for r in results.rows if r.op == op), key=_row_order)
    with_launches = any(r.launches is not None for r in rows)
    with_min = any(r.ms_min is not None for r in rows)
    with_tflops = any(r.tflops is not None for r in rows)
    with_gbps = any(r.gbps is not None for r in rows) or not with_tflops
    head = ["shape", "layout", "dtype", "mode", "provider", "ms"]
    head += ["GB/s", "% of copy"] if with_gbps else []
    head += ["TFLOP/s"] if with_tflops else []
    head += [f"× {results.baseline(op)}"]
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
    notes = results.notes.get(op, []) + results.target_lines(op)
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

