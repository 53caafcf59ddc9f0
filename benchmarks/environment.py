"""What the numbers depend on: the device under test, the machine, the versions, the commit.

SDXL_BENCH_DEVICE=cpu times the CPU on a GPU machine; SDXL_BENCH_THREADS=n sets torch's CPU threads;
SDXL_BENCH_OUT is where the pytest benchmarks write their tables (default benchmarks/results/).
Nothing here imports triton or sdxl_kernels at import time: tests/conftest.py must get to set TRITON_INTERPRET
before triton's first import when tests/ and benchmarks/ are collected in one session.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import subprocess

import torch

from . import timing as timers

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
OUT_ENV = "SDXL_BENCH_OUT"
DEVICE_ENV = "SDXL_BENCH_DEVICE"
THREADS_ENV = "SDXL_BENCH_THREADS"


def configure_threads() -> None:
    """SDXL_BENCH_THREADS=n times the CPU with n threads instead of torch's default."""
    n = os.environ.get(THREADS_ENV, "").strip()
    if n:
        torch.set_num_threads(int(n))


def bench_device() -> torch.device:
    """CUDA when there is a GPU; SDXL_BENCH_DEVICE=cpu runs the CPU benchmarks on a GPU machine."""
    if os.environ.get(DEVICE_ENV, "").strip().lower() == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")



def environment(device: torch.device) -> dict:
    """What the numbers depend on; deliberately no hostname."""
    import sdxl_kernels
    from sdxl_kernels import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        timing = (
            f"kernels: do_bench median (warmup {timers.CUDA_WARMUP_MS} ms, rep {timers.CUDA_REP_MS} ms); wall clock: "
            f"torch.utils.benchmark.Timer blocked_autorange median (≥{timers.WALL_MIN_RUN_S} s)"
        )
    else:
        timing = (
            f"wall clock of single calls, providers taking turns call by call; median over ≥{timers.WALL_MIN_CALLS} "
            f"rounds and ≥{timers.WALL_MIN_RUN_S} s per provider, after {timers.WALL_WARMUP_CALLS} warm-up calls"
        )
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # CPU noise
        "sdxl_kernels": sdxl_kernels.__version__,
        "extension_built": backends.cpu_extension_available(),
        "extension_cuda": backends.cuda_extension_available(),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": timing,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2]
                break
    except OSError:
        pass
    model = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$", " ", model, flags=re.IGNORECASE)
    return " ".join(["CPU", *model.split()])  # 'CPU Intel Xeon Platinum 8481C'


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=pathlib.Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None

