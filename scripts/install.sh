#!/usr/bin/env bash
# Installs what the project needs (CPU torch from the pinned wheel, the build tools) and the project itself with
# its test and benchmark extras (pyproject.toml), building the C++ extension in place. Idempotent; used by
# scripts/test.sh, scripts/bench.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"   # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
fi
# Build tools for --no-build-isolation (which builds against the torch installed above, not a fresh download).
"$PY" -m pip install -q setuptools wheel ninja "pybind11>=2.12"
# The project, its dependencies and extras: test (train + diffusers + pytest, hypothesis, matplotlib), bench.
"$PY" -m pip install -q --no-build-isolation -e ".[test,bench]"
"$PY" -c "import sdxl_kernels, sdxl_kernels.backends as b; print('sdxl_kernels', sdxl_kernels.__version__, '| C++ extension:', b.cpu_extension_available(), '| CUDA kernels:', b.cuda_extension_available())"
