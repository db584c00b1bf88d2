"""Helpers shared by the video dataset readers (CO3D, RealEstate10K): load an RGB frame, crop/resize it with
its intrinsics, scene records, DFM's frame-window view sampling for training, and their datamodule base."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from genvs.core.views import Views
from genvs.data.module import NVSDataModule
from genvs.data.srn import DatasetError, MissingDataError, check_color_mode
from genvs.data.views_dataset import MultiViewDataset, SceneSource

__all__ = [
    "load_rgb",
    "crop_resize",
    "VideoRecord",
    "frame_window_views",
    "FrameWindowDataset",
    "VideoDataModule",
]


def crop_resize(
    image: Tensor, K: Tensor, size: int | tuple[int, int] | None, crop: Literal["center", "none"] = "center"
) -> tuple[Tensor, Tensor]:
    """Centre-crop ``image [C, H, W]`` to a square (``crop="center"``) and resize to ``size`` (antialiased
    bilinear), adjusting ``K [3, 3]`` (pixel centres at ``i + 0.5``, so the maps are exact)."""
    C, H, W = image.shape
    K = K.clone()
    if crop == "center":
        s = min(H, W)
        y0, x0 = (H - s) // 2, (W - s) // 2
        image = image[:, y0 : y0 + s, x0 : x0 + s]
        K[0, 2] -= x0
        K[1, 2] -= y0
        H = W = s
    elif crop != "none":
        raise ValueError(f"crop={crop!r}: use 'center' or 'none'")
    if size is not None:
        H2, W2 = (size, size) if isinstance(size, int) else size
        if (H2, W2) != (H, W):
            image = F.interpolate(image[None], size=(H2, W2), mode="bilinear", antialias=True, align_corners=False)[0]
            K[0] *= W2 / W
            K[1] *= H2 / H
    return image, K


def load_rgb(path: str | Path) -> Tensor:
    """RGB image file -> ``[3, H, W]`` float in [-1, 1]; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"image {path} is missing; extract or restore it, or leave its frame out")
    try:
        with Image.open(path) as im:
            im.load()
            check_color_mode(im, path)
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read image {path} ({e}): it is corrupt or truncated; re-extract it") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
# Video datasets (CO3D, RealEstate10K): scene records, DFM's frame-window training views, datamodule
# ----------------------------------------------------------------------------------------------
@dataclass
class VideoRecord:
    """One video of a scene source: its id and number of frames (views)."""

    scene_id: str
    num_views: int


def frame_window_views(
    num_frames: int, n_context: int, n_target: int, min_distance: int, max_distance: int, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """Frame indices ``(context, targets)`` of one training example, as the official DFM loaders pick them.

    A window of ``span`` frames, ``span`` uniform in ``[min_distance, max_distance) * n_context`` (clipped to
    the video), starts at a random frame; the context view sits at one end and target 0 at the other (which
    end is which is a coin flip). The other targets lie inside the window; the other context views lie
    inside it at least ``d ~ U[min_distance, max_distance)`` frames from target 0. Targets are ordered from
    the farthest from the context to the nearest. Short videos fall back to the nearest free frames, so
    every index is distinct whenever ``num_frames >= n_context + n_target``.
    """

    def randint(lo: int, hi: int) -> int:  # uniform in [lo, hi]
        return lo + int(torch.randint(0, max(1, hi - lo + 1), (), generator=generator))

    def pick(pool: list[int], k: int) -> list[int]:
        if k <= 0 or not pool:
            return []
        perm = torch.randperm(len(pool), generator=generator)[:k].tolist()
        return [pool[j] for j in perm]

    hi = min(max(max_distance * n_context - 1, 1), num_frames - 1)
    lo = min(max(min_distance * n_context, 1), hi)
    span = randint(lo, hi)
    start = randint(0, num_frames - 1 - span)
    end = start + span
    c0, t0 = (end, start) if bool(torch.rand((), generator=generator) < 0.5) else (start, end)
    inner = list(range(start + 1, end))
    d = randint(min_distance, max(min_distance, max_distance - 1))
    near_ctx = [f for f in inner if abs(f - t0) >= d]
    if len(near_ctx) < n_context - 1:
        near_ctx = inner
    context = [c0] + pick(near_ctx, n_context - 1)
    targets = [t0] + pick([f for f in inner if f not in context], n_target - 1)
    used = set(context) | set(targets)
    missing = n_context + n_target - len(used)
    if missing > 0:  # too short a window: take the free frames nearest to it
        free = sorted((f for f in range(num_frames) if f not in used), key=lambda f: min(abs(f - start), abs(f - end)))
        extra = free[:missing]
        k = n_context - len(context)
        context += extra[:k]
        targets += extra[k:]
    targets = [targets[0]] + sorted(targets[1:], key=lambda f: -abs(f - c0))
    return context, targets


class FrameWindowDataset(MultiViewDataset):
    """Training examples from videos: views picked by `frame_window_views` (DFM's official sampling) instead
    of uniformly, and optional scene-scale augmentation (official CO3D: ``scale_aug_ratio=0.2``: every
    camera translation, and depth, multiplied by one factor uniform in ``[1 - r, 1 + r]`` per example).
    Deterministic in ``(seed, epoch, index)`` like `MultiViewDataset`."""

    def __init__(
        self,
        source: SceneSource,
        n_context: int = 1,
        n_target: int = 1,
        image_size: int | tuple[int, int] | None = None,
        load_depth: bool = False,
        seed: int = 0,
        min_distance: int = 20,
        max_distance: int = 40,
        scale_augmentation: float = 0.0,
    ):
        super().__init__(source, n_context, n_target, image_size, None, load_depth, seed)
        if not 1 <= min_distance < max_distance:
            raise ValueError(f"frame window: need 1 <= min_distance < max_distance, got {min_distance}, {max_distance}")
        if not 0 <= scale_augmentation < 1:
            raise ValueError(f"scale_augmentation={scale_augmentation} must lie in [0, 1)")
        self.min_distance, self.max_distance = min_distance, max_distance
        self.scale_augmentation = scale_augmentation

    def _generator(self, i: int, stream: int) -> torch.Generator:
        # integers only: hash() of str is salted per process, which would break reproducibility
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, i, stream)) & 0x7FFF_FFFF_FFFF_FFFF)

    def views_of(self, i: int) -> tuple[list[int], int]:
        nv = self.source.scenes[i].num_views
        ctx, tgt = frame_window_views(nv, self.n_context, self.n_target, self.min_distance, self.max_distance, self._generator(i, 1))
        return ctx + tgt, self.n_context

    def __getitem__(self, i: int) -> Views:
        v = super().__getitem__(i)
        if self.scale_augmentation > 0:
            u = float(torch.rand((), generator=self._generator(i, 2)))
            f = 1.0 + self.scale_augmentation * (2 * u - 1)
            c2w = v.c2w.clone()
            c2w[..., :3, 3] *= f
            v = dataclasses.replace(v, c2w=c2w, depth=None if v.depth is None else v.depth * f)
        return v


class VideoDataModule(NVSDataModule):
    """`NVSDataModule` for video datasets: training examples come from `FrameWindowDataset`.

    Args:
        min_distance, max_distance: frame-window bounds per context view (official: CO3D 20 / 40,
            RealEstate10K 100 / 180).
        scale_augmentation: scene-scale augmentation ratio in training (official CO3D: 0.2).

    The remaining arguments are `NVSDataModule`'s; ``load_depth`` defaults to False here.
    """

    def __init__(self, min_distance: int = 20, max_distance: int = 40, scale_augmentation: float = 0.0, **kwargs):
        kwargs.setdefault("load_depth", False)
        super().__init__(**kwargs)
        self.min_distance, self.max_distance = min_distance, max_distance
        self.scale_augmentation = scale_augmentation

    def dataset(self, stage: str) -> Dataset:
        if stage == "fit" and stage not in self._datasets:
            self._datasets[stage] = FrameWindowDataset(
                self.scene_source("train"), self.n_context, self.n_target, self.image_size, self.load_depth,
                min_distance=self.min_distance, max_distance=self.max_distance,
                scale_augmentation=self.scale_augmentation,
            )
        return super().dataset(stage)
