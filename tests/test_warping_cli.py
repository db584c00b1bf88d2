"""The warping method end to end through the `genvs` command (in-process): fit -> checkpoint -> predict
(novel views with depth and an orbit GIF, generation from scratch), the paper's two-stage training, and
novel views of unposed images from an image folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TOY
from genvs.cli import main, run
from genvs.methods.warping import WarpingRGBD

CONFIG = Path(__file__).parents[1] / "configs" / "warping_toy.yaml"
TINY_ADM = dict(
    image_size=16, model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8],
    num_head_channels=16, num_groups=8,
)  # num_classes stays the config's null


def tiny_args(toy_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIG),
        "--model.init_args.network.init_args", json.dumps(TINY_ADM),
        "--model.init_args.sampler.init_args.num_steps", "2",
        "--model.init_args.first_view_sampler.init_args.num_steps", "2",
        "--model.init_args.pairs.init_args.supersample", "1",
        "--model.init_args.aggregation", json.dumps({"supersample": 1}),
        "--data.init_args.root", str(toy_root),
        "--data.init_args.toy", json.dumps(TINY_TOY.__dict__),
        "--data.init_args.image_size", "16",
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4",
        "--data.init_args.val_protocol", json.dumps({"input_views": [0], "num_scenes": 1, "num_targets": 2}),
        "--data.init_args.predict_protocol", json.dumps({"input_views": [0], "num_scenes": 2, "num_targets": 3}),
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


@pytest.fixture(scope="module")
def warping_trained(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("warping_run")
    cli = run(["fit", *tiny_args(toy_root, out), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
               "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"])
    return out, Path(cli.trainer.checkpoint_callback.last_model_path), cli


def test_fit_logs_both_loss_terms_and_checkpoints_ema(warping_trained):
    out, ckpt, cli = warping_trained
    assert ckpt.exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and int(state["state_dict"]["ema.num_updates"]) == 2
    assert any(k.startswith("ema.shadow__conditional__") for k in state["state_dict"])
    metrics = cli.trainer.callback_metrics
    assert {"train/loss_unconditional", "train/loss_conditional", "val/psnr"} <= set(metrics)


def test_predict_writes_views_depth_and_orbit(warping_trained, toy_root, tmp_path):
    out, ckpt, _ = warping_trained
    nvs = tmp_path / "nvs"
    assert main(["predict", *tiny_args(toy_root, out), "--ckpt_path", str(ckpt), "--predict_writer.output_dir", str(nvs)]) == 0
    scenes = sorted(p for p in nvs.iterdir() if p.is_dir())
    assert len(scenes) == 2
    files = {p.name for p in scenes[0].iterdir()}
    assert len([f for f in files if f.startswith("view_")]) == 3 and len([f for f in files if f.startswith("depth_")]) == 3
    assert {"grid.png", "orbit.gif", "context_0000.png"} <= files and len([f for f in files if f.startswith("gt_")]) == 3
    assert Image.open(scenes[0] / sorted(f for f in files if f.startswith("depth_"))[0]).size == (16, 16)

    gen = tmp_path / "gen"  # no input view: the first view comes from the unconditional model
    args = tiny_args(toy_root, out, "--data.init_args.predict_protocol", json.dumps({"input_views": [], "num_scenes": 1, "num_targets": 3}))
    assert main(["predict", *args, "--ckpt_path", str(ckpt), "--predict_writer.output_dir", str(gen)]) == 0
    files = {p.name for p in next(gen.iterdir()).iterdir()}
    assert not any(f.startswith("context_") for f in files) and len([f for f in files if f.startswith("view_")]) == 3


def test_checkpoint_reloads_with_weights_only(warping_trained):
    _, ckpt, cli = warping_trained
    model = WarpingRGBD.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert model.stage == "joint" and model.sampler.num_steps == 2 and model.unconditional.model_channels == 16
    for k, v in cli.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k].cpu(), v.cpu(), msg=k)


def test_two_stage_training_through_the_cli(toy_root, tmp_path):
    """Stage 1 trains G_u; stage 2 starts G_c from stage 1's EMA weights and keeps G_u frozen."""
    s1 = run(["fit", *tiny_args(toy_root, tmp_path / "s1", "--model.init_args.stage", "unconditional"),
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    ckpt1 = Path(s1.trainer.checkpoint_callback.last_model_path)
    s2 = run(["fit", *tiny_args(toy_root, tmp_path / "s2", "--model.init_args.stage", "conditional",
                                "--model.init_args.unconditional_weights", str(ckpt1)),
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    ema1 = s1.model.ema
    for name, p in s2.model.unconditional.named_parameters():
        torch.testing.assert_close(p.detach().cpu(), getattr(ema1, ema1._key("unconditional." + name)).cpu(), msg=name)
    state = torch.load(s2.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("denoiser.unconditional.") for k in state)  # the stage-2 checkpoint samples everything
    assert not any(k.startswith("ema.shadow__unconditional__") for k in state)


def test_novel_views_of_unposed_images_from_an_image_folder(warping_trained, tmp_path):
    _, ckpt, _ = warping_trained
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(root / f"p{i}.jpg")
    hub = tmp_path / "midas"
    hub.mkdir()
    (hub / "hubconf.py").write_text(
        "import torch\nclass _M(torch.nn.Module):\n    def forward(self, x):\n        return 9000.0 + 3000.0 * x[:, 1]\n"
        "def tiny(**kw):\n    return _M()\n"
    )
    data = {"class_path": "genvs.data.ImageFolderDataModule", "init_args": {
        "root": str(root), "depth_estimator": str(hub), "depth_hub_model": "tiny", "image_size": 16, "estimate_size": 32,
        "trajectory": "swing", "num_frames": 3, "predict_num_images": 2, "num_workers": 0, "batch_size": 2}}
    pred = tmp_path / "pred"
    args = ["predict", "--config", str(CONFIG), "--model.init_args.network.init_args", json.dumps(TINY_ADM),
            "--model.init_args.sampler.init_args.num_steps", "2", "--model.init_args.aggregation", json.dumps({"supersample": 1}),
            "--data", json.dumps(data), "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--ckpt_path", str(ckpt), "--predict_writer.output_dir", str(pred)]
    assert main(args) == 0
    assert len(list((tmp_path / "photos_depth" / "16px").glob("*.npy"))) == 2  # estimated once, cached
    for command in ("validate", "test"):  # generation from scratch: sampled and shown, nothing to score
        cli = run([command, *args[1:-2], "--data.init_args.num_samples", "2", "--data.init_args.val_num_samples", "2"])
        assert not any(k.startswith(("val/", "test/")) for k in cli.trainer.callback_metrics)
    files = {p.name for p in (pred / "p0").iterdir()}
    assert {"context_0000.png", "view_0001.png", "view_0003.png", "depth_0002.png", "orbit.gif"} <= files
    assert not any(f.startswith("gt_") for f in files)  # unposed images have no ground-truth novel views
