"""Panorama datasets: one example is a whole ring of views (MVDiffusion), with one prompt per view.

Two sources on disk:

- **Matterport3D skyboxes** in MVDiffusion's layout (``layout: skybox``)::

      <root>/train.npy, <root>/test.npy     [N, 6] face image paths relative to <root> (val: val.npy or test.npy)
      <root>/<scan>/matterport_skybox_images/<pano>_skybox<k>_sami.jpg      cube faces k = 0..5
      <root>/<scan>/blip3/<pano>_<deg>.txt  caption of the view at yaw <deg> (0, 45, ..., 315; first line)

  The faces are resampled into ``num_views`` perspective views (90 deg field of view, 45 deg yaw steps,
  turning right), starting at a random yaw in training (as the official code) and at 0 otherwise; each
  view gets the caption of the nearest 45 deg yaw, prefixed with ``prompt_prefix``.
- **Rings** in the SRN layout plus ``prompts.txt`` (``layout: rings``): the procedural rooms of
  `genvs.data.toy` (`ToyRoomsDataModule` renders them on first use). Training rotates each ring by a random
  number of views.

Cameras are OpenCV ``c2w`` in a z-up world (the convention of `genvs.core.geometry`'s panorama functions,
so that `perspective_to_equirect` stitches the views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from genvs.core.cameras import intrinsics_from_fov
from genvs.core.geometry import panorama_cameras, reproject_views
from genvs.core.views import Views
from genvs.data.module import NVSDataModule
from genvs.data.srn import DatasetError, SRNScenes, read_image
from genvs.data.toy import RoomConfig, ensure_toy_rooms

__all__ = [
    "matterport_skybox_cameras",
    "SkyboxScenes",
    "RingScenes",
    "PanoramaDataset",
    "PanoramaDataModule",
    "ToyRoomsDataModule",
]

MATTERPORT_HELP = (
    "MVDiffusion's Matterport3D skybox data: request Matterport3D access (https://niessner.github.io/Matterport/), "
    "download the 'matterport_skybox_images' of every scan and the BLIP captions and train/test lists from the "
    "MVDiffusion repository (README, 'Data'), and lay them out as <root>/<scan>/matterport_skybox_images, "
    "<root>/<scan>/blip3, <root>/train.npy, <root>/test.npy"
)

# (yaw, pitch) in degrees of Matterport skybox faces 0..5 in MVDiffusion's convention: yaw turns right,
# face 2 is yaw 0; face 0 (up) and face 5 (down) are oriented as if tilted from the yaw -90 view.
_SKYBOX_YAW_PITCH = ((-90.0, 90.0), (270.0, 0.0), (0.0, 0.0), (90.0, 0.0), (180.0, 0.0), (-90.0, -90.0))


def _rot(axis: int, deg: float) -> Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R = torch.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def matterport_skybox_cameras(size: int) -> tuple[Tensor, Tensor]:
    """``K [6, 3, 3]``, ``c2w [6, 4, 4]`` of Matterport3D skybox faces (``size`` px, 90 deg).

    The one conversion from MVDiffusion's camera convention: its world is OpenCV-like (x right, y down,
    z forward at yaw 0) and a face of (yaw, pitch) has camera-to-world rotation ``R_y(yaw) R_x(pitch)``.
    genvs' panorama world is z up with yaw 0 along +x and right turns towards -y, so a vector
    ``(x, y, z)`` there is ``(z, -x, -y)`` here.
    """
    M = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # official world -> genvs world
    c2w = torch.eye(4).repeat(6, 1, 1)
    for k, (yaw, pitch) in enumerate(_SKYBOX_YAW_PITCH):
        c2w[k, :3, :3] = M @ _rot(1, yaw) @ _rot(0, pitch)
    return intrinsics_from_fov(90.0, size).expand(6, 3, 3).clone(), c2w


@dataclass
class PanoRecord:
    scene_id: str
    faces: list[Path]
    prompt_dir: Path
    pano_id: str
    num_views: int = 6


class SkyboxScenes:
    """Matterport3D skybox panoramas of one split, in MVDiffusion's layout (module docstring)."""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"panorama folder {self.root} not found. {MATTERPORT_HELP}")
        names = [split] + (["test"] if split == "val" else [])
        lists = [self.root / f"{n}.npy" for n in names]
        path = next((p for p in lists if p.is_file()), None)
        if path is None:
            raise DatasetError(f"{lists[0]}: missing split list ({' or '.join(p.name for p in lists)}). {MATTERPORT_HELP}")
        try:
            table = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DatasetError(f"{path}: not a [N, 6] array of face paths ({e})") from None
        if table.ndim != 2 or table.shape[1] != 6:
            raise DatasetError(f"{path}: expected an [N, 6] array of skybox face paths, got shape {table.shape}")
        self.scenes: list[PanoRecord] = []
        for row in table:
            faces = [self.root / str(p) for p in row]
            scan = faces[0].parts[-3] if len(faces[0].parts) >= 3 else faces[0].parent.name
            pano = faces[0].name.split("_")[0]
            prompt_dir = Path(str(faces[0].parent).replace("matterport_skybox_images", "blip3"))
            self.scenes.append(PanoRecord(f"{scan}_{pano}", faces, prompt_dir, pano))
        if not self.scenes:
            raise DatasetError(f"{path}: the split list is empty")

    def __len__(self) -> int:
        return len(self.scenes)

    def faces(self, i: int) -> Tensor:
        """``[6, 3, S, S]`` cube faces in [-1, 1]."""
        rec = self.scenes[i]
        imgs, hw = [], None
        for f in rec.faces:
            img = read_image(f, hw)
            hw = tuple(img.shape[-2:])
            if hw[0] != hw[1]:
                raise DatasetError(f"{f}: skybox faces must be square, got {hw[0]}x{hw[1]}")
            imgs.append(img)
        return torch.stack(imgs)

    def prompt(self, i: int, yaw_deg: float) -> str:
        rec = self.scenes[i]
        deg = int(round(yaw_deg / 45.0) * 45) % 360
        path = rec.prompt_dir / f"{rec.pano_id}_{deg}.txt"
        try:
            return path.read_text().splitlines()[0].strip()
        except FileNotFoundError:
            raise DatasetError(f"{path}: missing caption of view yaw {deg}. {MATTERPORT_HELP}") from None
        except IndexError:
            raise DatasetError(f"{path}: empty caption file") from None


class RingScenes:
    """Rings stored in the SRN layout with ``prompts.txt`` (one line per view)."""

    def __init__(self, root: str | Path, split: str):
        self.srn = SRNScenes(root, split)
        self.scenes = self.srn.scenes
        self.prompts: list[list[str]] = []
        for rec in self.scenes:
            path = rec.folder / "prompts.txt"
            if not path.is_file():
                raise DatasetError(f"{path}: missing; a ring needs one prompt per view (one line each)")
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            if len(lines) != rec.num_views:
                raise DatasetError(f"{path}: {len(lines)} prompts for {rec.num_views} views; write one line per view")
            self.prompts.append(lines)

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, i: int, views: list[int], load_depth: bool = True) -> dict:
        out = self.srn.load(i, views, load_depth)
        out["prompts"] = [self.prompts[i][v] for v in views]
        return out


class PanoramaDataset(Dataset):
    """`Views` examples (``B = 1``) holding a whole ring with its prompts; the first ``num_context`` views
    are context (0 for text-conditioned, 1 for image-conditioned generation)."""

    def __init__(
        self,
        source: SkyboxScenes | RingScenes,
        num_views: int = 8,
        num_context: int = 0,
        image_size: int = 512,
        fov_deg: float = 90.0,
        train: bool = False,
        random_rotation: bool = True,
        prompt_prefix: str = "",
        num_scenes: int | None = None,
        load_depth: bool = False,
    ):
        self.source = source
        self.num_views, self.num_context = num_views, num_context
        self.image_size, self.fov_deg = image_size, fov_deg
        self.train, self.random_rotation = train, random_rotation
        self.prompt_prefix = prompt_prefix
        self.load_depth = load_depth
        # training randomness (start yaw / view) is a function of (seed, epoch, i): resumed runs repeat it;
        # `genvs.data.module.EpochSampler` sets both
        self.seed, self.epoch = 0, 0
        if not 0 <= num_context < num_views:
            raise ValueError(f"num_context={num_context} must lie in [0, num_views={num_views})")
        if isinstance(source, RingScenes):
            for rec in source.scenes:
                if rec.num_views != num_views:
                    raise DatasetError(
                        f"{rec.folder}: a ring of {rec.num_views} views but num_views={num_views}; set data num_views"
                    )
        n = len(source)
        self.length = n if num_scenes is None else min(n, num_scenes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Views:
        V = self.num_views
        rotate = self.train and self.random_rotation
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF)
        if isinstance(self.source, SkyboxScenes):
            yaw0 = float(torch.randint(0, 360, (), generator=g)) if rotate else 0.0
            step = 360.0 / V
            faces = self.source.faces(i)
            # resample at (at least) the faces' resolution, then downsample with antialiasing, as the
            # official loader warps at face resolution and resizes
            size = max(self.image_size, faces.shape[-1])
            K, c2w = panorama_cameras(V, self.fov_deg, size, yaw_step_deg=-step, yaw0_deg=-yaw0)
            Kf, cf = matterport_skybox_cameras(faces.shape[-1])
            images, _ = reproject_views(faces[None], Kf[None], cf[None], K[None], c2w[None], (size, size))
            prompts = [self.prompt_prefix + self.source.prompt(i, yaw0 + step * v) for v in range(V)]
            views = Views(images.clamp(-1, 1), K[None], c2w[None], num_context=self.num_context,
                          scene=[self.source.scenes[i].scene_id], index=torch.arange(V)[None], prompts=[prompts])  # fmt: skip
            return views.resize(self.image_size)
        shift = int(torch.randint(0, V, (), generator=g)) if rotate else 0
        order = [(shift + v) % V for v in range(V)]
        data = self.source.load(i, order, load_depth=self.load_depth)
        views = Views(
            images=data["images"][None],
            K=data["K"][None],
            c2w=data["c2w"][None],
            depth=data["depth"][None] if self.load_depth and "depth" in data else None,
            num_context=self.num_context,
            scene=[self.source.scenes[i].scene_id],
            index=torch.tensor([order]),
            prompts=[[self.prompt_prefix + p for p in data["prompts"]]],
        )
        return views.resize(self.image_size)


class PanoramaDataModule(NVSDataModule):
    """Whole rings of views with per-view prompts (MVDiffusion panoramas).

    Args:
        root: the dataset folder (see the module docstring for both layouts).
        layout: ``skybox`` (Matterport3D cube faces resampled into rings) or ``rings`` (SRN layout + prompts).
        num_context: given views per ring: 0 (text-conditioned), 1 (image&text-conditioned).
        num_views: views per ring; fov_deg: their field of view (square views).
        image_size: view size in pixels (512 in the paper).
        random_rotation: training rings start at a random yaw (skybox) / view (rings).
        prompt_prefix: prepended to every prompt (the official Matterport prompts start with
            "This is one view of a scene. ").
        load_depth: also load depth maps (rings with depth only).
        num_val_scenes / num_test_scenes / num_predict_scenes: evaluate the first scenes of the split
            (``None``: all).
        batch_size / eval_batch_size / num_workers: as `NVSDataModule`.
    """

    def __init__(
        self,
        root: str = "data/mp3d_skybox",
        layout: Literal["skybox", "rings"] = "skybox",
        num_context: int = 0,
        num_views: int = 8,
        fov_deg: float = 90.0,
        image_size: int = 512,
        random_rotation: bool = True,
        prompt_prefix: str = "This is one view of a scene. ",
        load_depth: bool = False,
        num_val_scenes: int | None = 4,
        num_test_scenes: int | None = None,
        num_predict_scenes: int | None = 4,
        batch_size: int = 4,
        eval_batch_size: int | None = 1,
        num_workers: int = 4,
    ):
        super().__init__(
            n_context=num_context,
            n_target=num_views - num_context,
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            load_depth=load_depth,
        )
        self.root, self.layout = root, layout
        self.num_context, self.num_views, self.fov_deg = num_context, num_views, fov_deg
        self.random_rotation, self.prompt_prefix = random_rotation, prompt_prefix
        self.num_scenes = {"validate": num_val_scenes, "test": num_test_scenes, "predict": num_predict_scenes}
        # what results tables record as the evaluation protocol (the base's view protocols do not apply)
        self.val_protocol = self.predict_protocol = None
        self.test_protocol = {"whole rings": num_views, "given views": num_context, "scenes": num_test_scenes}

    def scene_source(self, split: str) -> SkyboxScenes | RingScenes:
        if self.layout == "skybox":
            return SkyboxScenes(self.root, split)
        if self.layout == "rings":
            return RingScenes(self.root, split)
        raise ValueError(f"layout={self.layout!r}: use 'skybox' or 'rings'")

    def dataset(self, stage: str) -> Dataset:
        if stage not in self._datasets:
            split = {"fit": "train", "validate": "val", "test": "test", "predict": "test"}[stage]
            self._datasets[stage] = PanoramaDataset(
                self.scene_source(split),
                num_views=self.num_views,
                num_context=self.num_context,
                image_size=self.image_size,
                fov_deg=self.fov_deg,
                train=stage == "fit",
                random_rotation=self.random_rotation,
                prompt_prefix=self.prompt_prefix,
                num_scenes=self.num_scenes.get(stage),
                load_depth=self.load_depth,
            )
        return self._datasets[stage]


class ToyRoomsDataModule(PanoramaDataModule):
    """Procedural rooms (`genvs.data.toy.generate_toy_rooms`) as panorama rings, rendered into ``root`` on
    first use (and again when ``rooms`` settings change).

    Args:
        root: where the rendered rooms live.
        rooms: the room generator's settings (resolution, rooms per split, ring geometry, ...).

    The other arguments are `PanoramaDataModule`'s; ``num_views`` and ``fov_deg`` follow ``rooms``.
    """

    def __init__(
        self,
        root: str = "data/toy_rooms",
        rooms: RoomConfig | None = None,
        num_context: int = 0,
        image_size: int = 64,
        random_rotation: bool = True,
        prompt_prefix: str = "",
        load_depth: bool = False,
        num_val_scenes: int | None = 2,
        num_test_scenes: int | None = None,
        num_predict_scenes: int | None = 2,
        batch_size: int = 1,
        eval_batch_size: int | None = 1,
        num_workers: int = 2,
    ):
        self.rooms = rooms or RoomConfig()
        super().__init__(
            root=root,
            layout="rings",
            num_context=num_context,
            num_views=self.rooms.num_views,
            fov_deg=self.rooms.fov_deg,
            image_size=image_size,
            random_rotation=random_rotation,
            prompt_prefix=prompt_prefix,
            load_depth=load_depth,
            num_val_scenes=num_val_scenes,
            num_test_scenes=num_test_scenes,
            num_predict_scenes=num_predict_scenes,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
        )

    def prepare_data(self) -> None:
        ensure_toy_rooms(self.root, self.rooms)

    def scene_source(self, split: str) -> RingScenes:
        if not (Path(self.root) / "rooms.json").exists():
            self.prepare_data()  # outside a Trainer nothing else calls prepare_data
        return RingScenes(self.root, split)
