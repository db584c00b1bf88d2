"""CO3D (Common Objects in 3D, v2 layout) reader: per-sequence frames with OpenCV cameras.

Published layout under ``root``::

    <category>/frame_annotations.jgz        gzipped JSON list, one entry per frame
    <category>/sequence_annotations.jgz     gzipped JSON list, one entry per sequence
    <category>/set_lists/set_lists_<subset>.json   {"train"|"val"|"test": [[sequence, frame_number, image_path], ...]}
    <category>/<sequence>/images/frameXXXXXX.jpg   (+ masks/*.png, depths/*.jpg.geometric.png)

Paths inside the annotations are relative to ``root`` (``hydrant/<sequence>/images/frame000001.jpg``).
Cameras are stored in PyTorch3D's convention (row-vector ``X_cam = X_world R + T``, camera x left / y up,
NDC intrinsics); `co3d_camera_to_opencv` is the one place that converts them. DFM trains on hydrants
with the ``fewview_dev`` subset, square centre crops, and each sequence scaled so that its mean
foreground depth is 10 (``scene_scale="depth"``; ``"cameras"`` estimates the same from the poses alone).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from genvs.core.cameras import optical_axes_center
from genvs.data.frames import VideoDataModule, VideoRecord, crop_resize, load_rgb
from genvs.data.srn import DatasetError, MissingDataError
from genvs.data.views_dataset import SceneSource

__all__ = [
    "co3d_camera_to_opencv",
    "load_jgz",
    "CO3DFrame",
    "read_co3d_frames",
    "read_co3d_set_list",
    "load_co3d_depth",
    "optical_axes_center",
    "CO3DScenes",
    "CO3DDataModule",
]


def co3d_camera_to_opencv(
    R: Tensor,
    T: Tensor,
    focal_length: Tensor,
    principal_point: Tensor,
    image_size_hw: Tensor,
    intrinsics_format: str = "ndc_isotropic",
) -> tuple[Tensor, Tensor]:
    """CO3D/PyTorch3D camera -> OpenCV ``K [..., 3, 3]`` (pixels, centres at ``i + 0.5``) and ``c2w [..., 4, 4]``.

    PyTorch3D maps world points by ``X_cam = X_world @ R + T`` into a camera with x left, y up, z forward,
    and projects ``x_ndc = f * X_cam / Z + p`` with NDC +x pointing left and +y up. ``intrinsics_format``
    says how NDC relates to pixels: ``"ndc_isotropic"`` (CO3D v2: the shorter side spans [-1, 1]) or
    ``"ndc_norm_image_bounds"`` (CO3D v1: each side spans [-1, 1]). ``image_size_hw`` is ``[..., 2]``.
    """
    R, T = R.double(), T.double()
    f, p = focal_length.double(), principal_point.double()
    half_wh = image_size_hw.double().flip(-1) / 2.0  # [..., 2] (W/2, H/2)
    fmt = intrinsics_format.lower()
    if fmt == "ndc_isotropic":
        rescale = half_wh.min(dim=-1, keepdim=True).values
    elif fmt == "ndc_norm_image_bounds":
        rescale = half_wh
    else:
        raise DatasetError(
            f"unknown CO3D intrinsics_format {intrinsics_format!r}: use 'ndc_isotropic' or 'ndc_norm_image_bounds'"
        )
    f_px = f * rescale
    p_px = half_wh - p * rescale  # NDC +x is left: pixel u grows as x_ndc falls
    K = torch.zeros(*f.shape[:-1], 3, 3, dtype=torch.float64)
    K[..., 0, 0], K[..., 1, 1] = f_px[..., 0], f_px[..., 1]
    K[..., 0, 2], K[..., 1, 2] = p_px[..., 0], p_px[..., 1]
    K[..., 2, 2] = 1
    # OpenCV camera = PyTorch3D camera with x and y negated: X_cv = diag(-1, -1, 1) (R^T X_world + T)
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    R_w2c = flip @ R.transpose(-1, -2)
    t_w2c = (flip @ T[..., None])[..., 0]
    c2w = torch.zeros(*R.shape[:-2], 4, 4, dtype=torch.float64)
    c2w[..., :3, :3] = R_w2c.transpose(-1, -2)
    c2w[..., :3, 3] = -(R_w2c.transpose(-1, -2) @ t_w2c[..., None])[..., 0]
    c2w[..., 3, 3] = 1
    return K.float(), c2w.float()


def load_jgz(path: str | Path) -> list | dict:
    """Read a gzipped JSON file (CO3D's ``.jgz``), naming the file on any failure."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(
            f"CO3D annotation file {path} not found; download CO3D v2 (https://github.com/facebookresearch/co3d) "
            "and pass its root folder"
        )
    try:
        with gzip.open(path, "rt", encoding="utf8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(
            f"CO3D annotation file {path} is not gzipped JSON ({e}); the download is corrupt or incomplete: "
            "download this category again"
        ) from None


@dataclass
class CO3DFrame:
    sequence: str
    frame_number: int
    image_path: str  # relative to the dataset root
    image_size: tuple[int, int]  # (H, W) of the original image
    K: Tensor  # [3, 3] pixels of the original image
    c2w: Tensor  # [4, 4] OpenCV
    mask_path: str | None = None
    depth_path: str | None = None
    depth_scale_adjustment: float = 1.0


def read_co3d_frames(root: str | Path, category: str) -> dict[str, list[CO3DFrame]]:
    """``{sequence: frames sorted by frame_number}`` from ``<root>/<category>/frame_annotations.jgz``."""
    path = Path(root) / category / "frame_annotations.jgz"
    entries = load_jgz(path)
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a list of frame annotations, got {type(entries).__name__}")
    if not entries:
        return {}
    try:
        vp = [e["viewpoint"] for e in entries]
        sizes = torch.tensor([e["image"]["size"] for e in entries], dtype=torch.float64)
        fmts = {v.get("intrinsics_format", "ndc_norm_image_bounds") for v in vp}
        Ks = torch.empty(len(entries), 3, 3)
        c2ws = torch.empty(len(entries), 4, 4)
        for fmt in fmts:  # vectorised per format (one format per file in practice)
            sel = [i for i, v in enumerate(vp) if v.get("intrinsics_format", "ndc_norm_image_bounds") == fmt]
            K, c2w = co3d_camera_to_opencv(
                torch.tensor([vp[i]["R"] for i in sel]),
                torch.tensor([vp[i]["T"] for i in sel]),
                torch.tensor([vp[i]["focal_length"] for i in sel]),
                torch.tensor([vp[i]["principal_point"] for i in sel]),
                sizes[sel],
                fmt,
            )
            Ks[sel], c2ws[sel] = K, c2w
        out: dict[str, list[CO3DFrame]] = {}
        for i, e in enumerate(entries):
            depth = e.get("depth") or {}
            mask = e.get("mask") or {}
            out.setdefault(e["sequence_name"], []).append(
                CO3DFrame(
                    sequence=e["sequence_name"],
                    frame_number=int(e["frame_number"]),
                    image_path=e["image"]["path"],
                    image_size=tuple(int(s) for s in e["image"]["size"]),
                    K=Ks[i],
                    c2w=c2ws[i],
                    mask_path=mask.get("path"),
                    depth_path=depth.get("path"),
                    depth_scale_adjustment=float(depth.get("scale_adjustment", 1.0) or 1.0),
                )
            )
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DatasetError(
            f"{path}: malformed frame annotation ({type(e).__name__}: {e}); expected CO3D v2 entries with "
            "sequence_name, frame_number, image {path, size} and viewpoint {R, T, focal_length, principal_point}: "
            "download the category again"
        ) from None
    bad = ~(torch.isfinite(Ks).flatten(1).all(1) & torch.isfinite(c2ws).flatten(1).all(1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise DatasetError(
            f"{path}: frame {entries[i].get('frame_number')} of sequence {entries[i].get('sequence_name')} (and "
            f"{int(bad.sum()) - 1} more) has a non-finite camera (NaN or inf in R, T, focal_length or "
            "principal_point); re-download the annotations or drop those frames from the set list"
        )
    for frames in out.values():
        frames.sort(key=lambda fr: fr.frame_number)
    return out


def read_co3d_set_list(root: str | Path, category: str, subset: str, split: str) -> dict[str, list[int]]:
    """``{sequence: sorted frame numbers}`` of ``split`` in ``<root>/<category>/set_lists/set_lists_<subset>.json``."""
    path = Path(root) / category / "set_lists" / f"set_lists_{subset}.json"
    if not path.is_file():
        have = sorted(p.name for p in path.parent.glob("set_lists_*.json")) if path.parent.is_dir() else []
        raise MissingDataError(f"CO3D set list {path} not found (subset={subset!r}); available: {have or 'none'}")
    try:
        with open(path) as f:
            lists = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"CO3D set list {path} is not valid JSON ({e}); download it again") from None
    if not isinstance(lists, dict):
        raise DatasetError(f"CO3D set list {path} must map split names to frame lists, got {type(lists).__name__}")
    if split not in lists:
        raise DatasetError(f"{path} has no split {split!r}; it has {sorted(lists)}")
    out: dict[str, list[int]] = {}
    for item in lists[split]:
        out.setdefault(item[0], []).append(int(item[1]))
    return {k: sorted(v) for k, v in out.items()}


def load_co3d_depth(path: str | Path, scale_adjustment: float = 1.0) -> Tensor:
    """CO3D depth map ``[H, W]``: 16-bit PNG whose bits are float16 values, times ``scale_adjustment``."""
    with Image.open(path) as im:
        raw = np.array(im, dtype=np.uint16)
    return torch.from_numpy(raw.view(np.float16).astype(np.float32)) * scale_adjustment


class CO3DScenes(Dataset):
    """One item per CO3D sequence of a category and split: all its frames (or a chosen subset).

    A genvs scene source (`genvs.data.views_dataset.SceneSource`): ``scenes[i]`` has ``scene_id`` (the
    sequence name) and ``num_views``; ``load(i, indices)`` returns ``{"images" [V, 3, H, W] in [-1, 1],
    "K" [V, 3, 3], "c2w" [V, 4, 4], "scene": str, "frame_numbers" [V]}`` (+ ``"mask" [V, 1, H, W]`` with
    ``load_masks``); ``dataset[i]`` loads every frame. ``indices`` index the sequence's frames in
    frame-number order (``num_frames(i)``). Depth maps are not loaded (DFM does not use them; ``load_depth``
    is accepted and ignored).

    Args:
        root: CO3D v2 root (the folder holding ``<category>/``).
        subset, split: which set list (``set_lists_<subset>.json``) and split (``train``/``val``/``test``);
            ``subset=None`` uses every annotated frame.
        image_size: output size (square after ``crop="center"``); None keeps the (cropped) size.
        scene_scale: ``"depth"`` (official DFM: translations divided by the sequence's mean median
            foreground depth, needs depths and masks), ``"cameras"`` (same idea from the poses alone: the
            mean distance of the cameras to the point their optical axes meet), or ``"none"``; the scaled
            scene has that distance equal to ``target_scale`` (DFM: 10).
        sequences: restrict to these sequence names.
        top_quality: keep the ``top_quality`` sequences with the highest ``viewpoint_quality_score`` in
            ``sequence_annotations.jgz`` (the official DFM training set keeps the best 500 hydrants).
    """

    def __init__(
        self,
        root: str | Path,
        category: str = "hydrant",
        subset: str | None = "fewview_dev",
        split: str = "train",
        image_size: int | tuple[int, int] | None = 64,
        crop: Literal["center", "none"] = "center",
        scene_scale: Literal["none", "cameras", "depth"] = "cameras",
        target_scale: float = 10.0,
        load_masks: bool = False,
        sequences: Sequence[str] | None = None,
        top_quality: int | None = None,
    ):
        self.root = Path(root)
        if not (self.root / category).is_dir():
            raise MissingDataError(
                f"CO3D category folder {self.root / category} not found: root must be the CO3D v2 folder that "
                f"contains '{category}/frame_annotations.jgz'. Download CO3D v2 with the official script "
                f"(https://github.com/facebookresearch/co3d: python co3d/download_dataset.py --download_folder "
                f"{self.root} --download_categories {category}) or set data.init_args.root to where it is"
            )
        if scene_scale not in ("none", "cameras", "depth"):
            raise ValueError(f"scene_scale={scene_scale!r}: use 'none', 'cameras' or 'depth'")
        self.category, self.split, self.image_size, self.crop = category, split, image_size, crop
        self.scene_scale, self.target_scale, self.load_masks = scene_scale, target_scale, load_masks
        frames = read_co3d_frames(self.root, category)
        if subset is not None:
            keep = read_co3d_set_list(self.root, category, subset, split)
            kept: dict[str, list[CO3DFrame]] = {}
            for seq, numbers in keep.items():
                numbers = set(numbers)
                kept[seq] = [fr for fr in frames.get(seq, []) if fr.frame_number in numbers]
                if len(kept[seq]) != len(numbers):
                    missing = sorted(numbers - {fr.frame_number for fr in kept[seq]})[:5]
                    raise DatasetError(
                        f"CO3D set list {subset}/{split} names frames of {seq} absent from "
                        f"{category}/frame_annotations.jgz (e.g. frame numbers {missing}); the download is incomplete"
                    )
            frames = kept
        if sequences is not None:
            missing = sorted(set(sequences) - set(frames))
            if missing:
                raise DatasetError(f"CO3D {category}/{split}: unknown sequences {missing}")
            frames = {s: frames[s] for s in sequences}
        if top_quality is not None:
            path = self.root / category / "sequence_annotations.jgz"
            try:
                score = {e["sequence_name"]: float(e.get("viewpoint_quality_score") or 0.0) for e in load_jgz(path)}
            except (KeyError, TypeError, AttributeError) as e:
                raise DatasetError(f"{path}: malformed sequence annotation ({e})") from e
            best = sorted(frames, key=lambda s: score.get(s, 0.0), reverse=True)[:top_quality]
            frames = {s: frames[s] for s in best}
        self.frames = {s: fr for s, fr in sorted(frames.items()) if fr}
        self.sequences = list(self.frames)
        if not self.sequences:
            raise DatasetError(
                f"CO3D {category}: no sequences with frames in split {split!r}"
                + (f" of set list {subset!r}" if subset else "")
                + f" under {self.root}; check the download and the subset/split names"
            )
        self.scenes = [VideoRecord(s, len(self.frames[s])) for s in self.sequences]
        self._scales: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.sequences)

    def num_frames(self, i: int) -> int:
        return len(self.frames[self.sequences[i]])

    def sequence_scale(self, sequence: str) -> float:
        """The factor translations are multiplied by (1 for ``scene_scale="none"``); cached per sequence."""
        if self.scene_scale == "none":
            return 1.0
        if sequence not in self._scales:
            frames = self.frames[sequence]
            if self.scene_scale == "cameras":
                c2w = torch.stack([fr.c2w for fr in frames])
                center = optical_axes_center(c2w)
                dist = (c2w[:, :3, 3] - center).norm(dim=-1).mean().item()
            else:
                dist = self._mean_foreground_depth(frames)
            if not dist > 0:
                raise DatasetError(f"CO3D sequence {sequence}: cannot estimate its scale ({self.scene_scale}={dist})")
            self._scales[sequence] = self.target_scale / dist
        return self._scales[sequence]

    def _mean_foreground_depth(self, frames: list[CO3DFrame]) -> float:
        medians = []
        for fr in frames:
            if fr.depth_path is None or fr.mask_path is None:
                raise DatasetError(f"scene_scale='depth' needs depth and mask paths; frame {fr.image_path} has none")
            depth = load_co3d_depth(self.root / fr.depth_path, fr.depth_scale_adjustment)
            with Image.open(self.root / fr.mask_path) as im:
                mask = torch.from_numpy(np.array(im.convert("L"), dtype=np.float32) / 255.0)
            if mask.shape != depth.shape:
                mask = F.interpolate(mask[None, None], size=depth.shape, mode="nearest")[0, 0]
            valid = (mask > 0.4) & (depth > 0)
            if valid.any():
                medians.append(depth[valid].median().item())
        return float(np.mean(medians)) if medians else float("nan")

    def load(self, i: int, indices: Sequence[int] | Tensor | None = None, load_depth: bool = False) -> dict:
        seq = self.sequences[i]
        frames = self.frames[seq]
        if indices is None:
            indices = range(len(frames))
        indices = [int(j) for j in indices]
        bad = [j for j in indices if not 0 <= j < len(frames)]
        if bad:
            raise IndexError(f"CO3D sequence {seq} has {len(frames)} frames; indices {bad} are out of range")
        scale = self.sequence_scale(seq)
        images, Ks, c2ws, masks = [], [], [], []
        for j in indices:
            fr = frames[j]
            img = load_rgb(self.root / fr.image_path)
            if tuple(img.shape[-2:]) != fr.image_size:
                raise DatasetError(
                    f"image {self.root / fr.image_path} is {tuple(img.shape[-2:])}, its annotation says {fr.image_size}"
                )
            if self.load_masks:
                if fr.mask_path is None:
                    raise DatasetError(f"load_masks=True but frame {fr.image_path} has no mask path")
                with Image.open(self.root / fr.mask_path) as im:
                    m = torch.from_numpy(np.array(im.convert("L"), dtype=np.float32) / 255.0)[None]
                img = torch.cat([img, m * 2 - 1], dim=0)
            img, K = crop_resize(img, fr.K, self.image_size, self.crop)
            c2w = fr.c2w.clone()
            c2w[:3, 3] *= scale
            images.append(img[:3])
            if self.load_masks:
                masks.append((img[3:] > 0).float())
            Ks.append(K)
            c2ws.append(c2w)
        out = {
            "images": torch.stack(images).clamp(-1, 1),
            "K": torch.stack(Ks),
            "c2w": torch.stack(c2ws),
            "scene": seq,
            "frame_numbers": torch.tensor([frames[j].frame_number for j in indices]),
        }
        if self.load_masks:
            out["mask"] = torch.stack(masks)
        return out

    def __getitem__(self, i: int) -> dict:
        return self.load(i)


class CO3DDataModule(VideoDataModule):
    """CO3D v2 (DFM: hydrants) as `Views` batches; training views follow DFM's frame windows.

    Download CO3D v2 (https://github.com/facebookresearch/co3d: ``python ./co3d/download_dataset.py
    --download_folder DIR --single_sequence_subset`` or the full category zip) so that ``root`` holds
    ``<category>/frame_annotations.jgz``, ``sequence_annotations.jgz``, ``set_lists/`` and the sequence folders.

    Args:
        root: the CO3D v2 folder.
        category: object category (DFM: ``hydrant``).
        subset: set list (``set_lists_<subset>.json``; DFM: ``fewview_dev``); ``None`` uses every frame.
        scene_scale, target_scale: per-sequence scale (see `CO3DScenes`; official: mean foreground depth 10).
        top_quality: keep only the best sequences of the *training* split by viewpoint quality (official: 500).
        crop: ``center`` square crops.

    Frame windows, scale augmentation and the `NVSDataModule` arguments are as in `VideoDataModule`.
    """

    def __init__(
        self,
        root: str = "data/co3d",
        category: str = "hydrant",
        subset: str | None = "fewview_dev",
        scene_scale: Literal["none", "cameras", "depth"] = "cameras",
        target_scale: float = 10.0,
        top_quality: int | None = 500,
        crop: Literal["center", "none"] = "center",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root, self.category, self.subset = root, category, subset
        self.scene_scale, self.target_scale, self.top_quality, self.crop = scene_scale, target_scale, top_quality, crop

    def scene_source(self, split: str) -> SceneSource:
        return CO3DScenes(
            self.root, self.category, self.subset, split, self.image_size, self.crop, self.scene_scale,
            self.target_scale, top_quality=self.top_quality if split == "train" else None,
        )
