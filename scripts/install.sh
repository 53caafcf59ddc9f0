#!/usr/bin/env bash
# Installs what the project needs (CPU torch from the pinned wheel, Triton, build and test tools) and builds
# the C++ extension in place. Idempotent; used by scripts/test.sh, scripts/bench.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"   # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
fi
"$PY" -m pip install -q "triton>=3.6" ninja "pybind11>=2.12" numpy pytest hypothesis safetensors
# Text side: transformers (CLIP text encoders; needs no torch of its own), regex + ftfy (CLIP BPE tokenizer), and
# open_clip_torch only for the BPE vocabulary file it ships: --no-deps, and it is never imported (it would pull
# torchvision/timm, which do not fit this torch).
"$PY" -m pip install -q "transformers>=5" regex ftfy
"$PY" -m pip install -q --no-deps "open_clip_torch>=2.20"
# Training data (webdataset tar shards) and the drop-in patch tests (diffusers models; imported only by tests).
"$PY" -m pip install -q webdataset diffusers tqdm matplotlib
# The extension (C++ CPU kernels; CUDA kernels too when torch has CUDA and nvcc is found).
"$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
"$PY" -c "import sdxl_kernels, sdxl_kernels.backends as b; print('sdxl_kernels', sdxl_kernels.__version__, '| C++ extension:', b.cpu_extension_available(), '| CUDA kernels:', b.cuda_extension_available())"
