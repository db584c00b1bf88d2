"""Novel views of your own images: ``genvs predict --data genvs.data.ImageOrbitDataModule ...``.

Each input image gets a camera, either from files (a 4x4 camera-to-world pose and SRN-style intrinsics)
or from a few numbers (field of view, distance to the object, elevation and azimuth; the camera looks at
the origin with +z up, as in the procedural and SRN data). The targets are an orbit of cameras around
the object starting at the input camera. Example::

    genvs predict --config configs/3dim_toy.yaml --ckpt_path <run>/checkpoints/last.ckpt \\
        --data genvs.data.ImageOrbitDataModule --data.images '[my_car.png]' --data.num_views 24 \\
        --data.image_size 32 --predict_writer.output_dir outputs/my_car
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from genvs.core.cameras import intrinsics_from_fov, look_at, orbit_around
from genvs.core.views import Views
from genvs.data.module import NVSDataModule
from genvs.data.srn import MissingDataError, read_image, read_intrinsics, read_pose

__all__ = ["ImageOrbitDataModule"]


class _ImageOrbits(Dataset):
    def __init__(self, module: "ImageOrbitDataModule"):
        self.m = module
        self.images = [Path(p) for p in module.images]
        for p in self.images:
            if not p.is_file():
                raise MissingDataError(f"{p}: input image not found; data.images lists the images to start from")

    def __len__(self) -> int:
        return len(self.images)

    def camera(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.m
        K = read_intrinsics(Path(m.intrinsics), (H, W)) if m.intrinsics else intrinsics_from_fov(m.fov_deg, H, W)
        if m.pose:
            return K, read_pose(Path(m.pose))
        el, az = math.radians(m.elevation_deg), math.radians(m.azimuth_deg)
        eye = m.radius * torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        return K, look_at(eye)

    def __getitem__(self, i: int) -> tuple[Views, Views]:
        image = read_image(self.images[i])
        H, W = image.shape[-2:]
        K, c2w = self.camera(H, W)
        context = Views(image[None, None], K[None, None], c2w[None, None], num_context=1,
                        scene=[self.images[i].stem], index=torch.zeros(1, 1, dtype=torch.long))
        size = self.m.image_size
        if size is not None:
            context = context.resize(size)
        orbit = orbit_around(c2w, self.m.num_views, self.m.orbit_axis, self.m.orbit_center)[None]
        targets = Views(None, context.K.expand(1, self.m.num_views, 3, 3).clone(), orbit, scene=context.scene,
                        index=torch.arange(self.m.num_views)[None], size=(context.H, context.W))
        return context, targets


class ImageOrbitDataModule(NVSDataModule):
    """Predict-only datamodule: an orbit of novel views around each of your images.

    Args:
        images: image files (RGBA is composited onto white, like SRN's background).
        num_views: cameras on the orbit (the first is the input camera).
        fov_deg, radius, elevation_deg, azimuth_deg: the input camera when no files are given.
        pose: optional file with the input camera's 4x4 OpenCV camera-to-world matrix.
        intrinsics: optional SRN-style ``intrinsics.txt`` for the input image.

    ``image_size`` resizes the input to the model's resolution; the other arguments are `NVSDataModule`'s.
    """

    def __init__(
        self,
        images: list[str],
        num_views: int = 24,
        fov_deg: float = 51.98,
        radius: float = 1.3,
        elevation_deg: float = 20.0,
        azimuth_deg: float = 0.0,
        pose: str | None = None,
        intrinsics: str | None = None,
        **kwargs,
    ):
        kwargs.setdefault("num_workers", 0)
        super().__init__(**kwargs)
        self.images = list(images)
        self.num_views = num_views
        self.fov_deg, self.radius = fov_deg, radius
        self.elevation_deg, self.azimuth_deg = elevation_deg, azimuth_deg
        self.pose, self.intrinsics = pose, intrinsics

    def dataset(self, stage: str) -> Dataset:
        if stage != "predict":
            raise ValueError("ImageOrbitDataModule only serves `genvs predict` (it has no ground truth to train or test on)")
        if "predict" not in self._datasets:
            self._datasets["predict"] = _ImageOrbits(self)
        return self._datasets["predict"]

    def setup(self, stage: str) -> None:
        self.dataset(stage)
