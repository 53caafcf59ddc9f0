"""Benchmarks run only with `--benchmark`; otherwise every item here is skipped, so a plain `pytest` stays fast.

At the end of a session that measured something, the tables are written (see results.py) and printed in the
terminal summary, so `-s` is not needed to see them.
"""
import os
import pathlib

import pytest

from . import environment
from .results import RESULTS

HERE = pathlib.Path(__file__).resolve().parent
JSONL_ENV = "SDXL_BENCH_JSONL"  # stream rows to this results.jsonl (its folder) as they are added


def pytest_addoption(parser):
    # pytest-benchmark, when installed, owns --benchmark-* but not --benchmark itself; pytest matches option
    # names exactly (no abbreviations), so the two coexist. Should another plugin ever claim --benchmark, use
    # its value rather than failing at start-up.
    try:
        parser.addoption(
            "--benchmark",
            action="store_true",
            default=False,
            help="sdxl-kernels: run the benchmarks in benchmarks/ (skipped without it)",
        )
    except ValueError:
        pass


def _enabled(config) -> bool:
    return bool(config.getoption("benchmark", default=False))


def pytest_configure(config):
    if _enabled(config):
        environment.configure_threads()
        stream = os.environ.get(JSONL_ENV)
        if stream:  # the GPU quick pass's compile suite: every row to its results.jsonl as it is measured
            from .gpu_quick.log import RowLog

            device = environment.bench_device()
            RESULTS.sink = RowLog(pathlib.Path(stream).parent, os.environ.get("SDXL_BENCH_STEP", "pytest"),
                                  device.type).sink()  # fmt: skip


def pytest_collection_modifyitems(config, items):
    if _enabled(config):
        return
    skip = pytest.mark.skip(reason="benchmark; run with --benchmark")
    for item in items:
        if HERE in pathlib.Path(item.path).resolve().parents:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if RESULTS.rows:
        RESULTS.write(environment.bench_device())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = RESULTS
    if not results.rows:
        return
    env = results.env or environment.environment(environment.bench_device())
    terminalreporter.write_sep("=", "sdxl-kernels benchmarks")
    for op in results.ops():
        terminalreporter.write_line(results.markdown(op, env))
        terminalreporter.write_line("")
    for path in results.written:
        terminalreporter.write_line(f"wrote {path}")
