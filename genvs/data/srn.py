"""SRN ShapeNet in pixelNeRF's layout (also the layout genvs' procedural dataset writes).

::

    <root>/<split>/<object>/rgb/*.png            (or <root>/<category>_<split>/..., as in srn_cars/cars_train)
                           /pose/*.txt           4x4 (or 3x4) OpenCV camera-to-world, row-major
                           /intrinsics.txt       "f cx cy 0." / origin / scale / "H W"
                           /depth/*.png          optional 16-bit z-depth in millimetres (genvs toy data)

Intrinsics come in two variants: files written for the 128 px images (``131.25 64 64`` / ``128 128``)
and the original SRN files written for 512 px renders while the released images are 128 px
(``f = 525``, ``cx = cy = 256``). The last line says which resolution the numbers describe; genvs
rescales them to the actual image size. Files without that line are assumed to describe a
``2 cx x 2 cy`` image. Some SRN test images are entirely white (the object is out of frame); they load
as valid images with an empty foreground mask instead of crashing a bounding-box computation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "DatasetError",
    "MissingDataError",
    "SceneRecord",
    "SRNScenes",
    "read_intrinsics",
    "read_pose",
    "read_image",
    "read_depth",
    "check_color_mode",
]


class DatasetError(ValueError):
    """Bad or missing dataset files (or generator settings). The message names the file or setting and the fix."""


class MissingDataError(DatasetError, FileNotFoundError):
    """A dataset folder or file that must exist does not (also a `FileNotFoundError`)."""


# single-channel modes with more than 8 bits: depth maps, masks or raw sensor data, never colour views
_NOT_COLOR_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def check_color_mode(im: Image.Image, path: Path | str) -> None:
    """Refuse images that cannot be a colour view (16-bit or float single-channel: a depth map or mask saved
    where a colour image belongs); every other mode (RGB, RGBA, L, P, CMYK, ...) converts to RGB."""
    if im.mode in _NOT_COLOR_MODES:
        raise DatasetError(
            f"{path}: a {im.mode!r} image (single channel, 16-bit or float) where a colour image is expected; it "
            "looks like a depth map or mask. Put the colour view here, saved as 8-bit RGB/RGBA (PNG or JPEG)"
        )


@dataclass
class SceneRecord:
    """One object/scene on disk: its id, image files, pose files and intrinsics file."""

    scene_id: str
    folder: Path
    images: list[Path]
    poses: list[Path]
    intrinsics: Path
    depths: list[Path] | None = None

    @property
    def num_views(self) -> int:
        return len(self.images)


def read_intrinsics(path: Path, image_hw: tuple[int, int]) -> Tensor:
    """``[3, 3]`` pixel intrinsics of an image of size ``image_hw`` from an SRN ``intrinsics.txt``."""
    try:
        lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
        f, cx, cy = (float(x) for x in lines[0][:3])
    except FileNotFoundError:
        raise MissingDataError(f"{path}: missing intrinsics file; every SRN object folder needs intrinsics.txt") from None
    except (ValueError, IndexError):
        raise DatasetError(
            f"{path}: malformed intrinsics; the first line must be 'f cx cy 0.' (e.g. '131.25 64. 64. 0.')"
        ) from None
    H, W = image_hw
    if len(lines) >= 4 and len(lines[-1]) == 2:
        try:
            h0, w0 = (float(x) for x in lines[-1])
        except ValueError:
            raise DatasetError(f"{path}: malformed last line {lines[-1]}; expected the image size 'H W'") from None
    else:  # no size line: assume a centred principal point
        h0, w0 = 2 * cy, 2 * cx
    if not all(np.isfinite([f, cx, cy, h0, w0])) or f <= 0 or h0 <= 0 or w0 <= 0:
        raise DatasetError(
            f"{path}: intrinsics must be finite and positive, got f={f} cx={cx} cy={cy} size={h0}x{w0}; the first line "
            "is 'f cx cy 0.' in pixels (e.g. '131.25 64. 64. 0.') and the last 'H W' of the image they describe"
        )
    sx, sy = W / w0, H / h0
    return torch.tensor([[f * sx, 0, cx * sx], [0, f * sy, cy * sy], [0, 0, 1]], dtype=torch.float32)


def read_pose(path: Path) -> Tensor:
    """``[4, 4]`` camera-to-world from a text file of 16 (or 12) numbers."""
    try:
        vals = np.array(Path(path).read_text().split(), dtype=np.float64)
    except FileNotFoundError:
        raise MissingDataError(f"{path}: missing pose file; every image needs a pose file with the same number") from None
    except ValueError:
        raise DatasetError(
            f"{path}: malformed pose; expected 16 numbers (a 4x4 camera-to-world matrix, row-major) and found text "
            "that is not a number"
        ) from None
    if vals.size == 12:
        vals = np.concatenate([vals, [0, 0, 0, 1]])
    if vals.size != 16:
        raise DatasetError(f"{path}: malformed pose; expected 16 numbers (a 4x4 camera-to-world), found {vals.size}")
    c2w = torch.from_numpy(vals.reshape(4, 4)).float()
    if not torch.isfinite(c2w).all():
        raise DatasetError(f"{path}: pose contains NaN or inf; re-export this camera or remove the view")
    R = c2w[:3, :3]
    if (R @ R.T - torch.eye(3)).abs().max() > 1e-2 or (c2w[3] - torch.tensor([0, 0, 0, 1.0])).abs().max() > 1e-6:
        raise DatasetError(
            f"{path}: not a rigid camera-to-world matrix (rotation not orthonormal or last row not 0 0 0 1); write "
            "the camera as [R t; 0 0 0 1] with R a rotation (OpenCV axes), without scale or shear"
        )
    return c2w


def white_background_mask(images: Tensor) -> Tensor:
    """``[..., 1, H, W]`` foreground mask of images ``[..., 3, H, W]`` in [-1, 1] on a white background:
    every pixel that is not (nearly) white."""
    return (images < 0.98).any(-3, keepdim=True).float()


def read_image(path: Path, expect_hw: tuple[int, int] | None = None) -> Tensor:
    """``[3, H, W]`` float in [-1, 1]; RGBA is composited onto white (SRN's background)."""
    try:
        with Image.open(path) as im:
            im.load()
            check_color_mode(im, path)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise MissingDataError(f"{path}: missing image; restore it or remove this view (and its pose file)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: corrupt or unreadable image ({e}); re-extract or delete this view") from None
    if expect_hw is not None and arr.shape[:2] != tuple(expect_hw):
        raise DatasetError(
            f"{path}: image is {arr.shape[0]}x{arr.shape[1]} but the other views of this object are "
            f"{expect_hw[0]}x{expect_hw[1]}; all views of an object must share one size"
        )
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1)


def read_depth(path: Path) -> Tensor:
    """``[1, H, W]`` z-depth from a 16-bit PNG in millimetres (0 = unknown)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im, dtype=np.float32)
    except FileNotFoundError:
        raise MissingDataError(f"{path}: missing depth map; restore it or delete the object's depth/ folder") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"{path}: corrupt depth map ({e}); re-extract it or delete the object's depth/ folder") from None
    return torch.from_numpy(arr / 1000.0)[None]


def _numbered(files: list[Path]) -> list[Path]:
    def key(p: Path):
        m = re.findall(r"\d+", p.stem)
        return (int(m[-1]) if m else -1, p.name)

    return sorted(files, key=key)


class SRNScenes:
    """Index of the objects of one split. ``scenes[i]`` is a `SceneRecord`; `load` reads views."""

    def __init__(self, root: str | Path, split: str, min_views: int = 1):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingDataError(
                f"dataset folder {self.root} not found. For SRN ShapeNet download pixelNeRF's srn_cars.zip / "
                "srn_chairs.zip (https://github.com/sxyu/pixel-nerf, 'Getting the data') and unzip it there; "
                "for the procedural dataset use genvs.data.ToyDataModule or run `genvs data toy --root <folder>`."
            )
        candidates = [self.root / split] + sorted(self.root.glob(f"*_{split}"))
        split_dir = next((c for c in candidates if c.is_dir()), None)
        if split_dir is None:
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise MissingDataError(
                f"{self.root}: no '{split}' split folder (looked for '{split}/' and '*_{split}/'); found {found}. "
                f"Point the root at the folder that holds the splits, or add the '{split}' split"
            )
        self.split_dir = split_dir
        self.scenes: list[SceneRecord] = []
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            rgb = _numbered([p for p in (folder / "rgb").glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")])
            poses = _numbered(list((folder / "pose").glob("*.txt")))
            if not rgb:
                raise DatasetError(f"{folder}: no images in {folder / 'rgb'}; expected rgb/*.png as in pixelNeRF's layout")
            if len(rgb) != len(poses):
                raise DatasetError(
                    f"{folder}: {len(rgb)} images in rgb/ but {len(poses)} pose files in pose/; every image needs "
                    "a pose file with the same number"
                )
            if len(rgb) < min_views:
                raise DatasetError(
                    f"{folder}: only {len(rgb)} views but {min_views} are needed per object (context + target "
                    "views); lower n_context/n_target or remove this object"
                )
            depth_dir = folder / "depth"
            depths = _numbered(list(depth_dir.glob("*.png"))) if depth_dir.is_dir() else None
            if depths is not None and len(depths) != len(rgb):
                raise DatasetError(f"{folder}: {len(depths)} depth maps for {len(rgb)} images")
            self.scenes.append(SceneRecord(folder.name, folder, rgb, poses, folder / "intrinsics.txt", depths))
        if not self.scenes:
            raise DatasetError(f"{split_dir}: no object folders; the split is empty")

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, i: int, views: list[int], load_depth: bool = True) -> dict[str, Tensor]:
        """Views ``views`` of scene ``i``: images ``[V, 3, H, W]``, K ``[V, 3, 3]``, c2w ``[V, 4, 4]``,
        depth ``[V, 1, H, W]`` when available, and foreground ``mask`` (non-white or positive depth)."""
        rec = self.scenes[i]
        images = [read_image(rec.images[v]) for v in views]
        poses = [read_pose(rec.poses[v]) for v in views]
        sizes = [tuple(img.shape[-2:]) for img in images]
        if len(set(sizes)) > 1:
            common = max(set(sizes), key=sizes.count)
            odd = [f"{rec.images[v]} is {h}x{w}" for v, (h, w) in zip(views, sizes) if (h, w) != common]
            raise DatasetError(
                f"{rec.folder}: views of one object differ in size: {'; '.join(odd)} while the others are "
                f"{common[0]}x{common[1]}; resize them to one size (all views of an object share the intrinsics)"
            )
        hw = sizes[0]
        images_t = torch.stack(images)
        K = read_intrinsics(rec.intrinsics, hw).expand(len(views), 3, 3).clone()
        out = {"images": images_t, "K": K, "c2w": torch.stack(poses)}
        if load_depth and rec.depths is not None:
            depth = torch.stack([read_depth(rec.depths[v]) for v in views])
            if depth.shape[-2:] != hw:
                raise DatasetError(f"{rec.depths[views[0]]}: depth map size {tuple(depth.shape[-2:])} != image size {hw}")
            out["depth"] = depth
            out["mask"] = (depth > 0).float()
        else:  # white background: foreground is anything not (nearly) white; all-white views give empty masks
            out["mask"] = white_background_mask(images_t)
        return out
