#!/usr/bin/env bash
# Sets up a fresh machine and runs the test suite (Triton kernels run in the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest tests/ -q --durations=15 "$@"
