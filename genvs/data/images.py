"""Unstructured image collections (ImageNet-style folders) for single-image methods.

Layout: either class subfolders (labels from the sorted folder names, as torchvision's ``ImageFolder``
and ImageNet's ``train/``) or images directly in the folder (unlabelled, ``labels = -1``)::

    <root>/<class>/<image>.JPEG         or          <root>/<image>.png

Images are resized (shorter side, Lanczos) and centre-cropped to ``image_size``, as the warping paper's
data pipeline. There are no cameras: every image is seen by a pinhole of ``fov_deg`` at the identity
(OpenCV), and evaluation/prediction cameras come from a trajectory around a pivot ahead of it
(`genvs.core.cameras.pivot_viewset`).

Depth comes from a monocular estimator (`genvs.methods.warping.depth`-style: images in [-1, 1] -> z-depth),
run ONCE by `ImageFolderDataModule.prepare_data` on ``estimate_size`` crops and cached as float16 ``.npy``
files at the training crop::

    <depth_cache>/<image_size>px/<relative image path>.npy     (default depth_cache: <root>_depth)
    <depth_cache>/<image_size>px/genvs_depth.json              (what computed them)

Loading never runs the estimator; a missing cache file is an error naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from genvs.core.cameras import intrinsics_from_fov, pivot_viewset
from genvs.core.views import Views
from genvs.data.module import NVSDataModule
from genvs.data.srn import DatasetError, MissingDataError, check_color_mode

__all__ = [
    "ImageRecord",
    "scan_image_folder",
    "load_square_image",
    "DepthCache",
    "SingleImageDataset",
    "TrajectoryDataset",
    "ImageFolderDataModule",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_META = "genvs_depth.json"


@dataclass
class ImageRecord:
    path: Path
    rel: str  # path relative to the root, "/"-separated
    label: int  # class index, -1 without class folders


def scan_image_folder(root: str | Path, class_labels: bool = True) -> tuple[list[ImageRecord], list[str]]:
    """All images under ``root`` (hidden folders skipped) and the class names (sorted subfolders).

    With ``class_labels`` and images in first-level subfolders, each image's label is its folder's index;
    images directly in ``root`` are unlabelled. Mixing both is an error.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingDataError(
            f"image folder {root} not found. Put the images there (ImageNet: the ILSVRC2012 train images, one "
            "subfolder per class, from https://image-net.org/download.php), or point data.init_args.root at them."
        )
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                files.append(f if rel_dir == "." else f"{rel_dir}/{f}".replace(os.sep, "/"))
    if not files:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    nested = [f for f in files if "/" in f]
    classes: list[str] = []
    if class_labels and nested:
        if len(nested) != len(files):
            top = next(f for f in files if "/" not in f)
            raise DatasetError(
                f"{root}: images both in class subfolders and directly in the folder (e.g. {top}); put every "
                "image in a class subfolder, or set class_labels: false"
            )
        classes = sorted({f.split("/")[0] for f in files})
    index = {c: i for i, c in enumerate(classes)}
    records = [ImageRecord(root / f, f, index[f.split("/")[0]] if classes else -1) for f in files]
    return records, classes


def load_square_image(path: Path, size: int) -> Tensor:
    """``[3, size, size]`` in [-1, 1]: shorter side resized to ``size`` (Lanczos), centre crop."""
    try:
        with Image.open(path) as im:
            im.load()
            check_color_mode(im, path)
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            im = im.resize((nw, nh), Image.LANCZOS)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise MissingDataError(f"{path}: missing image; restore it or rescan the folder") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: corrupt or unreadable image ({e}); delete or replace it") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1)


class DepthCache:
    """Monocular depth of every image at the training crop, computed once and stored as float16 ``.npy``."""

    def __init__(self, folder: str | Path, image_size: int):
        self.folder = Path(folder).expanduser() / f"{image_size}px"
        self.image_size = image_size

    def path(self, rec: ImageRecord) -> Path:
        return self.folder / f"{rec.rel}.npy"

    def missing(self, records: list[ImageRecord]) -> list[ImageRecord]:
        return [r for r in records if not self.path(r).is_file()]

    def check_meta(self, meta: dict) -> None:
        """Refuse to mix depth from different estimators/settings in one cache (never overwritten)."""
        f = self.folder / CACHE_META
        if f.is_file():
            have = json.loads(f.read_text())
            if have != meta:
                raise DatasetError(
                    f"{f}: the cached depth was computed with {have}, not {meta}. Delete {self.folder} to recompute, "
                    "or set data.init_args.depth_cache to another folder"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(meta, indent=1))

    @torch.no_grad()
    def compute(
        self,
        records: list[ImageRecord],
        estimator: Callable[[Tensor], Tensor],
        estimate_size: int,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> int:
        """Estimate and store the depth of ``records`` (those without a cache file); returns how many.

        The estimator sees the ``estimate_size`` centre crop (the training crop at a higher resolution);
        its depth is brought to ``image_size`` by nearest-neighbour sampling, as the official pipeline resizes
        depth. Files are written atomically (temporary file, then rename).
        """
        todo = self.missing(records)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            x = torch.stack([load_square_image(r.path, estimate_size) for r in chunk]).to(device)
            depth = estimator(x).float()
            if depth.shape != (len(chunk), 1, estimate_size, estimate_size) or not torch.isfinite(depth).all():
                raise ValueError(
                    f"depth estimator returned {list(depth.shape)} (finite: {bool(torch.isfinite(depth).all())}) for "
                    f"{len(chunk)} images of {estimate_size}px; expected finite [B, 1, H, W] z-depth"
                )
            depth = F.interpolate(depth, size=(self.image_size, self.image_size), mode="nearest-exact")
            for r, d in zip(chunk, depth.cpu().numpy().astype(np.float16)):
                out = self.path(r)
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as fh:
                    np.save(fh, d)
                os.replace(tmp, out)
            done = i + len(chunk)
            if progress and (done % (20 * batch_size) < batch_size or done == len(todo)):
                print(f"genvs: estimated depth of {done}/{len(todo)} images into {self.folder}", flush=True)
        return len(todo)

    def load(self, rec: ImageRecord) -> Tensor:
        p = self.path(rec)
        try:
            d = np.load(p)
        except FileNotFoundError:
            raise DatasetError(
                f"{p}: no cached depth for {rec.path}. Set data.init_args.depth_estimator to a local depth model "
                "so that prepare_data (run by every genvs command) estimates it once"
            ) from None
        except (ValueError, OSError) as e:
            raise DatasetError(f"{p}: corrupt depth cache file ({e}); delete it and run again to recompute") from None
        if d.shape != (1, self.image_size, self.image_size):
            raise DatasetError(f"{p}: cached depth has shape {d.shape}, expected (1, {self.image_size}, {self.image_size})")
        return torch.from_numpy(d.astype(np.float32))


class SingleImageDataset(Dataset):
    """One image per example: ``Views`` with ``V = 1`` (the image, its estimated depth, its class label)."""

    def __init__(self, records: list[ImageRecord], cache: DepthCache, image_size: int, fov_deg: float):
        self.records, self.cache, self.image_size = records, cache, image_size
        self.K = intrinsics_from_fov(fov_deg, image_size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Views:
        rec = self.records[i]
        s = self.image_size
        return Views(
            images=load_square_image(rec.path, s)[None, None],
            K=self.K[None, None].clone(),
            c2w=torch.eye(4)[None, None],
            depth=self.cache.load(rec)[None, None],
            num_context=1,
            scene=[rec.rel.rsplit(".", 1)[0].replace("/", "_")],
            index=torch.zeros(1, 1, dtype=torch.long),
            labels=torch.tensor([rec.label]),
        )


class TrajectoryDataset(Dataset):
    """A camera trajectory per example, for generation and for novel views of unposed images.

    - with ``records`` (NVS): ``(context, targets)`` pairs, the context being the image with its cached
      depth and the targets the trajectory's cameras only (there is no ground truth);
    - without (generation): ``num_samples`` camera-only examples (``num_context = 0``) with class labels
      ``classes[i % len(classes)]``.
    """

    def __init__(
        self,
        c2w: Tensor,
        image_size: int,
        fov_deg: float,
        records: list[ImageRecord] | None = None,
        cache: DepthCache | None = None,
        num_samples: int = 0,
        classes: list[int] | None = None,
    ):
        self.c2w, self.image_size = c2w, image_size
        self.K = intrinsics_from_fov(fov_deg, image_size)
        self.records, self.cache = records, cache
        self.num_samples, self.classes = num_samples, classes or [-1]

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else self.num_samples

    def __getitem__(self, i: int) -> Views | tuple[Views, Views]:
        T, s = self.c2w.shape[0], self.image_size
        index = torch.arange(T)[None]
        if self.records is None:
            label = self.classes[i % len(self.classes)]
            name = f"sample_{i:05d}" + (f"_class{label:04d}" if label >= 0 else "")
            return Views(
                images=None, K=self.K.expand(1, T, 3, 3).clone(), c2w=self.c2w[None].clone(), size=(s, s),
                num_context=0, scene=[name], index=index, labels=torch.tensor([label]),
            )
        rec = self.records[i]
        scene = [rec.rel.rsplit(".", 1)[0].replace("/", "_")]
        label = torch.tensor([rec.label])
        context = Views(
            images=load_square_image(rec.path, s)[None, None], K=self.K[None, None].clone(), c2w=torch.eye(4)[None, None],
            depth=self.cache.load(rec)[None, None], num_context=1, scene=scene,
            index=torch.zeros(1, 1, dtype=torch.long), labels=label,
        )
        targets = Views(
            images=None, K=self.K.expand(1, T, 3, 3).clone(), c2w=self.c2w[None].clone(), size=(s, s), scene=scene,
            index=index + 1, labels=label,
        )
        return context, targets


class ImageFolderDataModule(NVSDataModule):
    """Unposed single images with monocular depth (ImageNet-style collections), for the warping method.

    Training examples are single images (``V = 1``) with their cached depth and class label. Validation
    and test generate from scratch along the trajectory (no ground truth: grids are logged, nothing is
    scored); ``predict`` either generates (``predict_mode: generate``) or synthesises the trajectory's
    views of the first ``predict_num_images`` images of ``predict_root`` (``predict_mode: nvs``, batches of
    ``(context, camera-only targets)`` pairs).

    Args:
        root: the training images (class subfolders or flat).
        class_labels: labels from class subfolders (``-1`` otherwise).
        depth_estimator: local directory of a depth model (`genvs.methods.warping.depth.load_depth_estimator`:
            a transformers DPT such as Intel/dpt-beit-large-512, a genvs DPT export, or a MiDaS torch.hub
            checkout); needed only while some image has no cached depth.
        depth_hub_model: the torch.hub entry when ``depth_estimator`` is a MiDaS checkout.
        depth_cache: cache folder (default ``<root>_depth``; images of another ``predict_root`` cache in
            ``<predict_root>_depth``).
        estimate_size: crop size the estimator sees (512: MiDaS dpt_beit_large_512's resolution).
        estimator_batch_size, estimator_device: how the one-off estimation runs (``auto``: CUDA if available).
        fov_deg: the pinhole every image is seen by (the paper: 45).
        trajectory: ``3x9`` (the paper's 27-view set, official generation order), ``swing`` (a loop through
            the input view, ``num_frames`` frames) or ``sweep`` (yaw sweep); ``trajectory_step``: angle unit
            (0.15 rad) and ``pivot``: distance to the orbited point (1, in the depth units).
        val_num_samples, val_num_frames: generated scenes per validation and their first frames used.
        predict_mode, predict_root, predict_num_images: see above; ``num_samples`` / ``classes``: how many
            scenes test/predict generate and with which labels (default: ``i % num_classes``, the official
            "uniform" classes; ``-1`` without class folders).
    """

    def __init__(
        self,
        root: str = "data/imagenet/train",
        class_labels: bool = True,
        depth_estimator: str | None = None,
        depth_hub_model: str = "DPT_BEiT_L_512",
        depth_cache: str | None = None,
        estimate_size: int = 512,
        estimator_batch_size: int = 16,
        estimator_device: str = "auto",
        fov_deg: float = 45.0,
        trajectory: Literal["3x9", "swing", "sweep"] = "3x9",
        num_frames: int = 24,
        trajectory_step: float = 0.15,
        pivot: float = 1.0,
        val_num_samples: int = 4,
        val_num_frames: int = 3,
        predict_mode: Literal["nvs", "generate"] = "nvs",
        predict_root: str | None = None,
        predict_num_images: int = 8,
        num_samples: int = 8,
        classes: list[int] | None = None,
        image_size: int = 128,
        batch_size: int = 16,
        **kwargs,
    ):
        super().__init__(image_size=image_size, batch_size=batch_size, **kwargs)
        if image_size is None:
            raise ValueError("ImageFolderDataModule needs an image_size (images are centre-cropped squares)")
        self.root, self.class_labels = root, class_labels
        self.depth_estimator, self.depth_hub_model = depth_estimator, depth_hub_model
        self.depth_cache = depth_cache or str(Path(root).expanduser().parent / (Path(root).name + "_depth"))
        self.estimate_size, self.estimator_batch_size, self.estimator_device = estimate_size, estimator_batch_size, estimator_device
        self.fov_deg = fov_deg
        self.trajectory, self.num_frames, self.trajectory_step, self.pivot = trajectory, num_frames, trajectory_step, pivot
        self.val_num_samples, self.val_num_frames = val_num_samples, val_num_frames
        self.predict_mode, self.predict_root, self.predict_num_images = predict_mode, predict_root, predict_num_images
        self.num_samples, self.classes = num_samples, classes
        self._records: dict[str, tuple[list[ImageRecord], list[str]]] = {}

    # ------------------------------------------------------------------------------ records
    def records(self, which: Literal["train", "predict"]) -> tuple[list[ImageRecord], list[str]]:
        if which not in self._records:
            if which == "predict" and self.predict_root not in (None, self.root):
                recs, classes = scan_image_folder(self.predict_root, self.class_labels)
            else:
                recs, classes = self.records("train") if which == "predict" else scan_image_folder(self.root, self.class_labels)
            self._records[which] = (recs[: self.predict_num_images] if which == "predict" else recs, classes)
        return self._records[which]

    def cache(self, which: Literal["train", "predict"] = "train") -> DepthCache:
        if which == "predict" and self.predict_root not in (None, self.root):
            root = Path(self.predict_root).expanduser()
            return DepthCache(root.parent / (root.name + "_depth"), self.image_size)
        return DepthCache(self.depth_cache, self.image_size)

    def trajectory_poses(self) -> Tensor:
        return pivot_viewset(self.trajectory, self.num_frames, self.trajectory_step, self.pivot)

    @property
    def name(self) -> str:
        """Dataset name in results tables: the folder (its parent for ``train``/``val``-style split folders)."""
        root = Path(self.root).expanduser()
        return (root.resolve().parent.name if root.name in ("train", "val", "test", "images") else root.name).lower()

    def generation_classes(self) -> list[int]:
        if self.classes:
            return list(self.classes)
        names = self.records("train")[1]
        return list(range(len(names))) if names else [-1]

    # --------------------------------------------------------------------------------- depth
    def prepare_data(self) -> None:
        """Estimate the depth of every image without a cached depth map (once; later runs only check)."""
        needs = [("train", self.records("train")[0])]
        if self.predict_mode == "nvs":
            needs.append(("predict", self.records("predict")[0]))
        meta = None
        if self.depth_estimator is not None:
            meta = {"estimator": Path(self.depth_estimator).expanduser().name, "estimate_size": self.estimate_size,
                    "image_size": self.image_size, "format": 1}
            for which, _ in needs:
                self.cache(which).check_meta(meta)  # a cache made by another estimator is refused, never mixed
        todo = [(which, self.cache(which), recs) for which, recs in needs if self.cache(which).missing(recs)]
        if not todo:
            return
        if self.depth_estimator is None:
            which, cache, recs = todo[0]
            n = len(cache.missing(recs))
            raise DatasetError(
                f"{n} images have no cached depth in {cache.folder} (e.g. {cache.path(cache.missing(recs)[0])}). Set "
                "data.init_args.depth_estimator to a local depth model directory, e.g. Intel/dpt-beit-large-512 "
                "(the MiDaS model of the paper) downloaded once with `huggingface-cli download "
                "Intel/dpt-beit-large-512 --local-dir weights/dpt-beit-large-512`; genvs estimates and caches "
                "the depth once and never downloads anything"
            )
        from genvs.methods.warping.depth import load_depth_estimator  # only while something needs estimating

        device = self.estimator_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        estimator = load_depth_estimator(self.depth_estimator, hub_model=self.depth_hub_model).to(device)
        for which, cache, recs in todo:
            cache.compute(recs, estimator, self.estimate_size, self.estimator_batch_size, device)

    # ------------------------------------------------------------------------------ datasets
    def dataset(self, stage: str) -> Dataset:
        if stage not in self._datasets:
            poses = self.trajectory_poses()
            s, fov = self.image_size, self.fov_deg
            if stage == "fit":
                recs, _ = self.records("train")
                ds: Dataset = SingleImageDataset(recs, self.cache("train"), s, fov)
            elif stage == "validate":
                ds = TrajectoryDataset(poses[: self.val_num_frames], s, fov, num_samples=self.val_num_samples,
                                       classes=self.generation_classes())
            elif stage == "predict" and self.predict_mode == "nvs":
                ds = TrajectoryDataset(poses, s, fov, records=self.records("predict")[0], cache=self.cache("predict"))
            else:  # test, predict-generate
                ds = TrajectoryDataset(poses, s, fov, num_samples=self.num_samples, classes=self.generation_classes())
            self._datasets[stage] = ds
        return self._datasets[stage]
