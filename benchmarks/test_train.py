"""One training step of the SDXL base UNet (forward, backward, clipping, AdamW): ours vs eager vs torch.compile.

Providers
  eager    unet.use_kernels(False): plain PyTorch ops, attention on F.scaled_dot_product_attention (SDPA),
           eager GroupNorm and SiLU
  ours     unet.use_kernels(True): group_norm_silu, attention and fourier_embedding from sdxl_kernels, each on
           the backend it picks automatically
  compile  torch.compile(dynamic=False) of the kernels-off UNet (CUDA, gradient checkpointing off: compiling
           the full training graph takes minutes, on a small CPU far more)

The step is the trainer's (Trainer.micro_loss, then optimizer_step) with the data pipeline taken out:
`objective.draw` + `objective.diffusion_loss` with a default TrainConfig's offset noise, text dropout and AdamW
settings, on random latents, context and y drawn once, so the figure is the UNet's step, not the VAE, the text
encoders or the data loader. As the trainer: fp32 master weights, bf16 autocast on CUDA (fp32 on the CPU, its
precision="auto"), clip_grad_norm_ at TrainConfig.grad_clip, AdamW (fused on CUDA), zero_grad(set_to_none=True).
Left out: the EMA update (optional; a memory-bound pass over the weights) and the LR scheduler (host only).
The providers share one model and one optimizer, so weights, gradients and AdamW states weigh the same in each.

Cases
  CUDA  the SDXL base UNet (UNetConfig.sdxl_base(), 2.57 B parameters, random weights) at 1024² (latent
        1×4×128×128), batch 1, context 1×77×2048, y 1×2816, bf16 autocast; mode "train" with gradient
        checkpointing off, "train+ckpt" with it on (eager and ours)
  CPU   the base UNet of the tiny preset (sdxl_model.presets.tiny_components: context 64, ADM 2816), latent
        2×4×32×32, fp32; mode "train" only, so the run stays well under 30 s on 2 cores

Figures
  ms        wall clock per step, synchronized (see timing.time_providers)
  TFLOP/s   model FLOPs per step / ms. Full size: 3 × 6.76 TFLOP per image (the forward's 6.76 TFLOP at 1024²,
            backward 2×); the recomputation under checkpointing is not counted, as MFU wants. Otherwise
            torch.utils.flop_counter's FLOPs of one eager forward + backward.
  images/s  batch / step time
  peak      torch.cuda.max_memory_allocated over one step after warm-up, reset per provider; weights, AdamW
            states and gradients included (CUDA only)
  MFU       TFLOP/s / the card's dense bf16 peak (PEAK_BF16_TFLOPS by name, or $SDXL_BENCH_PEAK_TFLOPS)
"""
import os

import pytest
import torch

from . import driver, environment
from .results import RESULTS, Case

DEVICE = environment.bench_device()
OP = "sdxl_train_step"
SDXL_UNET_FLOPS_PER_IMAGE = 6.76e12  # forward at 1024²
TRAIN_FLOPS_FACTOR = 3  # forward + backward (2× the forward)
TARGET_SPEEDUP = 1.3  # issue 6: training step ours ≥ 1.3× eager, peak memory no higher than eager (GPU)
PEAK_ENV = "SDXL_BENCH_PEAK_TFLOPS"
PEAK_BF16_TFLOPS = (  # dense (no sparsity) bf16 tensor-core peaks, by a substring of the device name; first wins
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("A100", 312.0),
)
CONTEXT_TOKENS = 77

if DEVICE.type == "cuda":
    CASE = Case((1, 4, 128, 128), torch.bfloat16)
    PROVIDERS = {"train": ("eager", "ours", "compile"), "train+ckpt": ("eager", "ours")}
else:
    CASE = Case((2, 4, 32, 32), torch.float32)
    PROVIDERS = {"train": ("eager", "ours")}  # checkpointing: on CUDA (here it would double the run time)


def peak_tflops() -> float | None:
    """The device's dense bf16 peak in TFLOP/s, None where unknown (or on the CPU)."""
    if os.environ.get(PEAK_ENV, "").strip():
        return float(os.environ[PEAK_ENV])
    if DEVICE.type != "cuda":
        return None
    name = torch.cuda.get_device_name(DEVICE)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


class Setup:
    """The UNet in train mode with fp32 weights, its optimizer, and one fixed micro-batch on DEVICE."""

    def __init__(self):
        from sdxl_model import UNet, UNetConfig
        from sdxl_model.train import objective
        from sdxl_model.train.config import TrainConfig

        cfg = self.train_cfg = TrainConfig()
        torch.manual_seed(0)
        if DEVICE.type == "cuda":
            with torch.device(DEVICE):  # initialised on the GPU: only the fp32 weights are ever allocated
                self.unet = UNet(UNetConfig.sdxl_base())
        else:
            from sdxl_model.presets import tiny_components

            self.unet = tiny_components(seed=0)[0].unet
        self.unet.to(DEVICE).float().train()
        ucfg = self.unet.config
        b = CASE.shape[0]
        self.latents = torch.randn(CASE.shape, device=DEVICE)
        self.context = torch.randn(b, CONTEXT_TOKENS, ucfg.context_dim, device=DEVICE)
        self.y = torch.randn(b, ucfg.adm_in_channels, device=DEVICE)
        gen = torch.Generator().manual_seed(0)
        self.draw = objective.draw(CASE.shape, gen, offset_noise=cfg.offset_noise, text_dropout=cfg.text_dropout,
                                   micro_dropout=cfg.micro_dropout)
        fused = {"fused": True} if DEVICE.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay, **fused)
        self.bf16 = DEVICE.type == "cuda"
        self.full_size = ucfg == UNetConfig.sdxl_base() and tuple(CASE.shape[2:]) == (128, 128)
        self.flops = self._flops()

    def loss(self, model) -> torch.Tensor:
        from sdxl_model.train import objective

        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=self.bf16):
            return objective.diffusion_loss(model, self.latents, self.context, self.y, self.draw,
                                            min_snr_gamma=self.train_cfg.min_snr_gamma)

    def step_fn(self, model, kernels: bool):
        """One training step of `model` (the UNet or its compiled wrapper) with our kernels on or off."""

        def step():
            if self.unet.kernels != kernels:  # the providers take turns on the CPU: each call sets its mode
                self.unet.use_kernels(kernels)
            self.loss(model).backward()
            if self.train_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.train_cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return step

    def _flops(self) -> float:
        """Model FLOPs of one step: the SDXL accounting at full size, else counted on one eager fwd+bwd (built
        before checkpointing is switched on, so no recomputation is counted)."""
        if self.full_size:
            return TRAIN_FLOPS_FACTOR * SDXL_UNET_FLOPS_PER_IMAGE * CASE.shape[0]
        from torch.utils.flop_counter import FlopCounterMode

        self.unet.use_kernels(False)
        with FlopCounterMode(display=False) as counter:
            self.loss(self.unet).backward()
        self.unet.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


@pytest.fixture(scope="module")
def setup():
    s = Setup()
    yield s
    del s
    if DEVICE.type == "cuda":  # give the 41 GB of weights, gradients and AdamW states back to the next module
        torch._dynamo.reset()  # compiled graphs and their guards reference the UNet
        torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", list(PROVIDERS))
def test_train_step(setup: Setup, mode: str):
    s = setup
    s.unet.gradient_checkpointing(mode == "train+ckpt")
    steps, peaks = {}, {}
    for provider in PROVIDERS[mode]:
        kernels = provider == "ours"
        s.unet.use_kernels(kernels)
        model = torch.compile(s.unet, dynamic=False) if provider == "compile" else s.unet
        steps[provider] = s.step_fn(model, kernels)
    timings = driver.time_models(
        RESULTS, OP, CASE, mode, steps, DEVICE, flops=s.flops, peaks=peaks if DEVICE.type == "cuda" else None,
        on_failure=lambda provider: s.optimizer.zero_grad(set_to_none=True),
    )  # fmt: skip
    _notes(s, mode, {p: t.ms for p, t in timings.items()}, peaks)
    assert timings, "no provider ran"


def _notes(s: Setup, mode: str, ms: dict[str, float], peaks: dict[str, int]) -> None:
    RESULTS.note(OP, "providers: eager = use_kernels(False) (PyTorch ops, SDPA, eager GroupNorm/SiLU); ours = "
                     "use_kernels(True); compile = torch.compile of the kernels-off UNet (checkpointing off); "
                     "× eager = eager ms / ms")
    RESULTS.note(OP, "one step = objective.draw + diffusion_loss on fixed random latents/context/y (no VAE, "
                     "text encoders or data loading), backward, clip_grad_norm_, AdamW"
                     + (" (fused)" if DEVICE.type == "cuda" else "") + ", zero_grad; no EMA, no LR scheduler; "
                     "fp32 master weights" + ("; train+ckpt: gradient checkpointing on" if len(PROVIDERS) > 1 else ""))
    if s.full_size:
        RESULTS.note(OP, "SDXL base UNet (2.57 B parameters, random weights) at 1024², batch 1, context 77×2048, "
                         "y 2816, bf16 autocast (dtype column); TFLOP/s counts 3 × 6.76 TFLOP per image")
    elif DEVICE.type != "cuda":
        RESULTS.note(OP, "CPU: the tiny preset's base UNet, fp32 (the trainer's precision=auto); TFLOP/s counts "
                         "flop_counter's FLOPs of one eager fwd+bwd; the full-size step, gradient checkpointing, "
                         "torch.compile, peak memory and MFU are measured on CUDA")
    peak = peak_tflops()
    b = CASE.shape[0]
    for provider, v in ms.items():
        parts = [f"{v:.4g} ms/step", f"{b / (v / 1e3):.3g} images/s"]
        if provider in peaks:
            parts.append(f"peak {peaks[provider] / 2**30:.1f} GiB")
        if peak is not None:
            parts.append(f"MFU {100 * s.flops / (v * 1e-3) / (peak * 1e12):.1f}% of {peak:g} TFLOP/s")
        RESULTS.note(OP, f"{mode} {provider}: " + ", ".join(parts))
    if DEVICE.type == "cuda" and peak is None:
        RESULTS.note(OP, f"MFU: no dense bf16 peak known for {torch.cuda.get_device_name(DEVICE)}; set {PEAK_ENV}")
    if DEVICE.type != "cuda":
        RESULTS.note(OP, f"targets (CUDA, 1024² batch 1 bf16): ours ≥ {TARGET_SPEEDUP}× eager step time, peak "
                         "memory ours ≤ eager: not measured here")
        return
    label = f"target train step ({mode}) 1024² batch 1 bf16"
    if "eager" in ms and "ours" in ms:
        got = ms["eager"] / ms["ours"]
        verdict = "met" if got >= TARGET_SPEEDUP else "NOT met"
        RESULTS.note(OP, f"{label}: ours ≥ {TARGET_SPEEDUP}× eager: {got:.2f}×, {verdict}")
    else:
        RESULTS.note(OP, f"{label}: ours ≥ {TARGET_SPEEDUP}× eager: not measured (see the errors)")
    if "eager" in peaks and "ours" in peaks:
        ours, eager = peaks["ours"] / 2**30, peaks["eager"] / 2**30
        verdict = "met" if peaks["ours"] <= peaks["eager"] else "NOT met"
        RESULTS.note(OP, f"{label}: peak memory ours ≤ eager: {ours:.2f} vs {eager:.2f} GiB, {verdict}")
    else:
        RESULTS.note(OP, f"{label}: peak memory ours ≤ eager: not measured (see the errors)")
