"""Autoencoder training (SDXL paper Sec. 2.4): `AutoencoderKL` on reconstruction + KL (+ perceptual, + PatchGAN
from `disc_start`), AdamW, bf16 autocast with the losses in fp32, gradient accumulation, EMA of the weights,
DDP/FSDP2, kill-safe checkpoints, evaluation before and after.

`VAETrainer` is a `loop.Trainer`: the step loop (`run`), the data order and its resumption (`_batches`), the
stop flag, checkpoint cadence and the optimizer-state handling under FSDP are the UNet trainer's. What
differs is here: the model and its losses (`micro_loss`, `accumulate`, `optimizer_step` with the
discriminator), what a checkpoint holds (`save`/`resume`), the exports and the evaluation (`export`,
`evaluate`; the periodic hook `sample_grid` evaluates every `eval_every` steps).

Reproducibility as in loop.py: the posterior draw of each micro-batch comes from (seed, global micro-batch
index), the crops and the data order from (seed, epoch), so a resumed run repeats the uninterrupted one.

Outputs in OUT: vae_ema.safetensors (the EMA weights, official single-file layout `first_stage_model.*`: the
weights to use), vae.safetensors (the raw weights), vae_diffusers/ (the EMA weights in the diffusers layout;
the raw weights when EMA is off), eval.json and eval_grid.png, log.jsonl, checkpoints/.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint as ckpt_io
from ..config import VAEConfig
from ..vae import AutoencoderKL
from . import distributed as D
from . import metrics
from . import vae_losses as L
from .data import ImageFolderDataset, derive_seed
from .ema import EMA
from .loop import Trainer, TrainResult, build_data, run_trainer
from .runtime import atomic_save, image_grid
from .vae_config import VAETrainConfig

log = logging.getLogger(__name__)


class Reconstruct(nn.Module):
    """x, ε → (x̂, mean, logvar): encode, draw z = mean + exp(logvar/2)·ε, decode. One forward, so DDP and FSDP
    see the whole autoencoder step."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        mean, logvar = self.vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps.to(mean.dtype)
        return self.vae.decode(z), mean.clone(), logvar  # not a view of the moments: FSDP2 hooks outputs


class DiscPair(nn.Module):
    """The discriminator on real and reconstructed images in one forward (each its own BatchNorm batch, as in
    LDM), so a DDP wrapper sees one forward per backward."""

    def __init__(self, disc: nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        return self.disc(real), self.disc(fake)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Gradients flow through `module` to its input but not into its parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def build_vae(config: VAETrainConfig) -> AutoencoderKL:
    """The VAE to train: random (tiny or SDXL structure) or loaded from `config.model` (official single file:
    the SDXL preset, or the tiny one with tiny_models; diffusers folders: their config.json)."""
    vae_cfg = VAEConfig.tiny() if config.tiny_models else VAEConfig.sdxl()
    if not config.model:
        return AutoencoderKL(vae_cfg)
    path = Path(config.model)
    if not path.exists():
        raise FileNotFoundError(f"VAE checkpoint {path} does not exist")
    for folder in (path, path / "vae"):
        if path.is_dir() and (folder / "config.json").is_file():
            vae_cfg = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
            break
    return ckpt_io.load_weights(AutoencoderKL(vae_cfg), path)


def load_eval_images(config: VAETrainConfig) -> tuple[torch.Tensor | None, bool]:
    """(images (N, 3, res, res) in [-1, 1] as centre crops, held_out): the first `eval_images` of `eval_data`,
    else the last `eval_images` files of the `data` folder, which `data_config` keeps out of training; (None,
    False) when there is no folder to take them from."""
    res = config.resolution
    if config.eval_data:
        if not Path(config.eval_data).is_dir():
            raise FileNotFoundError(f"eval_data {config.eval_data} is not an image folder")
        ds = ImageFolderDataset(config.eval_data, [(res, res)], random_crop=False)
    elif Path(config.data).is_dir():
        log.info("no eval_data: the last %d images of %s are held out of training for evaluation",
                 config.eval_images, config.data)
        ds = ImageFolderDataset(config.data, [(res, res)], random_crop=False, holdout=config.eval_images,
                                split="holdout")
    else:
        log.warning("evaluation skipped: the training data is not a folder and no eval_data folder was given")
        return None, False
    n = min(config.eval_images, len(ds))
    return torch.stack([ds[i]["pixels"] for i in range(n)]), True


class VAETrainer(Trainer):
    def __init__(self, config: VAETrainConfig, vae: AutoencoderKL | None = None):
        self.config = cfg = config
        self.info = D.setup(None if cfg.device == "auto" else cfg.device)
        self.out = Path(cfg.out)
        dev = self.info.device
        # bad data and missing files fail before any model is built
        self.loader, self.sampler, self.dataset = build_data(cfg.data_config(), self.info)
        self.eval_x, self.held_out = load_eval_images(cfg)
        self.perceptual = L.load_torchscript(cfg.perceptual_weights, "perceptual loss")
        self.inception = L.load_torchscript(cfg.inception_weights, "rFID (Inception features)")
        if self.perceptual is not None:
            self.perceptual.to(dev)
        torch.manual_seed(cfg.seed)
        self.vae = vae = (vae if vae is not None else build_vae(cfg)).to(dev).float().train()
        f = vae.config.downsample_factor
        if cfg.resolution % f or (cfg.bucket_step and cfg.bucket_step % f):
            raise ValueError(f"resolution ({cfg.resolution}) and bucket_step must be multiples of the VAE's "
                             f"downsampling factor {f}")
        vae.use_kernels(cfg.use_kernels)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
        self.last = L.LastConvGrad(vae.decoder.conv_out)
        self.model = D.wrap(Reconstruct(vae), self.info, cfg.distributed, shard=[vae.encoder, vae.decoder])
        fused = {"fused": True} if dev.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=cfg.adam_betas, weight_decay=cfg.weight_decay, **fused)
        warm = max(1, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        self.ema = EMA(vae, cfg.ema_decay, "cpu" if cfg.ema_on_cpu else None) if cfg.ema_decay > 0 else None
        self.disc = self.disc_model = self.disc_optimizer = None
        if cfg.disc_start > 0:  # small: replicated (DDP) under either distributed mode
            self.disc = L.NLayerDiscriminator(vae.config.out_channels, cfg.disc_channels, cfg.disc_layers).to(dev)
            self.disc_model = D.wrap(DiscPair(self.disc), self.info, "ddp")
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr, betas=cfg.adam_betas,
                                                    weight_decay=cfg.weight_decay, **fused)
        self.step = self.epoch = self.consumed = 0
        self.eval_before: dict | None = None
        self._terms: dict[str, float] = {}

    # ---- one micro-batch ---------------------------------------------------------------------------------

    def adversarial(self) -> bool:
        """Whether the current step uses the discriminator (LDM: global_step ≥ disc_start)."""
        return self.disc is not None and self.step >= self.config.disc_start

    def micro_loss(self, batch, index: int):
        """(autoencoder loss, terms, x, x̂) of one micro-batch; `index` (global) seeds the posterior draw."""
        cfg, dev, vae = self.config, self.info.device, self.vae
        x = batch["pixels"].to(dev)
        b, _, h, w = x.shape
        f = vae.config.downsample_factor
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "vae-micro-batch", index))
        eps = torch.randn((b, vae.config.embed_dim, h // f, w // f), generator=gen).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            xrec, mean, logvar = self.model(x, eps)
        rec = L.reconstruction_loss(x, xrec, cfg.recon)
        terms = {"rec": rec}
        nll = rec
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            p = L.perceptual_distance(self.perceptual, x, xrec).mean()
            nll = nll + cfg.perceptual_weight * x[0].numel() * p
            terms["perceptual"] = p
        kl = L.kl_loss(mean, logvar)
        loss = nll + cfg.kl_weight * kl
        terms["kl"] = kl
        if self.adversarial():
            with frozen(self.disc), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                g = L.generator_loss(self.disc(xrec))
            lam = L.adaptive_weight(self.last.grad(nll), self.last.grad(g), cfg.disc_weight)
            loss = loss + lam * cfg.disc_factor * g
            terms.update(g_loss=g, d_weight=lam)
        self.last.clear()
        terms["ae_loss"] = loss
        return loss, terms, x, xrec

    def disc_loss(self, x: torch.Tensor, xrec: torch.Tensor):
        dev = self.info.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            real, fake = self.disc_model(x, xrec.detach())
        d = self.config.disc_factor * L.hinge_d_loss(real, fake)
        return d, {"d_loss": d, "logits_real": real.float().mean(), "logits_fake": fake.float().mean()}

    def accumulate(self, batches) -> float:
        """Forward and backward of one step's micro-batches for the autoencoder (and, from disc_start, the
        discriminator); returns the mean autoencoder loss; the mean of every term goes to the log."""
        cfg, info = self.config, self.info
        adversarial = self.adversarial()
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            index = (self.step * cfg.grad_accum + micro) * info.world_size + info.rank
            sync = micro == cfg.grad_accum - 1 or not info.distributed or cfg.distributed != "ddp"
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss, terms, x, xrec = self.micro_loss(batch, index)
                (loss / cfg.grad_accum).backward()
            if adversarial:
                dsync = micro == cfg.grad_accum - 1 or not info.distributed
                with contextlib.nullcontext() if dsync else self.disc_model.no_sync():
                    d, dterms = self.disc_loss(x, xrec)
                    (d / cfg.grad_accum).backward()
                terms.update(dterms)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            self.consumed += 1
        total = sums["ae_loss"]
        if not all(math.isfinite(v) for v in sums.values()):
            raise FloatingPointError(f"step {self.step}: non-finite loss terms {sums}; stopping (lower the lr?)")
        self._terms = sums
        return total

    def optimizer_step(self) -> None:
        """Clip, AdamW and the learning-rate schedule for the autoencoder, EMA; AdamW for the discriminator."""
        super().optimizer_step()
        if self.adversarial():
            self.disc_optimizer.step()
            self.disc_optimizer.zero_grad(set_to_none=True)

    def _log(self, loss: float, dt: float, global_batch: int, bar) -> None:
        if not self.info.is_main:
            return
        lr = self.scheduler.get_last_lr()[0]
        rec = {"step": self.step, "loss": loss, **self._terms, "lr": lr, "seconds": dt}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if bar is not None:
            bar.update(loss=f"{loss:.4g}", rec=f"{self._terms['rec']:.4g}", img_s=f"{global_batch / max(dt, 1e-9):.2f}")
        elif self.step % self.config.log_every == 0:
            log.info("step %d %s", self.step, " ".join(f"{k} {v:.5g}" for k, v in self._terms.items()))

    # ---- checkpoints -------------------------------------------------------------------------------------

    weights_name = "vae"
    command = "train-vae"

    sharded_prefix = "vae."  # self.model is Reconstruct(vae)

    def trained_module(self) -> torch.nn.Module:
        return self.vae

    def _extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.disc is None:
            return {}
        return {"disc": {k: v.detach().cpu() for k, v in self.disc.state_dict().items()}}

    def _extra_state(self) -> dict:
        return {"disc_optimizer": self.disc_optimizer.state_dict() if self.disc is not None else None,
                "eval_before": json.dumps(self.eval_before)}

    def _load_extra(self, weights: dict, trainer_state: dict) -> None:
        if self.disc is not None:
            self.disc.load_state_dict(weights["disc"])
            self.disc_optimizer.load_state_dict(trainer_state["disc_optimizer"])
        self.eval_before = json.loads(trainer_state["eval_before"])

    def _no_checkpoint(self) -> None:
        self.evaluate_before()

    # ---- evaluation and export ---------------------------------------------------------------------------

    def _host(self, weights: dict[str, torch.Tensor]) -> AutoencoderKL:
        vae = AutoencoderKL(self.vae.config).to(self.info.device)
        vae.load_state_dict({k: v.to(weights[k].dtype) for k, v in weights.items()})
        return vae.use_kernels(self.config.use_kernels).eval()

    def _ema_weights(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.ema is None:
            return raw
        return {**raw, **{k: v.to(raw[k].dtype) for k, v in self._ema_state().items()}}

    @torch.no_grad()
    def reconstruct(self, vae: AutoencoderKL, x: torch.Tensor, batch: int = 4) -> torch.Tensor:
        """Posterior-mean reconstructions of x (N, 3, H, W) in [-1, 1], in fp32 on the CPU."""
        dev, out = self.info.device, []
        for i in range(0, len(x), batch):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                out.append(vae(x[i: i + batch].to(dev)).float().cpu())
        return torch.cat(out)

    def _metrics(self, x01: torch.Tensor, r01: torch.Tensor) -> dict:
        m = {"psnr": metrics.summarize(metrics.psnr(x01, r01)), "ssim": metrics.summarize(metrics.ssim(x01, r01))}
        if self.inception is not None:
            with torch.no_grad():
                fa, fb = (self.inception(t).float().flatten(1).numpy() for t in (x01, r01))
            m["rfid"] = metrics.frechet_distance(fa, fb)
        return m

    def evaluate(self) -> dict | None:
        """PSNR / SSIM (/ rFID) of the raw and the EMA weights on the evaluation images, and the three rows of
        the grid: {"raw": {...}, "ema": {...}, "images": (x, raw recon, EMA recon) in [0, 1]} (main rank; a
        collective under FSDP, so every rank calls it)."""
        raw = D.full_state_dict(self.vae)
        ema = self._ema_weights(raw)
        if self.eval_x is None or not self.info.is_main:
            return None
        x01 = (self.eval_x + 1) / 2
        result, recons = {}, []
        for name, weights in (("raw", raw), ("ema", ema)):
            r01 = ((self.reconstruct(self._host(weights), self.eval_x) + 1) / 2).clamp(0, 1)
            result[name] = self._metrics(x01, r01)
            recons.append(r01)
        result["images"] = (x01, *recons)
        return result

    def evaluate_before(self) -> None:
        ev = self.evaluate()
        self.eval_before = None if ev is None else {k: ev[k] for k in ("raw", "ema")}

    def sample_grid(self) -> None:
        """Trainer.run's periodic hook (every `eval_every` steps): the evaluation, logged to log.jsonl."""
        ev = self.evaluate()
        if ev is not None:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "eval": {k: ev[k] for k in ("raw", "ema")}}) + "\n")

    def export(self) -> None:
        """vae.safetensors (raw), vae_ema.safetensors (EMA; the weights to use) in the official layout,
        vae_diffusers/ (EMA) in the diffusers layout; eval.json and eval_grid.png."""
        raw = D.full_state_dict(self.vae)
        ema = self._ema_weights(raw)
        after = self.evaluate()
        if not self.info.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        host = AutoencoderKL(self.vae.config)
        host.load_state_dict(raw)
        atomic_save(host, self.out / "vae.safetensors")
        host.load_state_dict(ema)
        if self.ema is not None:
            atomic_save(host, self.out / "vae_ema.safetensors")
        ckpt_io.save_diffusers_vae(host, self.out / "vae_diffusers")
        self._write_eval(after)

    def _write_eval(self, after: dict | None) -> None:
        cfg = self.config
        report = {"step": self.step, "images": 0 if self.eval_x is None else len(self.eval_x),
                  "held_out": self.held_out, "resolution": cfg.resolution,
                  "weights_to_use": "vae_ema.safetensors" if self.ema is not None else "vae.safetensors",
                  "before": self.eval_before,
                  "after": None if after is None else {k: after[k] for k in ("raw", "ema")}}
        if self.inception is None:
            report["rfid"] = "skipped: no --inception-weights given"
        if after is None:
            report["skipped"] = "no evaluation images (give --eval-data DIR)"
        (self.out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
        if after is not None:
            strips = torch.cat(after["images"], dim=3)  # (N, 3, H, 3·W): input | raw | EMA
            from PIL import Image

            Image.fromarray(image_grid(strips).numpy()).save(self.out / "eval_grid.png")
        if after is not None and self.eval_before is not None:
            b, a = self.eval_before["raw"], after["ema"]
            log.info("held-out PSNR %.2f → %.2f dB (EMA), SSIM %.4f → %.4f", b["psnr"], a["psnr"], b["ssim"], a["ssim"])

    def run(self, resume: bool = False) -> TrainResult:
        if not resume:
            self.evaluate_before()
        return super().run(resume=resume)


def train_vae(config: VAETrainConfig, *, resume: bool = False, vae: AutoencoderKL | None = None) -> TrainResult:
    """Run (or, with resume, continue) autoencoder training as `config` says; see `VAETrainer`."""
    return run_trainer(VAETrainer(config, vae), resume)
