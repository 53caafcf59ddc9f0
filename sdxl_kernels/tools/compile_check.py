"""Ahead-of-time compile of every Triton kernel variant for sm_80 and sm_90, no GPU needed.

    python -m sdxl_kernels.tools.compile_check [--arch 80 90] [--jobs N] [--json FILE] [--no-candidates]
                                               [--slice K/N]

The variants: every config of the tables in force (sdxl_kernels.configs: the packaged sm80.json/sm90.json, or
a new file through SDXL_KERNELS_CONFIGS=file.json, which checks it before it is committed) in every dtype and
flag combination the launchers use, then every sweep candidate (configs.candidates) in one dtype, rows
labelled "candidate" (each op's compile_specs says which variants). --no-candidates builds the tables only.
--slice K/N builds the K-th of N interleaved slices: every N-th variant of each (kernel, arch, TMA or not,
table or candidate) group, and at least one of each group, so every slice still meets every kernel and path
(the test suite's default run takes one slice, rotating by day; `pytest --slow` builds them all).

Each variant goes through `triton.compile(..., target=GPUTarget("cuda", arch, 32))`; the PTX then goes
through the `ptxas` that ships with Triton with `-v`, which reports registers, spills and static shared
memory, whether the PTX uses Hopper's warpgroup MMA (`wgmma`, sm_90 only) and its tensor memory accelerator
(`tma`: cp.async.bulk.tensor). Prints one row per (kernel,
config, arch); exits 1 on any spill, on shared memory over the arch's limit, or on a failed compile.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile

from . import ptxas

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block (opt-in maximum)
PTXAS_ARCH = {80: "sm_80", 90: "sm_90a"}


def all_specs(candidates: bool = True):
    from ..ops import attention, fourier_embedding, group_norm_silu

    specs = (
        [("group_norm_silu", s) for s in group_norm_silu.compile_specs()]
        + [("fourier_embedding", s) for s in fourier_embedding.compile_specs()]
        + [("attention", s) for s in attention.compile_specs()]
    )
    return [(op, s) for op, s in specs if candidates or not s.candidate]


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (its PTX version matches that ptxas)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # Triton >= 3.7: one ptxas per arch range

        return get_ptxas(arch).path
    except ImportError:
        from triton import knobs

        return knobs.nvidia.ptxas.path


def parse_ptxas(text: str) -> dict:
    """Registers, spills and static shared memory of the one kernel in `ptxas -v` output."""
    kernels = ptxas.parse(text)
    k = kernels[0] if kernels else ptxas.Kernel("", "", "")
    return {"registers": k.registers, "spill_stores": k.spill_stores, "spill_loads": k.spill_loads,
            "static_smem": k.smem}


def compile_one(job: tuple[int, int, bool]) -> dict:
    index, arch, candidates = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    op, spec = all_specs(candidates)[index]
    row = {"op": op, "kernel": spec.fn.__name__, "config": spec.label, "arch": f"sm_{arch}", "warps": spec.num_warps,
           "candidate": spec.candidate}  # fmt: skip
    try:
        # Arguments a spec declares divisible by 16 get the hint the JIT gives aligned pointers and strides.
        names = spec.fn.arg_names
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible_by_16 if n in names}
        src = ASTSource(fn=spec.fn, signature=spec.signature(), constexprs=spec.constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.options())
        row["triton_smem"] = int(compiled.metadata.shared)
        row["wgmma"] = "wgmma.mma_async" in compiled.asm["ptx"]
        row["tma"] = "cp.async.bulk.tensor" in compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            cmd = [ptxas_path(arch), f"-arch={PTXAS_ARCH[arch]}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")]
            res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip()[-500:])
        row |= parse_ptxas(res.stderr + res.stdout)
        row["smem"] = max(row["triton_smem"], row["static_smem"])
        row["error"] = None
    except Exception as e:  # reported in the table and fails the run
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return row


def problems(row: dict) -> list[str]:
    if row["error"]:
        return [row["error"]]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']}B stores / {row['spill_loads']}B loads")
    arch = int(row["arch"][3:])
    if row["smem"] > SMEM_LIMIT[arch]:
        out.append(f"shared memory {row['smem']}B > {SMEM_LIMIT[arch]}B")
    return out


def take_slice(jobs: list, specs: list, k: int, n: int) -> list:
    """The K-th of N slices of `jobs` ((index, arch, candidates) tuples): within each (kernel, arch, TMA,
    candidate) group in order, the variants at positions ≡ K (mod N), or the (K mod size)-th when none is."""
    groups: dict[tuple, list] = {}
    for job in jobs:
        spec = specs[job[0]][1]
        groups.setdefault((spec.fn.__name__, job[1], " TMA" in spec.label, spec.candidate), []).append(job)
    keep = set()
    for members in groups.values():
        chosen = members[k::n] or [members[k % len(members)]]
        keep.update(chosen)
    return [job for job in jobs if job in keep]


def _slice_arg(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    k, n = int(k), int(n)
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--slice K/N needs 0 <= K < N, got {text}")
    return k, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-candidates", action="store_true", help="the tables' configs only")
    parser.add_argument("--slice", type=_slice_arg, metavar="K/N", help="the K-th of N interleaved slices only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    candidates = not args.no_candidates
    specs = all_specs(candidates)
    # A spec may name the archs whose config tables pick it (attention's tiles differ per arch).
    jobs = [(i, a, candidates) for a in args.arch for i, (_, spec) in enumerate(specs) if a in spec.archs]
    total = len(jobs)
    if args.slice:
        jobs = take_slice(jobs, specs, *args.slice)
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_one, jobs, chunksize=4))

    header = (
        f"{'kernel':<24} {'config':<46} {'arch':<6} {'warps':>5} {'regs':>5} {'smem':>7} {'spills':>7} {'wgmma':>5} {'tma':>3}"
        "  status"
    )
    print(header)
    print("-" * len(header))
    bad = 0
    for row in rows:
        issues = problems(row)
        bad += bool(issues)
        spills = row.get("spill_stores", 0) + row.get("spill_loads", 0)
        wgmma = "-" if row["arch"] != "sm_90" or "wgmma" not in row else ("yes" if row["wgmma"] else "no")
        tma = "-" if "tma" not in row else ("yes" if row["tma"] else "no")
        print(
            f"{row['kernel']:<24} {row['config']:<46} {row['arch']:<6} {row['warps']:>5} "
            f"{row.get('registers', -1):>5} {row.get('smem', 0):>7} {spills:>7} {wgmma:>5} {tma:>3}  {'; '.join(issues) or 'ok'}"
        )
    part = f" (slice {args.slice[0]}/{args.slice[1]} of {total})" if args.slice else ""
    print(f"\n{len(rows)} variants compiled for {', '.join(f'sm_{a}' for a in args.arch)}{part}: {bad} with problems")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
