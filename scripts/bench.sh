#!/usr/bin/env bash
# Sets up a fresh machine and runs the benchmarks: ours vs eager PyTorch vs torch.compile, side by side.
# Results (raw JSON + a markdown table per op) land in benchmarks/results/ (or $SDXL_BENCH_OUT), and the charts
# (attention TFLOP/s vs length, GroupNorm+SiLU % of copy, UNet it/s) beside them as <device>-<chart>.png.
# On a GPU machine with a 15-minute slot, run `python -m benchmarks.gpu_quick OUTDIR` instead (README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
"$PY" -m pip install -q matplotlib   # the charts
"$PY" -m pytest benchmarks/ --benchmark -q "$@"
OUT=${SDXL_BENCH_OUT:-benchmarks/results}
for slug in $(ls "$OUT"/*.json 2>/dev/null | sed -E 's#.*/##; s#-[a-z_0-9]+\.json$##' | sort -u); do
  "$PY" -m benchmarks.charts "$OUT/$slug"-*.json --out "$OUT" --prefix "$slug-"
done
