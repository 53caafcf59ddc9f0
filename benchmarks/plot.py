"""TFLOP/s against sequence length, one bar per provider, one panel per mode (forward, backward): the chart the
FlashAttention README shows, drawn from an attention benchmark's JSON (benchmarks/test_attention.py).

    python -m benchmarks.plot RESULTS_JSON [OUT_PNG]

OUT_PNG defaults to the JSON's name with .png (`<device-slug>-attention.png` beside it). The sweep drawn is the
largest group of self-attention rows (Lq = Lk) sharing B, H, D, dtype and layout; error rows are left out.
Needs matplotlib (Agg backend, no display); without it, says so and exits 0, so a GPU run never fails on it.
No torch import: it runs wherever the JSON is.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections import defaultdict

MODES = {"fwd": "forward", "bwd": "backward"}
ORDER = ("ours-triton", "sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math")  # bars, left to right
COLORS = {  # fixed per provider, so charts of different runs compare at a glance
    "ours-triton": "#d62728",
    "sdpa": "#1f77b4",
    "sdpa-cudnn": "#9467bd",
    "sdpa-flash": "#2ca02c",
    "sdpa-efficient": "#ff7f0e",
    "sdpa-math": "#7f7f7f",
}


def sweep(doc: dict) -> tuple[tuple, dict[str, dict[str, dict[int, float]]]]:
    """(B, H, D, dtype, layout) of the longest self-attention sweep, and {mode: {provider: {L: TFLOP/s}}}."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in doc["rows"]:
        b, h, lq, lk, d = r["shape"]
        if lq == lk and r.get("tflops") and r["mode"] in MODES:
            groups[(b, h, d, r["dtype"], r["layout"])].append(r)
    if not groups:
        raise ValueError("no timed self-attention rows with TFLOP/s in this file")
    key = max(groups, key=lambda g: (len({r["shape"][2] for r in groups[g]}), g[4] == "blhd", len(groups[g])))
    data: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in groups[key]:
        data[r["mode"]][r["provider"]][r["shape"][2]] = r["tflops"]
    return key, data


def draw(doc: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (b, h, d, dtype, layout), data = sweep(doc)
    modes = [m for m in MODES if m in data]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    handles = {}  # provider -> a bar of it, for the one legend under the panels
    for ax, mode in zip(axes[0], modes):
        providers = sorted(data[mode], key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))
        lengths = sorted({n for p in providers for n in data[mode][p]})
        width = 0.8 / len(providers)
        top = max(v for p in providers for v in data[mode][p].values())
        for i, provider in enumerate(providers):
            offset = (i - (len(providers) - 1) / 2) * width
            xs = [j + offset for j, n in enumerate(lengths) if n in data[mode][provider]]
            ys = [data[mode][provider][n] for n in lengths if n in data[mode][provider]]
            bars = handles[provider] = ax.bar(xs, ys, width, label=provider, color=COLORS.get(provider))
            labels = [f"{y:.0f}" if top >= 10 else f"{y:.2g}" for y in ys]
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1, rotation=90 if len(providers) > 4 else 0)
        ax.set_xticks(range(len(lengths)), [_length(n) for n in lengths])
        ax.set_xlabel("sequence length (Lq = Lk)")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(0, top * 1.18)
        ax.set_title(MODES[mode])
        ax.grid(axis="y", alpha=0.3)
    order = sorted(handles, key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))
    fig.legend([handles[p] for p in order], order, loc="lower center", ncol=len(order), fontsize=8, frameon=False)
    fig.suptitle(
        f"attention on {doc.get('device', '?')}: B={b}, H={h}, D={d}, {dtype}, layout {layout}\n"
        f"torch {doc.get('torch')}, triton {doc.get('triton')}, commit {doc.get('git_commit')}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=130)
    plt.close(fig)


def _length(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_json", type=pathlib.Path, help="<device-slug>-attention.json")
    parser.add_argument("out_png", type=pathlib.Path, nargs="?", help="default: the JSON's path with .png")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("benchmarks.plot: matplotlib is not installed, no plot drawn (pip install matplotlib)")
        return 0
    out = args.out_png or args.results_json.with_suffix(".png")
    try:
        doc = json.loads(args.results_json.read_text())
        draw(doc, out)
    except (OSError, ValueError, KeyError) as exc:
        print(f"benchmarks.plot: {args.results_json}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
