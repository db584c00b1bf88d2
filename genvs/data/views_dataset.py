"""Shared view sampling: which views of a scene make one training or evaluation example.

A *scene source* indexes scenes on disk (`genvs.data.srn.SRNScenes`, CO3D, RealEstate10K, ...). It
provides ``len()``, ``scenes[i].scene_id``, ``scenes[i].num_views`` and ``load(i, views)`` returning a
dict with ``images [V, 3, H, W]`` in [-1, 1], ``K``, ``c2w`` and optionally ``depth``/``mask``.
`MultiViewDataset` turns it into `Views` examples:

- training: ``n_context + n_target`` distinct views drawn at random per scene and epoch, as a function of
  ``(seed, epoch, index)`` so that a resumed run draws exactly what an uninterrupted one would;
- evaluation: an `EvalProtocol` fixes the context views (pixelNeRF's SRN protocol conditions on view
  64) and takes the other views as targets, all of them or an evenly spaced subset, so every run
  evaluates exactly the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.utils.data import Dataset

from genvs.core.views import Views
from genvs.data.srn import DatasetError

__all__ = ["EvalProtocol", "SceneSource", "MultiViewDataset"]


class SceneSource(Protocol):
    scenes: list

    def __len__(self) -> int: ...

    def load(self, i: int, views: list[int], load_depth: bool = True) -> dict: ...


@dataclass
class EvalProtocol:
    """Which views an evaluation conditions on and which it scores.

    Args:
        input_views: context view indices of every scene (pixelNeRF/SRN: ``[64]``).
        num_scenes: evaluate the first ``num_scenes`` scenes (``None``: all).
        num_targets: score an evenly spaced subset of this many of the remaining views (``None``: all).
    """

    input_views: list[int] = field(default_factory=lambda: [64])
    num_scenes: int | None = None
    num_targets: int | None = None

    def targets(self, num_views: int) -> list[int]:
        rest = [v for v in range(num_views) if v not in self.input_views]
        if self.num_targets is None or self.num_targets >= len(rest):
            return rest
        step = len(rest) / self.num_targets
        return [rest[int(i * step)] for i in range(self.num_targets)]


class MultiViewDataset(Dataset):
    """`Views` examples (``B = 1``) from a scene source; collate with `Views.collate`."""

    def __init__(
        self,
        source: SceneSource,
        n_context: int = 1,
        n_target: int = 1,
        image_size: int | tuple[int, int] | None = None,
        protocol: EvalProtocol | None = None,
        load_depth: bool = True,
        seed: int = 0,
    ):
        self.source = source
        self.n_context, self.n_target = n_context, n_target
        self.image_size = image_size
        self.protocol = protocol
        self.load_depth = load_depth
        self.seed = seed
        self.epoch = 0  # set by `genvs.data.module.EpochSampler` so view draws are a function of (seed, epoch, i)
        n = len(source)
        if protocol is not None:
            n = n if protocol.num_scenes is None else min(n, protocol.num_scenes)
            for rec in source.scenes[:n]:
                bad = [v for v in protocol.input_views if not 0 <= v < rec.num_views]
                if bad:
                    raise DatasetError(
                        f"{getattr(rec, 'folder', None) or rec.scene_id}: the evaluation protocol conditions on view(s) {bad} but the scene has "
                        f"{rec.num_views} views; set the protocol's input_views to indices below {rec.num_views}"
                    )
        else:
            need = n_context + n_target
            for rec in source.scenes:
                if rec.num_views < need:
                    where = getattr(rec, "folder", None) or rec.scene_id
                    raise DatasetError(
                        f"{where}: {rec.num_views} views but each training example needs {need} "
                        f"(data.init_args.n_context={n_context} + n_target={n_target}); lower them or remove the scene"
                    )
        self.length = n

    def __len__(self) -> int:
        return self.length

    def views_of(self, i: int) -> tuple[list[int], int]:
        """(view indices, number of context views) of example ``i``."""
        nv = self.source.scenes[i].num_views
        if self.protocol is None:  # deterministic in (seed, epoch, i): resumed runs draw the same views
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
            pick = torch.randperm(nv, generator=g)[: self.n_context + self.n_target].tolist()
            return pick, self.n_context
        return list(self.protocol.input_views) + self.protocol.targets(nv), len(self.protocol.input_views)

    def __getitem__(self, i: int) -> Views:
        views, nc = self.views_of(i)
        data = self.source.load(i, views, load_depth=self.load_depth)
        v = Views(
            images=data["images"][None],
            K=data["K"][None],
            c2w=data["c2w"][None],
            depth=data["depth"][None] if "depth" in data else None,
            mask=data["mask"][None] if "mask" in data else None,
            num_context=nc,
            scene=[self.source.scenes[i].scene_id],
            index=torch.tensor([views]),
        )
        return v.resize(self.image_size) if self.image_size is not None else v
