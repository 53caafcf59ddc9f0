"""Autoencoder training: the loss terms and metrics against independent references, the exports in both layouts,
bitwise resume (in process and after a real SIGTERM), bad input, and the tiny demo improving held-out PSNR."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdxl_model import AutoencoderKL, VAEConfig, load_weights
from sdxl_model.checkpoint import save_diffusers_vae
from sdxl_model.train import make_shapes_dataset, metrics, state
from sdxl_model.train import vae_losses as L
from sdxl_model.train.config import TrainConfig
from sdxl_model.train.loop import ConfigMismatch
from sdxl_model.train.vae_config import VAETrainConfig
from sdxl_model.train.vae_loop import Reconstruct, train_vae

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT),
                                                                          "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The training runs here are tiny: one thread avoids oversubscribing a small shared CPU (10× faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-data")
    make_shapes_dataset(root / "train", n=12, seed=11, min_side=32, max_side=80)
    make_shapes_dataset(root / "held", n=6, seed=12, min_side=32, max_side=80)
    return root


def tiny(tmp_path, data, **kw):
    base = dict(data=str(data / "train"), eval_data=str(data / "held"), out=str(tmp_path / "out"), progress=False,
                max_steps=4, save_every=2, batch_size=2, eval_images=4, device="cpu")
    return VAETrainConfig.tiny(**{**base, **kw})


# ---- config -------------------------------------------------------------------------------------------------


def test_config_files_presets_and_single_bucket(tmp_path):
    (tmp_path / "c.toml").write_text('kl_weight = 0.5\nadam_betas = [0.8, 0.9]\nrecon = "l2"\n')
    cfg = VAETrainConfig.from_file(tmp_path / "c.toml", base=VAETrainConfig.tiny())
    assert cfg.kl_weight == 0.5 and cfg.adam_betas == (0.8, 0.9) and cfg.recon == "l2" and cfg.tiny_models
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert VAETrainConfig.from_file(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown config field"):
        VAETrainConfig.from_dict({"lr_ae": 1})
    with pytest.raises(ValueError, match="recon"):
        VAETrainConfig(recon="l3")
    assert VAETrainConfig.tiny().differences(VAETrainConfig.tiny(max_steps=9, eval_every=3)) == {}
    assert set(VAETrainConfig.tiny().differences(VAETrainConfig.tiny(kl_weight=1.0))) == {"kl_weight"}
    assert VAETrainConfig.sdxl().disc_start == 50001 and VAETrainConfig.sdxl().kl_weight == 1e-6
    from sdxl_model.train.buckets import make_buckets

    d = VAETrainConfig(resolution=256).data_config()
    assert make_buckets(d.resolution, d.bucket_step, d.min_side or None, d.max_side or None) == [(256, 256)]


# ---- loss terms ---------------------------------------------------------------------------------------------


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    q = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros(()).double(), torch.ones(()).double())
    ref = torch.distributions.kl_divergence(q, p).sum((1, 2, 3)).mean()
    got = L.kl_loss(mean.bfloat16(), logvar.bfloat16())  # any input dtype: computed in fp32
    assert got.dtype == torch.float32
    torch.testing.assert_close(L.kl_loss(mean, logvar).double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=0)


def test_reconstruction_loss_is_a_per_image_sum():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    xn, yn = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    l1 = sum(np.abs(xn[b] - yn[b]).sum() for b in range(2)) / 2
    l2 = sum(((xn[b] - yn[b]) ** 2).sum() for b in range(2)) / 2
    assert math.isclose(L.reconstruction_loss(x, y, "l1").item(), l1, rel_tol=1e-6)
    assert math.isclose(L.reconstruction_loss(x, y, "l2").item(), l2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="l1"):
        L.reconstruction_loss(x, y, "huber")


def test_hinge_and_generator_losses_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.9]])
    fake = torch.tensor([[-3.0, 0.2], [1.5, -0.4]])
    by_hand = 0.5 * (sum(max(0.0, 1 - v) for v in real.flatten().tolist()) / 4
                     + sum(max(0.0, 1 + v) for v in fake.flatten().tolist()) / 4)
    assert math.isclose(L.hinge_d_loss(real, fake).item(), by_hand, rel_tol=1e-6)
    assert math.isclose(L.generator_loss(fake).item(), -sum(fake.flatten().tolist()) / 4, rel_tol=1e-6)


def test_last_conv_grad_and_adaptive_weight_match_autograd():
    """∇W through the hook equals autograd's gradient at the decoder's conv_out weight; λ is LDM's formula."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).use_kernels(False)
    disc = L.NLayerDiscriminator(3, 8, 2)
    last = L.LastConvGrad(vae.decoder.conv_out)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    xrec, mean, logvar = Reconstruct(vae)(x, torch.randn(2, 4, 16, 16))
    nll = L.reconstruction_loss(x, xrec)
    g = L.generator_loss(disc(xrec))
    w = vae.decoder.conv_out.weight
    for loss in (nll, g):
        (ref,) = torch.autograd.grad(loss, w, retain_graph=True)
        torch.testing.assert_close(last.grad(loss), ref, rtol=1e-4, atol=1e-6)
    a, b = last.grad(nll), last.grad(g)
    ratio = math.sqrt((a.double() ** 2).sum().item()) / (math.sqrt((b.double() ** 2).sum().item()) + 1e-4)
    assert math.isclose(L.adaptive_weight(a, b, 0.5).item(), min(max(ratio, 0.0), 1e4) * 0.5, rel_tol=1e-5)
    assert L.adaptive_weight(torch.ones(3) * 1e9, torch.zeros(3), 0.5).item() == pytest.approx(0.5e4)
    last.remove()


def test_discriminator_is_ldm_patchgan():
    d = L.NLayerDiscriminator(3, 64, 3)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)  # 256→128→64→32→31→30 (kernel 4, pad 1)


# ---- metrics ------------------------------------------------------------------------------------------------


def test_psnr_matches_numpy():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 16, 16, generator=g)
    y = (x + 0.05 * torch.randn(3, 3, 16, 16, generator=g)).clamp(0, 1)
    xn, yn = x.double().numpy(), y.double().numpy()
    ref = [10 * np.log10(1.0 / np.mean((xn[i] - yn[i]) ** 2)) for i in range(3)]
    np.testing.assert_allclose(metrics.psnr(x, y).numpy(), ref, rtol=1e-12)


def _ssim_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s SSIM of one (C, H, W) pair in float64, window by window ('valid' positions)."""
    k = np.arange(11) - 5.0
    g1 = np.exp(-(k ** 2) / (2 * 1.5 ** 2))
    win = np.outer(g1, g1) / np.outer(g1, g1).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[c, i:i + 11, j:j + 11], y[c, i:i + 11, j:j + 11]
                ma, mb = (win * a).sum(), (win * b).sum()
                va, vb = (win * (a - ma) ** 2).sum(), (win * (b - mb) ** 2).sum()
                cov = (win * (a - ma) * (b - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_direct_windowed_computation():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 14, 17, generator=g)
    y = (0.7 * x + 0.3 * torch.rand(2, 3, 14, 17, generator=g)).clamp(0, 1)
    got = metrics.ssim(x, y)
    ref = [_ssim_direct(x[i].double().numpy(), y[i].double().numpy()) for i in range(2)]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="11"):
        metrics.ssim(x[..., :8, :8], y[..., :8, :8])


def test_frechet_distance_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.3, 1.5, size=(50, 6))
    ma, mb, ca, cb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert math.isclose(metrics.frechet_distance(a, b), ref, rel_tol=1e-8)


# ---- the diffusers writer -----------------------------------------------------------------------------------


def test_diffusers_vae_writer_round_trip_and_diffusers_loads_it(tmp_path):
    torch.manual_seed(4)
    vae = AutoencoderKL(VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)).eval()
    save_diffusers_vae(vae, tmp_path / "vae")
    back = load_weights(AutoencoderKL(vae.config), tmp_path / "vae")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in vae.state_dict().items())
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z).sample, vae.use_kernels(False).decode(z), rtol=1e-4, atol=1e-4)


# ---- the loop -----------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_is_bitwise_equal_and_exports_load(tmp_path, shapes):
    """Across epochs (12 images, batches of 2, 2 micro-steps) with the discriminator switching on at step 3."""
    kw = dict(max_steps=8, save_every=3, grad_accum=2, disc_start=3, disc_channels=8, disc_layers=2)
    full = train_vae(tiny(tmp_path / "a", shapes, **kw))
    part = train_vae(tiny(tmp_path / "b", shapes, **{**kw, "max_steps": 5}))
    assert part.step == 5
    rest = train_vae(tiny(tmp_path / "b", shapes, **kw), resume=True)
    assert rest.step == 8 and rest.losses == full.losses[5:]
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    for name in ("vae.safetensors", "vae_ema.safetensors", "vae_diffusers/diffusion_pytorch_model.safetensors",
                 "checkpoints/step-00000008/disc.safetensors"):
        assert _same_file(a / name, b / name), name
    log = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    assert "g_loss" not in log[2] and {"g_loss", "d_weight", "d_loss", "rec", "kl"} <= set(log[3])
    assert json.loads((b / "eval.json").read_text())["before"] == json.loads((a / "eval.json").read_text())["before"]

    # the exports: EMA weights (not the raw ones) in the official and the diffusers layouts
    ema = load_file(str(a / "checkpoints" / "step-00000008" / "ema.safetensors"))
    official = load_file(str(a / "vae_ema.safetensors"))
    assert set(official) == {"first_stage_model." + k for k in ema}
    assert all(torch.equal(official["first_stage_model." + k], v) for k, v in ema.items())
    assert not _same_file(a / "vae.safetensors", a / "vae_ema.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    outs = []
    for src in (a / "vae_ema.safetensors", a / "vae_diffusers"):
        vae = load_weights(AutoencoderKL(VAEConfig.tiny()), src).eval()
        assert all(torch.equal(vae.state_dict()[k], v) for k, v in ema.items())
        with torch.no_grad():
            outs.append(vae(x))
    assert torch.equal(*outs)


def test_fine_tuning_starts_from_an_exported_vae(tmp_path, shapes):
    """--model: the official file and the diffusers folder both start from the exported weights."""
    train_vae(tiny(tmp_path / "first", shapes, max_steps=2))
    first = tmp_path / "first" / "out"
    after = json.loads((first / "eval.json").read_text())["after"]["ema"]
    for i, src in enumerate((first / "vae_ema.safetensors", first / "vae_diffusers")):
        train_vae(tiny(tmp_path / f"tune{i}", shapes, model=str(src), max_steps=1))
        before = json.loads((tmp_path / f"tune{i}" / "out" / "eval.json").read_text())["before"]["raw"]
        assert before == after, src


def test_mismatched_checkpoint_is_refused_before_any_step(tmp_path, shapes):
    train_vae(tiny(tmp_path, shapes, max_steps=2))
    out = tmp_path / "out"
    log_lines = (out / "log.jsonl").read_text()
    with pytest.raises(ConfigMismatch, match="kl_weight"):
        train_vae(tiny(tmp_path, shapes, max_steps=4, kl_weight=0.1), resume=True)
    assert (out / "log.jsonl").read_text() == log_lines
    unet_run = tmp_path / "unet"  # a UNet trainer's checkpoint is not a VAE one
    state.save_checkpoint(unet_run, 1, {"unet": {}}, {}, TrainConfig.tiny().to_json())
    with pytest.raises(ConfigMismatch, match="not a train-vae checkpoint"):
        train_vae(tiny(tmp_path, shapes, out=str(unet_run), max_steps=2), resume=True)


def test_corrupt_image_is_skipped_and_named(tmp_path, shapes, caplog):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "train" / "broken.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level("WARNING"):
        res = train_vae(tiny(tmp_path, data, max_steps=2))
    assert res.step == 2 and "broken.png" in caplog.text


def test_missing_files_are_clear_errors(tmp_path, shapes):
    with pytest.raises(FileNotFoundError, match="lpips.pt"):
        train_vae(tiny(tmp_path, shapes, perceptual_weights=str(tmp_path / "lpips.pt")))
    with pytest.raises(FileNotFoundError, match="eval_data"):
        train_vae(tiny(tmp_path, shapes, eval_data=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_vae(tiny(tmp_path, shapes, model=str(tmp_path / "vae.safetensors")))


class _MeanAbsPool(torch.nn.Module):
    """A stand-in perceptual network: mean |avgpool(x) - avgpool(y)| per image."""

    def forward(self, x, y):
        return (torch.nn.functional.avg_pool2d(x, 4) - torch.nn.functional.avg_pool2d(y, 4)).abs().mean((1, 2, 3))


class _PooledFeatures(torch.nn.Module):
    """A stand-in Inception: 4×4 average-pooled pixels as features (B, 3·8·8) of 32² images."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_perceptual_term_and_rfid_from_torchscript_files(tmp_path, shapes):
    torch.jit.save(torch.jit.script(_MeanAbsPool()), str(tmp_path / "p.pt"))
    torch.jit.save(torch.jit.script(_PooledFeatures()), str(tmp_path / "inception.pt"))
    train_vae(tiny(tmp_path, shapes, max_steps=2, perceptual_weights=str(tmp_path / "p.pt"), perceptual_weight=2.0,
                   inception_weights=str(tmp_path / "inception.pt")))
    rec = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[0])
    assert rec["perceptual"] > 0
    # nll = rec + w·C·H·W·p (LDM broadcasts the perceptual distance over every pixel); KL weight 1e-6
    assert math.isclose(rec["ae_loss"], rec["rec"] + 2.0 * 3 * 32 * 32 * rec["perceptual"] + 1e-6 * rec["kl"],
                        rel_tol=1e-5)
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert "rfid" not in report  # not "skipped"
    for when, which in (("before", "raw"), ("after", "raw"), ("after", "ema")):
        assert report[when][which]["rfid"] > 0, report


def test_kernels_track_eager(tmp_path, shapes):
    ours = train_vae(tiny(tmp_path / "k", shapes, max_steps=4, use_kernels=True))
    eager = train_vae(tiny(tmp_path / "e", shapes, max_steps=4, use_kernels=False))
    for a, b in zip(ours.losses, eager.losses):
        assert math.isclose(a, b, rel_tol=1e-5), (ours.losses, eager.losses)


def test_tiny_demo_improves_held_out_psnr(tmp_path):
    """The CPU demo, shortened: 120 steps of the tiny preset on the shapes set, evaluated on held-out shapes."""
    make_shapes_dataset(tmp_path / "train", n=32, seed=0)
    make_shapes_dataset(tmp_path / "held", n=8, seed=1)
    cfg = VAETrainConfig.tiny(data=str(tmp_path / "train"), eval_data=str(tmp_path / "held"),
                              out=str(tmp_path / "out"), max_steps=120, save_every=1000, progress=False,
                              device="cpu")
    train_vae(cfg)
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["held_out"] and report["images"] == 8 and report["weights_to_use"] == "vae_ema.safetensors"
    before, after = report["before"]["raw"], report["after"]["ema"]
    assert after["psnr"] >= before["psnr"] + 3.0, report
    assert after["ssim"] > before["ssim"] + 0.2, report
    from PIL import Image

    assert Image.open(tmp_path / "out" / "eval_grid.png").size == (3 * 3 * 32, 3 * 32)  # 8 strips in a 3×3 grid


# ---- DDP and FSDP2 (two gloo processes) ----------------------------------------------------------------------


def step_gradients(data: Path, out: str, mode: str, accum: int):
    """(trainer, {name: gradient}, mean loss over ranks) of one step with the discriminator on."""
    from sdxl_model.train.vae_loop import VAETrainer

    cfg = VAETrainConfig.tiny(data=str(data / "train"), eval_data=str(data / "held"), out=out, batch_size=2,
                              grad_accum=accum, distributed=mode, progress=False, disc_start=1, disc_channels=8,
                              disc_layers=2, eval_images=2, device="cpu")
    t = VAETrainer(cfg)
    t.step = 1  # past disc_start: every term and both models get gradients
    loss = t.accumulate(t._batches())
    named = list(t.vae.named_parameters()) + [(f"disc.{n}", p) for n, p in t.disc.named_parameters()]
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().cpu().contiguous()
             for n, p in named}
    if t.info.distributed:
        losses = [None] * t.info.world_size
        torch.distributed.all_gather_object(losses, loss)
        loss = sum(losses) / len(losses)
    return t, grads, loss


def test_two_process_ddp_and_fsdp_gradients_equal_one_process(tmp_path, shapes):
    """2 gloo processes × 1 micro-batch = 1 process × 2 micro-batches (same micro-batches, same draws)."""
    import socket

    from safetensors import safe_open

    _, ref, ref_loss = step_gradients(shapes, str(tmp_path / "one"), "ddp", accum=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, str(shapes), str(tmp_path / "two"), "ddp", "fsdp"]
    res = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for mode in ("ddp", "fsdp"):
        path = f"{tmp_path / 'two'}-{mode}.safetensors"
        got = load_file(path)
        assert got.keys() == ref.keys(), mode
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], msg=lambda m, k=k: f"{mode} {k}: {m}")
        with safe_open(path, "pt") as f:
            assert math.isclose(float(f.metadata()["loss"]), ref_loss, rel_tol=1e-6), mode


def _distributed_main(data: str, out: str, *modes: str) -> None:
    """Under torchrun: one step's gradients per distributed mode, saved by rank 0 as OUT-MODE.safetensors."""
    from safetensors.torch import save_file

    from sdxl_model.train import distributed as D

    torch.set_num_threads(1)
    for mode in modes:
        t, grads, loss = step_gradients(Path(data), f"{out}-{mode}.run", mode, accum=1)
        info = t.info
        if info.is_main:
            save_file(grads, f"{out}-{mode}.safetensors", metadata={"loss": repr(loss)})
        del t  # DDP/FSDP modules before the process group (distributed.cleanup)
    D.cleanup(info)


# ---- the command line ---------------------------------------------------------------------------------------


def sdxl_train_vae(*args):
    cmd = [sys.executable, "-m", "sdxl_model.cli", "train-vae", *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_help_sigterm_and_resume(tmp_path, shapes):
    """`sdxl train-vae` documents every field; a real SIGTERM writes a checkpoint, exits 143, and --resume
    finishes with exports identical to an uninterrupted run."""
    res = subprocess.run([sys.executable, "-m", "sdxl_model.cli", "train-vae", "--help"], env=ENV, cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0
    for name in VAETrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in res.stdout, name
    common = ["--preset", "tiny", "--data", shapes / "train", "--eval-data", shapes / "held", "--max-steps", 40,
              "--save-every", 100, "--batch-size", 2, "--no-progress", "--seed", 3, "--eval-images", 2,
              "--device", "cpu"]
    ref = sdxl_train_vae(*common, "--out", tmp_path / "ref")
    out = tmp_path / "run"
    proc = sdxl_train_vae(*common, "--out", out)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert not (out / "vae_ema.safetensors").exists()
    (ckpt,) = (out / "checkpoints").glob("step-*")
    assert 3 <= int(ckpt.name.split("-")[1]) < 40
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    resumed = sdxl_train_vae(*common, "--out", out, "--resume")
    stdout, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and "vae_ema.safetensors" in stdout, err
    for name in ("vae.safetensors", "vae_ema.safetensors"):
        assert _same_file(tmp_path / "ref" / name, out / name), f"{name} differs after resume"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 41))
    bad = sdxl_train_vae("--preset", "tiny", "--data", tmp_path / "nowhere", "--out", tmp_path / "o",
                         "--device", "cpu")
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "does not exist" in err


if __name__ == "__main__":
    _distributed_main(*sys.argv[1:])


def test_without_eval_data_the_last_images_are_held_out_of_training(tmp_path, shapes):
    from sdxl_model.train.vae_loop import VAETrainer

    trainer = VAETrainer(tiny(tmp_path, shapes, eval_images=3, eval_data=""))
    files = sorted(p.name for p in (shapes / "train").rglob("*.png"))
    trained = [r.path.name for r in trainer.dataset.records]
    assert trained == files[:-3] and trainer.held_out and trainer.eval_x.shape[0] == 3
