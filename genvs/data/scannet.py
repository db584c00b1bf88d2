"""Depth sequences for depth-to-image generation (MVDiffusion): ScanNet in MVDiffusion's layout, or rings
with depth (the procedural rooms of `genvs.data.toy`).

ScanNet layout (``layout: scannet``, what MVDiffusion's preprocessing writes from the ScanNet ``.sens``
exports)::

    <root>/<split>/<scene>/color/<id>.jpg         RGB frames (resized to the depth maps' size)
                          /depth/<id>.png         z-depth in millimetres, 16 bit, 0 = unknown
                          /pose/<id>.txt          4x4 OpenCV camera-to-world
                          /prompt/<id>.txt        caption of the frame (first line)
                          /intrinsic/intrinsic_depth.txt   4x4 intrinsics of the depth maps
                          /key_frame_0.6.txt      key frame ids, one per line
                          /valid_frames.npy       optional: the frame ids with valid poses

Training examples (as the official ``fix_frame`` mode): with probability ``p_generation`` a batch of
*key-frame* examples (``num_views`` consecutive key frames, ``num_context = 0``), otherwise a batch of
*interpolation* examples: two key frames ``keyframe_gap`` apart first (``num_context = 2``), then
``num_views - 2`` frames between them in temporal order. Evaluation examples are sequences in temporal
order: ``eval_keyframes`` consecutive key frames and the frames every ``frame_interval`` ids between
them; the model picks its key frames and runs both stages.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from genvs.core.views import Views
from genvs.data.module import EpochSampler, NVSDataModule
from genvs.data.panorama import RingScenes
from genvs.data.srn import DatasetError, read_depth, read_image, read_pose
from genvs.data.toy import RoomConfig, ensure_toy_rooms

__all__ = [
    "scannet_intrinsics",
    "SequenceRecord",
    "ScanNetScenes",
    "RingSequences",
    "DepthSequenceDataset",
    "ModeEpochSampler",
    "DepthSequenceDataModule",
]

SCANNET_HELP = (
    "Get ScanNet (http://www.scan-net.org/, terms of use required), export color/depth/pose/intrinsics with "
    "ScanNet's SensReader, and add the key frame lists, valid frame lists and BLIP captions of MVDiffusion's "
    "data release (MVDiffusion README, 'Depth-to-image'), one folder per scene under <root>/<split>/"
)


def scannet_intrinsics(path: Path) -> Tensor:
    """``[3, 3]`` genvs intrinsics from a ScanNet ``intrinsic_*.txt`` (4x4, pixel centres at integers).

    The one conversion from ScanNet's convention: genvs puts pixel centres at ``i + 0.5``, so the
    principal point moves by half a pixel."""
    try:
        M = np.loadtxt(path, dtype=np.float64)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing intrinsics file. {SCANNET_HELP}") from None
    except ValueError:
        raise DatasetError(f"{path}: malformed intrinsics; expected a 4x4 (or 3x3) matrix") from None
    if M.shape not in ((4, 4), (3, 3)) or not np.isfinite(M).all() or M[0, 0] <= 0 or M[1, 1] <= 0:
        raise DatasetError(f"{path}: expected a finite 4x4 (or 3x3) intrinsics matrix, got shape {M.shape}")
    K = torch.tensor(M[:3, :3], dtype=torch.float32)
    K[0, 2] += 0.5
    K[1, 2] += 0.5
    return K


@dataclass
class SequenceRecord:
    """One scene: its frames in temporal order and which of them are key frames (positions)."""

    scene_id: str
    folder: Path
    frames: list[int]  # frame ids, increasing
    keyframes: list[int]  # positions into `frames`

    @property
    def num_views(self) -> int:
        return len(self.frames)


def _ids(files) -> list[int]:
    out = []
    for p in files:
        m = re.fullmatch(r"\d+", p.stem)
        if m:
            out.append(int(p.stem))
    return sorted(out)


class ScanNetScenes:
    """ScanNet scenes of one split in MVDiffusion's layout (module docstring)."""

    def __init__(self, root: str | Path, split: str, keyframe_file: str = "key_frame_0.6.txt"):
        self.root = Path(root)
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DatasetError(f"ScanNet split folder {split_dir} not found. {SCANNET_HELP}")
        self.scenes: list[SequenceRecord] = []
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            frames = _ids((folder / "color").glob("*.jpg"))
            if not frames:
                raise DatasetError(f"{folder}: no frames in {folder / 'color'} (expected color/<id>.jpg). {SCANNET_HELP}")
            valid_path = folder / "valid_frames.npy"
            if valid_path.is_file():
                valid = {int(v) for v in np.load(valid_path, allow_pickle=False).reshape(-1)}
                frames = [f for f in frames if f in valid]
            kf_path = folder / keyframe_file
            if not kf_path.is_file():
                raise DatasetError(f"{kf_path}: missing key frame list. {SCANNET_HELP}")
            try:
                kf_ids = [int(x) for x in kf_path.read_text().split()]
            except ValueError:
                raise DatasetError(f"{kf_path}: malformed; expected one integer frame id per line") from None
            pos = {f: i for i, f in enumerate(frames)}
            missing = [k for k in kf_ids if k not in pos]
            if missing:
                raise DatasetError(
                    f"{kf_path}: key frame(s) {missing[:5]} have no valid color frame in {folder / 'color'}"
                )
            self.scenes.append(SequenceRecord(folder.name, folder, frames, sorted(pos[k] for k in kf_ids)))
        if not self.scenes:
            raise DatasetError(f"{split_dir}: no scene folders. {SCANNET_HELP}")

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, i: int, views: list[int], load_depth: bool = True) -> dict:
        """Frames at positions ``views``: images at the depth maps' size, K, c2w, depth, prompts."""
        rec = self.scenes[i]
        ids = [rec.frames[v] for v in views]
        depths = [read_depth(rec.folder / "depth" / f"{f}.png") for f in ids]
        hw = tuple(depths[0].shape[-2:])
        images = []
        for f in ids:
            img = read_image(rec.folder / "color" / f"{f}.jpg")
            if tuple(img.shape[-2:]) != hw:  # ScanNet colour (1296x968) -> the depth maps' size (640x480)
                img = F.interpolate(img[None], size=hw, mode="bilinear", antialias=True, align_corners=False)[0]
            images.append(img)
        prompts = []
        for f in ids:
            p = rec.folder / "prompt" / f"{f}.txt"
            try:
                prompts.append(p.read_text().splitlines()[0].strip())
            except (FileNotFoundError, IndexError):
                raise DatasetError(f"{p}: missing or empty caption. {SCANNET_HELP}") from None
        K = scannet_intrinsics(rec.folder / "intrinsic" / "intrinsic_depth.txt")
        out = {
            "images": torch.stack(images),
            "K": K.expand(len(ids), 3, 3).clone(),
            "c2w": torch.stack([read_pose(rec.folder / "pose" / f"{f}.txt") for f in ids]),
            "prompts": prompts,
        }
        if load_depth:
            out["depth"] = torch.stack(depths)
        return out


class RingSequences:
    """Rings with depth (SRN layout + prompts.txt) as depth sequences: the views in ring order, all of them
    key frames."""

    def __init__(self, root: str | Path, split: str):
        self.rings = RingScenes(root, split)
        self.scenes = [
            SequenceRecord(r.scene_id, r.folder, list(range(r.num_views)), list(range(r.num_views)))
            for r in self.rings.scenes
        ]
        for r in self.rings.scenes:
            if r.depths is None:
                raise DatasetError(f"{r.folder}: no depth/ folder; depth-to-image needs depth maps")

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, i: int, views: list[int], load_depth: bool = True) -> dict:
        return self.rings.load(i, views, load_depth)


class DepthSequenceDataset(Dataset):
    """`Views` examples (``B = 1``) of depth sequences (see the module docstring).

    Training: one example per key frame of every scene (``N`` anchors, ``len() = N``); index ``i`` is the
    key-frame example of anchor ``i``, index ``i + N`` its interpolation example (`ModeEpochSampler` draws
    the kind per batch). Evaluation: one sequence per scene.
    """

    def __init__(
        self,
        source: ScanNetScenes | RingSequences,
        num_views: int = 12,
        train: bool = False,
        keyframe_gap: int = 2,
        eval_keyframes: int = 4,
        frame_interval: int = 20,
        image_size: int | tuple[int, int] | None = None,
        num_scenes: int | None = None,
    ):
        self.source = source
        self.num_views, self.train = num_views, train
        self.keyframe_gap, self.eval_keyframes, self.frame_interval = keyframe_gap, eval_keyframes, frame_interval
        self.image_size = image_size
        self.seed, self.epoch = 0, 0  # frames between key frames are a function of (seed, epoch, i)
        if train:
            need = max(num_views, keyframe_gap + 1)
            short = [r.scene_id for r in source.scenes if len(r.keyframes) < need]
            if short:  # as the official loader, scenes with too few key frames are not used (said, not silent)
                print(f"genvs: {len(short)} scene(s) have fewer than {need} key frames and are not used: {short[:5]}")
            self.anchors = [(i, k) for i, r in enumerate(source.scenes) if len(r.keyframes) >= need
                            for k in range(len(r.keyframes))]  # fmt: skip
            if not self.anchors:
                raise DatasetError(
                    f"no scene has {need} key frames (num_views={num_views}, keyframe_gap={keyframe_gap}); lower them"
                )
        else:
            n = len(source) if num_scenes is None else min(len(source), num_scenes)
            self.anchors = [(i, 0) for i in range(n)]

    def __len__(self) -> int:
        return len(self.anchors)

    def views_of(self, i: int) -> tuple[int, list[int], int]:
        """(scene, frame positions, num_context) of example ``i``."""
        N = len(self.anchors)
        scene, k = self.anchors[i % N]
        rec = self.source.scenes[scene]
        kf = rec.keyframes
        V = self.num_views
        if not self.train:
            keys = kf[: self.eval_keyframes]
            pos = {rec.frames[p]: p for p in range(len(rec.frames))}
            seq = []
            for a, b in zip(keys[:-1], keys[1:]):
                seq.append(a)
                fa, fb = rec.frames[a], rec.frames[b]
                seq += [pos[f] for f in range(fa + self.frame_interval, fb, self.frame_interval) if f in pos]
            seq.append(keys[-1])
            return scene, seq, 0
        if i < N:  # key-frame example: V consecutive key frames
            k = min(k, len(kf) - V)
            return scene, kf[k : k + V], 0
        k = min(k, len(kf) - 1 - self.keyframe_gap)  # interpolation example
        a, b = kf[k], kf[k + self.keyframe_gap]
        between = list(range(a + 1, b))
        if between:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
            pick = torch.randperm(len(between), generator=g)[: V - 2].sort().values.tolist()
            between = [between[j] for j in pick]
            between += [between[-1]] * (V - 2 - len(between))  # too few frames: repeat (as the official code)
        else:
            between = [a] * (V - 2)
        return scene, [a, b] + between, 2

    def __getitem__(self, i: int) -> Views:
        scene, frames, nc = self.views_of(i)
        data = self.source.load(scene, frames, load_depth=True)
        rec = self.source.scenes[scene]
        v = Views(
            images=data["images"][None],
            K=data["K"][None],
            c2w=data["c2w"][None],
            depth=data["depth"][None],
            num_context=nc,
            scene=[rec.scene_id],
            index=torch.tensor([[rec.frames[f] for f in frames]]),
            prompts=[data["prompts"]],
        )
        return v.resize(self.image_size) if self.image_size is not None else v


class ModeEpochSampler(EpochSampler):
    """`EpochSampler` order in batches of one kind: each run of ``batch_size`` consecutive indices (one
    batch) is, with probability ``p_generation``, key-frame examples ``i``, else interpolation examples
    ``i + N`` of the same anchors (`DepthSequenceDataset`). The kind of the ``k``-th batch of an epoch is a
    function of ``(seed, epoch, k)``: the same on every DDP rank, and the same in a resumed run."""

    def __init__(self, dataset: "DepthSequenceDataset", batch_size: int, p_generation: float = 0.5, seed: int = 0,
                 drop_last: bool = True):  # fmt: skip
        super().__init__(dataset, seed=seed, drop_last=drop_last)
        self.batch_size, self.p_generation = batch_size, p_generation

    def interpolation_batch(self, k: int) -> bool:
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, k)) & 0x7FFF_FFFF_FFFF_FFFF)
        return float(torch.rand((), generator=g)) >= self.p_generation

    def __iter__(self):
        N = len(self.dataset)
        order = list(super(EpochSampler, self).__iter__())  # this rank's whole epoch
        kinds = [self.interpolation_batch(k) for k in range((len(order) + self.batch_size - 1) // self.batch_size)]
        order = [i + N * kinds[j // self.batch_size] for j, i in enumerate(order)][self.start :]
        self.start = 0
        return iter(order)


class DepthSequenceDataModule(NVSDataModule):
    """Depth sequences with per-frame prompts for depth-to-image generation (module docstring).

    Args:
        root: dataset folder (``<root>/<split>/<scene>/...``).
        layout: ``scannet`` (MVDiffusion's ScanNet layout) or ``rings`` (SRN-layout rings with depth).
        num_views: views per training example (12 in the paper).
        keyframe_gap: interpolation examples span key frames ``k`` and ``k + keyframe_gap``.
        p_generation: fraction of key-frame (vs. interpolation) training batches (0.5 as the official code).
        eval_keyframes / frame_interval: evaluation sequences (module docstring).
        image_size: ``(H, W)`` of the views (192 x 256 in the paper) or one int for square views.
        rooms: with ``layout: rings``, render the procedural rooms (`genvs.data.toy.RoomConfig`) into
            ``root`` on first use.
        num_val_scenes / num_test_scenes / num_predict_scenes: evaluate the first scenes (``None``: all).
    """

    def __init__(
        self,
        root: str = "data/scannet",
        layout: Literal["scannet", "rings"] = "scannet",
        num_views: int = 12,
        keyframe_gap: int = 2,
        p_generation: float = 0.5,
        eval_keyframes: int = 4,
        frame_interval: int = 20,
        image_size: tuple[int, int] | int | None = (192, 256),
        rooms: RoomConfig | None = None,
        num_val_scenes: int | None = 2,
        num_test_scenes: int | None = None,
        num_predict_scenes: int | None = 2,
        batch_size: int = 4,
        eval_batch_size: int | None = 1,
        num_workers: int = 4,
        seed: int = 0,
    ):
        super().__init__(
            n_context=0, n_target=num_views, image_size=None, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, load_depth=True,
        )  # fmt: skip
        self.image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size
        self.root, self.layout = root, layout
        self.num_views, self.keyframe_gap, self.p_generation = num_views, keyframe_gap, p_generation
        self.eval_keyframes, self.frame_interval = eval_keyframes, frame_interval
        self.rooms = rooms
        self.seed = seed
        self.num_scenes = {"validate": num_val_scenes, "test": num_test_scenes, "predict": num_predict_scenes}
        # what results tables record as the evaluation protocol (the base's view protocols do not apply)
        self.val_protocol = self.predict_protocol = None
        self.test_protocol = {"key frames": eval_keyframes, "frame interval": frame_interval, "scenes": num_test_scenes}
        if rooms is not None and layout != "rings":
            raise ValueError("data.rooms renders procedural rings: use layout: rings with it")

    def prepare_data(self) -> None:
        if self.rooms is not None:
            ensure_toy_rooms(self.root, self.rooms)

    def scene_source(self, split: str) -> ScanNetScenes | RingSequences:
        if self.layout == "scannet":
            return ScanNetScenes(self.root, split)
        if self.layout == "rings":
            if self.rooms is not None and not (Path(self.root) / "rooms.json").exists():
                self.prepare_data()
            return RingSequences(self.root, split)
        raise ValueError(f"layout={self.layout!r}: use 'scannet' or 'rings'")

    def dataset(self, stage: str) -> Dataset:
        if stage not in self._datasets:
            split = {"fit": "train", "validate": "val", "test": "test", "predict": "test"}[stage]
            self._datasets[stage] = DepthSequenceDataset(
                self.scene_source(split),
                num_views=self.num_views,
                train=stage == "fit",
                keyframe_gap=self.keyframe_gap,
                eval_keyframes=self.eval_keyframes,
                frame_interval=self.frame_interval,
                image_size=self.image_size,
                num_scenes=self.num_scenes.get(stage),
            )
        return self._datasets[stage]

    def train_dataloader(self) -> DataLoader:
        """Resumable, DDP-sharded order in batches of one kind (`ModeEpochSampler`)."""
        dataset = self.dataset("fit")
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))
        dataset.seed = seed
        sampler = ModeEpochSampler(dataset, self.batch_size, self.p_generation, seed=seed)
        trainer = self.trainer
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
            sampler.start = self._batches_done_this_epoch(trainer) * self.batch_size
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=False,  # workers restart each epoch and see the new epoch's seed
            collate_fn=Views.collate,
        )
