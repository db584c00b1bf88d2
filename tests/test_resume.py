"""A training run killed with SIGKILL (mid-step, or mid-checkpoint-write) resumes with `--ckpt_path last`
and ends bit-identical to the uninterrupted run: same batches, same weights, optimizer and EMA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_PROTOCOL_ARGS, TINY_TOY, TINY_XUNET
from genvs.callbacks import CheckpointError, check_checkpoint
from genvs.cli import find_last_checkpoint

HELPER = Path(__file__).parent / "helpers" / "run_and_kill.py"
CONFIG = Path(__file__).parents[1] / "configs" / "3dim_toy.yaml"
STEPS = 8


def fit_args(toy_root: Path, out: Path) -> list[str]:
    return [
        "fit", "--config", str(CONFIG),
        "--model.init_args.network.init_args", json.dumps({**TINY_XUNET, "dropout": 0.1}),
        "--data.init_args.root", str(toy_root), "--data.init_args.toy", json.dumps(TINY_TOY.__dict__),
        *TINY_PROTOCOL_ARGS,
        "--data.init_args.num_workers", "1", "--data.init_args.batch_size", "2",
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--checkpoint.every_n_train_steps", "2",
    ]


def run(kill_at: str, args: list[str], expect_killed: bool) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(HELPER), kill_at, *args], env=env, capture_output=True, text=True, timeout=600)
    if expect_killed:
        assert proc.returncode == -9, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [line.split(" ", 2)[2] for line in proc.stdout.splitlines() if line.startswith("BATCH")]


def final_state(out: Path) -> dict:
    return torch.load(find_last_checkpoint(str(out)), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    batches = run("never", fit_args(toy_root, out), expect_killed=False)
    return batches, final_state(out)


def assert_same_training(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == STEPS
    for k, v in a["state_dict"].items():  # weights and EMA
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]


@pytest.mark.slow
def test_sigkill_mid_training_resumes_exactly(uninterrupted, toy_root, tmp_path):
    full_batches, full = uninterrupted
    out = tmp_path / "cut"
    before = run("step:5", fit_args(toy_root, out), expect_killed=True)
    assert len(before) == 5 and before == full_batches[:5]
    after = run("never", [*fit_args(toy_root, out), "--ckpt_path", "last"], expect_killed=False)
    assert after == full_batches[4:]  # the last checkpoint was at step 4: step 5 is redone, then the rest
    assert_same_training(full, final_state(out))


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_keeps_previous_checkpoint(uninterrupted, toy_root, tmp_path):
    _, full = uninterrupted
    out = tmp_path / "cut"
    run("save:3", fit_args(toy_root, out), expect_killed=True)  # killed writing the step-4 checkpoint
    last = find_last_checkpoint(str(out))
    assert torch.load(last, weights_only=True)["global_step"] == 2  # previous checkpoint intact
    assert list(out.rglob(".*.tmp"))  # the half-written file never replaced it
    run("never", [*fit_args(toy_root, out), "--ckpt_path", "last"], expect_killed=False)
    assert_same_training(full, final_state(out))


def test_truncated_checkpoint_is_refused_with_a_clear_error(uninterrupted, tmp_path):
    _, full = uninterrupted
    good = tmp_path / "good.ckpt"
    torch.save(full, good)
    check_checkpoint(good)
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.ckpt .* is truncated or corrupt.*earlier checkpoint"):
        check_checkpoint(bad)
    from genvs.cli import main

    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        main(["fit", "--config", str(CONFIG), "--ckpt_path", str(bad), "--trainer.max_steps", "1"])
