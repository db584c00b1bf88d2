"""RealEstate10K reader: camera files of the published release + frames extracted from the videos.

Cameras come in either of two published layouts:

- the RealEstate10K release (https://google.github.io/realestate10k/download.html, ``RealEstate10K.tar.gz``):
  ``<pose_root>/<split>/<sequence>.txt``, first line the YouTube URL, then one line per frame::

      timestamp_us fx fy cx cy 0 0 r00 r01 r02 t0 r10 r11 r12 t1 r20 r21 r22 t2

- the layout of the download scripts of cross_attention_renderer
  (https://github.com/yilundu/cross_attention_renderer/tree/master/data_download), which the official DFM
  code reads: one MATLAB file ``<pose_root>/<split>.mat`` mapping each sequence to a ``[V, 19]`` array of
  the same rows.

Intrinsics are normalised by the image width (``fx``, ``cx``) and height (``fy``, ``cy``); the 3x4
world-to-camera matrix uses OpenCV axes (x right, y down, z forward). Frames are not distributed; they are
extracted from the videos at those timestamps into ``<frames_root>/<split>/<sequence>/<timestamp>.png``
(or ``.jpg``, as those scripts write them). `re10k_to_opencv` is the one conversion from this convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from genvs.data.frames import VideoDataModule, VideoRecord, crop_resize, load_rgb
from genvs.data.srn import DatasetError, MissingDataError
from genvs.data.views_dataset import SceneSource

__all__ = ["parse_re10k_pose_file", "parse_re10k_rows", "re10k_to_opencv", "RealEstate10KScenes", "RealEstate10KDataModule"]

DOWNLOAD_HELP = (
    "RealEstate10K: download the camera files from https://google.github.io/realestate10k/download.html "
    "(RealEstate10K.tar.gz holds train/ and test/ folders of <sequence>.txt) and extract the frames of each "
    "video at the listed timestamps into <frames_root>/<split>/<sequence>/<timestamp>.png|jpg, e.g. with the "
    "scripts of https://github.com/yilundu/cross_attention_renderer/tree/master/data_download (which also "
    "write the <split>.mat camera layout)"
)

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")


def parse_re10k_rows(rows: Tensor, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """``[V, 19]`` camera rows -> ``(timestamps [V] int64, intrinsics [V, 4], w2c [V, 4, 4])``."""
    if rows.ndim != 2 or rows.shape[1] != 19 or rows.shape[0] == 0:
        raise DatasetError(f"{where}: expected camera rows of 19 numbers (timestamp fx fy cx cy 0 0 + 3x4 w2c), got {list(rows.shape)}")
    v = rows.double()
    if not torch.isfinite(v).all():
        raise DatasetError(f"{where}: camera rows contain NaN or inf")
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(v), 1, 1)
    w2c[:, :3, :] = v[:, 7:].reshape(-1, 3, 4)
    return v[:, 0].round().long(), v[:, 1:5].float(), w2c.float()


def parse_re10k_pose_file(path: str | Path) -> tuple[str, Tensor, Tensor, Tensor]:
    """Parse one camera file -> ``(url, timestamps [V] int64 (microseconds), intrinsics [V, 4] normalised
    (fx, fy, cx, cy), w2c [V, 4, 4])``. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"RealEstate10K camera file {path} not found. {DOWNLOAD_HELP}")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DatasetError(f"RealEstate10K camera file {path} is empty")
    url, rows = lines[0], lines[1:]
    if not rows:
        raise DatasetError(f"RealEstate10K camera file {path} lists no frames")
    ts, vals = [], []
    for n, ln in enumerate(rows, start=2):
        parts = ln.split()
        if len(parts) != 19:
            raise DatasetError(f"{path}:{n}: expected 19 numbers (timestamp fx fy cx cy 0 0 + 3x4 w2c), got {len(parts)}")
        try:
            ts.append(int(parts[0]))
            vals.append([float(x) for x in parts[1:]])
        except ValueError as e:
            raise DatasetError(f"{path}:{n}: not a number ({e})") from e
    v = torch.tensor(vals, dtype=torch.float64)
    finite = torch.isfinite(v).all(1)
    if not finite.all():
        n = int((~finite).nonzero()[0]) + 2
        raise DatasetError(f"{path}:{n}: camera row contains NaN or inf; re-download the camera file or delete that row")
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

    A genvs scene source (`genvs.data.views_dataset.SceneSource`): ``scenes[i]`` has ``scene_id`` and
    ``num_views`` (camera rows); ``load(i, indices)`` returns ``{"images" [V, 3, H, W] in [-1, 1],
    "K" [V, 3, 3], "c2w" [V, 4, 4], "scene": str, "timestamps" [V]}``; ``indices`` index the camera rows
    (``num_frames(i)``); ``dataset[i]`` loads every frame. DFM uses 64x64 (then 128) square centre crops
    (``crop="center"``: the official 140-pixel side crops of 640x360 frames).

    Args:
        pose_root: folder with ``<split>/<sequence>.txt`` camera files or a ``<split>.mat`` file.
        frames_root: folder with ``<split>/<sequence>/<timestamp>.png|jpg`` extracted frames.
        sequences: use these sequences. By default every sequence that has both cameras and a frames folder
            (videos that could not be downloaded have none); how many were left out is printed.
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
        pose_root = Path(pose_root)
        self.pose_dir = pose_root / split
        self.pose_mat = pose_root / f"{split}.mat"
        self.frames_dir = Path(frames_root) / split
        self.split, self.image_size, self.crop = split, image_size, crop
        self._mat: dict[str, Tensor] | None = None
        if self.pose_dir.is_dir():
            available = {p.stem: p for p in self.pose_dir.glob("*.txt")}
        elif self.pose_mat.is_file():
            self._mat = self._load_mat(self.pose_mat)
            available = {k: self.pose_mat for k in self._mat}
        else:
            raise MissingDataError(
                f"RealEstate10K camera files for split {split!r} not found: expected {self.pose_dir}/<sequence>.txt "
                f"or {self.pose_mat}. {DOWNLOAD_HELP}"
            )
        if not self.frames_dir.is_dir():
            raise MissingDataError(f"RealEstate10K frames folder {self.frames_dir} not found. {DOWNLOAD_HELP}")
        if not available:
            raise MissingDataError(f"no RealEstate10K camera files (*.txt) in {self.pose_dir}. {DOWNLOAD_HELP}")
        if sequences is None:
            with_frames = {p.name for p in self.frames_dir.iterdir() if p.is_dir()}
            sequences = sorted(set(available) & with_frames)
            if not sequences:
                raise MissingDataError(
                    f"none of the {len(available)} RealEstate10K sequences of split {split!r} has a frames folder in "
                    f"{self.frames_dir} (<sequence>/<timestamp>.png|jpg). {DOWNLOAD_HELP}"
                )
            if len(sequences) < len(available):
                print(
                    f"genvs: RealEstate10K {split}: {len(available) - len(sequences)} of {len(available)} sequences "
                    f"have cameras but no extracted frames in {self.frames_dir}; using the {len(sequences)} that do"
                )
        self.sequences = list(sequences)
        self._available = available
        self._cameras: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.scenes = [VideoRecord(seq, self._count_rows(seq)) for seq in self.sequences]

    @staticmethod
    def _load_mat(path: Path) -> dict[str, Tensor]:
        try:
            import scipy.io
        except ImportError as e:  # pragma: no cover - scipy is a test dependency of genvs
            raise ImportError(f"reading {path} needs scipy (pip install scipy), or use the .txt camera files") from e
        try:
            raw = scipy.io.loadmat(path)
        except Exception as e:  # noqa: BLE001 - any parse failure: name the file
            raise DatasetError(f"cannot read RealEstate10K camera file {path}: {e}") from e
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in raw.items() if not k.startswith("__")}

    def _count_rows(self, seq: str) -> int:
        if self._mat is not None:
            if seq not in self._mat:
                raise MissingDataError(f"RealEstate10K sequence {seq} is not in {self.pose_mat}")
            return int(self._mat[seq].shape[0])
        path = self.pose_dir / f"{seq}.txt"
        if not path.is_file():
            raise MissingDataError(f"RealEstate10K camera file {path} not found. {DOWNLOAD_HELP}")
        lines = [ln for ln in path.read_bytes().splitlines() if ln.strip()]
        return max(len(lines) - 1, 0)  # first line: the video URL

    def __len__(self) -> int:
        return len(self.sequences)

    def cameras(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(timestamps [V], intrinsics [V, 4] normalised, w2c [V, 4, 4])`` of sequence ``i`` (cached)."""
        seq = self.sequences[i]
        if seq not in self._cameras:
            if self._mat is not None:
                self._cameras[seq] = parse_re10k_rows(self._mat[seq], f"{self.pose_mat}[{seq}]")
            else:
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
        raise MissingDataError(
            f"RealEstate10K frame {folder / str(timestamp)}.png (or .jpg) is missing: extract it from the "
            f"sequence's video at {timestamp / 1e6:.6f} s (e.g. ffmpeg -ss {timestamp / 1e6:.6f} -i VIDEO -frames:v 1 "
            f"{timestamp}.png)"
        )

    def load(self, i: int, indices: Sequence[int] | Tensor | None = None, load_depth: bool = False) -> dict:
        """Frames ``indices`` of sequence ``i`` (``load_depth`` is accepted and ignored: RealEstate10K has no depth)."""
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


class RealEstate10KDataModule(VideoDataModule):
    """RealEstate10K as `Views` batches; training views follow DFM's frame windows (official: 100-180 frames
    between the context and target 0 per context view).

    Args:
        pose_root: camera files (``<split>/<sequence>.txt`` from the release, or ``<split>.mat``).
        frames_root: extracted frames ``<split>/<sequence>/<timestamp>.png|jpg``.
        val_split: split used for validation (the release has only ``train`` and ``test``).
        crop: ``center`` square crops (official).

    Frame windows, scale augmentation and the `NVSDataModule` arguments are as in `VideoDataModule`.
    """

    def __init__(
        self,
        pose_root: str = "data/realestate10k/poses",
        frames_root: str = "data/realestate10k/frames",
        val_split: str = "test",
        crop: Literal["center", "none"] = "center",
        min_distance: int = 100,
        max_distance: int = 180,
        **kwargs,
    ):
        super().__init__(min_distance=min_distance, max_distance=max_distance, **kwargs)
        self.pose_root, self.frames_root, self.val_split, self.crop = pose_root, frames_root, val_split, crop

    def scene_source(self, split: str) -> SceneSource:
        split = self.val_split if split == "val" else split
        return RealEstate10KScenes(self.pose_root, self.frames_root, split, self.image_size, self.crop)
