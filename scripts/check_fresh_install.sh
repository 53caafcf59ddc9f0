#!/usr/bin/env bash
# A new user's install, checked: a fresh venv with only the pinned CPU torch, then
#   pip install --no-build-isolation -e ".[train]"
# from a copy of the tracked tree, and the first commands a user runs. Fails on any missing dependency or
# package data (ModuleNotFoundError, the CLIP vocabulary, the tile tables). .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/src"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$WORK/src"   # what a clone holds
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q --upgrade pip
"$V/python" -m pip install -q "torch==2.13.0"                      # the CPU wheel
"$V/python" -m pip install -q setuptools wheel ninja "pybind11>=2.12"  # build tools (--no-build-isolation)
(cd "$WORK/src" && "$V/python" -m pip install -q --no-build-isolation -e ".[train]")
if "$V/python" -c "import torchvision" 2>/dev/null; then
  echo "check_fresh_install: the install pulled torchvision, which does not import beside the CPU torch" >&2
  exit 1
fi
cd "$WORK"
"$V/python" -c "import sdxl_model, sdxl_kernels; from sdxl_kernels import backends as b; \
print('import ok; C++ extension:', b.cpu_extension_available())"
"$V/sdxl" generate "a cat" --preset tiny --steps 2 --out "$WORK/cat.png"
test -s "$WORK/cat.png"
"$V/python" -m sdxl_model.train.synthetic "$WORK/shapes" --n 8
"$V/sdxl" train --preset tiny --data "$WORK/shapes" --out "$WORK/run" --max-steps 5 --sample-every 0 --device cpu
test -s "$WORK/run/unet.safetensors"
echo "check_fresh_install: ok (fresh venv, pip install -e .[train], import, sdxl generate, 5-step sdxl train)"
