"""env: what the numbers depend on (planned ~5 s: one nvidia-smi query and the imports).

GPU name, SM count, clocks (current and maximum), driver, CUDA, cuDNN, torch, Triton, Python, the commit, and
whether the C++/CUDA extension is built. The quick pass never rebuilds the extension: it times the Triton and
PyTorch paths as they are. Also written to OUTDIR/env.json.
"""
from __future__ import annotations

import json
import platform
import subprocess

SMI_FIELDS = ("name", "driver_version", "memory.total", "compute_cap", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "clocks.max.mem", "power.limit", "persistence_mode")  # fmt: skip


def nvidia_smi() -> dict:
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return {"nvidia_smi_error": str(exc)}
    if res.returncode != 0:
        return {"nvidia_smi_error": res.stderr.strip()[-300:]}
    first = res.stdout.strip().splitlines()[0]
    return {f"smi_{k.replace('.', '_')}": v.strip() for k, v in zip(SMI_FIELDS, first.split(","))}


def collect(ctx) -> dict:
    import torch

    from .. import environment
    from sdxl_kernels import backends

    device = ctx.device
    info = environment.environment(device)
    info |= {"python_impl": platform.python_implementation(), "cudnn": torch.backends.cudnn.version()}
    info |= {"triton_interpret": backends.triton_interpret()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {"gpu": p.name, "sm_count": p.multi_processor_count, "capability": f"sm_{p.major}{p.minor}",
                 "memory_gib": round(p.total_memory / 2**30, 1), "gpu_count": torch.cuda.device_count()}  # fmt: skip
        info |= nvidia_smi()
    else:
        info |= {"gpu": None, "sm_count": None, "capability": None, "note": "dry run: CPU figures, not a GPU"}
    return info


def run(ctx) -> list[str]:
    info = collect(ctx)
    (ctx.out / "env.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    ctx.log.write(info, kind="env")
    return []
