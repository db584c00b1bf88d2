"""Reference baselines that every novel-view table should carry: a generative method is only worth its
compute where it beats them.

`CopyInput` answers every target with a given view: the nearest context view by viewing direction
(``choose: nearest``, the default), or always the first (``choose: first``). Nothing is trained: score it with
``genvs test --model copy_input --config <the method's config>`` (no ``--ckpt_path``) and it is scored on
exactly the method's test protocol, metrics and seeds, and written to the same results tables.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from genvs.core.model import BaseNVSModel
from genvs.core.samplers import Sampler
from genvs.core.views import Views

__all__ = ["CopyInput", "NothingToTrainError", "nearest_view"]


class NothingToTrainError(RuntimeError):
    """A baseline was given to `genvs fit`."""


_NOTHING_TO_TRAIN = (
    "copy_input is a baseline with nothing to train: score it with `genvs test --model copy_input "
    "--config <config>` (no --ckpt_path)"
)


def nearest_view(context_c2w: Tensor, target_c2w: Tensor) -> Tensor:
    """Index ``[B, Nt]`` of the context camera whose viewing direction (the c2w's +z axis, OpenCV) is
    closest in angle to each target's; ties go to the nearer camera centre, then to the lower index."""
    fwd_c = context_c2w[..., :3, 2]  # [B, Nc, 3]
    fwd_t = target_c2w[..., :3, 2]  # [B, Nt, 3]
    cos = torch.einsum("btk,bck->btc", fwd_t, fwd_c) / (
        fwd_t.norm(dim=-1)[..., :, None] * fwd_c.norm(dim=-1)[..., None, :]
    ).clamp_min(1e-12)
    dist = torch.cdist(target_c2w[..., :3, 3], context_c2w[..., :3, 3])  # [B, Nt, Nc]
    # round the angle so that equal directions compare equal, then break ties by distance
    score = torch.round(cos.clamp(-1, 1) * 1e6) - dist / (dist.amax() + 1)
    return score.argmax(dim=-1)


class CopyInput(BaseNVSModel):
    """Baseline: every target view is a copy of a context view (no network, nothing to train).

    Args:
        choose: ``nearest`` copies the context view whose viewing direction is closest to the target's;
            ``first`` always copies the first context view (the single-input protocols of SRN make both
            the same).

    The remaining arguments are `BaseNVSModel`'s (only the evaluation ones, ``sample_seed`` and
    ``num_log_images``, matter here).
    """

    def __init__(self, choose: Literal["nearest", "first"] = "nearest", **kwargs):
        super().__init__(**kwargs)
        if choose not in ("nearest", "first"):
            raise ValueError(f"choose={choose!r}: use 'nearest' or 'first'")
        self.choose = choose
        self.denoiser = nn.Module()  # no trainable parameters

    def training_loss(self, views: Views) -> dict[str, Tensor]:
        raise NothingToTrainError(_NOTHING_TO_TRAIN)

    def configure_optimizers(self):
        raise NothingToTrainError(_NOTHING_TO_TRAIN)

    def sample(
        self,
        context: Views,
        targets: Views,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> Views:
        if context.V < 1:
            raise ValueError("copy_input needs at least one context view to copy")
        if (context.H, context.W) != (targets.H, targets.W):
            context = context.resize((targets.H, targets.W))
        if self.choose == "first":
            idx = torch.zeros(targets.B, targets.V, dtype=torch.long, device=context.device)
        else:
            idx = nearest_view(context.c2w, targets.c2w)
        batch = torch.arange(targets.B, device=context.device)[:, None]
        return targets.with_images(context.images[batch, idx])

    def sampler_description(self) -> tuple[str, int]:
        return f"copy {self.choose} input view", 0

