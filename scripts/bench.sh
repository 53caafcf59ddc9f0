#!/usr/bin/env bash
# Sets up a fresh machine and runs the benchmarks: ours vs eager PyTorch vs torch.compile, side by side.
# Results (raw JSON + a markdown table) land in benchmarks/results/ (or $SDXL_BENCH_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
"${PYTHON:-python3}" -m pytest benchmarks/ --benchmark -q "$@"
# The attention TFLOP/s-vs-length plot, when matplotlib is installed (optional).
for json in "${SDXL_BENCH_OUT:-benchmarks/results}"/*-attention.json; do
  [ -e "$json" ] && "${PYTHON:-python3}" -m benchmarks.plot "$json" || true
done
