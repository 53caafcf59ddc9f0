"""The charts beside the tables, drawn from result rows (a pytest benchmark's JSON or the quick pass's
results.jsonl): nothing here measures.

  attention.png        TFLOP/s against sequence length, one bar per provider, forward and backward panels
                       (the chart the FlashAttention README shows)
  group_norm_silu.png  GroupNorm+SiLU as % of the copy of the same bytes, per SDXL shape and layout
  unet.png             SDXL UNet iterations per second: eager / ours / ours + CUDA graphs (and compile)

    python -m benchmarks.charts RESULTS [RESULTS ...] [--out DIR] [--prefix P]

RESULTS: `<device>-<op>.json` files or a results.jsonl. Needs matplotlib (Agg backend, no display). No torch
import: it runs wherever the rows are.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections import defaultdict

MODES = {"fwd": "forward", "bwd": "backward"}
ORDER = ("copy", "eager", "compile", "ours-triton", "ours-cuda", "ours-cpu", "ours", "ours-graphs", "compile-ours",
         "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math")  # fmt: skip
COLORS = {  # fixed per provider, so charts of different runs compare at a glance
    "ours-triton": "#d62728",
    "ours": "#d62728",
    "ours-graphs": "#8c1c13",
    "ours-cuda": "#e377c2",
    "ours-cpu": "#bcbd22",
    "eager": "#7f7f7f",
    "compile": "#17becf",
    "compile-ours": "#ff9896",
    "sdpa": "#1f77b4",
    "sdpa-cudnn": "#9467bd",
    "sdpa-flash": "#2ca02c",
    "sdpa-efficient": "#ff7f0e",
    "sdpa-math": "#c7c7c7",
}


def _order(p: str):
    return (ORDER.index(p) if p in ORDER else len(ORDER), p)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, data: dict[str, dict], xs: list, fmt) -> dict:
    """Grouped bars: data {provider: {x: value}}; returns {provider: a bar container} for the legend."""
    providers = sorted(data, key=_order)
    width = 0.8 / max(1, len(providers))
    top = max((v for p in providers for v in data[p].values()), default=1.0) or 1.0
    handles = {}
    for i, provider in enumerate(providers):
        offset = (i - (len(providers) - 1) / 2) * width
        pos = [j + offset for j, x in enumerate(xs) if x in data[provider]]
        vals = [data[provider][x] for x in xs if x in data[provider]]
        bars = handles[provider] = ax.bar(pos, vals, width, label=provider, color=COLORS.get(provider))
        ax.bar_label(bars, labels=[fmt(v, top) for v in vals], fontsize=6, padding=1,
                     rotation=90 if len(providers) > 4 else 0)  # fmt: skip
    ax.set_ylim(0, top * 1.2)
    ax.grid(axis="y", alpha=0.3)
    return handles


def _num(v: float, top: float) -> str:
    return f"{v:.0f}" if top >= 10 else f"{v:.2g}"


def _finish(fig, handles: dict, title: str, out: pathlib.Path) -> pathlib.Path:
    order = sorted(handles, key=_order)
    fig.legend([handles[p] for p in order], order, loc="lower center", ncol=min(len(order), 7), fontsize=8,
               frameon=False)  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=130)
    _plt().close(fig)
    return out


def _subtitle(meta: dict) -> str:
    dry = " (DRY RUN: CPU figures)" if meta.get("step") and meta.get("device_type") == "cpu" else ""  # quick pass
    versions = f"torch {meta.get('torch')}, triton {meta.get('triton')}, commit {meta.get('git_commit')}"
    return f"{meta.get('device', '?')}{dry}; {versions}"


# ---- attention ------------------------------------------------------------------------------------------------


def attention_sweep(rows: list[dict]) -> tuple[tuple, dict[str, dict[str, dict[int, float]]]]:
    """(B, H, D, dtype, layout) of the longest self-attention sweep, and {mode: {provider: {L: TFLOP/s}}}."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("op") != "attention" or len(r.get("shape") or ()) != 5 or not r.get("tflops"):
            continue
        b, h, lq, lk, d = r["shape"]
        if lq == lk and r["mode"] in MODES:
            groups[(b, h, d, r["dtype"], r["layout"])].append(r)
    if not groups:
        raise ValueError("no timed self-attention rows with TFLOP/s")
    key = max(groups, key=lambda g: (len({r["shape"][2] for r in groups[g]}), g[4] == "blhd", len(groups[g])))
    data: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in groups[key]:
        data[r["mode"]][r["provider"]][r["shape"][2]] = r["tflops"]
    return key, data


def attention_chart(rows: list[dict], out: pathlib.Path, meta: dict) -> pathlib.Path:
    plt = _plt()
    (b, h, d, dtype, layout), data = attention_sweep(rows)
    modes = [m for m in MODES if m in data]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    handles = {}
    for ax, mode in zip(axes[0], modes):
        lengths = sorted({n for p in data[mode] for n in data[mode][p]})
        handles |= _bars(ax, data[mode], lengths, _num)
        ax.set_xticks(range(len(lengths)), [_length(n) for n in lengths])
        ax.set_xlabel("sequence length (Lq = Lk)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(MODES[mode])
    title = f"attention: B={b}, H={h}, D={d}, {dtype}, layout {layout}\n{_subtitle(meta)}"
    return _finish(fig, handles, title, out)


# ---- GroupNorm + SiLU ------------------------------------------------------------------------------------------


def _case_name(r: dict) -> str:
    layout = r.get("layout")
    return r.get("label") or "×".join(map(str, r["shape"])) + (f" {layout}" if layout and layout != "-" else "")


def group_norm_chart(rows: list[dict], out: pathlib.Path, meta: dict) -> pathlib.Path:
    """% of the copy of the same bytes (from the copy rows of the same run), per case, fwd and bwd panels."""
    plt = _plt()
    gn = [r for r in rows if r.get("op") == "group_norm_silu" and r.get("gbps")]
    copy = {(_case_name(r), r["dtype"]): r["gbps"] for r in gn if r["provider"] == "copy"}
    data: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in gn:
        base = copy.get((_case_name(r), r["dtype"]))
        if r["provider"] != "copy" and base and r["mode"] in MODES:
            data[r["mode"]][r["provider"]][_case_name(r)] = 100.0 * r["gbps"] / base
    if not data:
        raise ValueError("no GroupNorm rows with a copy yardstick")
    modes = [m for m in MODES if m in data]
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.8), squeeze=False)
    handles = {}
    for ax, mode in zip(axes[0], modes):
        cases = sorted({c for p in data[mode] for c in data[mode][p]})
        handles |= _bars(ax, data[mode], cases, lambda v, top: f"{v:.0f}")
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("% of copy bandwidth")
        ax.axhline(100, color="black", lw=0.6, ls="--")
        ax.set_title(MODES[mode])
    return _finish(fig, handles, f"GroupNorm+SiLU as % of a copy of the same bytes\n{_subtitle(meta)}", out)


# ---- the UNet -------------------------------------------------------------------------------------------------


def unet_chart(rows: list[dict], out: pathlib.Path, meta: dict) -> pathlib.Path:
    plt = _plt()
    unet = [r for r in rows if r.get("op") == "sdxl_unet" and r.get("ms") and r.get("mode") == "fwd"]
    if not unet:
        raise ValueError("no timed UNet rows")
    data: dict[str, dict[str, float]] = defaultdict(dict)
    for r in unet:
        data[r["provider"]][_case_name(r)] = 1e3 / r["ms"]
    cases = sorted({c for p in data for c in data[p]})
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    handles = _bars(ax, data, cases, lambda v, top: f"{v:.3g}")
    ax.set_xticks(range(len(cases)), cases, fontsize=8)
    ax.set_ylabel("iterations / s (one call = one sampling step)")
    return _finish(fig, handles, f"SDXL UNet forward\n{_subtitle(meta)}", out)


CHARTS = {"attention": attention_chart, "group_norm_silu": group_norm_chart, "unet": unet_chart}


def draw_all(rows: list[dict], out_dir: pathlib.Path, prefix: str = "") -> list[pathlib.Path]:
    """Every chart these rows have data for, as OUT_DIR/<prefix><chart>.png; the paths drawn."""
    meta = next((r for r in rows if r.get("kind") == "env"), None) or (rows[0] if rows else {})
    pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, draw in CHARTS.items():
        try:
            drawn.append(draw(rows, pathlib.Path(out_dir) / f"{prefix}{name}.png", meta))
        except ValueError:  # no rows for this chart in these files
            continue
    return drawn


def load_rows(path: pathlib.Path) -> list[dict]:
    """Rows of a benchmark JSON (environment fields copied into each row) or of a results.jsonl."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    doc = json.loads(text)
    env = {k: v for k, v in doc.items() if k != "rows"}
    return [env | r for r in doc.get("rows", [])]


def _length(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.charts", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=pathlib.Path, nargs="+", help="<device>-<op>.json files or a results.jsonl")
    parser.add_argument("--out", type=pathlib.Path, help="folder for the PNGs (default: beside the first file)")
    parser.add_argument("--prefix", default="", help="file name prefix, e.g. the device slug")
    args = parser.parse_args(argv)
    rows = []
    try:
        for path in args.results:
            rows += load_rows(path)
    except (OSError, ValueError) as exc:
        print(f"benchmarks.charts: {exc}", file=sys.stderr)
        return 1
    drawn = draw_all(rows, args.out or args.results[0].parent, args.prefix)
    for path in drawn:
        print(f"wrote {path}")
    if not drawn:
        print("benchmarks.charts: no rows any chart can draw", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
