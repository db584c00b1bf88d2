"""Shared fixtures: a tiny procedural dataset and a tiny 3DiM, both built in seconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

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
