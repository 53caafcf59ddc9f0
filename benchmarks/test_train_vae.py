"""One autoencoder training step (`sdxl train-vae`): ours vs eager, side by side.

Providers
  eager  vae.use_kernels(False): plain PyTorch GroupNorm, SiLU and F.scaled_dot_product_attention
  ours   vae.use_kernels(True): the fused group_norm_silu and attention of sdxl_kernels, each on the backend it
         picks automatically

The step is the trainer's own (`VAETrainer.accumulate` then `optimizer_step`: encode, posterior draw, decode,
L1 + KL in fp32, backward, AdamW, EMA update) on one fixed batch repeated, so the data loader is not timed.
The adversarial terms are off (they start at `disc_start`, step 50001 in the sdxl preset); fp32 master weights,
bf16 autocast on CUDA (precision="auto"), fp32 on the CPU.

Cases
  CUDA  the SDXL VAE (VAEConfig.sdxl(), 83.7 M parameters, random weights), 256² crops, batch 8, bf16 autocast
  CPU   the tiny preset (VAEConfig.tiny()), 32² crops, batch 4, fp32

Figures: ms per step (wall clock, synchronized), TFLOP/s (torch.utils.flop_counter's FLOPs of one eager
forward + backward), images/s, and the peak CUDA memory of one step per provider.
"""
import itertools

import pytest
import torch

from . import driver, environment
from .results import RESULTS, Case

DEVICE = environment.bench_device()
OP = "sdxl_vae_train_step"

if DEVICE.type == "cuda":
    CASE = Case((8, 3, 256, 256), torch.bfloat16)
else:
    CASE = Case((4, 3, 32, 32), torch.float32)
PROVIDERS = ("eager", "ours")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from sdxl_model.train import make_shapes_dataset
    from sdxl_model.train.vae_config import VAETrainConfig
    from sdxl_model.train.vae_loop import VAETrainer

    root = tmp_path_factory.mktemp("vae-bench")
    b, _, res, _ = CASE.shape
    make_shapes_dataset(root / "data", n=b, seed=0, min_side=res, max_side=res + 16)
    preset = VAETrainConfig.sdxl if DEVICE.type == "cuda" else VAETrainConfig.tiny
    cfg = preset(data=str(root / "data"), out=str(root / "out"), resolution=res, batch_size=b, eval_images=1,
                 progress=False, device=DEVICE.type)
    t = VAETrainer(cfg)
    yield t
    del t
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _flops(t, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    t.vae.use_kernels(False)
    with FlopCounterMode(display=False) as counter:
        loss, *_ = t.micro_loss(batch, 0)
        loss.backward()
    t.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def test_vae_train_step(trainer):
    t = trainer
    batch = next(iter(t.loader))
    batches = itertools.repeat(batch)
    flops = _flops(t, batch)
    steps, peaks = {}, {}
    for provider in PROVIDERS:
        kernels = provider == "ours"

        def step(kernels=kernels):
            t.vae.use_kernels(kernels)  # the providers take turns on the CPU: each call sets its own mode
            t.accumulate(batches)
            t.optimizer_step()

        steps[provider] = step
    timings = driver.time_models(
        RESULTS, OP, CASE, "train", steps, DEVICE, flops=flops, peaks=peaks if DEVICE.type == "cuda" else None,
        on_failure=lambda provider: t.optimizer.zero_grad(set_to_none=True),
    )  # fmt: skip
    b = CASE.shape[0]
    RESULTS.note(OP, "providers: eager = use_kernels(False); ours = use_kernels(True); × eager = eager ms / ms")
    RESULTS.note(OP, "one step = VAETrainer.accumulate + optimizer_step on a fixed batch (encode, posterior draw, "
                     "decode, L1 + KL in fp32, backward, AdamW, EMA); no discriminator, no data loading")
    what = "SDXL VAE, random weights, bf16 autocast" if DEVICE.type == "cuda" else "tiny preset VAE, fp32 (CPU)"
    RESULTS.note(OP, f"{'×'.join(map(str, CASE.shape))}: {what}; images/s: "
                     + ", ".join(f"{p} {b * 1e3 / tm.ms:.3g}" for p, tm in timings.items()))
    if peaks:
        shown = ", ".join(f"{p} {v / 2**30:.2f} GiB" for p, v in peaks.items())
        RESULTS.note(OP, f"peak CUDA memory per step: {shown}")
    assert timings, "no provider ran"
