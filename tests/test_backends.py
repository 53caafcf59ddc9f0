import subprocess
import sys

import pytest
import torch

import sdxl_kernels
from sdxl_kernels import backends


def test_set_backend_validates_names():
    with pytest.raises(ValueError, match="unknown op"):
        sdxl_kernels.set_backend("group_norm", "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        sdxl_kernels.set_backend("group_norm_silu", "cudnn")


def test_override_then_auto(backend):
    name, device = backend
    x = torch.randn(1, 4, 3, 3, device=device)
    sdxl_kernels.set_backend("group_norm_silu", name)
    assert sdxl_kernels.get_backend("group_norm_silu") == name
    sdxl_kernels.group_norm_silu(x, 2)
    assert sdxl_kernels.last_backend("group_norm_silu") == name
    sdxl_kernels.set_backend("group_norm_silu", None)
    sdxl_kernels.group_norm_silu(x, 2)
    expected = "cpu" if device.type == "cpu" and backends.cpu_extension_available() else None
    if device.type == "cuda":
        expected = "triton" if backends.triton_available() else "cuda"
    assert sdxl_kernels.last_backend("group_norm_silu") == (expected or "torch")


def test_environment_variable(monkeypatch):
    x = torch.randn(1, 4, 3, 3)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    sdxl_kernels.group_norm_silu(x, 2)
    sdxl_kernels.fourier_embedding(torch.tensor([1.0]), 8)
    assert sdxl_kernels.last_backend("group_norm_silu") == "torch"
    assert sdxl_kernels.last_backend("fourier_embedding") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "fourier_embedding=torch")
    assert sdxl_kernels.get_backend("group_norm_silu") is None
    assert sdxl_kernels.get_backend("fourier_embedding") == "torch"
    sdxl_kernels.set_backend("fourier_embedding", "triton")  # an explicit override beats the environment
    assert sdxl_kernels.get_backend("fourier_embedding") == "triton"
    monkeypatch.setenv(backends.ENV_VAR, "group_norm_silu=fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        sdxl_kernels.group_norm_silu(x, 2)


def test_import_without_extension_warns_once_and_works():
    """With sdxl_kernels._C unimportable the package imports, says so once, and serves from Triton/PyTorch."""
    code = (
        "import sys, warnings\n"
        "sys.modules['sdxl_kernels._C'] = None\n"  # makes `import sdxl_kernels._C` raise ImportError
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import torch, sdxl_kernels\n"
        "    y = sdxl_kernels.group_norm_silu(torch.randn(1, 4, 2, 2), 2)\n"
        "    sdxl_kernels.group_norm_silu(torch.randn(1, 4, 2, 2), 2)\n"
        "msgs = [str(x.message) for x in w if 'not built' in str(x.message)]\n"
        "print(len(msgs), sdxl_kernels.last_backend('group_norm_silu'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "torch"]
