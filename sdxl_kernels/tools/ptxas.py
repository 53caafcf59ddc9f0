"""Reading `ptxas -v` output: the one parser behind compile_check (Triton's PTX) and nvcc_check (our .cu files)."""
from __future__ import annotations

import dataclasses
import re

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclasses.dataclass
class Kernel:
    """One entry function's resources as ptxas reports them (-1 registers: no "Used N registers" line)."""

    file: str
    name: str
    arch: str
    registers: int = -1
    smem: int = 0  # static shared memory, bytes
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse(text: str, file: str = "") -> list[Kernel]:
    """Kernels from `ptxas -v` (or `nvcc -Xptxas -v`) output, in the order ptxas reports them. Lines before the
    first "Compiling entry function" belong to an unnamed kernel (ptxas of a single-kernel PTX file)."""
    kernels: list[Kernel] = []

    def current() -> Kernel:
        if not kernels:
            kernels.append(Kernel(file=file, name="", arch=""))
        return kernels[-1]

    for line in text.splitlines():
        if m := _ENTRY.search(line):
            kernels.append(Kernel(file=file, name=m.group(1), arch=m.group(2)))
        elif m := _FRAME.search(line):
            k = current()
            k.stack, k.spill_stores, k.spill_loads = (int(g) for g in m.groups())
        elif m := _USED.search(line):
            k = current()
            k.registers = int(m.group(1))
            if s := _SMEM.search(line):
                k.smem = int(s.group(1))
    return kernels
