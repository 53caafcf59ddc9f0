"""Test set-up. Without a GPU the Triton kernels run in the interpreter, which must be switched on before
triton is first imported; importing torch does not import triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

import sdxl_kernels  # noqa: E402
from sdxl_kernels import backends  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="run the exhaustive grids whole (the default run takes a rotating slice of each)")


def rotating_slice(n: int) -> int:
    """Which of n slices of an exhaustive grid today's default run takes: the UTC day number mod n, so that n
    consecutive days cover the grid (SDXL_TEST_SLICE=k picks one)."""
    import time

    return int(os.environ.get("SDXL_TEST_SLICE", int(time.time() // 86400))) % n


def examples(default: int, slow: int) -> int:
    """Hypothesis examples of a random-shape test: `slow` under `pytest --slow` (read from the command line,
    since @settings is applied at import), else `default`."""
    import sys

    return slow if "--slow" in sys.argv else default


@pytest.fixture
def slow(request) -> bool:
    """True under `pytest --slow`: exhaustive grids run whole."""
    return request.config.getoption("--slow")


def available_backends() -> list[str]:
    """Backends this machine can run: triton needs CUDA or the interpreter, cpu/cuda need the extension."""
    names = []
    if backends.triton_available() and (torch.cuda.is_available() or backends.triton_interpret()):
        names.append("triton")
    if torch.cuda.is_available() and backends.cuda_extension_available():
        names.append("cuda")
    if backends.cpu_extension_available():
        names.append("cpu")
    names.append("torch")
    return names


def backend_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=available_backends())
def backend(request):
    """Forces each op onto one backend for the duration of a test; yields (name, device)."""
    yield request.param, backend_device(request.param)


@pytest.fixture(autouse=True)
def _reset_backends():
    yield
    for op in backends.OPS:
        backends.set_backend(op, None)


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty/empty_like inside the test returns NaN-filled memory (ints get their max), so an
    output element a kernel forgets to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def fixture_path(*parts: str) -> pathlib.Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"oracle fixture {path} is absent (expected ../shared/fixtures beside the project root)")
    return path
