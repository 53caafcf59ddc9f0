"""One step of the quick pass in its own process: `python -m benchmarks.gpu_quick.step NAME OUTDIR --deadline T`.

The step writes its rows to OUTDIR/results.jsonl as it measures them. On SIGTERM it stops where it is, writes
an "interrupted" row and exits 143; an exception ends the step with an "error" row and exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pathlib
import signal
import sys
import time
import traceback

from .log import RowLog

STEP_MODULES = {  # step name -> module of benchmarks.gpu_quick with run(ctx)
    "build": "build",
    "env": "env",
    "ceilings": "ceilings",
    "check": "check",
    "kernels": "kernels",
    "sweep": "sweep",
    "model": "model",
    "compile_unet": "compile_suite",
    "train_step": "compile_suite",
    "two_stage": "compile_suite",
}


class Interrupted(BaseException):  # not an Exception: a step's own `except Exception` must not swallow it
    pass


@dataclasses.dataclass
class Context:
    """What a step gets: where to write, whether this is a dry run, and when it must have finished."""

    name: str
    out: pathlib.Path
    dry_run: bool
    deadline: float  # time.time() by which the step should have written everything
    log: RowLog

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry_run else "cuda")

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, **fields) -> dict:
        return self.log.write(fields)


def _on_term(signum, frame):
    raise Interrupted()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=sorted(STEP_MODULES))
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--deadline", type=float, default=float("inf"))
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    ctx = Context(args.name, args.out, args.dry_run, args.deadline, RowLog(args.out, args.name,
                  "cpu" if args.dry_run else "cuda"))  # fmt: skip
    if not args.dry_run and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ctx.row(error="TRITON_INTERPRET is set: a GPU pass must run the compiled kernels")
        return 2
    t0 = time.monotonic()
    try:
        module = importlib.import_module(f"{__package__}.{STEP_MODULES[args.name]}")
        run = getattr(module, f"run_{args.name}", None) or module.run
        failures = run(ctx)
    except Interrupted:
        ctx.log.write({"status": "interrupted", "seconds": round(time.monotonic() - t0, 1)}, kind="end")
        return 143
    except Exception as exc:
        ctx.log.write({"status": "error", "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-4000:]}, kind="end")  # fmt: skip
        traceback.print_exc()
        return 1
    status = "ok" if not failures else "failures"
    ctx.log.write({"status": status, "failures": failures or [], "seconds": round(time.monotonic() - t0, 1)},
                  kind="end")  # fmt: skip
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
