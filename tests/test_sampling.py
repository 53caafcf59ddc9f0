"""Schedules, the denoiser, CFG and the samplers of sdxl_model.sampling: against the sgm and diffusers fixtures,
and on Gaussian data, whose exact denoiser and probability-flow ODE solution are known in closed form."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import sdxl_kernels
from sdxl_model import UNet, UNetConfig, load_weights
from sdxl_model import sampling as S

from .conftest import fixture_path

ALL_SAMPLERS = sorted(S.SAMPLERS)
DETERMINISTIC = ["euler", "heun", "dpmpp_2m", "lms", "ddim"]
STOCHASTIC = ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde"]


# ---- schedules -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 30])
def test_legacy_ddpm_sigmas_equal_sgm(n):
    ref = load_file(fixture_path("sgm", "fourier.safetensors"))[f"legacy_ddpm_sigmas_{n}"]
    sigmas = S.legacy_ddpm_sigmas(n)
    assert sigmas.shape == (n + 1,) and sigmas[-1] == 0
    torch.testing.assert_close(sigmas, ref, atol=0, rtol=0)


def test_training_sigmas_equal_sgm_table():
    ref = load_file(fixture_path("sgm", "fourier.safetensors"))["legacy_ddpm_sigmas_1000_ascending"]
    torch.testing.assert_close(S.training_sigmas(), ref, atol=0, rtol=0)
    torch.testing.assert_close(S.legacy_ddpm_sigmas(1000)[:-1], ref.flip(0), atol=0, rtol=0)


def test_sampler_sigmas_equal_sgm_sampling_fixture():
    ref = load_file(fixture_path("sgm", "sampling.safetensors"))["sigmas_sampler"]
    torch.testing.assert_close(S.legacy_ddpm_sigmas(len(ref) - 1), ref, atol=0, rtol=0)


@pytest.mark.parametrize("n", [10, 30])
@pytest.mark.parametrize("scheduler", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_diffusers_leading_schedule_equals_fixture(scheduler, n):
    ref = load_file(fixture_path("diffusers", "schedulers.safetensors"))
    multistep = scheduler == "dpmpp_2m"
    torch.testing.assert_close(S.diffusers_sigmas(n, "leading", multistep=multistep), ref[f"{scheduler}.n{n}.sigmas"],
                               atol=0, rtol=0)
    assert S.diffusers_timesteps(n, "leading", multistep=multistep).tolist() == \
        ref[f"{scheduler}.n{n}.timesteps"].long().tolist()


def test_diffusers_trailing_schedule_starts_at_last_timestep():
    """Trailing spacing (Lin et al. 2023, Table 2): 1000 · (1 − k/n) − 1, so it starts at t = 999."""
    assert S.diffusers_timesteps(10, "trailing").tolist() == list(range(999, 0, -100))
    assert S.diffusers_timesteps(4, "trailing").tolist() == [999, 749, 499, 249]


def test_karras_and_exponential_sigmas():
    k = S.karras_sigmas(10, 0.03, 14.6)
    e = S.exponential_sigmas(10, 0.03, 14.6)
    for s in (k, e):
        assert s.shape == (11,) and s[-1] == 0 and (s[1:] < s[:-1]).all()
        torch.testing.assert_close(s[[0, -2]], torch.tensor([14.6, 0.03]), rtol=1e-6, atol=0)
    # Karras: sigma^(1/rho) is linear in the step; exponential: log sigma is linear
    torch.testing.assert_close(k[:-1].double().pow(1 / 7).diff(), k[:-1].double().pow(1 / 7).diff()[:1].expand(9),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(e[:-1].double().log().diff(), e[:-1].double().log().diff()[:1].expand(9),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("call", [
    lambda: S.legacy_ddpm_sigmas(0),
    lambda: S.legacy_ddpm_sigmas(1001),
    lambda: S.karras_sigmas(5, 2.0, 1.0),
    lambda: S.exponential_sigmas(5, 0.0, 1.0),
    lambda: S.diffusers_timesteps(5, "linspace-ish"),
])
def test_bad_schedule_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


# ---- sgm oracle: tiny UNet, CFG 5, 6 LegacyDDPM steps ---------------------------------------------------------


@pytest.fixture(scope="module")
def sgm_run():
    fx = load_file(fixture_path("sgm", "sampling.safetensors"))
    kwargs = json.loads(fixture_path("sgm", "tiny_unet.config.json").read_text())["kwargs"]
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_sgm(kwargs))
    load_weights(unet, fixture_path("sgm", "tiny_unet.safetensors"))
    unet.eval().use_kernels(False)
    guided = S.CFGDenoiser(S.EpsDenoiser(unet), 5.0)
    extra = {"cond": {"context": fx["cond_crossattn"], "y": fx["cond_vector"]},
             "uncond": {"context": fx["uc_crossattn"], "y": fx["uc_vector"]}}
    sigmas = S.legacy_ddpm_sigmas(6)
    x = fx["init_noise"] * (1 + sigmas[0] ** 2) ** 0.5  # sgm's prepare_sampling_loop
    return fx, guided, extra, sigmas, x


def _assert_final(out, ref):
    # README: sampler finals rtol 1e-4 of magnitude ~70 (roughly atol 1e-2); we compare against the max magnitude
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), (out - ref).abs().max()


def test_first_step_denoised_equals_sgm(sgm_run):
    fx, guided, extra, sigmas, x = sgm_run
    seen = []
    S.sample_euler(guided, x, sigmas[:2], extra_args=extra, callback=lambda info: seen.append(info["denoised"]))
    _assert_final(seen[0], fx["first_step_denoised"])
    with torch.no_grad():
        _assert_final(guided(x, sigmas[0], **extra), fx["first_step_denoised"])


@pytest.mark.parametrize("name, key", [("euler", "euler_edm_out"), ("dpmpp_2m", "dpmpp2m_out"),
                                       ("euler_ancestral", "euler_ancestral_out")])
def test_sampler_equals_sgm(sgm_run, name, key):
    fx, guided, extra, sigmas, x = sgm_run
    kwargs = {}
    if name == "euler_ancestral":
        draws = iter(fx["euler_ancestral_noise"])  # one per step; sgm discards the last (next sigma = 0)
        kwargs["noise_sampler"] = lambda sigma, sigma_next: next(draws)
    out = S.SAMPLERS[name](guided, x, sigmas, extra_args=extra, **kwargs)
    _assert_final(out, fx[key])


# ---- diffusers oracle: fake model (eps = 0.1 x_in + t/1000 C), 6 "leading" steps -------------------------------


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_fake_model_run_equals_diffusers(name):
    fx = load_file(fixture_path("diffusers", "schedulers.safetensors"))
    multistep = name == "dpmpp_2m"
    sigmas = S.diffusers_sigmas(6, "leading", multistep=multistep)
    timesteps = S.diffusers_timesteps(6, "leading", multistep=multistep)
    C = fx["fake.C"]

    def fake_denoiser(x, sigma):
        i = (sigmas[:-1] - sigma[0]).abs().argmin()  # the scheduler feeds the model its own timestep
        x_in = x / (sigma[0] ** 2 + 1) ** 0.5
        eps = 0.1 * x_in + (float(timesteps[i]) / 1000.0) * C
        return x - sigma[0] * eps

    # Euler(-a) start from noise · sqrt(σ0² + 1); DPM-Solver works on x/sqrt(σ²+1) from plain noise: same x here
    x = fx["init_noise"] * (sigmas[0] ** 2 + 1) ** 0.5
    kwargs = {}
    if name == "euler_ancestral":
        draws = iter(fx["fake.euler_ancestral.step_noise"])
        kwargs["noise_sampler"] = lambda sigma, sigma_next: next(draws)
    out = S.SAMPLERS[name](fake_denoiser, x, sigmas, **kwargs)
    ref = fx[f"fake.{name}.final"]
    torch.testing.assert_close(out, ref, atol=2e-5 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_tiny_unet_cfg_run_equals_diffusers(name):
    """diffusers' tiny UNet with CFG 5 through our EpsDenoiser: the snapped sgm sigma gives the same timestep."""
    fx = load_file(fixture_path("diffusers", "schedulers.safetensors"))
    folder = fixture_path("diffusers", "tiny_unet")
    unet = UNet(UNetConfig.from_diffusers(json.loads((folder / "config.json").read_text())))
    load_weights(unet, folder)
    unet.eval().use_kernels(False)
    ctx, pooled, time_ids = (fx[f"unet_cfg.{k}"] for k in ("prompt_embeds", "text_embeds", "time_ids"))
    y = torch.cat([pooled, sdxl_kernels.fourier_embedding(time_ids, 16).reshape(2, -1)], dim=1)  # ADM vector
    extra = {"cond": {"context": ctx[1:], "y": y[1:]}, "uncond": {"context": ctx[:1], "y": y[:1]}}  # row 0: uncond
    sigmas = S.diffusers_sigmas(6, "leading", multistep=name == "dpmpp_2m")
    x = fx["init_noise"] * (sigmas[0] ** 2 + 1) ** 0.5
    kwargs = {}
    if name == "euler_ancestral":
        draws = iter(fx["unet_cfg.euler_ancestral.step_noise"])
        kwargs["noise_sampler"] = lambda sigma, sigma_next: next(draws)
    out = S.SAMPLERS[name](S.CFGDenoiser(S.EpsDenoiser(unet), 5.0), x, sigmas, extra_args=extra, **kwargs)
    ref = fx[f"unet_cfg.{name}.final"]
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


# ---- Gaussian data: D(x; σ) = (s² x + σ² μ) / (s² + σ²) exactly ---------------------------------------------------

MU, STD = 0.7, 0.5


def gaussian_denoiser(x, sigma):
    s2 = S._expand(sigma, x) ** 2
    return (STD**2 * x + s2 * MU) / (STD**2 + s2)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_sampler_solves_gaussian_flow_ode(name):
    """The probability-flow ODE maps μ + √(s² + σ0²)·z to exactly μ + s·z; the error shrinks at the method's order
    (Euler and DDIM first order, the others at least second) going from 40 to 100 Karras steps."""
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in (40, 100):
        sigmas = S.karras_sigmas(n, 0.002, 80.0).double()
        x = MU + (STD**2 + sigmas[0] ** 2) ** 0.5 * z
        out = S.SAMPLERS[name](gaussian_denoiser, x, sigmas)
        errors.append((out - (MU + STD * z)).abs().max().item())
    first_order = name in ("euler", "ddim")
    assert errors[1] < (6e-2 if first_order else 5e-3), errors
    assert errors[0] / errors[1] > (2.0 if first_order else 5.0), errors


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_reaches_gaussian_data_distribution(name):
    """Final mean and std within ~3 standard errors plus the first-order bias left at 200 steps."""
    g = torch.Generator().manual_seed(1)
    sigmas = S.karras_sigmas(200, 0.002, 80.0).double()
    x = MU + (STD**2 + sigmas[0] ** 2) ** 0.5 * torch.randn(8, 4, 32, 32, generator=g, dtype=torch.float64)
    out = S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=g)
    assert abs(out.mean().item() - MU) < 0.015 and abs(out.std().item() - STD) < 0.02, (out.mean(), out.std())


def test_stochastic_samplers_are_reproducible_per_generator():
    sigmas = S.karras_sigmas(5, 0.1, 10.0)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for name in STOCHASTIC:
        a, b, c = (S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(s))
                   for s in (3, 3, 4))
        assert torch.equal(a, b) and not torch.equal(a, c), name


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_randn_with_one_generator_per_row():
    rows = S.randn((3, 4, 5), _gens(7, 8, 9), dtype=torch.float64)
    for i, seed in enumerate((7, 8, 9)):
        want = torch.randn((1, 4, 5), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.equal(rows[i:i + 1], want)
    one = S.randn((3, 4, 5), torch.Generator().manual_seed(7))  # a single generator: unchanged behaviour
    assert torch.equal(one, torch.randn((3, 4, 5), generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        S.randn((3, 4), _gens(1, 2))


@pytest.mark.parametrize("name, kwargs", [(n, {}) for n in STOCHASTIC] + [("ddim", {"eta": 1.0}),
                                                                           ("euler", {"s_churn": 1.0})])
def test_stochastic_sampler_rows_follow_their_own_generator(name, kwargs):
    """With a list of generators, row i of a batch is what the sampler gives row i alone with generator i."""
    sigmas = S.karras_sigmas(6, 0.1, 10.0).double()
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    batch = S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=_gens(3, 4, 5), **kwargs)
    for i, seed in enumerate((3, 4, 5)):
        alone = S.SAMPLERS[name](gaussian_denoiser, x[i:i + 1], sigmas, generator=_gens(seed), **kwargs)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-12, atol=1e-12)
    shared = S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), **kwargs)
    assert not torch.allclose(shared[1:], batch[1:])  # one shared generator draws differently: not vacuous
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=_gens(1, 2), **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_model_sees_sigma_in_float32_for_low_precision_latents(dtype):
    """A bf16 sigma keeps 3 significant digits, enough to snap to the wrong training timestep."""
    sigmas = S.legacy_ddpm_sigmas(7)
    seen = []

    def model(x, sigma):
        seen.append(sigma)
        return x * 0.5

    S.sample_euler(model, torch.ones(2, 4, 4, 4, dtype=dtype), sigmas)
    assert all(s.dtype == torch.float32 and s.shape == (2,) for s in seen)
    torch.testing.assert_close(torch.stack([s[0] for s in seen]), sigmas[:-1], rtol=0, atol=0)


def test_ddim_eta0_equals_euler_and_eta1_equals_euler_ancestral():
    """DDIM is Euler in σ form (Karras et al. 2022, sec. 3); DDIM with η=1 takes the ancestral split."""
    sigmas = S.karras_sigmas(8, 0.1, 10.0).double()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    torch.testing.assert_close(S.sample_ddim(gaussian_denoiser, x, sigmas),
                               S.sample_euler(gaussian_denoiser, x, sigmas), rtol=1e-10, atol=1e-10)
    ddim = S.sample_ddim(gaussian_denoiser, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(5))
    ancestral = S.sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim, ancestral, rtol=1e-10, atol=1e-10)


def test_lms_coefficients_integrate_polynomials_exactly():
    grid = S.legacy_ddpm_sigmas(6).double().numpy()
    # the order-k weights integrate 1 exactly: their sum is σ_{i+1} − σ_i
    for order, i in [(1, 0), (2, 1), (3, 2), (4, 4)]:
        total = sum(S.lms_coefficient(order, grid, i, j) for j in range(order))
        assert math.isclose(total, grid[i + 1] - grid[i], rel_tol=1e-12)


def test_callback_sees_every_step_and_progress_is_quiet_by_default(capsys):
    sigmas = S.karras_sigmas(4, 0.1, 10.0)
    x = torch.randn(1, 4, 4, 4)
    for name in ALL_SAMPLERS:
        seen = []
        S.SAMPLERS[name](gaussian_denoiser, x, sigmas, callback=lambda info: seen.append(info["i"]))
        assert seen == [0, 1, 2, 3], name
    assert capsys.readouterr().err == ""
    S.sample_euler(gaussian_denoiser, x, sigmas, disable=False)
    assert "step 4/4" in capsys.readouterr().err


# ---- denoiser and CFG ------------------------------------------------------------------------------------------


class RecordingUNet:
    """A stand-in UNet returning a fixed eps-like function of its inputs, recording each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, timesteps, context, y):
        self.calls.append((x.clone(), timesteps.clone(), context.clone(), y.clone()))
        return 0.3 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + y[:, :1].view(-1, 1, 1, 1)


def _cond(b, value):
    return {"context": torch.full((b, 3, 8), value), "y": torch.full((b, 5), value)}


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_eps_denoiser_snaps_sigma_and_applies_scalings(prediction):
    unet = RecordingUNet()
    den = S.EpsDenoiser(unet, prediction=prediction)
    table = S.training_sigmas()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([table[500].item() * 1.001, table[20].item() * 0.999])
    out = den(x, sigma, _cond(2, 0.5))
    _, t, _, _ = unet.calls[0]
    assert t.tolist() == [500.0, 20.0] and t.dtype == torch.float32
    s = table[[500, 20]].view(-1, 1, 1, 1)
    c_in = 1 / (s**2 + 1) ** 0.5
    net = 0.3 * x * c_in + 1.0
    torch.testing.assert_close(unet.calls[0][0], x * c_in)
    expected = x - s * net if prediction == "eps" else x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * net
    torch.testing.assert_close(out, expected)


def test_cfg_one_call_uncond_first_and_guidance():
    unet = RecordingUNet()
    den = S.EpsDenoiser(unet)
    guided = S.CFGDenoiser(den, 5.0)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = _cond(2, 1.0), _cond(2, -1.0)
    out = guided(x, 3.0, cond=cond, uncond=uncond)
    assert len(unet.calls) == 1
    _, t, ctx, _ = unet.calls[0]
    assert ctx.shape[0] == 4 and (ctx[:2] == -1).all() and (ctx[2:] == 1).all()
    d_u, d_c = den(x, 3.0, uncond), den(x, 3.0, cond)
    torch.testing.assert_close(out, d_u + 5.0 * (d_c - d_u))
    # rescale 1: the guided x0 takes the per-sample std of the conditional one
    rescaled = S.CFGDenoiser(den, 5.0, rescale=1.0)(x, 3.0, cond, uncond)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3)), d_c.std(dim=(1, 2, 3)))


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_SAMPLERS)
@pytest.mark.parametrize("sigmas", [
    torch.tensor([1.0, 2.0, 0.0]),       # not descending
    torch.tensor([2.0, 2.0, 0.0]),       # repeated
    torch.tensor([[2.0, 1.0, 0.0]]),     # not 1-D
    torch.tensor([2.0]),                 # no step
    torch.tensor([2.0, 1.0, -0.5]),      # negative
    torch.tensor([float("nan"), 1.0, 0.0]),
], ids=["ascending", "repeated", "2d", "single", "negative", "nan"])
def test_bad_sigmas_raise(name, sigmas):
    with pytest.raises(ValueError):
        S.SAMPLERS[name](gaussian_denoiser, torch.randn(1, 4, 4, 4), sigmas)


def test_bad_shapes_raise():
    den = S.EpsDenoiser(RecordingUNet())
    with pytest.raises(ValueError):
        S.sample_euler(gaussian_denoiser, torch.randn(4), S.karras_sigmas(2, 0.1, 1.0))  # no batch dim
    with pytest.raises(ValueError):
        den(torch.randn(4, 4, 4), 1.0, _cond(4, 0.0))  # not (B, C, H, W)
    with pytest.raises(ValueError):
        den(torch.randn(2, 4, 4, 4), torch.ones(3), _cond(2, 0.0))  # sigma batch mismatch
    with pytest.raises(ValueError):
        den(torch.randn(2, 4, 4, 4), 1.0, _cond(3, 0.0))  # cond batch mismatch
    with pytest.raises(ValueError):
        den(torch.randn(2, 4, 4, 4), 1.0, {"context": torch.zeros(2, 3, 8)})  # missing y
    with pytest.raises(ValueError):
        S.CFGDenoiser(den, 5.0)(torch.randn(2, 4, 4, 4), 1.0, _cond(2, 0.0), {"context": torch.zeros(2, 3, 8)})
    with pytest.raises(ValueError):
        S.EpsDenoiser(RecordingUNet(), prediction="x0")
