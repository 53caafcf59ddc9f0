"""The autoencoder objective of LDM's `LPIPSWithDiscriminator` (sgm `GeneralLPIPSWithDiscriminator`): each term
separately, all in float32.

    nll   = Σ_pixels |x - x̂|  (or (x - x̂)²)  +  w_p · C·H·W · d_p(x, x̂)          summed per image, mean over batch
    kl    = ½ Σ_latent (μ² + σ² - 1 - log σ²)                                   summed per image, mean over batch
    g     = -mean D(x̂)                                                          (PatchGAN logits)
    λ     = clamp(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4) · disc_weight            W = the decoder's last conv
    loss  = nll + kl_weight · kl + λ · disc_factor · g                          (g only from disc_start on)
    d     = disc_factor · ½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))         (the discriminator's hinge loss)

The perceptual distance d_p is broadcast over every pixel as LDM adds LPIPS's (B, 1, 1, 1) output to the
(B, C, H, W) L1 map before summing, hence the C·H·W factor. LDM's learned output log-variance (initialised
to 0 and not learned in sgm's configs) is left out: nll is the plain reconstruction sum.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def reconstruction_loss(x: torch.Tensor, xrec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """x, xrec (B, C, H, W) → Σ over (C, H, W) of |x - xrec| ("l1") or (x - xrec)² ("l2"), mean over B (fp32)."""
    diff = x.float() - xrec.float()
    if kind == "l1":
        err = diff.abs()
    elif kind == "l2":
        err = diff.square()
    else:
        raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")
    return err.flatten(1).sum(1).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) of a diagonal Gaussian (B, c, h, w): summed over the latent, mean
    over the batch (LDM's DiagonalGaussianDistribution.kl), in fp32."""
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂))), in fp32."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss -mean D(x̂), in fp32."""
    return -logits_fake.float().mean()


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """LDM's λ = clamp(‖∇nll‖ / (‖∇g‖ + 1e-4), 0, 1e4) · disc_weight, the gradients taken at the last layer."""
    w = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return w.clamp(0.0, 1e4).detach() * disc_weight


class LastConvGrad:
    """∇_W of a loss at a conv layer's weight W without asking autograd for W itself (which FSDP2 shards):
    a forward hook keeps the layer's input and output, autograd gives ∂loss/∂output, and
    ∇_W = conv2d_weight(input, ∂loss/∂output) (the conv's weight VJP). Used on the decoder's `conv_out`."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv
        self.input = self.output = None
        self._hook = conv.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if torch.is_grad_enabled():
            self.input, self.output = args[0], output

    def grad(self, loss: torch.Tensor) -> torch.Tensor:
        """∇_W loss (fp32) through the conv's last forward with gradients (the graph is kept)."""
        if self.output is None:
            raise RuntimeError("LastConvGrad: the conv has not run a forward with gradients yet")
        (g_out,) = torch.autograd.grad(loss, self.output, retain_graph=True)
        c = self.conv
        weight_shape = (c.out_channels, c.in_channels // c.groups, *c.kernel_size)
        return torch.nn.grad.conv2d_weight(self.input.detach().float(), weight_shape, g_out.float(),
                                           stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)

    def clear(self) -> None:
        self.input = self.output = None

    def remove(self) -> None:
        self._hook.remove()
        self.clear()


class NLayerDiscriminator(nn.Module):
    """The PatchGAN discriminator of pix2pix / LDM (`NLayerDiscriminator`): conv4×4 stride 2 + LeakyReLU(0.2),
    then `layers - 1` conv4×4 stride 2 + BatchNorm + LeakyReLU with doubling channels (at most 8×), one
    conv4×4 stride 1 + BatchNorm + LeakyReLU, and a conv4×4 stride 1 to one logit per patch.
    Image (B, C, H, W) → logits (B, 1, ~H/2^layers, ~W/2^layers). BatchNorm as in LDM (use_actnorm=False); the
    weights start as LDM's `weights_init`: conv N(0, 0.02), BatchNorm scale N(1, 0.02), shift 0."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"the discriminator needs ≥ 1 layer, got {layers}")
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def load_torchscript(path: str, what: str) -> nn.Module | None:
    """A frozen TorchScript module from `path` (no downloads); None with a log line when `path` is ""."""
    if not path:
        log.info("%s: no weights given; skipped", what)
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}: {path} not found (give a TorchScript file saved with torch.jit.save)")
    module = torch.jit.load(path, map_location="cpu").eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def perceptual_distance(module: nn.Module, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
    """The user's perceptual network on images in [-1, 1] (e.g. LPIPS): one distance per image (B,), fp32."""
    d = module(x.float(), xrec.float()).float()
    return d.reshape(d.shape[0], -1).mean(1)
