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


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fourier_embedding(case: Case):
    RESULTS.target(OP, MICRO_COND, "fwd", TARGET, f"micro-conditioning 2×6×256 on {DEVICE.type}")
    values, dim = make_values(case)
    want = eager(values, dim)
    steps, failures = {}, []
    for provider in PROVIDERS:
        reason = _report.skip_reason(provider, DEVICE)
        if reason is not None:
            RESULTS.note(OP, f"{provider}: not measured, {reason}")
            continue
        fn = ours if provider.startswith("ours-") else eager
        try:
            with _report.forced_backend(OP, provider):
                # arguments up to 1024 rad in float32: sin/cos implementations differ by a few ulps
                torch.testing.assert_close(fn(values, dim), want, atol=1e-4, rtol=0)
        except Exception as exc:  # a wrong or crashing kernel: its times would be meaningless
            failures.append(f"{provider}: {_report.error_text(exc)}")
            RESULTS.add(OP, case, "fwd", provider, error=_report.error_text(exc))
            continue
        steps[provider] = lambda fn=fn: fn(values, dim)
    nbytes = values.numel() * values.element_size() + want.numel() * want.element_size()
    for provider, timing in _report.time_providers(OP, steps, DEVICE, wall=True).items():
        with _report.forced_backend(OP, provider):
            launches = _report.count_launches(steps[provider], DEVICE)
        RESULTS.add(OP, case, "fwd", provider, timing, nbytes=nbytes, launches=launches)
    if failures:
        pytest.fail("\n".join(failures))
