"""The SDXL training loop: frozen VAE and text encoders, the UNet trained on `objective.diffusion_loss` with
AdamW, warm-up, bf16 autocast, gradient accumulation and clipping, EMA, DDP/FSDP2, kill-safe checkpoints.

Reproducibility: every random draw of a micro-batch (noise level, noise, offset noise, dropout, the VAE
posterior sample) comes from a generator seeded by (seed, global micro-batch index), and the data order from
(seed, epoch). A resumed run therefore continues with exactly the draws the uninterrupted run would have made,
and a run on W processes with accumulation A sees the same micro-batches as one process with accumulation W·A.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from ..conditioning import build_adm_vector
from ..keys import StateMismatch
from . import distributed as D
from . import objective, state
from .buckets import make_buckets
from .config import TrainConfig
from .data import BucketBatchSampler, ImageFolderDataset, LatentCache, WebDatasetShards, collate, derive_seed
from .ema import EMA
from .runtime import StopFlag, agree, atomic_save, image_grid, progress_bar

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Models:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module


@dataclasses.dataclass
class TrainResult:
    out: Path
    step: int  # optimizer steps done in total
    losses: list[float]  # per step of this process's run (mean over its micro-batches)
    interrupted: bool  # stopped by SIGTERM / SIGINT (a checkpoint was written)


class ConfigMismatch(ValueError):
    pass


def build_models(config: TrainConfig) -> Models:
    """Random tiny base models (`config.tiny_models`) or the checkpoint `config.model`; base vs refiner must match."""
    if config.tiny_models:
        from ..presets import tiny_components

        base, refiner = tiny_components(config.seed)
        stage = refiner if config.refiner else base
        return Models(stage.unet, stage.vae, stage.text_encoder)
    if not config.model:
        raise ValueError("give a checkpoint to fine-tune (model / --model PATH) or use the tiny preset")
    comps = ckpt_io.load_pipeline_components(config.model)
    kind = getattr(comps, "kind", None)
    if kind is not None and (kind == "refiner") != config.refiner:
        raise ValueError(f"{config.model} is an SDXL {kind}, but the config trains a "
                         f"{'refiner' if config.refiner else 'base'} (refiner={config.refiner})")
    text = getattr(comps, "text_encoders", None) or getattr(comps, "text_encoder", None)
    if text is None:
        raise ValueError(f"{config.model} has no text encoders; training needs them")
    return Models(comps.unet, comps.vae, text)


def build_data(config: TrainConfig, info: D.DistInfo):
    """(loader, sampler or None, dataset) for an image folder or webdataset shards."""
    buckets = make_buckets(config.resolution, config.bucket_step, config.min_side or None, config.max_side or None)
    data = config.data
    if not data:
        raise ValueError("no training data: give data / --data DIR (image folder) or shard URLs")
    if Path(data).is_dir():
        ds = ImageFolderDataset(data, buckets, seed=config.seed, random_crop=config.random_crop,
                                new_crop_each_epoch=not config.cache_dir, holdout=config.holdout)
        sampler = BucketBatchSampler(ds.bucket_ids, config.batch_size, seed=config.seed, rank=info.rank,
                                     world_size=info.world_size)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=config.num_workers)
        return loader, sampler, ds
    if data.endswith(".tar") or "{" in data:
        ds = WebDatasetShards(data, buckets, config.batch_size, seed=config.seed, rank=info.rank,
                              world_size=info.world_size, random_crop=config.random_crop, repeat=True)
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=config.num_workers), None, ds
    if not Path(data).exists():
        raise FileNotFoundError(f"training data {data} does not exist (give an image folder or *.tar shard URLs)")
    raise FileNotFoundError(f"training data {data!r} is neither a folder nor webdataset shard URLs (*.tar)")


class Trainer:
    def __init__(self, config: TrainConfig, models: Models | None = None):
        self.config = config
        self.info = D.setup(None if config.device == "auto" else config.device)
        self.out = Path(config.out)
        dev = self.info.device
        cfg = config
        self.loader, self.sampler, self.dataset = build_data(cfg, self.info)  # bad data fails before model loading
        torch.manual_seed(cfg.seed)
        self.models = models or build_models(cfg)
        m = self.models
        for frozen in (m.vae, m.text_encoder):
            frozen.requires_grad_(False).eval().to(dev)
        unet = m.unet.to(dev).float().train()
        unet.use_kernels(cfg.use_kernels)
        m.vae.use_kernels(cfg.use_kernels)
        unet.gradient_checkpointing(cfg.gradient_checkpointing)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
        self.unet = unet
        self.model = D.wrap(unet, self.info, cfg.distributed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if dev.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay, **fused)
        warm = max(1, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = EMA(self.unet, cfg.ema_decay, "cpu" if cfg.ema_on_cpu else None)
        self.vae_cache = self.text_cache = None
        if cfg.cache_dir:
            self.vae_cache = LatentCache(Path(cfg.cache_dir) / "vae", _model_id(m.vae))
            self.text_cache = LatentCache(Path(cfg.cache_dir) / "text", _model_id(m.text_encoder))
        self.step = 0
        self.epoch = 0
        self.consumed = 0  # batches of this epoch consumed by finished steps

    # ---- one micro-batch ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _latents(self, batch, gen: torch.Generator) -> torch.Tensor:
        vae, dev = self.models.vae, self.info.device
        if self.vae_cache is None:
            mean, logvar = vae.encode(batch["pixels"].to(dev, next(vae.parameters()).dtype))
        else:
            moments = [self.vae_cache.get_or_compute(
                self.vae_cache.key(sid, tuple(c.tolist()), tuple(t.tolist())),
                lambda i=i: dict(zip(("mean", "logvar"), vae.encode(batch["pixels"][i: i + 1].to(dev)))))
                for i, (sid, c, t) in enumerate(zip(batch["source_id"], batch["crop_top_left"], batch["target_size"]))]
            mean = torch.cat([mo["mean"] for mo in moments]).to(dev)
            logvar = torch.cat([mo["logvar"] for mo in moments]).to(dev)
        eps = torch.randn(mean.shape, generator=gen).to(dev)
        z = mean.float() + torch.exp(0.5 * logvar.float()) * eps
        return z * vae.config.scale_factor

    @torch.no_grad()
    def _text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) of the captions; with a cache, only the captions not cached are encoded."""
        enc, cache = self.models.text_encoder, self.text_cache
        if cache is None:
            return enc(captions)
        keys = [cache.key(c) for c in captions]
        found = {k: cache.get(k) for k in dict.fromkeys(keys)}
        todo = [c for c, k in dict(zip(captions, keys)).items() if found[k] is None]
        if todo:
            context, pooled = enc(todo)
            for i, c in enumerate(todo):
                entry = {"context": context[i], "pooled": pooled[i]}
                cache.put(cache.key(c), entry)
                found[cache.key(c)] = entry
        cache.hits += len(captions) - len(todo)
        cache.misses += len(todo)
        context = torch.stack([found[k]["context"].to(self.info.device) for k in keys])
        pooled = torch.stack([found[k]["pooled"].to(self.info.device) for k in keys])
        return context, pooled

    @torch.no_grad()
    def _conditioning(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, y): text embeddings and the ADM vector with the batch's own size/crop/target."""
        cfg = self.config
        context, pooled = self._text(list(batch["caption"]))
        pooled = pooled.to(self.info.device).float()
        if cfg.refiner:
            score = torch.full((pooled.shape[0],), cfg.aesthetic_score)
            y = build_adm_vector(pooled, batch["original_size"], batch["crop_top_left"], refiner=True,
                                 aesthetic_score=score)
        else:
            y = build_adm_vector(pooled, batch["original_size"], batch["crop_top_left"], batch["target_size"])
        return context.to(self.info.device).float(), y

    def micro_loss(self, batch, index: int) -> torch.Tensor:
        """Loss of one micro-batch; `index` is its global micro-batch index (seeds every draw)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "micro-batch", index))
        latents = self._latents(batch, gen)
        context, y = self._conditioning(batch)
        levels = cfg.refiner_noise_levels if cfg.refiner else 1000
        d = objective.draw(latents.shape, gen, offset_noise=cfg.offset_noise, num_levels=levels,
                           text_dropout=cfg.text_dropout, micro_dropout=cfg.micro_dropout)
        dev = self.info.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            return objective.diffusion_loss(self.model, latents, context, y, d, min_snr_gamma=cfg.min_snr_gamma)

    # ---- checkpoints -------------------------------------------------------------------------------------

    def _optimizer_state(self) -> dict:
        if self.config.distributed == "fsdp" and self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, sd: dict) -> None:
        if self.config.distributed == "fsdp" and self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, sd,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            return
        self.optimizer.load_state_dict(sd)

    def _ema_state(self) -> dict[str, torch.Tensor]:
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu() for k, v in self.ema.state_dict().items()}

    # Hooks a trainer of another model (vae_loop.VAETrainer) overrides: its weights' file stem, its full state,
    # loading it back, and what else its checkpoints carry.
    weights_name = "unet"
    command = "sdxl train"

    sharded_prefix = ""  # where the trained module's names sit in `self.model`'s state dict

    def trained_module(self) -> torch.nn.Module:
        return self.unet

    def _trained_state(self) -> dict[str, torch.Tensor]:
        return D.full_state_dict(self.trained_module())

    def _load_trained(self, full: dict[str, torch.Tensor], latest: Path) -> None:
        if self.config.distributed == "fsdp" and self.info.distributed:
            self._load_sharded({self.sharded_prefix + k: v for k, v in full.items()})
            return
        module = self.trained_module()
        missing, unexpected = module.load_state_dict(full, strict=False)
        wrong = StateMismatch(frozenset(missing), frozenset(unexpected))
        if wrong:
            raise ConfigMismatch(f"{latest}: {type(module).__name__} weights do not fit ({wrong.inline(3)})")

    def _extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def _extra_state(self) -> dict:
        return {}

    def _load_extra(self, weights: dict, trainer_state: dict) -> None:
        pass

    def _no_checkpoint(self) -> None:
        """Called by `resume` when `out` holds no checkpoint yet."""

    def save(self) -> Path | None:
        weights = {self.weights_name: self._trained_state()}
        if self.ema is not None:
            weights["ema"] = self._ema_state()
        weights |= self._extra_weights()
        trainer_state = {
            "step": self.step, "epoch": self.epoch, "consumed": self.consumed,
            "optimizer": self._optimizer_state(), "scheduler": self.scheduler.state_dict(),
            "ema_updates": self.ema.num_updates if self.ema is not None else 0,
            "sampler": self.sampler.state_dict(self.consumed) if self.sampler is not None else None,
            "torch_rng": torch.get_rng_state(),
        } | self._extra_state()
        path = None
        if self.info.is_main:
            path = state.save_checkpoint(self.out, self.step, weights, trainer_state, self.config.to_json(),
                                         keep=self.config.keep_checkpoints)
        D.barrier(self.info)
        return path

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint in `out` (refused before any step if its config differs);
        False when there is none."""
        latest = state.latest_checkpoint(self.out)
        if latest is None:
            self._no_checkpoint()
            return False
        weights, ts, saved = state.load_checkpoint(latest)
        try:
            old = type(self.config).from_dict(saved)
        except (TypeError, ValueError) as e:
            raise ConfigMismatch(f"cannot resume from {latest}: it is not a {self.command} checkpoint ({e})") from e
        diff = old.differences(self.config)
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ConfigMismatch(f"cannot resume from {latest}: the config differs ({shown})")
        self._load_trained(weights[self.weights_name], latest)
        if self.ema is not None:
            self.ema.load_state_dict(weights["ema"], ts["ema_updates"])
        self._load_extra(weights, ts)
        self._load_optimizer_state(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.step, self.epoch, self.consumed = ts["step"], ts["epoch"], ts["consumed"]
        if self.sampler is not None and ts["sampler"] is not None:
            self.sampler.load_state_dict(ts["sampler"])
        torch.set_rng_state(ts["torch_rng"])
        log.info("resumed from %s at step %d", latest, self.step)
        return True

    def _load_sharded(self, full: dict[str, torch.Tensor]):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
        return [], []

    def export(self) -> None:
        """OUT/unet.safetensors and OUT/unet_ema.safetensors in the official single-file layout."""
        full = D.full_state_dict(self.model)
        ema = self._ema_state() if self.ema is not None else None
        if not self.info.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        host = copy.deepcopy(self.unet).cpu() if not (self.config.distributed == "fsdp" and self.info.distributed) \
            else None
        if host is None:
            from ..unet import UNet

            host = UNet(self.unet.config)
        host.load_state_dict(full)
        atomic_save(host, self.out / "unet.safetensors")
        if ema is not None:
            host.load_state_dict({k: v.to(full[k].dtype) for k, v in ema.items()}, strict=False)
            atomic_save(host, self.out / "unet_ema.safetensors")

    # ---- the loop ----------------------------------------------------------------------------------------

    def _batches(self):
        """(batch, consumed-in-epoch after it) forever, epoch after epoch, from the restored position on."""
        while True:
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)
                self.dataset.set_epoch(self.epoch)
            n = 0 if self.sampler is not None else self.consumed
            for batch in self.loader:
                if self.sampler is None and n < self.consumed:  # webdataset: skip what was consumed
                    n += 1
                    continue
                yield batch
            self.epoch += 1
            self.consumed = 0

    def accumulate(self, batches) -> float:
        """Forward and backward of one step's `grad_accum` micro-batches (gradients averaged over them and, under
        DDP/FSDP, over ranks); returns the mean loss of this process's micro-batches."""
        cfg, info = self.config, self.info
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            index = (self.step * cfg.grad_accum + micro) * info.world_size + info.rank
            sync = micro == cfg.grad_accum - 1 or not info.distributed or cfg.distributed != "ddp"
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss = self.micro_loss(batch, index)
                (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            self.consumed += 1
        if not math.isfinite(total):
            raise FloatingPointError(f"step {self.step}: the loss is {total}; stopping (lower the lr?)")
        return total

    def optimizer_step(self) -> None:
        """Clip, AdamW, learning-rate schedule, EMA."""
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.trained_module())

    def run(self, resume: bool = False) -> TrainResult:
        cfg, info = self.config, self.info
        if resume and not self.resume() and info.is_main:
            log.info("no checkpoint in %s: starting from step 0", self.out)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(cfg.to_json())
        losses: list[float] = []
        bar = progress_bar(cfg.progress, cfg.max_steps, info, self.step)
        interrupted = False
        global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
        batches = self._batches()
        with StopFlag() as stop:
            t0 = time.perf_counter()
            while self.step < cfg.max_steps:
                total = self.accumulate(batches)
                self.optimizer_step()
                self.step += 1
                losses.append(total)
                dt, t0 = time.perf_counter() - t0, time.perf_counter()
                self._log(total, dt, global_batch, bar)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.sample_grid()
                stop_now = agree(stop.requested is not None, info)
                if self.step % cfg.save_every == 0 or stop_now or self.step == cfg.max_steps:
                    self.save()
                if stop_now:
                    interrupted = True
                    log.warning("%s: checkpoint at step %d written; resume with --resume", stop.requested, self.step)
                    break
        if bar is not None:
            bar.close()
        if not interrupted:
            self.export()
        return TrainResult(self.out, self.step, losses, interrupted)

    def _log(self, loss: float, dt: float, global_batch: int, bar) -> None:
        if not self.info.is_main:
            return
        lr = self.scheduler.get_last_lr()[0]
        rec = {"step": self.step, "loss": loss, "lr": lr, "seconds": dt}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if bar is not None:
            bar.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{global_batch / max(dt, 1e-9):.2f}")
        elif self.step % self.config.log_every == 0:
            log.info("step %d loss %.5f lr %.2e %.2f it/s %.2f img/s", self.step, loss, lr, 1 / dt, global_batch / dt)

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """OUT/samples/step-N.png: the sample prompts through the sampling pipeline with the current weights."""
        if not self.info.is_main:
            return None
        from ..pipeline import SDXLPipeline, Stage

        m, cfg = self.models, self.config
        if cfg.refiner:
            log.info("sample grids need a base model; skipped for a refiner run")
            return None
        self.unet.eval()
        try:
            pipe = SDXLPipeline(Stage(self.unet, m.vae, m.text_encoder))
            size = (cfg.resolution, cfg.resolution)
            images = pipe(list(cfg.sample_prompts), steps=cfg.sample_steps, size=size, seed=cfg.seed,
                          output="tensor", disable=True)
        finally:
            self.unet.train()
        grid = image_grid(images)
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(grid.numpy()).save(path)
        return path


def _model_id(model: torch.nn.Module) -> str:
    """Identifies frozen weights for the cache: a hash over every parameter's bytes."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def train(config: TrainConfig, *, resume: bool = False, models: Models | None = None) -> TrainResult:
    """Run (or, with resume, continue) training as `config` says; see `Trainer`."""
    return run_trainer(Trainer(config, models), resume)


def run_trainer(trainer: Trainer, resume: bool) -> TrainResult:
    """`trainer.run`, then leave the process group; the caller keeps no reference, so the DDP/FSDP modules
    are gone before it (see distributed.cleanup)."""
    info, finished = trainer.info, False
    try:
        result = trainer.run(resume=resume)
        finished = True
    finally:
        del trainer
        D.cleanup(info, synchronize=finished)
    return result
