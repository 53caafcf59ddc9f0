"""Noise schedules, the SDXL denoiser with classifier-free guidance, and samplers as pure functions.

Every sampler takes k-diffusion's calling convention `sample_x(model, x, sigmas, extra_args=None, callback=None,
disable=None, ...)` and calls `model(x, sigma, **extra_args) -> denoised` with sigma of shape (B,). Sigmas are
in the variance-exploding parametrization x = x0 + sigma * eps (Karras et al. 2022); a latent at sigma0 is
noise * sigma0 for the samplers here, or noise * sqrt(1 + sigma0^2) as sgm does for the LegacyDDPM schedule.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from .progress import Progress

Denoiser = Callable[..., torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


# --------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------
def training_alphas_cumprod(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """SDXL's scaled-linear DDPM schedule (Rombach et al. 2022): betas = linspace(√0.00085, √0.012, 1000)²."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=dtype) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def training_sigmas() -> torch.Tensor:
    """The 1000 training sigmas √((1−ᾱ)/ᾱ), ascending (index = UNet timestep), as sgm's LegacyDDPMDiscretization."""
    ac = training_alphas_cumprod(torch.float64)
    # sgm: ratio in float64, cast to float32, then the square root in float32
    return ((1 - ac) / ac).to(torch.float32) ** 0.5


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def legacy_ddpm_sigmas(n: int) -> torch.Tensor:
    """sgm's LegacyDDPMDiscretization (Ho et al. 2020 timesteps, evenly strided): [n+1], descending, trailing 0."""
    _check_steps(n)
    table = training_sigmas()
    if n < NUM_TRAIN_TIMESTEPS:
        steps = np.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, n, endpoint=False).astype(int)[::-1].copy()
        table = table[torch.from_numpy(steps)]
    elif n > NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"legacy_ddpm_sigmas: n={n} exceeds the {NUM_TRAIN_TIMESTEPS} training steps")
    return _append_zero(table.flip(0))


def diffusers_timesteps(n: int, spacing: str = "leading", steps_offset: int = 1,
                        multistep: bool = False) -> torch.Tensor:
    """Timesteps of diffusers' "leading"/"trailing" spacing (Lin et al. 2023, Table 2), descending, int64.

    multistep=True reproduces DPMSolverMultistepScheduler's "leading" variant (step ratio 1000 // (n + 1)).
    """
    _check_steps(n)
    T = NUM_TRAIN_TIMESTEPS
    if spacing == "leading":
        if multistep:
            ratio = T // (n + 1)
            t = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + steps_offset
        else:
            ratio = T // n
            t = (np.arange(0, n) * ratio).round()[::-1] + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"diffusers_timesteps: spacing must be 'leading' or 'trailing', got {spacing!r}")
    return torch.from_numpy(t.astype(np.int64).copy())


def diffusers_sigmas(n: int, spacing: str = "leading", steps_offset: int = 1,
                     multistep: bool = False) -> torch.Tensor:
    """Sigmas of diffusers' discrete schedulers (float32 scaled-linear table) at `diffusers_timesteps`, trailing 0."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    table = ((1 - ac) / ac) ** 0.5  # float32, as diffusers computes it
    t = diffusers_timesteps(n, spacing, steps_offset, multistep)
    return _append_zero(table[t])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The noise schedule of Karras et al. 2022 (EDM), eq. 5: [n+1], descending, trailing 0."""
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero(((hi + ramp * (lo - hi)) ** rho).to(torch.float32))


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Log-linear sigmas (k-diffusion's get_sigmas_exponential): [n+1], descending, trailing 0."""
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return _append_zero(s.to(torch.float32))


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be a positive int, got {n!r}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


# --------------------------------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------------------------------
def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or of shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


class EpsDenoiser:
    """The discrete DDPM denoiser (Karras et al. 2022, Table 1 "VP"; sgm's DiscreteDenoiser) around an SDXL UNet.

    den(x, sigma, cond) -> x0 with x: (B, C, H, W), sigma: scalar or (B,), cond = {"context": (B, L, C_ctx),
    "y": (B, adm)}. Sigma is snapped to the nearest training sigma and the UNet timestep is its index.
    eps-prediction: c_skip 1, c_out −σ, c_in 1/√(σ²+1); v-prediction: c_skip 1/(σ²+1), c_out −σ/√(σ²+1).
    """

    def __init__(self, unet: Callable[..., torch.Tensor], prediction: str = "eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.unet = unet
        self.prediction = prediction
        self.sigmas = training_sigmas()  # ascending, index = timestep
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table(self, device) -> torch.Tensor:
        """self.sigmas on `device`, copied once (a host-to-device copy per step would sync the stream)."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.sigmas.to(device)
        return self._tables[device]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the nearest training sigma, per element."""
        table = self._table(sigma.device)
        return (sigma.reshape(-1, 1) - table).abs().argmin(dim=1).reshape(sigma.shape)

    def __call__(self, x: torch.Tensor, sigma, cond: dict) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        sigma = _batch_sigma(sigma, x)
        for key in ("context", "y"):
            if key not in cond:
                raise ValueError(f"cond needs key {key!r}")
            if cond[key].shape[0] != x.shape[0]:
                raise ValueError(f"cond[{key!r}] has batch {cond[key].shape[0]}, x has {x.shape[0]}")
        idx = self.sigma_to_index(sigma)
        s = self._table(x.device)[idx].view(-1, 1, 1, 1)  # float32 scalings, cast once for bf16/fp16 x
        c_in = 1 / (s**2 + 1) ** 0.5
        if self.prediction == "eps":
            c_skip, c_out = torch.ones_like(s), -s
        else:
            c_skip, c_out = 1 / (s**2 + 1), -s / (s**2 + 1) ** 0.5
        c_skip, c_out, c_in = (c.to(x.dtype) for c in (c_skip, c_out, c_in))
        out = self.unet(x * c_in, idx.to(torch.float32), cond["context"], cond["y"])
        return out * c_out + x * c_skip


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022), uncond first in one batched call; optional guidance rescale
    on the denoised output (Lin et al. 2023, "Common Diffusion Noise Schedules ... are Flawed", eq. 15–16)."""

    def __init__(self, denoiser: Denoiser, scale: float, rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale must be in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.rescale = float(rescale)

    def __call__(self, x: torch.Tensor, sigma, cond: dict, uncond: dict) -> torch.Tensor:
        sigma = _batch_sigma(sigma, x)
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}  # (2B, ...): uncond rows first
        x_u, x_c = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        guided = x_u + self.scale * (x_c - x_u)
        if self.rescale > 0:
            dims = tuple(range(1, x.ndim))
            factor = x_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
            guided = self.rescale * (guided * factor) + (1 - self.rescale) * guided
        return guided


# --------------------------------------------------------------------------------------------------------------
# Sampler helpers
# --------------------------------------------------------------------------------------------------------------
def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if v.ndim == 0:  # a scalar broadcasts as it is, and may stay on the CPU while x is on the GPU
        return v
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dσ = (x − D(x; σ)) / σ (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / _expand(sigma, x)


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step σ_from → σ_to into a deterministic step to σ_down plus fresh noise σ_up (DDPM posterior, eta)."""
    if not eta:
        return sigma_to, sigma_to * 0
    up = torch.minimum(torch.as_tensor(sigma_to),
                       eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    down = (sigma_to**2 - up**2) ** 0.5
    return down, up


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape, generator: Generators = None, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """N(0, I) of `shape`. `generator` may be one generator (or None) for the whole tensor, or a list with one
    generator per batch row (shape[0] of them): row i is then what `generator[i]` alone would draw, so an image
    of a batch equals the same image generated by itself."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    generator = list(generator)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per row")
    row = (1, *shape[1:])
    return torch.cat([torch.randn(row, generator=g, dtype=dtype, device=device) for g in generator])


def default_noise_sampler(x: torch.Tensor, generator: Generators = None) -> NoiseSampler:
    """Fresh N(0, I) like x per call; reproducible when a generator (or a list of them, one per row) is given."""
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}: give one per row")

    def sample(sigma, sigma_next):
        return randn(x.shape, generator, dtype=x.dtype, device=x.device)
    return sample


def _validate(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"x must be a batched tensor (B, ...), got {getattr(x, 'shape', type(x))}")
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError("sigmas must be finite and non-negative")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError("sigmas must be strictly descending")
    # kept on the CPU: the samplers' branches on sigma (`if sigmas[i + 1] > 0`) then read host memory instead of
    # syncing with the GPU every step; 0-dim CPU tensors combine with CUDA tensors as scalars
    return sigmas.detach().to("cpu")


class _Steps:
    """The step indices of a sampler, with progress shown (sdxl_model.progress) only when disable is False."""

    def __init__(self, n: int, disable):
        self.n, self.show = n, disable is False

    def __iter__(self):
        bar = Progress(self.n, enabled=self.show)
        for i in range(self.n):
            yield i
            bar.update()
        bar.close()


def _setup(model, x, sigmas, extra_args, disable):
    sigmas = _validate(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    # sigma goes to the model in at least float32: a bf16 sigma (3 significant digits) can snap to the wrong
    # training timestep
    s_in = x.new_ones(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))

    def den(x_, sigma):
        return model(x_, sigma * s_in, **extra_args)

    return sigmas, den, _Steps(len(sigmas) - 1, disable)


def _callback(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churned_slope(den, x, sigmas, i, churn, callback):
    """Step i's start of Karras et al. 2022, Algorithm 2: raise σ_i to σ̂ = σ_i(1 + γ) with fresh noise (churn),
    denoise there; → (x at σ̂, σ̂, the slope dx/dσ = (x - D(x))/σ̂)."""
    s_churn, s_tmin, s_tmax, s_noise, noise_sampler = churn
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise_sampler(sigma, sigmas[i + 1]) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    denoised = den(x, sigma_hat)
    _callback(callback, x, i, sigma, sigma_hat, denoised)
    return x, sigma_hat, to_d(x, sigma_hat, denoised)


# --------------------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, noise_sampler=None, generator=None):
    """Euler with optional churn (Karras et al. 2022, Algorithm 2 without the 2nd-order correction)."""
    sigmas, den, steps = _setup(model, x, sigmas, extra_args, disable)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    churn = (s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
    for i in steps:
        x, sigma_hat, d = _churned_slope(den, x, sigmas, i, churn, callback)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None, generator=None):
    """Ancestral Euler: Euler to σ_down, then fresh noise σ_up (k-diffusion; Ho et al. 2020 posterior)."""
    sigmas, den, steps = _setup(model, x, sigmas, extra_args, disable)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in steps:
        denoised = den(x, sigmas[i])
        down, up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0, noise_sampler=None, generator=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 2); Euler on the last step to σ = 0."""
    sigmas, den, steps = _setup(model, x, sigmas, extra_args, disable)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    churn = (s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
    for i in steps:
        x, sigma_hat, d = _churned_slope(den, x, sigmas, i, churn, callback)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], den(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M), multistep 2nd order in log-SNR (Lu et al. 2022, Algorithm 2)."""
    sigmas, den, steps = _setup(model, x, sigmas, extra_args, disable)
    old_denoised = None
    for i in steps:
        denoised = den(x, sigmas[i])
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            d_hat = denoised
        else:
            r = (t + sigmas[i - 1].log()) / h  # h_last / h
            d_hat = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d_hat
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                              s_noise=1.0, noise_sampler=None, generator=None):
    """Ancestral DPM-Solver++(2S), single-step midpoint in log-SNR (Lu et al. 2022) plus σ_up noise."""
    sigmas, den, steps = _setup(model, x, sigmas, extra_args, disable)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in steps:
        denoised = den(x, sigmas[i])
        down, up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        if down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:
            t, t_next = -sigmas[i].log(), -down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / sigmas[i]) * x - (-h / 2).expm1() * denoised
            denoised_2 = den(x_2, (-s).exp())
            x = (down / sigmas[i]) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * up
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, generator=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, the SDE variant as in k-diffusion), Gaussian noise per step."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sigmas, den, steps = _setup(model, x, sigmas, extra_args, disable)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    old_denoised, h_last = None, None
    for i in steps:
        denoised = den(x, sigmas[i])
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            phi = -(-h - eta_h).expm1()  # 1 − e^{−(1+η)h}
            x = (sigmas[i + 1] / sigmas[i]) * (-eta_h).exp() * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "midpoint":
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + (phi / (h + eta_h) * -1 + 1) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (
                    -(-2 * eta_h).expm1()).sqrt() * s_noise
            h_last = h
        old_denoised = denoised
    return x


def lms_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """∫_{σ_i}^{σ_{i+1}} of the j-th Lagrange basis polynomial through σ_i, …, σ_{i−order+1} (exact, polynomial)."""
    p = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            p = p * np.poly1d([1.0, -sigmas[i - k]]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = p.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams–Bashforth on the non-uniform σ grid; Karras et al. 2022 / k-diffusion "LMS")."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    sigmas, den, steps = _setup(model, x, sigmas, extra_args, disable)
    grid = sigmas.detach().cpu().double().numpy()
    ds = []
    for i in steps:
        denoised = den(x, sigmas[i])
        ds.append(to_d(x, sigmas[i], denoised))
        ds = ds[-order:]
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, grid, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, s_noise=1.0,
                noise_sampler=None, generator=None):
    """DDIM (Song et al. 2021, eq. 12) in σ form: x' = D + √(σ'²−c²)·ε̂ + c·z with c = η·σ'√(σ²−σ'²)/σ."""
    sigmas, den, steps = _setup(model, x, sigmas, extra_args, disable)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in steps:
        denoised = den(x, sigmas[i])
        _callback(callback, x, i, sigmas[i], sigmas[i], denoised)
        eps = (x - denoised) / sigmas[i]
        s_next = sigmas[i + 1]
        c = eta * s_next * (sigmas[i] ** 2 - s_next**2).clamp(min=0).sqrt() / sigmas[i]
        x = denoised + (s_next**2 - c**2).clamp(min=0).sqrt() * eps
        if eta and s_next > 0:
            x = x + noise_sampler(sigmas[i], s_next) * s_noise * c
    return x


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "lms": sample_lms,
    "ddim": sample_ddim,
}
