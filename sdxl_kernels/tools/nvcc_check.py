"""Ahead-of-time check of the CUDA sources: compile every csrc/cuda/*.cu with
nvcc for each target arch, print ptxas resource usage per kernel, and fail on
register spills or compile errors. Needs nvcc, not a GPU.

    python -m sdxl_kernels.tools.nvcc_check [--arch sm_80 sm_90] [--src DIR]

Exit status: 0 when every kernel compiled without spills (or nvcc is missing:
then a line starting with SKIPPED says so), 1 on a spill or compile error,
2 when the source directory is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import ptxas
from .ptxas import Kernel

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
DEFAULT_ARCHS = ("sm_80", "sm_90")


def find_nvcc() -> str | None:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def parse_ptxas(text: str, file: str) -> list[Kernel]:
    """Kernels from `-Xptxas -v` output, in the order ptxas reports them."""
    return ptxas.parse(text, file)


def compile_one(nvcc: str, src: Path, arch: str, out_dir: str) -> tuple[list[Kernel], str | None]:
    """Returns the kernels, and the compiler output when compilation failed."""
    obj = os.path.join(out_dir, f"{src.stem}.{arch}.o")
    cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-c", "-O3", "-Xptxas", "-v", str(src), "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return [], f"$ {' '.join(cmd)}\n{output}"
    return parse_ptxas(output, src.name), None


def short_names(mangled: list[str]) -> list[str]:
    """`gn_fwd_apply_kernel<float, true, false>` from the mangled symbol."""
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if filt is None or not mangled:
        return mangled
    proc = subprocess.run([filt], input="\n".join(mangled), capture_output=True, text=True)
    names = proc.stdout.splitlines()
    if proc.returncode != 0 or len(names) != len(mangled):
        return mangled
    out = []
    for name in names:
        name = re.sub(r"^void ", "", name)
        name = name.replace("(anonymous namespace)::", "").replace("sdxl_kernels::", "")
        out.append(name.split("(", 1)[0])
    return out


def print_table(kernels: list[Kernel]) -> None:
    names = short_names([k.name for k in kernels])
    header = ("file", "kernel", "arch", "regs", "smem", "stack", "spill st", "spill ld")
    rows = [
        (k.file, n, k.arch, str(k.registers), str(k.smem), str(k.stack), str(k.spill_stores), str(k.spill_loads))
        for k, n in zip(kernels, names)
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="targets, e.g. sm_80 sm_90")
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="directory of .cu files")
    parser.add_argument("-j", "--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("SKIPPED: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        return 0
    sources = sorted(args.src.glob("*.cu"))
    if not sources:
        print(f"error: no .cu files under {args.src}", file=sys.stderr)
        return 2

    jobs = [(src, arch) for src in sources for arch in args.arch]
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: compile_one(nvcc, job[0], job[1], out_dir), jobs))

    kernels = [k for ks, _ in results for k in ks]
    errors = [err for _, err in results if err is not None]
    print_table(kernels)
    for err in errors:
        print(f"\ncompile error:\n{err}", file=sys.stderr)
    spilled = [k for k in kernels if k.spills]
    max_regs = max((k.registers for k in kernels), default=0)
    print(
        f"\n{len(kernels)} kernel builds ({len(sources)} files x {len(args.arch)} archs), "
        f"max {max_regs} registers, {len(spilled)} with spills, {len(errors)} compile errors"
    )
    return 1 if spilled or errors else 0


if __name__ == "__main__":
    sys.exit(main())
