"""Run `genvs fit` (one or several processes) and record what tests/test_ddp.py compares.

    python ddp_fit.py <record_dir> <genvs fit args...>

Lightning's DDP/FSDP launcher starts the other ranks by running this script again with the same
arguments. Written to ``record_dir``:

- ``losses.json`` (rank 0): the training loss of every step, averaged over the processes (the loss of the
  global batch);
- ``rank<r>_start.pt``: each process's model and EMA weights when training starts (after a resume has
  loaded them); under FSDP only ``rank0_start.pt``, the full weights and EMA gathered from the shards;
- ``fsdp_units.json`` (rank 0, FSDP only): the class of every module FSDP wrapped as a unit;
- ``writers.txt``: one line per checkpoint write, with the rank of the process that wrote it.

`recorded_run` does the same in the calling process (single-process runs).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

torch.set_num_threads(1)

from genvs.callbacks import AtomicCheckpointIO  # noqa: E402

RECORD = Path(sys.argv[1]) if __name__ == "__main__" else None


class Record(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from genvs.core.distributed import clean_param_name

        units = [type(m.module).__name__ for m in trainer.strategy.model.modules() if isinstance(m, FSDP)]
        if units:  # full weights and EMA, gathered from every process's shard (collectives)
            ema = pl_module.ema.gather()
            with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True):
                params = {f"denoiser.{clean_param_name(n)}": p.detach().clone() for n, p in pl_module.denoiser.named_parameters()}
            if trainer.global_rank == 0:
                (RECORD / "fsdp_units.json").write_text(json.dumps(units))
                torch.save({**params, **{f"ema.{k}": v for k, v in ema.items()}}, RECORD / "rank0_start.pt")
            return
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if k.startswith(("denoiser.", "ema."))}
        torch.save(state, RECORD / f"rank{trainer.global_rank}_start.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(RECORD / f"batches_rank{trainer.global_rank}.txt", "a") as f:
            f.write(f"step={trainer.global_step} epoch={trainer.current_epoch} scenes={batch.scene} views={batch.index.tolist()}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            (RECORD / "losses.json").write_text(json.dumps(self.losses))


class RecordingCheckpointIO(AtomicCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(RECORD / "writers.txt", "a") as f:
            f.write(f"{rank} {Path(path).name}\n")
        return super().save_checkpoint(checkpoint, path, storage_options)


def recorded_run(record: Path, args: list[str]):
    """`genvs fit` with the recording callback and checkpoint IO, in this process."""
    global RECORD
    RECORD = Path(record)
    RECORD.mkdir(parents=True, exist_ok=True)
    import genvs.cli as cli

    defaults = cli._trainer_defaults
    cli._trainer_defaults = lambda: {**defaults(), "callbacks": [Record()], "plugins": [RecordingCheckpointIO()]}
    try:
        return cli.run(args)
    finally:
        cli._trainer_defaults = defaults


if __name__ == "__main__":
    recorded_run(RECORD, sys.argv[2:])
