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

from . import _report
from ._report import RESULTS, Case

OP = "fourier_embedding"
DEVICE = _report.bench_device()
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


def make_values(case: Case) -> tuple[torch.Tensor, int]:
    if case == MICRO_COND:  # (original h, w), (crop top, left), (target h, w) for two images
        rows = [[1024, 1024, 0, 0, 1024, 1024], [896, 1152, 64, 0, 1024, 1024]]
        return torch.tensor(rows, dtype=torch.float32, device=DEVICE), case.shape[-1]
    return torch.tensor([999.0, 421.5], device=DEVICE), case.shape[-1]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fourier_embedding(case: Case, provider: str):
    RESULTS.target(OP, MICRO_COND, "fwd", TARGET, f"micro-conditioning 2×6×256 on {DEVICE.type}")
    reason = _report.skip_reason(provider, DEVICE)
    if reason is not None:
        RESULTS.note(OP, f"{provider}: not measured, {reason}")
        pytest.skip(reason)
    values, dim = make_values(case)
    fn = ours if provider.startswith("ours-") else eager
    with _report.forced_backend(OP, provider):
        out = fn(values, dim)
        if provider.startswith("ours-"):  # wide arguments (up to 1024 rad) in float32: sin/cos differ in ulps
            torch.testing.assert_close(out, eager(values, dim), atol=1e-4, rtol=0)
        run = lambda: fn(values, dim)  # noqa: E731
        ms = _report.time_wall_ms(run)
        launches = _report.count_launches(run, DEVICE)
    nbytes = values.numel() * values.element_size() + out.numel() * out.element_size()
    RESULTS.add(OP, case, "fwd", provider, ms, nbytes=nbytes, launches=launches)
