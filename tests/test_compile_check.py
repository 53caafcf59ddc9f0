import os
import subprocess
import sys

import pytest

from sdxl_kernels import backends

from .conftest import rotating_slice

SLICES = 16  # the default run compiles about 1/16 of the variants (~17 s cold), all of them in 16 days


@pytest.mark.skipif(not backends.triton_available(), reason="triton is not installed")
def test_every_triton_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path, slow):
    """Runs the ahead-of-time compile check in a fresh process (the interpreter must be off there). By default
    one of SLICES interleaved slices, rotating by day, each holding every (kernel, arch, TMA, candidate) group;
    `pytest --slow` compiles every variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = tmp_path / "rows.json"
    part = [] if slow else ["--slice", f"{rotating_slice(SLICES)}/{SLICES}"]
    res = subprocess.run(
        [sys.executable, "-m", "sdxl_kernels.tools.compile_check", "--json", str(rows), *part],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    import json

    data = json.loads(rows.read_text())
    kernels = {r["kernel"] for r in data}
    assert {"_gn_stats_kernel", "_gn_fwd_apply_kernel", "_gn_bwd_reduce_kernel", "_gn_bwd_apply_kernel"} <= kernels
    assert "_fourier_kernel" in kernels
    assert {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} <= kernels
    sm90_fwd = [r for r in data if r["kernel"] == "_attn_fwd_kernel" and r["arch"] == "sm_90"]
    assert sm90_fwd and all(r["wgmma"] for r in sm90_fwd), "the sm_90 attention forward should use wgmma"
    attention = [r for r in data if r["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")]
    tma = [r for r in attention if " TMA" in r["config"]]
    assert {r["kernel"] for r in tma} == {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    assert all(r["arch"] == "sm_90" and r["tma"] for r in tma), "TMA variants load through cp.async.bulk.tensor"
    assert all(r["wgmma"] for r in tma if r["kernel"] == "_attn_fwd_kernel"), "the sm_90 TMA forward uses wgmma"
    assert not any(r["tma"] for r in attention if r not in tma)
    assert {r["arch"] for r in data} == {"sm_80", "sm_90"}
    assert all(r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in data)
