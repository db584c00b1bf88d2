"""The copy-the-input baseline: nearest-view choice against a brute-force computation, and `genvs test
--model copy_input` scored against copying by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_args
from genvs.cli import run
from genvs.core.cameras import orbit_poses
from genvs.methods.baselines import CopyInput, nearest_view


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))))


def test_nearest_view_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    context = orbit_poses(7, radius=1.3, elevation_deg=30.0)[None].repeat(2, 1, 1, 1)
    targets = orbit_poses(11, radius=1.3, elevation_deg=45.0)[None].repeat(2, 1, 1, 1)
    context[1] = context[1][torch.randperm(7, generator=g)]  # another order in the second example
    idx = nearest_view(context, targets)
    for b in range(2):
        for t in range(11):
            angles = [_angle(targets[b, t, :3, 2], context[b, c, :3, 2]) for c in range(7)]
            assert angles[int(idx[b, t])] == pytest.approx(min(angles), abs=1e-3)


def test_nearest_view_breaks_ties_by_distance():
    c2w = torch.eye(4).repeat(1, 3, 1, 1)  # three cameras looking along +z, at z = -3, -1, -2
    c2w[0, :, 2, 3] = torch.tensor([-3.0, -1.0, -2.0])
    target = torch.eye(4)[None, None].clone()
    target[0, 0, 2, 3] = -0.9
    assert int(nearest_view(c2w, target)) == 1


def test_copy_input_samples_the_chosen_view():
    from genvs.core.views import Views

    c2w = orbit_poses(4, radius=1.3, elevation_deg=30.0)[None]
    K = torch.tensor([[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]]).expand(1, 4, 3, 3)
    images = torch.rand(1, 4, 3, 16, 16) * 2 - 1
    context = Views(images=images[:, :3], K=K[:, :3], c2w=c2w[:, :3])
    targets = Views(images=None, K=K[:, 3:], c2w=c2w[:, [1]], size=(16, 16))  # the second context camera again
    assert torch.equal(CopyInput().sample(context, targets).images[0, 0], images[0, 1])
    assert torch.equal(CopyInput(choose="first").sample(context, targets).images[0, 0], images[0, 0])
    with pytest.raises(RuntimeError, match="nothing to train"):
        CopyInput().training_loss(context)
    with pytest.raises(RuntimeError, match="nothing to train"):
        CopyInput().configure_optimizers()
    with pytest.raises(ValueError, match="choose='closest'"):
        CopyInput(choose="closest")


def test_genvs_test_of_copy_input_scores_copying(toy_root, tmp_path):
    """Reuses the 3DiM config unchanged: same protocol, metrics and tables, no checkpoint."""
    results = tmp_path / "results"
    cli = run(["test", *tiny_args(toy_root, tmp_path), "--model", "copy_input", "--evaluation.results_dir", str(results)])
    rec = json.loads(next(results.glob("copyinput_toy_*.json")).read_text())["results"][0]
    assert rec["method"] == "CopyInput" and rec["sampler"] == "copy nearest input view" and rec["steps"] == 0
    # by hand, on the same protocol's batches: copy view 0 (the only input) to every target
    psnrs = []
    for batch in cli.datamodule.test_dataloader():
        context, targets = batch.split()
        mse = ((targets.images - context.images[:, :1]) / 2).pow(2).flatten(2).mean(2)
        psnrs += (-10 * torch.log10(mse)).flatten().tolist()
    assert rec["metrics"]["num_images"] == len(psnrs) == 2 * 3
    assert rec["metrics"]["psnr"] == pytest.approx(sum(psnrs) / len(psnrs), abs=1e-4)
    assert float(cli.trainer.callback_metrics["test/psnr"]) == pytest.approx(rec["metrics"]["psnr"], abs=1e-5)


def test_genvs_fit_of_copy_input_says_there_is_nothing_to_train(toy_root, tmp_path, capsys):
    from genvs.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", *tiny_args(toy_root, tmp_path), "--model", "copy_input", "--trainer.max_steps", "1"], friendly_errors=True)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "genvs: error: copy_input is a baseline with nothing to train" in err and "Traceback" not in err
