"""The one progress display of sampling, `sdxl generate` and training: a line on stderr per step.

    bar = Progress(total, desc="train", enabled=True, initial=step)
    bar.update(loss="0.1234", lr="1.0e-04")   # one step done, with what to show beside it
    bar.close()

On a terminal the line is rewritten in place ("\\r"); into a file or a pipe (CI logs, a job's stderr) it is
written about 20 times per run and at the last step, each on its own line, so logs stay short. Shown:
"<desc> step i/total (r it/s, eta 1m05s) key=value ...". Silent when not enabled.
"""
from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    def __init__(self, total: int, *, desc: str = "", enabled: bool = True, initial: int = 0, stream=None):
        self.total, self.done, self.desc, self.enabled = total, initial, desc, enabled
        self.stream = sys.stderr if stream is None else stream
        self.start, self.t0 = initial, time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 1 if self.tty else max(1, total // 20)
        self._open = False  # a rewritten line is waiting for its newline

    def line(self, **postfix) -> str:
        steps = self.done - self.start
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = steps / elapsed
        text = f"{self.desc + ' ' if self.desc else ''}step {self.done}/{self.total} ({rate:.2f} it/s"
        if 0 < rate and self.done < self.total:
            text += f", eta {_duration((self.total - self.done) / rate)}"
        text += ")"
        return text + "".join(f" {k}={v}" for k, v in postfix.items())

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if not self.enabled or (self.done % self.every and self.done != self.total):
            return
        if self.tty:
            end = "\n" if self.done == self.total else ""
            print(f"\r{self.line(**postfix)}", end=end, file=self.stream, flush=True)
            self._open = not end
        else:
            print(self.line(**postfix), file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self._open:
            print(file=self.stream, flush=True)
        self._open = False
