import os
import subprocess
import sys

import pytest

from sdxl_kernels import backends


@pytest.mark.skipif(not backends.triton_available(), reason="triton is not installed")
def test_every_triton_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    """Runs the ahead-of-time compile check in a fresh process (the interpreter must be off there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, "-m", "sdxl_kernels.tools.compile_check", "--json", str(rows)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    import json

    data = json.loads(rows.read_text())
    kernels = {r["kernel"] for r in data}
    assert {"_gn_stats_kernel", "_gn_fwd_apply_kernel", "_gn_bwd_reduce_kernel", "_gn_bwd_apply_kernel"} <= kernels
    assert "_fourier_kernel" in kernels
    assert {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} <= kernels
    sm90_fwd = [r for r in data if r["kernel"] == "_attn_fwd_kernel" and r["arch"] == "sm_90"]
    assert sm90_fwd and all(r["wgmma"] for r in sm90_fwd), "the sm_90 attention forward should use wgmma"
    sm90_tma = [r for r in data if r["kernel"] == "_attn_fwd_tma_kernel"]
    assert sm90_tma and all(r["arch"] == "sm_90" and r["wgmma"] and r["tma"] for r in sm90_tma), (
        "the sm_90 TMA forward should load through cp.async.bulk.tensor and multiply with wgmma"
    )
    assert {r["arch"] for r in data} == {"sm_80", "sm_90"}
    assert all(r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in data)
