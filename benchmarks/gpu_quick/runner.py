"""The parent process: plans the time, runs each step in its own process under its cap, writes the summary.

A step is `python -m benchmarks.gpu_quick.step NAME OUTDIR --deadline T [--dry-run]`. It gets SIGTERM at its
cap and SIGKILL GRACE_S later; a SIGTERM to this process goes to the running step the same way, and then the
summary and charts are written before exiting (status 143).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time

from . import log, summary

# (name, planned cap in seconds on an H100/H200). Planned from the work each step does (see each step's
# module docstring); the caps add up to the default budget, and a step that ends early hands its time on.
QUICK = (("env", 15), ("ceilings", 25), ("check", 110), ("kernels", 140), ("sweep", 160), ("model", 90))
COMPILE = (("env", 15), ("compile_unet", 190), ("train_step", 165), ("two_stage", 165))
SUITES = {"quick": QUICK, "compile": COMPILE}
BUILD = ("build", 200)  # only with --build-extension: run first, reported as the bit after the suite's steps
DEFAULT_BUDGET_S = 540
GRACE_S = 10  # between a step's SIGTERM and its SIGKILL
MIN_STEP_S = 5  # a step with less time than this left is not started


class Terminated(Exception):
    pass


def _on_term(signum, frame):
    raise Terminated()


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_quick", description=__doc__.splitlines()[0])
    p.add_argument("out", type=pathlib.Path, help="output folder (results.jsonl, summary.md, configs, charts)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall time for the whole pass")
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--steps", help="comma-separated subset of the suite's steps, in the suite's order")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU: interpreter, tiny shapes")
    p.add_argument("--build-extension", action="store_true",
                   help="first rebuild the C++/CUDA extension in place (the pass runs without it)")
    return p.parse_args(argv)


def plan(suite: str, steps: str | None, build: bool = False) -> list[tuple[int, str, float]]:
    """[(bit, name, cap)] of the steps to run; bit is the step's place in its suite (the exit mask), and the
    optional build's bit is the one after the suite's last."""
    table = SUITES[suite]
    names = [n for n, _ in table]
    wanted = names if not steps else [s.strip() for s in steps.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise SystemExit(f"gpu_quick: unknown step(s) {unknown} for suite {suite!r}; its steps: {', '.join(names)}")
    chosen = [(i, n, cap) for i, (n, cap) in enumerate(table) if n in wanted]
    return ([(len(table), *BUILD)] if build else []) + chosen


def main(argv=None) -> int:
    args = parse(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(args.suite, args.steps, args.build_extension)
    device_type = "cpu" if args.dry_run else "cuda"
    runlog = log.RowLog(out, "runner", device_type)
    start = time.monotonic()
    end = start + args.budget_s
    runlog.write({"suite": args.suite, "steps": [n for _, n, _ in steps], "budget_s": args.budget_s,
                  "dry_run": args.dry_run, "pid": os.getpid()}, kind="start")  # fmt: skip
    old = signal.signal(signal.SIGTERM, _on_term)
    failed, terminated, carry = [], False, 0.0
    try:
        for bit, name, cap in steps:
            left = end - time.monotonic()
            limit = min(cap + carry, left)
            if terminated or limit < MIN_STEP_S:
                status = "killed" if terminated else "not run (no time)"
                runlog.write({"name": name, "status": status, "seconds": 0.0}, kind="step")
                failed.append(bit)
                continue
            t0 = time.monotonic()
            try:
                status = run_step(name, out, limit, args.dry_run, runlog)
            except Terminated:
                status, terminated = "killed", True
            used = time.monotonic() - t0
            carry = max(0.0, cap + carry - used)
            runlog.write({"name": name, "status": status, "seconds": round(used, 1), "limit_s": round(limit, 1)},
                         kind="step")  # fmt: skip
            if status != "ok":
                failed.append(bit)
    except Terminated:
        terminated = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the summary must get written
        try:
            text = summary.write(out)
            print(text, flush=True)
        finally:
            signal.signal(signal.SIGTERM, old)
    if terminated:
        return 143
    return sum(1 << bit for bit in set(failed))


def run_step(name: str, out: pathlib.Path, limit: float, dry_run: bool, runlog: log.RowLog) -> str:
    """Run one step in a child process for at most `limit` seconds; its status ("ok", "failed (rc N)",
    "timed out", "killed")."""
    env = dict(os.environ)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # before the child's first triton import
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run on a GPU machine still exercises the CPU paths
    else:
        env.pop("TRITON_INTERPRET", None)
    deadline = time.time() + limit - GRACE_S
    cmd = [sys.executable, "-m", "benchmarks.gpu_quick.step", name, str(out), "--deadline", f"{deadline:.1f}"]
    cmd += ["--dry-run"] if dry_run else []
    root = pathlib.Path(__file__).resolve().parents[2]
    runlog.write({"name": name, "limit_s": round(limit, 1)}, kind="step-start")
    print(f"[gpu_quick] {name}: limit {limit:.0f} s", flush=True)
    child = subprocess.Popen(cmd, cwd=root, env=env)
    try:
        rc = child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _stop(child)
        return "timed out"
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop at a time; the summary is written next
        _stop(child)
        raise
    return "ok" if rc == 0 else f"failed (rc {rc})"


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after GRACE_S: the step writes what it has on SIGTERM."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
