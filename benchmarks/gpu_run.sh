#!/usr/bin/env bash
# One pass over a CUDA machine with no network: build, test, compile checks, benchmarks, all logged to OUTDIR.
#
#   benchmarks/gpu_run.sh OUTDIR
#
# Writes OUTDIR/env.txt, build.log, tests.log, compile_check.log, nvcc_check.log (when nvcc is there),
# bench.log, the benchmark tables (<device>-<op>.json/.md), the attention chart (<device>-attention.png, when
# matplotlib is installed; plot.log) and summary.txt (one line per step). The chart never fails the run.
# Every step runs under `timeout` against one deadline (SDXL_GPU_RUN_BUDGET_S, just under 9 minutes by
# default) that keeps BENCH_MIN_S for the benchmarks; a failing step does not stop the next, and the script
# exits 1 if any failed.
# PYTHON picks the interpreter (default python3, the one that holds torch on our GPU machines).
# The whole pass does not fit one 10-minute device command once the model benchmarks (full-size UNet, training
# step, two-stage loop, each with torch.compile) are in: split it across commands with
#   SDXL_GPU_STEPS="env build tests compile_check nvcc_check"   (default: all of them and bench)
#   SDXL_BENCH_FILES="benchmarks/test_attention.py benchmarks/test_group_norm_silu.py"   (default: benchmarks/)
#   SDXL_GPU_TESTS_S=...   the test step's cap (default 170 s with the benchmarks, 420 s without)
# A later command on the same warm machine finds the build in place.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PY=${PYTHON:-python3}
BUDGET_S=${SDXL_GPU_RUN_BUDGET_S:-525}  # 9 minutes, less the slack of timeout --kill-after
BENCH_MIN_S=150
START=$SECONDS
FAILED=()
: >"$OUT/summary.txt"

# step NAME LOG CAP_S KEEP_S CMD...: run CMD for at most CAP_S seconds, leaving KEEP_S of the budget for later
# steps; output goes to the terminal and OUT/LOG.
step() {
    local name=$1 log=$2 cap=$3 keep=$4
    shift 4
    local left=$((BUDGET_S - (SECONDS - START) - keep))
    local limit=$((cap < left ? cap : left))
    local t0=$SECONDS rc
    if ((limit < 5)); then
        echo "[$name] not run: the time budget is spent" | tee "$OUT/$log"
        rc=-1
    else
        echo "[$name] $* (limit ${limit}s)" | tee "$OUT/$log"
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
        rc=${PIPESTATUS[0]}
    fi
    local verdict=ok
    if ((rc == -1)); then
        verdict="not run (no time)"
    elif ((rc == 124 || rc == 137)); then
        verdict="timed out"
    elif ((rc != 0)); then
        verdict="failed (rc $rc)"
    fi
    ((rc == 0)) || FAILED+=("$name")
    printf '%-14s %-18s %4ss  %s\n' "$name" "$verdict" "$((SECONDS - t0))" "$log" | tee -a "$OUT/summary.txt"
}

environment() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem --format=csv
    if command -v nvcc >/dev/null; then nvcc --version; else echo "nvcc: not found"; fi
    "$PY" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB")
else:
    print("device: no CUDA device visible to torch")
EOF
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|pybind11|ninja|setuptools|numpy) '
    return 0  # a missing tool is information here, not a failure
}

build() {
    # Objects or a _C built against another torch/python (e.g. the CPU build of the checkout this came from)
    # must not be linked or loaded here.
    rm -rf build sdxl_kernels/_C*.so
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e . || return
    "$PY" - <<'EOF'
import os
import torch
from torch.utils import cpp_extension
from sdxl_kernels import backends
cpu, cuda = backends.cpu_extension_available(), backends.cuda_extension_available()
home = cpp_extension.CUDA_HOME
want_cuda = bool(torch.version.cuda and home and os.path.exists(os.path.join(home, "bin", "nvcc")))  # as setup.py
print(f"sdxl_kernels._C: cpu kernels {cpu}, cuda kernels {cuda} (expected: {want_cuda})")
raise SystemExit(0 if cpu and (cuda or not want_cuda) else 1)
EOF
}

export -f environment build  # `timeout` runs programs, so the steps above run as `bash -c NAME`

has_nvcc() {
    command -v nvcc >/dev/null || [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]
}

STEPS=" ${SDXL_GPU_STEPS:-env build tests compile_check nvcc_check bench} "
wanted() { [[ $STEPS == *" $1 "* ]]; }
read -r -a BENCH_FILES <<<"${SDXL_BENCH_FILES:-benchmarks/}"
TESTS_CAP_S=${SDXL_GPU_TESTS_S:-170}
if ! wanted bench; then  # a command without the benchmarks gives the test suite most of its time
    BENCH_MIN_S=0
    TESTS_CAP_S=${SDXL_GPU_TESTS_S:-420}
fi

wanted env && step env env.txt 30 "$BENCH_MIN_S" bash -c environment
wanted build && step build build.log 200 "$BENCH_MIN_S" bash -c build
wanted tests && step tests tests.log "$TESTS_CAP_S" "$BENCH_MIN_S" "$PY" -m pytest tests/ -x -q -p no:cacheprovider
wanted compile_check && step compile_check compile_check.log 75 "$BENCH_MIN_S" "$PY" -m sdxl_kernels.tools.compile_check
if wanted nvcc_check; then
    if has_nvcc; then
        step nvcc_check nvcc_check.log 60 "$BENCH_MIN_S" "$PY" -m sdxl_kernels.tools.nvcc_check
    else
        echo "nvcc_check     skipped (no nvcc)" | tee -a "$OUT/summary.txt"
    fi
fi
wanted bench && step bench bench.log 480 0 env SDXL_BENCH_OUT="$OUT" "$PY" -m pytest "${BENCH_FILES[@]}" --benchmark -q -p no:cacheprovider

# The attention chart: optional equipment, so it is not a step (a failure here is logged, never counted).
plot() {
    local json
    if ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
        echo "plot           skipped (matplotlib is not installed)" | tee -a "$OUT/summary.txt"
        return 0
    fi
    for json in "$OUT"/*-attention.json; do
        [[ -e $json ]] || { echo "plot           skipped (no attention results)" | tee -a "$OUT/summary.txt"; break; }
        if timeout --kill-after=5 60 "$PY" -m benchmarks.plot "$json" >>"$OUT/plot.log" 2>&1; then
            echo "plot           ok                       $(basename "${json%.json}.png")" | tee -a "$OUT/summary.txt"
        else
            echo "plot           failed (not counted)     plot.log" | tee -a "$OUT/summary.txt"
        fi
    done
    return 0
}
plot

echo "total $((SECONDS - START))s; outputs in $OUT" | tee -a "$OUT/summary.txt"
if ((${#FAILED[@]})); then
    echo "failed: ${FAILED[*]}" | tee -a "$OUT/summary.txt"
    exit 1
fi
