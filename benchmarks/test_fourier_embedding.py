"""fourier_embedding: ours (each backend this device has) vs the eager code SDXL runs today (sgm).

The op is tiny and launch-bound, so it is timed by wall clock per call (synchronized), which counts the Python,
dispatch and launch overheads that fusing into one kernel removes; on CUDA the kernels launched per call are
counted too. Cases:
  micro-conditioning  values (2, 6) × 256: original size, crop top-left, target size, batch 2 → (2, 1536)
  timestep            t (2,) × 320: the UNet's timestep embedding → (2, 320)
Acceptance for micro-conditioning: ours ≥ 2× eager on CPU, ≥ 5× on a GPU.
GB/s counts reading the values and writing the embedding (float32); it says little at these sizes.
"""
import math

import pytest
import torch

from . import driver, environment
from .driver import Bench, Inputs
from .results import RESULTS, Case

OP = "fourier_embedding"
DEVICE = environment.bench_device()
PROVIDERS = ("eager", "ours-triton", "ours-cuda", "ours-cpu")
MICRO_COND = Case((2, 6, 256), torch.float32)  # values (B, N), dim
TIMESTEP = Case((2, 320), torch.float32)  # t (B,), dim
CASES = (MICRO_COND, TIMESTEP)
TARGET = 5.0 if DEVICE.type == "cuda" else 2.0


# ---- the eager reference, as sgm writes it (sgm/modules/diffusionmodules/util.py, sgm/modules/encoders) ----


def sgm_timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
        device=timesteps.device
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sgm_concat_timestep_embedder(x, outdim):
    """ConcatTimestepEmbedderND.forward; einops' rearranges written as the reshapes they are."""
    if x.ndim == 1:
        x = x[:, None]
    b, dims = x.shape[0], x.shape[1]
    x = x.reshape(b * dims)  # "b d -> (b d)"
    emb = sgm_timestep_embedding(x, outdim)  # (b·d, outdim)
    return emb.reshape(b, dims * outdim)  # "(b d) d2 -> b (d d2)"


def eager(values, dim):
    return sgm_concat_timestep_embedder(values, dim) if values.dim() == 2 else sgm_timestep_embedding(values, dim)


def ours(values, dim):
    import sdxl_kernels

    return sdxl_kernels.fourier_embedding(values, dim)


def make_inputs(case: Case) -> Inputs:
    if case.shape == MICRO_COND.shape:  # (original h, w), (crop top, left), (target h, w) for two images
        rows = [[1024, 1024, 0, 0, 1024, 1024], [896, 1152, 64, 0, 1024, 1024]]
        return Inputs((torch.tensor(rows, dtype=torch.float32, device=DEVICE), case.shape[-1]))
    return Inputs((torch.tensor([999.0, 421.5], device=DEVICE), case.shape[-1]))


def check_close(fn, inputs: Inputs) -> None:
    # arguments up to 1024 rad in float32: sin/cos implementations differ by a few ulps
    torch.testing.assert_close(fn(*inputs.args), eager(*inputs.args), atol=1e-4, rtol=0)


def traffic(mode: str, case: Case, inputs: Inputs) -> dict:
    values, dim = inputs.args
    out_elems = values.numel() * dim
    return {"nbytes": values.numel() * values.element_size() + out_elems * 4}


def build(bench: Bench, mode: str, provider: str, fn, inputs: Inputs):
    return lambda: fn(*inputs.args)


def bench(**overrides) -> Bench:
    fields = dict(
        op=OP, providers=PROVIDERS, make_inputs=make_inputs,
        provider_fn=lambda p: ours if p.startswith("ours-") else eager,
        check=check_close, build=build, work=traffic, wall=True, launches=("fwd",),
    )  # fmt: skip
    return Bench(**(fields | overrides))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fourier_embedding(case: Case):
    RESULTS.target(OP, MICRO_COND, "fwd", TARGET, f"micro-conditioning 2×6×256 on {DEVICE.type}")
    failures = driver.run(bench(), case, RESULTS, DEVICE)
    if failures:
        pytest.fail("\n".join(failures))
