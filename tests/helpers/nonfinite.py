"""A tiny `BaseNVSModel` whose training loss is NaN on chosen scenes, and its data (tests/test_nonfinite.py).

Run as a script it trains under Lightning DDP on 2 CPU processes (gloo)::

    python nonfinite.py ddp

Rank ``r`` sees scenes ``s{2 i + r}`` at step ``i`` (batch size 1, no shuffling). The loss is NaN on ``s3`` (rank 1
only, step 1: skipped, training goes on) and on ``s6``, ``s8`` (rank 0 only, steps 3 and 4: two consecutive skips,
more than ``max_skipped=1``, so both ranks stop with `NonFiniteLossError`). Each rank prints its state after step
3 (``STATE {...}``) and the error it stopped with (``STOPPED rank=r ...``).
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from genvs.core.model import BaseNVSModel, NonFiniteLossError, OptimConfig
from genvs.core.views import Views


class TinyNaN(BaseNVSModel):
    """Denoises nothing: a 1x1 conv regresses a fixed colour; the loss is NaN on ``nan_scenes``."""

    def __init__(self, nan_scenes: list[str] | None = None, **kwargs):
        kwargs.setdefault("optim", OptimConfig(lr=1e-2, warmup_steps=2))
        kwargs.setdefault("ema_decay", 0.9)
        kwargs.setdefault("channels_last", False)
        super().__init__(**kwargs)
        self.nan_scenes = set(nan_scenes or [])
        self.denoiser = nn.Conv2d(3, 3, 1)

    def training_loss(self, views: Views) -> dict[str, torch.Tensor]:
        x = views.images.flatten(0, 1)
        loss = (self.denoiser(x) - 0.5).pow(2).mean()
        if self.nan_scenes & set(views.scene):
            loss = loss * float("nan")
        return {"loss": loss}


class Scenes(Dataset):
    def __init__(self, n: int = 12):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Views:
        g = torch.Generator().manual_seed(i)
        images = torch.rand(1, 1, 3, 4, 4, generator=g) * 2 - 1
        return Views(images, torch.eye(3).expand(1, 1, 3, 3).clone(), torch.eye(4).expand(1, 1, 4, 4).clone(), scene=[f"s{i}"])


def loader(n: int = 12) -> DataLoader:
    return DataLoader(Scenes(n), batch_size=1, shuffle=False, collate_fn=Views.collate)


class RankData(L.LightningDataModule):
    """Rank ``r`` of ``w`` gets scenes ``r, r + w, r + 2w, ...`` in order (a sampler built once DDP is up)."""

    def train_dataloader(self) -> DataLoader:
        from torch.utils.data import DistributedSampler

        data = Scenes()
        sampler = DistributedSampler(data, shuffle=False) if torch.distributed.is_initialized() else None
        return DataLoader(data, batch_size=1, sampler=sampler, collate_fn=Views.collate)


def state(model: TinyNaN, trainer: L.Trainer) -> dict:
    opt = trainer.optimizers[0]
    steps = [int(s["step"]) for s in opt.state.values() if "step" in s]
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "skipped": model._skipped_steps,
        "ema_updates": int(model.ema.num_updates),
        "adam_steps": steps[0] if steps else 0,
        "lr_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        "weights": [float(p.detach().double().sum()) for p in model.denoiser.parameters()],
    }


def say(line: str) -> None:
    """One line in one write: the two ranks share stdout and must not interleave."""
    sys.stdout.flush()
    os.write(1, (line.replace("\n", " ") + "\n").encode())


class Snapshot(L.Callback):
    """Prints the rank's state once ``at_step`` optimizer steps are done."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            say("STATE " + json.dumps(state(pl_module, trainer)))


def run_ddp() -> None:
    L.seed_everything(0, verbose=False)
    model = TinyNaN(nan_scenes=["s3", "s6", "s8"], nonfinite_loss="skip", max_skipped=1)
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Snapshot(3)], use_distributed_sampler=False,
    )
    try:
        trainer.fit(model, datamodule=RankData())
    except NonFiniteLossError as e:
        say(f"STOPPED rank={trainer.global_rank} step={trainer.global_step} {e}")
    finally:
        # Lightning leaves the gloo group up after the error; its threads then abort the interpreter's exit
        # now and then ("terminate called without an active exception", return code -6)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:] == ["ddp"]:
        run_ddp()
