"""The GPU quick pass on this CPU machine (`--dry-run`): every step runs through the code the GPU run takes, so a
GPU slot cannot be lost to a typo; a kill keeps every row measured before it; the charts draw from its rows."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.gpu_quick import log, runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the runner sets it for its steps


def _run(out: pathlib.Path, *args: str, timeout: float = 170) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.gpu_quick", str(out), "--dry-run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    t0 = time.monotonic()
    res = _run(out)
    return out, res, time.monotonic() - t0


def _rows(out, step=None, kind="row"):
    return [r for r in log.read(out) if (step is None or r.get("step") == step) and r.get("kind") == kind]


def test_dry_run_passes_every_step_in_under_two_minutes(dry_run):
    out, res, seconds = dry_run
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    assert seconds < 120, f"the dry run took {seconds:.0f} s"
    steps = {r["name"]: r["status"] for r in _rows(out, kind="step")}
    assert steps == {name: "ok" for name, _ in runner.QUICK}
    assert (out / "summary.md").read_text() in res.stdout  # printed last, the same text
    assert all(r["device_type"] == "cpu" for r in log.read(out)), "dry-run rows are marked as CPU figures"


def test_env_and_ceilings_rows(dry_run):
    out, _, _ = dry_run
    env = _rows(out, "env", kind="env")
    assert len(env) == 1 and {"torch", "triton", "git_commit", "extension_built", "sm_count"} <= set(env[0])
    assert json.loads((out / "env.json").read_text())["torch"] == env[0]["torch"]
    ceilings = {r["op"]: r for r in _rows(out, "ceilings")}
    assert ceilings["copy"]["gbps"] > 0 and ceilings["matmul"]["tflops"] > 0


def test_check_covers_every_shape_class_and_passes(dry_run):
    from benchmarks.gpu_quick import check

    out, _, _ = dry_run
    rows = _rows(out, "check")
    attention = {(r["label"], r["dtype"], r["mode"]) for r in rows if r["op"] == "attention"}
    for case in check.ATTENTION:
        for dtype in case.dtypes:
            for mode in ("fwd", "bwd"):
                assert (case.label, str(dtype).removeprefix("torch."), mode) in attention
    assert {r["label"] for r in rows if r["op"] == "group_norm_silu"} == {
        f"{label}-{layout}" for label, _, _ in check.GN_SHAPES for layout in ("nchw", "channels_last")
    }
    assert {r["label"] for r in rows if r["op"] == "fourier_embedding"} == {"micro-conditioning", "timestep"}
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    assert all(r["backend"] == "triton" for r in rows)
    paths = {r["label"]: r["path"] for r in rows if r["op"] == "attention"}
    assert paths["unaligned"] == "pointers" and set(paths.values()) <= {"tma", "pointers"}


def test_kernels_rows_for_every_case_and_provider(dry_run):
    from benchmarks.gpu_quick import kernels

    out, _, _ = dry_run
    rows = _rows(out, "kernels")
    timed = {(r["op"], r["label"], r["mode"], r["provider"]) for r in rows if r.get("ms")}
    for case, modes in kernels.ATTENTION_DRY:
        for mode in modes:
            for provider in ("ours-triton", "sdpa"):
                assert ("attention", case.label, mode, provider) in timed
    for i, (_, label) in enumerate(kernels.GN_DRY):
        for j, layout in enumerate(("nchw", "channels_last")):
            ours = "ours-triton" if i == j == 0 else "ours-cpu"  # the interpreter serves the first case
            for mode in ("fwd", "bwd", "fwd+bwd"):
                assert ("group_norm_silu", f"{label}-{layout}", mode, ours) in timed
                assert ("group_norm_silu", f"{label}-{layout}", mode, "eager") in timed
            assert ("group_norm_silu", f"{label}-{layout}", "copy", "copy") in timed
    assert {r["label"] for r in rows if r["op"] == "fourier_embedding" and r.get("ms")} == {"micro-conditioning",
                                                                                             "timestep"}
    assert not any(r["provider"] == "compile" for r in rows), "no torch.compile in the kernels step"
    ours = [r for r in rows if r["op"] == "attention" and r["provider"] == "ours-triton" and r.get("ms")]
    assert ours and all(r["path"] in ("tma", "pointers") for r in ours)


def test_sweep_writes_a_configs_file_the_launchers_read(dry_run, monkeypatch):
    from sdxl_kernels import configs

    out, _, _ = dry_run
    best = _rows(out, "sweep", kind="best")
    assert {(r["family"], r["cls"]) for r in best} >= {("attention_fwd", "d64-long"), ("attention_fwd", "d64-short"),
                                                        ("attention_bwd", "d64"), ("group_norm_silu", "c16"),
                                                        ("group_norm_silu", "c64"), ("fourier_embedding", "all")}
    timed = [r for r in _rows(out, "sweep") if r.get("ms")]
    assert len(timed) >= 2 * len(best) - 1, "the table's config and at least one candidate per class"
    arch, table = configs.load(out / "configs-sm80.json")
    assert arch == 80 and set(table) == set(configs.families())
    for r in best:
        assert configs.dump(80, {r["family"]: {r["cls"]: table[r["family"]][r["cls"]]}})[r["family"]][r["cls"]] == {
            k: v for k, v in r["best"].items() if v is not None}


def test_model_rows(dry_run):
    out, _, _ = dry_run
    rows = _rows(out, "model")
    its = {r["provider"]: r["it_per_s"] for r in rows if r.get("it_per_s")}
    assert set(its) == {"eager", "ours"} and all(v > 0 for v in its.values())
    assert any("CUDA graphs need a CUDA device" in (r.get("error") or "") for r in rows)
    top = next(r["profile_top"] for r in rows if r.get("profile_top"))
    assert 0 < len(top) <= 15 and (out / "model_profile.txt").exists()


def test_charts_draw_from_the_dry_run_rows(dry_run, tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import charts

    out, _, _ = dry_run
    for name in ("attention", "group_norm_silu", "unet"):
        assert (out / f"{name}.png").stat().st_size > 10_000  # drawn by the pass itself
    drawn = charts.draw_all(log.read(out), tmp_path)
    assert sorted(p.name for p in drawn) == ["attention.png", "group_norm_silu.png", "unet.png"]
    key, data = charts.attention_sweep(log.read(out))
    assert set(data) == {"fwd", "bwd"} and {16, 32, 64} <= set(data["fwd"]["ours-triton"])


def test_sigterm_in_kernels_keeps_every_row_and_writes_the_summary(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_quick", str(tmp_path), "--dry-run", "--steps", "env,kernels,model"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        seen = [r for r in log.read(tmp_path) if r.get("step") == "kernels" and r.get("kind") == "row"]
        if len(seen) >= 3:
            break
        time.sleep(0.2)
    assert len(seen) >= 3, "the kernels step wrote no rows in time"
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, stdout[-3000:]
    after = log.read(tmp_path)
    lines = [json.dumps(r, sort_keys=True) for r in after]
    for r in seen:  # every row measured before the kill is still there, unchanged
        assert json.dumps(r, sort_keys=True) in lines
    steps = {r["name"]: r["status"] for r in after if r.get("kind") == "step"}
    assert steps == {"env": "ok", "kernels": "killed", "model": "killed"}
    assert any(r.get("step") == "kernels" and r.get("status") == "interrupted" for r in after if r.get("kind") == "end")
    summary = (tmp_path / "summary.md").read_text()
    assert "| kernels | killed |" in summary and summary in stdout


def test_exit_status_is_a_mask_of_the_failed_steps(tmp_path):
    assert runner.plan("quick", "kernels,env") == [(0, "env", 15), (3, "kernels", 140)]
    assert runner.plan("quick", "env", build=True) == [(6, "build", 200), (0, "env", 15)]  # only when asked
    with pytest.raises(SystemExit, match="unknown step"):
        runner.plan("quick", "env,nope")
    res = _run(tmp_path, "--steps", "env,ceilings", "--budget-s", "4", timeout=60)  # no time for any step
    assert res.returncode == 0b11, res.stdout
    assert {r["status"] for r in _rows(tmp_path, kind="step")} == {"not run (no time)"}
