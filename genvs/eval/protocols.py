"""Evaluation protocols: which objects, which input view(s), which target views, which seeds.

The SRN ShapeNet protocol of pixelNeRF / 3DiM: every test object is conditioned on view 64 and *all
its other views* are generated and scored (250 targets for the 251-view SRN test objects). For quick
runs, ``max_objects`` / ``max_target_views`` take a seeded random subset (the same for every method
with the same seed). `EvalProtocol.sample_seed` gives each (object, target view) its own seed that does
not depend on batch composition, data-loader order or the number of DDP processes, so a run is
reproducible and comparable across machines.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Sequence

__all__ = ["EvalProtocol", "SRN_PROTOCOL", "ProtocolError"]


class ProtocolError(ValueError):
    """A scene does not fit the evaluation protocol (too few views, bad index)."""


@dataclass(frozen=True)
class EvalProtocol:
    """Selection of objects / views and per-sample seeds for a test run.

    Args:
        name: label written to result files.
        input_views: context view indices within each object (SRN: ``(64,)``).
        max_objects: score only this many objects (seeded random subset); ``None``: all.
        max_target_views: score only this many target views per object (seeded subset); ``None``: all
            views that are not inputs.
        seed: drives the subsets and `sample_seed`.
    """

    name: str = "srn"
    input_views: tuple[int, ...] = (64,)
    max_objects: int | None = None
    max_target_views: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.input_views:
            raise ProtocolError("EvalProtocol.input_views must name at least one context view")
        for k in ("max_objects", "max_target_views"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ProtocolError(f"EvalProtocol.{k} must be >= 1 or None (all), got {v}")

    def _rng(self, *key: object) -> random.Random:
        return random.Random(self.sample_seed(*key))

    def select_objects(self, scene_ids: Sequence[str]) -> list[str]:
        """The objects to score, in sorted order (all of them, or a seeded subset of ``max_objects``)."""
        ids = sorted(scene_ids)
        if self.max_objects is None or self.max_objects >= len(ids):
            return ids
        return sorted(self._rng("objects").sample(ids, self.max_objects))

    def select_views(self, scene_id: str, num_views: int) -> tuple[list[int], list[int]]:
        """``(context, targets)`` view indices of one object with ``num_views`` views."""
        bad = [i for i in self.input_views if not 0 <= i < num_views]
        if bad:
            raise ProtocolError(
                f"Scene {scene_id!r} has {num_views} views but the protocol {self.name!r} conditions on view(s) {bad}; "
                f"use the full test split (SRN test objects have 251 views) or set input_views to indices < {num_views}"
            )
        context = list(self.input_views)
        targets = [i for i in range(num_views) if i not in context]
        if not targets:
            raise ProtocolError(f"Scene {scene_id!r}: no target views left after the inputs {context}")
        if self.max_target_views is not None and self.max_target_views < len(targets):
            targets = sorted(self._rng("views", scene_id).sample(targets, self.max_target_views))
        return context, targets

    def sample_seed(self, *key: object) -> int:
        """A 31-bit seed from ``(seed, *key)``, e.g. ``sample_seed(scene_id, view)``; stable across runs
        and Python processes (CRC32, not the salted built-in ``hash``)."""
        text = "/".join(map(str, (self.seed, *key)))
        return zlib.crc32(text.encode()) & 0x7FFFFFFF


SRN_PROTOCOL = EvalProtocol()
