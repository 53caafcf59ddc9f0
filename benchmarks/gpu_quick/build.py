"""build (only with --build-extension): compile the C++/CUDA extension in place, then say what got built.

The quick pass does not need it: it times the Triton and PyTorch paths as they are. Objects built against
another torch or Python (e.g. a CPU build carried from a developer's checkout) are removed first, so they are
never linked or loaded. Planned ~60-200 s (nvcc for sm_80 and sm_90 on the GPU machine's cores).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys


def run(ctx) -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.rmtree(os.path.join(root, "build"), ignore_errors=True)
    for stale in glob.glob(os.path.join(root, "sdxl_kernels", "_C*.so")):
        os.remove(stale)
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=max(5.0, ctx.left()))
    (ctx.out / "build.log").write_text(res.stdout + res.stderr)
    probe = subprocess.run([sys.executable, "-c", "from sdxl_kernels import backends as b; "
                            "print(b.cpu_extension_available(), b.cuda_extension_available())"],
                           cwd=root, capture_output=True, text=True, timeout=120)  # fmt: skip
    cpu, cuda = (probe.stdout.split() + ["?", "?"])[:2]
    ctx.row(op="build", rc=res.returncode, cpu_kernels=cpu == "True", cuda_kernels=cuda == "True",
            log="build.log", tail=(res.stderr or res.stdout)[-1500:])  # fmt: skip
    if res.returncode != 0:
        return [f"setup.py build_ext failed (rc {res.returncode}); see build.log"]
    return [] if cuda == "True" or ctx.dry_run else ["the extension built without its CUDA kernels"]
