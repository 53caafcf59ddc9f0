"""Kill-safe training checkpoints: OUT/checkpoints/step-NNNNNNNN/ holding the weights as safetensors, the
trainer state (optimizer, scheduler, data position, RNG) as a weights-only torch file and the config as JSON.

A checkpoint is written into a hidden temporary folder, every file fsynced, a `COMPLETE` marker written last,
then the folder renamed into place and its parent fsynced: a run killed mid-write (or a full disk) leaves the
previous checkpoint as the latest one, and the half-written folder is ignored and cleaned up later.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_NAME = re.compile(r"^step-(\d{8})$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(out: str | os.PathLike, step: int, weights: dict[str, dict[str, torch.Tensor]],
                    trainer_state: dict, config_json: str, keep: int = 2) -> Path:
    """Write checkpoint `step` (weights: file stem → state dict) and keep the newest `keep` checkpoints."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for stem, state in weights.items():
            path = tmp / f"{stem}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
            _fsync_file(path)
        torch.save(trainer_state, tmp / "trainer.pt")
        _fsync_file(tmp / "trainer.pt")
        (tmp / "config.json").write_text(config_json)
        _fsync_file(tmp / "config.json")
        (tmp / MARKER).write_text(str(step))
        _fsync_file(tmp / MARKER)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"checkpoint for step {step} not written ({e.strerror or e}); the latest complete "
                                   f"checkpoint is still {previous or 'none'}") from e
        raise
    for old in complete_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def complete_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(weights by file stem, trainer state, config dict) of a complete checkpoint folder."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    weights = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    config = json.loads((path / "config.json").read_text())
    return weights, trainer_state, config
