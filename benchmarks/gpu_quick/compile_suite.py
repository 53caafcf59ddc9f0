"""The compile suite (`--suite compile`, a second device command): the slow parts, through the pytest benchmarks.

  compile_unet  benchmarks/test_unet.py: the UNet forward eager / ours / torch.compile of the eager model /
                torch.compile of the kernels-on model (compile-ours), and the VAE decode; planned ~150-200 s
                (two inductor compiles of the 2.57 B-parameter UNet at ~60-80 s each on an H100 host)
  train_step    benchmarks/test_train.py: one SDXL training step ours / eager / compile, with checkpointing;
                planned ~120-170 s
  two_stage     benchmarks/test_pipeline.py: the two-stage 1024² loop; planned ~120-170 s

Each runs `pytest FILE --benchmark` with SDXL_BENCH_JSONL pointing at results.jsonl, so every row is streamed
the moment it is measured (benchmarks/conftest.py), and the tables land in OUTDIR/compile/ at the end.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

FILES = {"compile_unet": "benchmarks/test_unet.py", "train_step": "benchmarks/test_train.py",
         "two_stage": "benchmarks/test_pipeline.py"}  # fmt: skip


def run(ctx) -> list[str]:
    env = dict(os.environ, SDXL_BENCH_JSONL=str(ctx.out / "results.jsonl"), SDXL_BENCH_STEP=ctx.name,
               SDXL_BENCH_OUT=str(ctx.out / "compile"))  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", FILES[ctx.name], "--benchmark", "-q", "-p", "no:cacheprovider", "-x"]
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait(timeout=max(1.0, ctx.left()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # pytest's KeyboardInterrupt still runs sessionfinish
        proc.wait()
        return [f"{FILES[ctx.name]}: stopped at the step's deadline"]
    except BaseException:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    return [] if rc == 0 else [f"{FILES[ctx.name]}: pytest exit {rc}"]
