"""Shared fixtures: a tiny procedural dataset and a tiny 3DiM, both built in seconds on a CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("TORCH_HOME", os.path.join(os.path.dirname(__file__), ".torch_home_unused"))

from genvs.data.toy import ToyConfig, generate_toy_dataset  # noqa: E402

TINY_TOY = ToyConfig(
    seed=0,
    resolution=32,
    num_objects={"train": 6, "val": 2, "test": 2},
    num_views={"train": 6, "val": 6, "test": 8},
    supersample=1,
)

TINY_XUNET = dict(
    image_size=32, ch=16, ch_mult=(1, 2), emb_ch=32, num_res_blocks=1, attn_resolutions=(16,), attn_heads=2, dropout=0.0
)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A tiny procedural dataset in SRN layout (train/val/test), generated once per session."""
    root = tmp_path_factory.mktemp("toy") / "toy"
    generate_toy_dataset(root, TINY_TOY, progress=False)
    return root


# One intra-op thread: the suite's tensors are tiny, and OpenMP threads spinning against each other (or
# against other processes on a 2-core machine) make small ops many times slower, not faster.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CONFIG_3DIM_TOY = Path(__file__).parents[1] / "configs" / "3dim_toy.yaml"


# the toy config's protocols condition on views the tiny dataset's 6-8 views lack
TINY_PROTOCOL_ARGS = [
    "--data.init_args.val_protocol", json.dumps({"input_views": [0], "num_scenes": 2, "num_targets": 2}),
    "--data.init_args.test_protocol", json.dumps({"input_views": [0], "num_targets": 3}),
]


def tiny_args(toy_root: Path, out: Path) -> list[str]:
    """`genvs` arguments for a tiny 3DiM on the tiny procedural dataset (fast on a CPU)."""
    return [
        "--config", str(CONFIG_3DIM_TOY),
        "--model.init_args.network.init_args", json.dumps(TINY_XUNET),
        "--model.init_args.sampler.init_args.num_steps", "3",
        "--data.init_args.root", str(toy_root),
        "--data.init_args.toy", json.dumps(TINY_TOY.__dict__),
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4",
        *TINY_PROTOCOL_ARGS,
        "--data.init_args.predict_protocol", json.dumps({"input_views": [0], "num_scenes": 2, "num_targets": 3}),
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
    ]


def printed_config(capsys, args: list[str]) -> dict:
    """The resolved config that `genvs fit <args> --print_config` prints, as a dict."""
    from genvs.cli import main

    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(scope="session")
def trained(toy_root, tmp_path_factory):
    """A 4-step `genvs fit` run of the tiny 3DiM: (run folder, last checkpoint, the GenvsCLI)."""
    from genvs.cli import run

    out = tmp_path_factory.mktemp("run")
    cli = run(["fit", *tiny_args(toy_root, out), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
               "--trainer.limit_val_batches", "1"])
    return out, Path(cli.trainer.checkpoint_callback.last_model_path), cli
