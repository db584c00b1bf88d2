"""RealEstate10K reader: camera files of the published release + frames extracted from the videos.

Published layout: ``<pose_root>/<split>/<sequence>.txt``, first line the YouTube URL, then one line per
frame::

    timestamp_us fx fy cx cy 0 0 r00 r01 r02 t0 r10 r11 r12 t1 r20 r21 r22 t2

intrinsics normalised by the image width (``fx``, ``cx``) and height (``fy``, ``cy``), and a 3x4
world-to-camera matrix in OpenCV axes (x right, y down, z forward). Frames are not distributed; they are
extracted from the videos at those timestamps into ``<frames_root>/<split>/<sequence>/<timestamp>.png``
(or ``.jpg``). `re10k_to_opencv` is the one conversion from these files' convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from genvs.data.frames import crop_resize, load_rgb

__all__ = ["parse_re10k_pose_file", "re10k_to_opencv", "RealEstate10KScenes"]

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")


def parse_re10k_pose_file(path: str | Path) -> tuple[str, Tensor, Tensor, Tensor]:
    """Parse one camera file -> ``(url, timestamps [V] int64 (microseconds), intrinsics [V, 4] normalised
    (fx, fy, cx, cy), w2c [V, 4, 4])``. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"RealEstate10K camera file {path} not found: pose_root must hold <split>/<sequence>.txt from the "
            f"RealEstate10K release"
        )
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"RealEstate10K camera file {path} is empty")
    url, rows = lines[0], lines[1:]
    if not rows:
        raise ValueError(f"RealEstate10K camera file {path} lists no frames")
    ts, vals = [], []
    for n, ln in enumerate(rows, start=2):
        parts = ln.split()
        if len(parts) != 19:
            raise ValueError(f"{path}:{n}: expected 19 numbers (timestamp fx fy cx cy 0 0 + 3x4 w2c), got {len(parts)}")
        try:
            ts.append(int(parts[0]))
            vals.append([float(x) for x in parts[1:]])
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not a number ({e})") from e
    v = torch.tensor(vals, dtype=torch.float64)
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(rows), 1, 1)
    w2c[:, :3, :] = v[:, 6:].reshape(-1, 3, 4)
    return url, torch.tensor(ts, dtype=torch.int64), v[:, :4].float(), w2c.float()


def re10k_to_opencv(intrinsics: Tensor, w2c: Tensor, H: int, W: int) -> tuple[Tensor, Tensor]:
    """Normalised ``(fx, fy, cx, cy) [..., 4]`` and ``w2c [..., 4, 4]`` -> ``K [..., 3, 3]`` in pixels of an
    ``H x W`` frame and OpenCV ``c2w [..., 4, 4]`` (the files already use OpenCV axes: only invert)."""
    K = torch.zeros(*intrinsics.shape[:-1], 3, 3, dtype=torch.float32)
    K[..., 0, 0] = intrinsics[..., 0] * W
    K[..., 1, 1] = intrinsics[..., 1] * H
    K[..., 0, 2] = intrinsics[..., 2] * W
    K[..., 1, 2] = intrinsics[..., 3] * H
    K[..., 2, 2] = 1
    R, t = w2c[..., :3, :3].double(), w2c[..., :3, 3:].double()
    c2w = torch.zeros_like(w2c, dtype=torch.float64)
    c2w[..., :3, :3] = R.transpose(-1, -2)
    c2w[..., :3, 3:] = -R.transpose(-1, -2) @ t
    c2w[..., 3, 3] = 1
    return K, c2w.float()


class RealEstate10KScenes(Dataset):
    """One item per RealEstate10K sequence: its frames with OpenCV cameras.

    ``load(i, indices)`` returns ``{"images" [V, 3, H, W] in [-1, 1], "K" [V, 3, 3], "c2w" [V, 4, 4],
    "scene": str, "timestamps" [V]}``; ``indices`` index the camera file's rows (``num_frames(i)``);
    ``dataset[i]`` loads every frame. DFM uses 64x64 (then 128) square centre crops (``crop="center"``).

    Args:
        pose_root: folder with ``<split>/<sequence>.txt`` camera files.
        frames_root: folder with ``<split>/<sequence>/<timestamp>.png|jpg`` extracted frames.
        sequences: restrict to these sequences (default: every camera file of the split).
    """

    def __init__(
        self,
        pose_root: str | Path,
        frames_root: str | Path,
        split: str = "train",
        image_size: int | tuple[int, int] | None = 64,
        crop: Literal["center", "none"] = "center",
        sequences: Sequence[str] | None = None,
    ):
        self.pose_dir = Path(pose_root) / split
        self.frames_dir = Path(frames_root) / split
        if not self.pose_dir.is_dir():
            raise FileNotFoundError(
                f"RealEstate10K camera folder {self.pose_dir} not found (expected <pose_root>/{split}/*.txt)"
            )
        if not self.frames_dir.is_dir():
            raise FileNotFoundError(
                f"RealEstate10K frames folder {self.frames_dir} not found: extract each video's frames at the "
                f"timestamps of its camera file into <frames_root>/{split}/<sequence>/<timestamp>.png"
            )
        self.split, self.image_size, self.crop = split, image_size, crop
        if sequences is None:
            sequences = sorted(p.stem for p in self.pose_dir.glob("*.txt"))
            if not sequences:
                raise FileNotFoundError(f"no RealEstate10K camera files (*.txt) in {self.pose_dir}")
        self.sequences = list(sequences)
        self._cameras: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.sequences)

    def cameras(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(timestamps [V], intrinsics [V, 4] normalised, w2c [V, 4, 4])`` of sequence ``i`` (cached)."""
        seq = self.sequences[i]
        if seq not in self._cameras:
            _, ts, intr, w2c = parse_re10k_pose_file(self.pose_dir / f"{seq}.txt")
            self._cameras[seq] = (ts, intr, w2c)
        return self._cameras[seq]

    def num_frames(self, i: int) -> int:
        return len(self.cameras(i)[0])

    def frame_path(self, i: int, timestamp: int) -> Path:
        folder = self.frames_dir / self.sequences[i]
        for ext in FRAME_EXTENSIONS:
            p = folder / f"{timestamp}{ext}"
            if p.is_file():
                return p
        raise FileNotFoundError(
            f"RealEstate10K frame {folder / str(timestamp)}.png (or .jpg) is missing: extract it from the "
            f"sequence's video at {timestamp / 1e6:.6f} s (e.g. ffmpeg -ss {timestamp / 1e6:.6f} -i VIDEO -frames:v 1 "
            f"{timestamp}.png)"
        )

    def load(self, i: int, indices: Sequence[int] | Tensor | None = None) -> dict:
        ts, intr, w2c = self.cameras(i)
        if indices is None:
            indices = range(len(ts))
        indices = [int(j) for j in indices]
        bad = [j for j in indices if not 0 <= j < len(ts)]
        if bad:
            raise IndexError(
                f"RealEstate10K sequence {self.sequences[i]} has {len(ts)} frames; indices {bad} are out of range"
            )
        images, Ks, c2ws = [], [], []
        for j in indices:
            img = load_rgb(self.frame_path(i, int(ts[j])))
            H, W = img.shape[-2:]
            K, c2w = re10k_to_opencv(intr[j], w2c[j], H, W)
            img, K = crop_resize(img, K, self.image_size, self.crop)
            images.append(img)
            Ks.append(K)
            c2ws.append(c2w)
        return {
            "images": torch.stack(images).clamp(-1, 1),
            "K": torch.stack(Ks),
            "c2w": torch.stack(c2ws),
            "scene": self.sequences[i],
            "timestamps": ts[indices],
        }

    def __getitem__(self, i: int) -> dict:
        return self.load(i)
