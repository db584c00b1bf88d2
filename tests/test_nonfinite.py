"""Non-finite training losses: ``error`` stops naming the batch's scenes; ``skip`` leaves the weights, optimizer
state and EMA untouched for that step (the LR schedule and global step move on), counts the skip, and stops
after more than ``max_skipped`` consecutive skips; under DDP the decision is collective, so a NaN on one rank
skips (or stops) every rank together instead of hanging the gradient all-reduce."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from genvs.core.model import NonFiniteLossError
from helpers.nonfinite import TinyNaN, loader, state

HELPER = Path(__file__).parent / "helpers" / "nonfinite.py"


class Weights(L.Callback):
    """The denoiser's weights after each optimizer step (``global_step`` -> tensors)."""

    def __init__(self):
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = [p.detach().clone() for p in pl_module.denoiser.parameters()]


def fit(model: TinyNaN, steps: int, *callbacks) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=list(callbacks))
    trainer.fit(model, loader())
    return trainer


def test_skip_leaves_weights_optimizer_and_ema_alone_and_counts(capsys, tmp_path):
    torch.manual_seed(0)
    model = TinyNaN(nan_scenes=["s1", "s3"], nonfinite_loss="skip", max_skipped=1)
    weights = Weights()
    trainer = fit(model, 5, weights)
    s = state(model, trainer)
    assert s["global_step"] == 5 and s["lr_epoch"] == 5  # skipped batches are consumed: schedule moves on
    assert s["skipped"] == 2 and s["ema_updates"] == 3 and s["adam_steps"] == 3  # ... but nothing is updated
    for step_before, step_skipped in ((1, 2), (3, 4)):
        for a, b in zip(weights.after[step_before], weights.after[step_skipped]):
            assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(weights.after[2], weights.after[3]))  # real steps update
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2
    out = capsys.readouterr().out
    assert re.search(r"skipping the update of step 1 .*loss nan on scenes s1", out)
    assert re.search(r"skipping the update of step 3 .*loss nan on scenes s3", out)
    # the count travels with checkpoints
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["genvs"]["skipped_steps"] == 2
    again = TinyNaN.load_from_checkpoint(path)
    assert again._skipped_steps == 2


def test_error_policy_names_the_scenes_and_the_fix():
    model = TinyNaN(nan_scenes=["s2"])  # nonfinite_loss="error" is the default
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss nan on scenes s2.*nonfinite_loss: skip"):
        fit(model, 5)


def test_max_skipped_stops_after_too_many_consecutive_skips():
    model = TinyNaN(nan_scenes=["s1", "s2"], nonfinite_loss="skip", max_skipped=1)
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive .*max_skipped=1.*step 2: loss nan on scenes s2"):
        fit(model, 5)


@pytest.mark.slow
def test_ddp_nan_on_one_rank_skips_every_rank_together():
    """2 CPU processes (gloo). A hang would be a timeout here, never a blocked suite."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, str(HELPER), "ddp"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = {s["rank"]: s for s in map(json.loads, re.findall(r"^STATE (.*)$", proc.stdout, re.M))}
    assert set(states) == {0, 1}
    for s in states.values():  # the NaN of rank 1 at step 1 skipped the update on both ranks
        assert s["global_step"] == 3 and s["skipped"] == 1
        assert s["ema_updates"] == 2 and s["adam_steps"] == 2 and s["lr_epoch"] == 3
    assert states[0]["weights"] == states[1]["weights"]  # still in sync
    assert re.search(r"skipping the update of step 1 .*rank 1: loss nan on scenes s3", proc.stdout)
    stops = dict(re.findall(r"^STOPPED rank=(\d) step=\d+ (.*)$", proc.stdout, re.M))
    assert set(stops) == {"0", "1"}  # NaNs of rank 0 at steps 3 and 4: both ranks stop, neither hangs
    for msg in stops.values():
        assert re.search(r"2 consecutive .*max_skipped=1.*step 4: rank 0: loss nan on scenes s8", msg)
