"""Reconstruction metrics on images in [0, 1]: PSNR, SSIM (Wang et al. 2004) and rFID (Heusel et al. 2017, with
a user-supplied Inception feature extractor; nothing is downloaded)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio 10·log10(1 / MSE) per image of (B, C, H, W) in [0, 1] → (B,), in float64."""
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-20))


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image of (B, C, H, W) in [0, 1] → (B,), in float64.

    Wang et al.'s SSIM: Gaussian window 11×11, σ = 1.5, C1 = (0.01·L)², C2 = (0.03·L)², L = 1, local statistics
    by 'valid' filtering (no padding, as their reference MATLAB code), the SSIM map averaged over pixels and
    channels. Images must be at least 11 pixels on each side.
        SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) images of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}² pixels, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    c = x.shape[1]
    w = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, torch.float64).to(x.device).expand(c, 1, -1, -1)

    def blur(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """‖μa - μb‖² + tr(Σa + Σb - 2 (Σa^½ Σb Σa^½)^½) of two (N, D) feature sets (the FID formula), float64;
    the matrix square root through the symmetric eigendecomposition of Σa^½ Σb Σa^½."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"FID needs two (N ≥ 2, D) feature sets, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev, vec = np.linalg.eigh(cov_a)
    root_a = (vec * np.sqrt(np.clip(ev, 0, None))) @ vec.T
    middle = root_a @ cov_b @ root_a
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(np.square(mu_a - mu_b).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_root)


def summarize(values: torch.Tensor) -> float:
    v = float(values.mean())
    return v if math.isfinite(v) else float("inf")
