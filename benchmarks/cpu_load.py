"""How busy the rest of the machine was while we timed: the figure that says whether a CPU time can be trusted."""
from __future__ import annotations

import os
import pathlib


class OthersCpu:
    """The share of all CPUs that other processes used since construction, from /proc/stat minus our own CPU
    time; None where /proc/stat is missing. One other busy process on a 2-core machine is 0.5."""

    def __init__(self) -> None:
        self.jiffies, self.times = self._stat(), os.times()

    @staticmethod
    def _stat() -> tuple[int, int] | None:  # (busy, total) jiffies over all CPUs
        try:
            fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def share(self) -> float | None:
        end, times = self._stat(), os.times()
        if self.jiffies is None or end is None or end[1] <= self.jiffies[1]:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        ours = (times.user - self.times.user) + (times.system - self.times.system)
        busy = (end[0] - self.jiffies[0]) / tick
        return max(0.0, busy - ours) / ((end[1] - self.jiffies[1]) / tick)
