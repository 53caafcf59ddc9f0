"""results.jsonl: one JSON object a line, appended and flushed to disk as each row is measured.

Each row carries `step` (which step wrote it), `kind` ("row" for a measurement, "step" for a step's start/end,
"env" for the environment) and `device_type` ("cuda", or "cpu" on a dry run: CPU figures, marked as such).
Several processes append to one file (the runner and one step at a time); each line is written with one
write() call on a file opened for appending, so lines never interleave.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time

RESULTS = "results.jsonl"


def _clean(value):
    """JSON without NaN/inf (they become null) and with tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RowLog:
    def __init__(self, out: pathlib.Path, step: str, device_type: str) -> None:
        self.path = pathlib.Path(out) / RESULTS
        self.step = step
        self.device_type = device_type
        self.count = 0

    def write(self, row: dict, kind: str = "row") -> dict:
        row = {"step": self.step, "kind": kind, "device_type": self.device_type, "time": round(time.time(), 3)} | row
        line = json.dumps(_clean(row), ensure_ascii=False) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.count += 1
        return row

    def sink(self, extra: dict | None = None):
        """A results.Results sink: each benchmark Row as it is added, with `extra` fields."""

        def add(r) -> None:
            self.write(dataclasses.asdict(r) | (extra or {}))

        return add


def read(out: pathlib.Path) -> list[dict]:
    """Every row of OUTDIR/results.jsonl; a last line cut off by a kill is skipped."""
    path = pathlib.Path(out) / RESULTS
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
