"""Run by tests/test_train_cli.py under torchrun (or alone): one step's gradients of the tiny preset, saved.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_grads.py DATA OUT.safetensors ddp|fsdp ACCUM
"""
import sys

import torch
from safetensors.torch import save_file

from sdxl_model.train import distributed as D
from sdxl_model.train.config import TrainConfig
from sdxl_model.train.loop import Trainer


def main(data, out, mode, accum):
    cfg = TrainConfig.tiny(data=data, out=out + ".run", batch_size=2, grad_accum=int(accum), distributed=mode,
                           progress=False, text_dropout=0.3, offset_noise=0.1)
    trainer = Trainer(cfg)
    loss = trainer.accumulate(trainer._batches())
    grads = {}
    for name, p in D.unwrap(trainer.model).named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        grads[name] = g.detach().cpu().contiguous()
    losses = [None] * trainer.info.world_size
    if trainer.info.distributed:
        torch.distributed.all_gather_object(losses, loss)
    else:
        losses = [loss]
    info = trainer.info
    if info.is_main:
        save_file(grads, out, metadata={"loss": repr(sum(losses) / len(losses))})
    del trainer  # DDP/FSDP modules before the process group (distributed.cleanup)
    D.cleanup(info)


if __name__ == "__main__":
    main(*sys.argv[1:])
