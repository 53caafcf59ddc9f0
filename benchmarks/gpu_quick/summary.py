"""OUTDIR/summary.md: one screen over results.jsonl, written last (also after a kill), and the charts.

Speedups here are computed from the raw rows of the same run (ours' ms against the baseline's ms of the same
case and mode): nothing is read from anywhere else.
"""
from __future__ import annotations

import pathlib

from . import log

MAIN_ATTENTION = ("sdxl-self-4096", "sdxl-self-1024", "cross-77-4096", "cross-77-1024")


def _f(v, spec="{:.3g}") -> str:
    return "-" if v is None else spec.format(v)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _timed(rows, step, op):
    return [r for r in rows if r.get("step") == step and r.get("kind") == "row" and r.get("op") == op]


def steps_section(rows) -> list[str]:
    starts = [r for r in rows if r.get("kind") == "start"]
    ends = {r["step"]: r for r in rows if r.get("kind") == "end"}
    done = [r for r in rows if r.get("kind") == "step"]
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("kind") == "row":
            counts[r["step"]] = counts.get(r["step"], 0) + 1
    body = []
    for r in done:
        end = ends.get(r["name"], {})
        detail = end.get("status", "")
        if end.get("failures"):
            detail += f" ({len(end['failures'])} failures)"
        if end.get("error"):
            detail += f": {end['error'][:120]}"
        body.append([r["name"], r["status"], _f(r.get("seconds"), "{:.0f}"), str(counts.get(r["name"], 0)), detail])
    started = {r["name"] for r in done}
    for r in rows:  # a step that was running when the whole pass was killed has no "step" row
        if r.get("kind") == "step-start" and r["name"] not in started:
            body.append([r["name"], "killed", "-", str(counts.get(r["name"], 0)), "pass stopped while it ran"])
    head = []
    if starts:
        s = starts[-1]
        dry = ", DRY RUN (CPU figures)" if s["dry_run"] else ""
        head = [f"suite {s['suite']}, budget {s['budget_s']:.0f} s{dry}"]
    return head + [""] + _table(["step", "status", "s", "rows", "detail"], body)


def env_section(rows) -> list[str]:
    env = next((r for r in rows if r.get("kind") == "env"), None)
    if env is None:
        return []
    gpu = env.get("gpu") or env.get("device")
    parts = [f"{gpu}", f"{env.get('sm_count')} SMs" if env.get("sm_count") else None,
             f"SM clock max {env.get('smi_clocks_max_sm')}" if env.get("smi_clocks_max_sm") else None,
             f"driver {env.get('smi_driver_version')}" if env.get("smi_driver_version") else None,
             f"CUDA {env.get('cuda')}", f"torch {env.get('torch')}", f"triton {env.get('triton')}",
             f"commit {env.get('git_commit')}", f"extension built {env.get('extension_built')}"]  # fmt: skip
    return [", ".join(p for p in parts if p)]


def ceilings_section(rows) -> list[str]:
    out = []
    for r in rows:
        if r.get("step") == "ceilings" and r.get("kind") == "row":
            if r["op"] == "copy":
                out.append(f"copy {r['shape'][0] / 2**30:.2f} GiB: {_f(r.get('gbps'), '{:.0f}')} GB/s")
            else:
                out.append(f"matmul {r['shape'][0]}³ {r.get('dtype')}: {_f(r.get('tflops'))} TFLOP/s")
    return ["ceilings: " + "; ".join(out)] if out else []


def check_section(rows) -> list[str]:
    checks = [r for r in rows if r.get("step") == "check" and r.get("kind") == "row"]
    if not checks:
        return []
    bad = [r for r in checks if not r.get("passed")]
    paths: dict[str, int] = {}
    for r in checks:
        if r.get("op") == "attention" and r.get("mode") == "fwd":
            paths[r.get("path")] = paths.get(r.get("path"), 0) + 1
    lines = [f"check: {len(checks) - len(bad)}/{len(checks)} passed; attention forward paths: "
             + ", ".join(f"{k} {v}" for k, v in paths.items())]  # fmt: skip
    for r in bad[:12]:
        what = r.get("error") or f"max err {_f(r.get('max_err'))} > limit {_f(r.get('limit'))}"
        lines.append(f"- FAILED {r.get('op')} {r.get('label')} {r.get('dtype', '')} {r.get('mode', '')}: {what}")
    return lines


def _speedups(rows, baseline: str, labels=None, metric="tflops"):
    by = {(r.get("label"), r["mode"], r["provider"]): r for r in rows if r.get("ms")}
    body = []
    for (label, mode, provider), r in by.items():
        if not provider.startswith("ours-") or (labels and label not in labels):
            continue
        base = by.get((label, mode, baseline))
        speed = base["ms"] / r["ms"] if base else None
        extra = _f(r.get(metric)) if metric == "tflops" else _f(r.get("gbps"))
        base_metric = _f(base.get(metric) if base else None) if metric == "tflops" else "-"
        body.append([label or "-", mode, provider, _f(r["ms"], "{:.4g}"), extra, base_metric, _f(speed, "{:.2f}×")])
    return body


def _gap(before: list[str], table: list[str]) -> list[str]:
    return ([""] if before and table else []) + table


def kernels_section(rows) -> list[str]:
    lines = []
    attn = _timed(rows, "kernels", "attention")
    body = _speedups(attn, "sdpa", MAIN_ATTENTION)
    lines += _table(["attention", "mode", "provider", "ms", "TFLOP/s", "sdpa TFLOP/s", "× sdpa"], body)
    gn = _timed(rows, "kernels", "group_norm_silu")
    copy = {r.get("label"): r for r in gn if r["provider"] == "copy" and r.get("gbps")}
    body = []
    for row in _speedups(gn, "eager", metric="gbps"):
        c = copy.get(row[0])
        gbps = float(row[4]) if row[4] != "-" else None
        pct = f"{100 * gbps / c['gbps']:.0f}%" if c and gbps else "-"
        body.append(row[:5] + [pct, row[6]])
    lines += _gap(lines, _table(["group_norm_silu", "mode", "provider", "ms", "GB/s", "% of copy", "× eager"], body))
    fourier = _timed(rows, "kernels", "fourier_embedding")
    body = [[r[0], r[2], r[3], r[6]] for r in _speedups(fourier, "eager", metric="gbps")]
    lines += _gap(lines, _table(["fourier_embedding", "provider", "ms", "× eager"], body))
    return lines


def _config(cfg: dict) -> str:
    """{'block_m': 128, 'num_warps': 8, 'num_stages': 2, 'tma': True} → 'm=128 w=8 st=2 tma'."""
    short = {"num_warps": "w", "num_stages": "st"}
    parts = []
    for key, value in cfg.items():
        name = short.get(key, key.removeprefix("block_"))
        if value is True:
            parts.append(name)
        elif value not in (None, False):
            parts.append(f"{name}={value}")
    return " ".join(parts)


def sweep_section(rows) -> list[str]:
    best = [r for r in rows if r.get("step") == "sweep" and r.get("kind") == "best"]
    body = [[r["family"], r["cls"], _f(r.get("default_ms"), "{:.4g}"), _f(r.get("best_ms"), "{:.4g}"),
             _f(r.get("gain"), "{:.2f}×"), _config(r.get("best") or {})] for r in best]  # fmt: skip
    return _table(["sweep family", "class", "default ms", "best ms", "gain", "best config"], body)


def model_section(rows) -> list[str]:
    its = [r for r in rows if r.get("step") == "model" and r.get("kind_of") == "it/s"]
    body = [[r["label"], r["provider"], _f(r.get("it_per_s"), "{:.3g}"), _f(r.get("peak_gib"), "{:.1f}")] for r in its]
    errors = [r for r in rows if r.get("step") == "model" and r.get("error")]
    return _table(["UNet", "provider", "it/s", "peak GiB"], body) + [
        f"- {r.get('provider')}: {r['error'][:150]}" for r in errors
    ]


def compile_section(rows) -> list[str]:
    comp = [r for r in rows if r.get("step") in ("compile_unet", "train_step", "two_stage") and r.get("ms")]
    body = [[r["step"], r.get("op", "-"), r.get("mode", "-"), r.get("provider", "-"), _f(r["ms"], "{:.4g}"),
             _f(r.get("tflops"), "{:.0f}")] for r in comp]  # fmt: skip
    return _table(["step", "op", "mode", "provider", "ms", "TFLOP/s"], body)


def render(rows) -> str:
    lines = ["# GPU quick pass", ""]
    for section in (env_section, steps_section, ceilings_section, check_section, kernels_section, sweep_section,
                    model_section, compile_section):  # fmt: skip
        part = section(rows)
        if part:
            lines += part + [""]
    return "\n".join(lines)


def write(out: pathlib.Path) -> str:
    rows = log.read(out)
    text = render(rows)
    charts = []
    try:
        from .. import charts as charts_mod

        charts = charts_mod.draw_all(rows, out)
    except Exception as exc:  # a chart never costs the summary
        text += f"\ncharts: not drawn ({type(exc).__name__}: {exc})\n"
    if charts:
        text += "\ncharts: " + ", ".join(p.name for p in charts) + "\n"
    (pathlib.Path(out) / "summary.md").write_text(text)
    return text
