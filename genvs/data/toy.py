"""Procedural multi-view dataset: textured composite objects ray-cast in torch, written in SRN layout.

Each object is a union of 2-5 primitives (spheres, oriented boxes, vertical cylinders), each with a
material: a base colour and a pattern (solid, checker, stripes, dots) in a second colour, shaded
Lambertian with one directional light plus ambient and a little specular. Cameras sit on a sphere
around the object like SRN ShapeNet (radius 1.3, ~52 deg field of view, looking at the origin, z up),
train views uniformly on the upper hemisphere and val/test views on an Archimedean spiral as in SRN.
Background is white. ``category: car`` replaces the random composites by one class in a canonical
orientation (`car_object`), and ``elevation_deg`` the SRN cameras by a turntable. Everything is
deterministic from ``seed``.

Written layout (the SRN/pixelNeRF layout plus depth)::

    <root>/<split>/<object>/rgb/000000.png       RGB, 8 bit
                           /depth/000000.png     z-depth in millimetres, 16 bit, 0 = background
                           /pose/000000.txt      4x4 OpenCV camera-to-world, row-major
                           /intrinsics.txt       "f cx cy 0." / "0. 0. 0." / "1." / "H W"
    <root>/toy.json                              the generator's settings (regenerated when they change)
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from genvs.core.cameras import (
    camera_rays,
    intrinsics_from_fov,
    look_at,
    ring_poses,
    sphere_poses,
    spherical_to_cartesian,
)
from genvs.data.srn import DatasetError

__all__ = ["ToyConfig", "generate_toy_dataset", "render_object", "random_object", "car_object", "ensure_toy_dataset"]

SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}
FORMAT_VERSION = 1


@dataclass
class ToyConfig:
    """Settings of a procedural dataset. Changing any of them regenerates the data."""

    seed: int = 0
    resolution: int = 64
    num_objects: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 200, "val": 8, "test": 16})
    num_views: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 24, "val": 24, "test": 80})
    min_primitives: int = 2
    max_primitives: int = 4
    radius: float = 1.3
    fov_deg: float = 51.98  # SRN cars: f = 131.25 px at 128 px
    supersample: int = 2
    patterns: list[str] = dataclasses.field(default_factory=lambda: list(PATTERNS))  # all of them
    object_scale: float = 1.3  # objects fit in a sphere of radius ~0.55 * object_scale
    # None: SRN's cameras (train on the upper hemisphere, val/test on a spiral). A number: a turntable, every
    # camera at this elevation (degrees), train azimuths at random, val/test azimuths evenly spaced.
    elevation_deg: float | None = None
    # None: random composites of min..max_primitives primitives at random orientations. "car": one category
    # in a canonical orientation, like an SRN ShapeNet class: a body, a cabin set back on it and four wheels,
    # their proportions and colours drawn per object (min/max_primitives do not apply).
    category: str | None = None

    def __post_init__(self):
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad or not self.patterns:
            raise DatasetError(f"toy.patterns={self.patterns!r}: choose one or more of {list(PATTERNS)}")
        if not 1 <= self.min_primitives <= self.max_primitives:
            raise DatasetError(
                f"toy.min_primitives={self.min_primitives}, toy.max_primitives={self.max_primitives}: "
                "need 1 <= min_primitives <= max_primitives"
            )
        if not self.object_scale > 0:
            raise DatasetError(f"toy.object_scale={self.object_scale}: must be positive (1.3 is the default size)")
        if self.category is not None and self.category not in CATEGORIES:
            raise DatasetError(f"toy.category={self.category!r}: choose one of {list(CATEGORIES)}, or null for random "
                               "composite objects")
        if self.elevation_deg is not None and not -90 < self.elevation_deg < 90:
            raise DatasetError(f"toy.elevation_deg={self.elevation_deg}: give an elevation strictly between -90 and 90 "
                               "degrees, or null for SRN's hemisphere and spiral cameras")

    def metadata(self) -> dict:
        """What ``toy.json`` records. Unset optional settings are left out, so datasets written before a
        setting existed are not regenerated."""
        return {"version": FORMAT_VERSION, **{k: v for k, v in dataclasses.asdict(self).items() if v is not None}}


# ----------------------------------------------------------------------------------- scene model
PALETTE = torch.tensor(
    [
        [0.85, 0.15, 0.15],
        [0.15, 0.55, 0.85],
        [0.95, 0.75, 0.10],
        [0.20, 0.70, 0.30],
        [0.55, 0.25, 0.75],
        [0.95, 0.45, 0.10],
        [0.15, 0.15, 0.20],
        [0.90, 0.90, 0.85],
        [0.45, 0.30, 0.20],
        [0.10, 0.60, 0.60],
    ]
)
KINDS = ("sphere", "box", "cylinder")
PATTERNS = ("solid", "checker", "stripes", "dots")
CATEGORIES = ("car",)


@dataclass
class Primitive:
    kind: str  # sphere | box | cylinder
    center: Tensor  # [3]
    size: Tensor  # [3]: sphere (r, r, r); box half-extents; cylinder (r, r, half-height)
    yaw: float  # rotation about z
    color: Tensor  # [3]
    color2: Tensor  # [3]
    pattern: str
    frequency: float


def random_object(
    generator: torch.Generator,
    min_primitives: int = 2,
    max_primitives: int = 4,
    scale: float = 1.3,
    patterns: tuple[str, ...] | list[str] = PATTERNS,
) -> list[Primitive]:
    """A random composite object inside a sphere of radius ~0.55 * ``scale`` around the origin, its
    materials' patterns drawn from ``patterns``."""

    def u(lo=0.0, hi=1.0):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def pick(seq):
        return seq[int(torch.randint(len(seq), (), generator=generator))]

    n = int(torch.randint(min_primitives, max_primitives + 1, (), generator=generator))
    prims = []
    for i in range(n):
        kind = pick(KINDS)
        if kind == "sphere":
            r = u(0.14, 0.3)
            size = torch.tensor([r, r, r])
        elif kind == "box":
            size = torch.tensor([u(0.08, 0.3), u(0.08, 0.3), u(0.08, 0.25)])
        else:
            r = u(0.07, 0.2)
            size = torch.tensor([r, r, u(0.12, 0.3)])
        # the first primitive anchors the object at the centre; the others attach around it
        spread = 0.0 if i == 0 else 0.28
        center = torch.tensor([u(-spread, spread), u(-spread, spread), u(-spread, spread) * 0.7])
        c1, c2 = torch.randperm(len(PALETTE), generator=generator)[:2]
        jitter = (torch.rand(3, generator=generator) - 0.5) * 0.1
        prims.append(
            Primitive(
                kind=kind,
                center=center * scale,
                size=size * scale,
                yaw=u(0, math.pi),
                color=(PALETTE[c1] + jitter).clamp(0, 1),
                color2=PALETTE[c2],
                pattern=pick(patterns),
                frequency=u(4.0, 9.0),
            )
        )
    return prims


def car_object(
    generator: torch.Generator, scale: float = 1.3, patterns: tuple[str, ...] | list[str] = PATTERNS
) -> list[Primitive]:
    """A toy car facing +x, centred on the origin (z up): a box body, a box cabin set back on its roof and
    four spherical wheels under its corners. Proportions vary by up to ~25% and body and cabin take two
    different palette colours; the orientation is the same for every object (like ShapeNet's aligned
    classes), so the camera pose alone says where the front, the cabin and the wheels appear."""

    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def pick(seq):
        return seq[int(torch.randint(len(seq), (), generator=generator))]

    bx, by, bz = u(0.30, 0.40), u(0.14, 0.19), u(0.06, 0.09)  # body half-extents
    cx, cz = u(0.12, 0.18), u(0.06, 0.09)  # cabin half-length and half-height
    body_z, wheel_r = -0.04, u(0.06, 0.08)
    c_body, c_cabin, c_pat = torch.randperm(len(PALETTE), generator=generator)[:3]

    def prim(kind, center, size, color, pattern="solid"):
        return Primitive(kind=kind, center=torch.tensor(center) * scale, size=torch.tensor(size) * scale, yaw=0.0,
                         color=color, color2=PALETTE[c_pat], pattern=pattern, frequency=u(4.0, 9.0))

    jitter = (torch.rand(3, generator=generator) - 0.5) * 0.1
    body = prim("box", [0.0, 0.0, body_z], [bx, by, bz], (PALETTE[c_body] + jitter).clamp(0, 1), pick(patterns))
    cabin = prim("box", [-u(0.25, 0.45) * (bx - cx), 0.0, body_z + bz + cz], [cx, by * u(0.75, 0.92), cz],
                 PALETTE[c_cabin])
    wheels = [
        prim("sphere", [sx * 0.65 * bx, sy * by, body_z - bz], [wheel_r] * 3, PALETTE[6])
        for sx in (-1, 1)
        for sy in (-1, 1)
    ]
    return [body, cabin, *wheels]


def _rot_z(yaw: float) -> Tensor:
    c, s = math.cos(yaw), math.sin(yaw)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _intersect(prim: Primitive, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest positive hit distance ``[N]`` (inf when missed) and local-frame normal ``[N, 3]``."""
    R = _rot_z(prim.yaw)  # local -> world
    lo = (o - prim.center) @ R  # world -> local (R^T applied on the right-hand side)
    ld = d @ R
    inf = torch.full(o.shape[:1], math.inf)
    if prim.kind == "sphere":
        r = prim.size[0]
        b = (lo * ld).sum(-1)
        c = (lo * lo).sum(-1) - r * r
        disc = b * b - c
        sq = disc.clamp_min(0).sqrt()
        t0, t1 = -b - sq, -b + sq
        t = torch.where(t0 > 1e-4, t0, torch.where(t1 > 1e-4, t1, inf))
        t = torch.where(disc > 0, t, inf)
        n = lo + t.unsqueeze(-1).nan_to_num(posinf=0) * ld
    elif prim.kind == "box":
        h = prim.size
        inv = 1.0 / torch.where(ld.abs() < 1e-9, torch.full_like(ld, 1e-9), ld)
        ta, tb = (-h - lo) * inv, (h - lo) * inv
        tmin = torch.minimum(ta, tb).amax(-1)
        tmax = torch.maximum(ta, tb).amin(-1)
        hit = (tmax >= tmin) & (tmax > 1e-4)
        t = torch.where(hit, torch.where(tmin > 1e-4, tmin, tmax), inf)
        p = lo + t.unsqueeze(-1).nan_to_num(posinf=0) * ld
        q = p / h
        axis = q.abs().argmax(-1)
        n = F.one_hot(axis, 3).float() * torch.sign(q.gather(-1, axis[:, None]))
    else:  # vertical cylinder with caps
        r, hh = prim.size[0], prim.size[2]
        a = ld[:, 0] ** 2 + ld[:, 1] ** 2
        b = lo[:, 0] * ld[:, 0] + lo[:, 1] * ld[:, 1]
        c = lo[:, 0] ** 2 + lo[:, 1] ** 2 - r * r
        disc = b * b - a * c
        sq = disc.clamp_min(0).sqrt()
        a_safe = a.clamp_min(1e-12)
        cand = []
        for ts in ((-b - sq) / a_safe, (-b + sq) / a_safe):
            z = lo[:, 2] + ts * ld[:, 2]
            ok = (disc > 0) & (a > 1e-12) & (z.abs() <= hh) & (ts > 1e-4)
            cand.append(torch.where(ok, ts, inf))
        for zc in (-hh, hh):
            dz = torch.where(ld[:, 2].abs() < 1e-9, torch.full_like(ld[:, 2], 1e-9), ld[:, 2])
            ts = (zc - lo[:, 2]) / dz
            pxy = lo[:, :2] + ts.unsqueeze(-1) * ld[:, :2]
            ok = ((pxy**2).sum(-1) <= r * r) & (ts > 1e-4)
            cand.append(torch.where(ok, ts, inf))
        cand_t = torch.stack(cand, -1)
        t, which = cand_t.min(-1)
        p = lo + t.unsqueeze(-1).nan_to_num(posinf=0) * ld
        side = torch.stack([p[:, 0], p[:, 1], torch.zeros_like(p[:, 0])], -1)
        cap = torch.zeros_like(p)
        cap[:, 2] = torch.where(which == 2, -1.0, 1.0)
        n = torch.where((which < 2).unsqueeze(-1), side, cap)
    n = F.normalize(n, dim=-1) @ R.T  # back to world
    return t, n


def _pattern(prim: Primitive, p_local: Tensor) -> Tensor:
    """Pattern mask ``[N]`` in {0, 1} evaluated in object-local coordinates (so it sticks to the object)."""
    f = prim.frequency
    if prim.pattern == "solid":
        return torch.zeros(p_local.shape[0])
    if prim.pattern == "checker":
        k = torch.floor(p_local * f).sum(-1)
        return (k.remainder(2) < 1).float()
    if prim.pattern == "stripes":
        return (torch.sin(p_local[:, 2] * f * math.pi) > 0).float()
    q = torch.remainder(p_local * f, 1.0) - 0.5  # dots
    return ((q**2).sum(-1) < 0.12).float()


LIGHT = F.normalize(torch.tensor([0.4, -0.3, 0.85]), dim=0)


def render_object(prims: list[Primitive], K: Tensor, c2w: Tensor, H: int, W: int) -> tuple[Tensor, Tensor]:
    """Ray-cast one view: RGB ``[3, H, W]`` in [0, 1] on white, z-depth ``[H, W]`` (0 = background)."""
    o, d = camera_rays(K, c2w, H, W)  # [H, W, 3] unit directions
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    hits = [_intersect(p, o, d) for p in prims]
    ts = torch.stack([h[0] for h in hits], -1)  # [N, P]
    t, idx = ts.min(-1)
    hit = torch.isfinite(t)
    normals = torch.stack([h[1] for h in hits], 1)  # [N, P, 3]
    n = normals.gather(1, idx[:, None, None].expand(-1, 1, 3)).squeeze(1)
    n = torch.where((n * d).sum(-1, keepdim=True) > 0, -n, n)  # face the camera
    t_safe = torch.where(hit, t, torch.zeros_like(t))
    p = o + t_safe.unsqueeze(-1) * d
    rgb = torch.ones(o.shape[0], 3)
    for k, prim in enumerate(prims):
        sel = hit & (idx == k)
        if not sel.any():
            continue
        p_local = (p[sel] - prim.center) @ _rot_z(prim.yaw)
        m = _pattern(prim, p_local).unsqueeze(-1)
        albedo = prim.color * (1 - m) + prim.color2 * m
        ndl = (n[sel] @ LIGHT).clamp_min(0).unsqueeze(-1)
        h = F.normalize(LIGHT - d[sel], dim=-1)
        spec = (n[sel] * h).sum(-1, keepdim=True).clamp_min(0) ** 32
        rgb[sel] = (albedo * (0.35 + 0.65 * ndl) + 0.25 * spec).clamp(0, 1)
    forward = c2w[:3, 2]
    depth = torch.where(hit, t_safe * (d @ forward), torch.zeros_like(t))
    return rgb.T.reshape(3, H, W), depth.reshape(H, W)


def spiral_poses(n: int, radius: float) -> Tensor:
    """``[n, 4, 4]`` cameras on an Archimedean spiral over the upper hemisphere (SRN test-set style)."""
    s = (torch.arange(n) + 0.5) / n
    el = torch.asin(1 - s)  # from near the pole down to the equator
    az = s * 2 * math.pi * 6  # six turns
    return look_at(spherical_to_cartesian(torch.full((n,), radius), az, el))


def turntable_poses(n: int, radius: float, elevation_deg: float, generator: torch.Generator | None = None) -> Tensor:
    """``[n, 4, 4]`` cameras at one elevation looking at the origin: azimuths at random with ``generator``,
    else ``n`` evenly spaced ones starting at 0."""
    az = torch.rand(n, generator=generator) if generator is not None else torch.arange(n) / n
    el = torch.full((n,), math.radians(elevation_deg))
    return look_at(spherical_to_cartesian(torch.full((n,), radius), az * 2 * math.pi, el))


def _poses(split: str, n: int, cfg: ToyConfig, generator: torch.Generator) -> Tensor:
    if cfg.elevation_deg is not None:
        return turntable_poses(n, cfg.radius, cfg.elevation_deg, generator if split == "train" else None)
    if split == "train":
        return sphere_poses(n, cfg.radius, generator=generator, min_elevation_deg=5.0)
    return spiral_poses(n, cfg.radius)


def _write_object(folder: Path, prims: list[Primitive], poses: Tensor, cfg: ToyConfig) -> None:
    res, ss = cfg.resolution, cfg.supersample
    K = intrinsics_from_fov(cfg.fov_deg, res)
    K_ss = intrinsics_from_fov(cfg.fov_deg, res * ss)
    for sub in ("rgb", "depth", "pose"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, c2w in enumerate(poses):
        rgb, depth = render_object(prims, K_ss, c2w, res * ss, res * ss)
        rgb = F.avg_pool2d(rgb[None], ss)[0]  # antialiased
        depth = depth[ss // 2 :: ss, ss // 2 :: ss]  # depth of one sample per pixel (no mixing at edges)
        Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(folder / f"rgb/{i:06d}.png")
        mm = (depth.numpy() * 1000 + 0.5).clip(0, 65535).astype(np.uint16)
        Image.fromarray(mm).save(folder / f"depth/{i:06d}.png")
        np.savetxt(folder / f"pose/{i:06d}.txt", c2w.reshape(1, 16).numpy(), fmt="%.8f")
    f, c = float(K[0, 0]), float(K[0, 2])
    (folder / "intrinsics.txt").write_text(f"{f:.6f} {c:.6f} {c:.6f} 0.\n0. 0. 0.\n1.\n{res} {res}\n")


def generate_toy_dataset(root: str | Path, cfg: ToyConfig | None = None, progress: bool = True) -> Path:
    """Render the whole dataset into ``root`` (every split); returns ``root``.

    Rendering goes to a sibling temporary folder that replaces ``root`` only once complete, so an
    interrupted generation never leaves a half-written dataset behind.
    """
    cfg = cfg or ToyConfig()
    final = Path(root)
    root = final.with_name(final.name + ".genvs-tmp")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    splits = list(cfg.num_objects)
    total = sum(cfg.num_objects[s] for s in splits)
    done = 0
    for split in splits:
        for i in range(cfg.num_objects[split]):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + SPLIT_OFFSETS.get(split, 3) * 100_003 + i)
            if cfg.category == "car":
                prims = car_object(g, cfg.object_scale, cfg.patterns)
            else:
                prims = random_object(g, cfg.min_primitives, cfg.max_primitives, cfg.object_scale, cfg.patterns)
            poses = _poses(split, cfg.num_views[split], cfg, g)
            _write_object(root / split / f"toy_{split}_{i:05d}", prims, poses, cfg)
            done += 1
            if progress and (done % 20 == 0 or done == total):
                print(f"genvs: rendered {done}/{total} procedural objects into {root}", flush=True)
    (root / "toy.json").write_text(json.dumps(cfg.metadata(), indent=1))
    if final.exists():
        shutil.rmtree(final)
    root.rename(final)
    return final


def ensure_toy_dataset(root: str | Path, cfg: ToyConfig | None = None) -> Path:
    """Generate the dataset on first use, or again when ``toy.json`` records other settings."""
    cfg = cfg or ToyConfig()
    root = Path(root)
    meta = root / "toy.json"
    want = cfg.metadata()
    if meta.exists():
        try:
            have = json.loads(meta.read_text())
        except json.JSONDecodeError:
            have = None
        if have == want:
            return root
        if have is not None:
            print(f"genvs: {meta} records other generator settings; regenerating the procedural dataset")
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists, is not empty and holds no toy.json: it is not a genvs procedural dataset. "
            "Point data.init_args.root at an empty or new folder."
        )
    return generate_toy_dataset(root, cfg)


# =================================================================================================
# Procedural rooms: panorama rings with depth and per-view prompts (MVDiffusion's toy data)
#
# A box room whose four walls, floor and ceiling are thin box slabs, each with its own material, and a
# few composite objects (`random_object`) standing on the floor. A ring of views (90 deg field of view,
# 45 deg yaw steps by default) is rendered from near the room centre with `render_object`, so rooms use
# exactly the primitives, patterns and shading of the object generator. Every view gets a short prompt
# naming what it shows (its dominant wall, the floor, the objects in sight).
#
# Written layout: the SRN layout above (rgb/, depth/, pose/, intrinsics.txt, the ring's views in order)
# plus ``prompts.txt`` (one prompt per view, in view order) and ``<root>/rooms.json``.
# =================================================================================================

__all__ += ["RoomConfig", "Room", "random_room", "room_primitives", "render_room_ring", "room_prompts",
            "generate_toy_rooms", "ensure_toy_rooms"]  # fmt: skip

ROOMS_FORMAT_VERSION = 1
COLOR_NAMES = ("red", "blue", "yellow", "green", "purple", "orange", "black", "white", "brown", "teal")
PATTERN_WORDS = {"solid": "plain", "checker": "checkered", "stripes": "striped", "dots": "dotted"}
SURFACE_NAMES = ("wall", "wall", "wall", "wall", "floor", "ceiling")


@dataclass
class RoomConfig:
    """Settings of the procedural room dataset. Changing any of them regenerates the data.

    Args:
        num_views: views per ring; ``yaw_step_deg`` apart (negative: turning right, as MVDiffusion's
            rings, so that the views read left to right in an equirectangular panorama).
        fov_deg: horizontal (= vertical, square views) field of view.
        min_objects / max_objects: composite objects per room.
    """

    seed: int = 0
    resolution: int = 64
    num_rooms: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 100, "val": 4, "test": 8})
    num_views: int = 8
    fov_deg: float = 90.0
    yaw_step_deg: float = -45.0
    min_objects: int = 2
    max_objects: int = 4
    supersample: int = 2


@dataclass
class Room:
    half: Tensor  # [3] half extents; the room spans [-half, half], floor at z = -half[2]
    surfaces: list[Primitive]  # 6 slabs: walls +x, -x, +y, -y, floor, ceiling
    objects: list[list[Primitive]]  # composite objects standing on the floor
    camera: Tensor  # [3] centre of the ring


def _color_name(c: Tensor) -> str:
    return COLOR_NAMES[int((PALETTE - c).norm(dim=-1).argmin())]


def _object_bottom(prims: list[Primitive]) -> float:
    return min(float(p.center[2] - p.size[2]) for p in prims)


def random_room(generator: torch.Generator, min_objects: int = 2, max_objects: int = 4) -> Room:
    """A random room: size, one material per surface (distinct wall colours), objects, ring centre."""

    def u(lo=0.0, hi=1.0):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    half = torch.tensor([u(1.8, 3.0), u(1.8, 3.0), u(1.3, 1.6)])
    colors = torch.randperm(len(PALETTE), generator=generator)[:6]
    surfaces = []
    for k in range(6):
        axis, sign = (0, 0, 1, 1, 2, 2)[k], (1.0, -1.0, 1.0, -1.0, -1.0, 1.0)[k]
        # floor and ceiling: patterns that vary within a horizontal plane (stripes vary with height only)
        patterns = PATTERNS if k < 4 else ("solid", "checker", "dots")
        pattern = patterns[int(torch.randint(len(patterns), (), generator=generator))]
        c2 = PALETTE[int(torch.randint(len(PALETTE), (), generator=generator))]
        freq = u(1.5, 3.0)
        t = 0.5 / freq  # slab half thickness: puts the inner face mid-cell of the 3D dot lattice
        center = torch.zeros(3)
        center[axis] = sign * (half[axis] + t)
        size = half + 2 * t
        size[axis] = t
        surfaces.append(Primitive("box", center, size, 0.0, PALETTE[colors[k]].clone(), c2, pattern, freq))
    camera = torch.tensor([u(-0.3, 0.3), u(-0.3, 0.3), -half[2] + u(1.3, 1.6)])
    objects = []
    n = int(torch.randint(min_objects, max_objects + 1, (), generator=generator))
    for _ in range(n):
        prims = random_object(generator, 2, 3, scale=u(1.4, 2.0))
        for _attempt in range(20):  # somewhere on the floor, away from the camera and the walls
            xy = torch.stack([u(-1, 1) * (half[0] - 0.7), u(-1, 1) * (half[1] - 0.7)])
            if (xy - camera[:2]).norm() > 1.2:
                break
        lift = -half[2] - _object_bottom(prims)
        shift = torch.tensor([float(xy[0]), float(xy[1]), lift])
        objects.append([dataclasses.replace(p, center=p.center + shift) for p in prims])
    return Room(half=half, surfaces=surfaces, objects=objects, camera=camera)


def room_primitives(room: Room) -> list[Primitive]:
    """Every primitive of the room: the 6 surface slabs, then the objects' primitives."""
    return list(room.surfaces) + [p for obj in room.objects for p in obj]


def _surface_ids(room: Room, K: Tensor, c2w: Tensor, H: int, W: int) -> Tensor:
    """``[H, W]`` what each pixel sees: 0-5 surfaces, ``6 + j`` object ``j``."""
    prims = room_primitives(room)
    owner = torch.tensor(list(range(6)) + [6 + j for j, obj in enumerate(room.objects) for _ in obj])
    o, d = camera_rays(K, c2w, H, W)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    t = torch.stack([_intersect(p, o, d)[0] for p in prims], -1)
    return owner[t.argmin(-1)].reshape(H, W)


def room_prompts(room: Room, K: Tensor, c2w: Tensor, size: int = 32) -> list[str]:
    """One prompt per camera ``c2w [V, 4, 4]`` (``K [3, 3]`` for ``size`` px views): the dominant wall,
    the floor and ceiling when in sight, and the objects covering at least 2% of the view."""
    prompts = []
    for cam in c2w:
        ids = _surface_ids(room, K, cam, size, size).flatten()
        frac = torch.bincount(ids, minlength=6 + len(room.objects)).float() / ids.numel()
        wall = int(frac[:4].argmax())
        parts = [f"a {_desc(room.surfaces[wall])} wall"]
        for k in (4, 5):
            if frac[k] > 0.05:
                parts.append(f"a {_desc(room.surfaces[k])} {SURFACE_NAMES[k]}")
        for j, obj in enumerate(room.objects):
            if frac[6 + j] > 0.02:
                big = max(obj, key=lambda p: float(p.size.prod()))
                parts.append(f"a {_color_name(big.color)} {big.kind}")
        prompts.append("a room with " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1])
    return prompts


def _desc(p: Primitive) -> str:
    word = PATTERN_WORDS[p.pattern]
    return f"{word} {_color_name(p.color)}" if p.pattern != "solid" else _color_name(p.color)


def _ring(room: Room, cfg: RoomConfig, resolution: int) -> tuple[Tensor, Tensor]:
    K = intrinsics_from_fov(cfg.fov_deg, resolution)
    poses = ring_poses(cfg.num_views, cfg.yaw_step_deg, position=tuple(float(x) for x in room.camera))
    return K, poses


def render_room_ring(room: Room, cfg: RoomConfig | None = None) -> dict:
    """Render the ring of ``room`` in memory: ``images [V, 3, H, W]`` in [-1, 1], ``depth [V, 1, H, W]``,
    ``K [V, 3, 3]``, ``c2w [V, 4, 4]`` (OpenCV, z-up world) and ``prompts`` (V strings)."""
    cfg = cfg or RoomConfig()
    res, ss = cfg.resolution, cfg.supersample
    K_ss, poses = _ring(room, cfg, res * ss)
    prims = room_primitives(room)
    images, depths = [], []
    for c2w in poses:
        rgb, depth = render_object(prims, K_ss, c2w, res * ss, res * ss)
        images.append(F.avg_pool2d(rgb[None], ss)[0] * 2 - 1)
        depths.append(depth[ss // 2 :: ss, ss // 2 :: ss][None])
    K = intrinsics_from_fov(cfg.fov_deg, res)
    return {
        "images": torch.stack(images),
        "depth": torch.stack(depths),
        "K": K.expand(cfg.num_views, 3, 3).clone(),
        "c2w": poses,
        "prompts": room_prompts(room, intrinsics_from_fov(cfg.fov_deg, 32), poses),
    }


def generate_toy_rooms(root: str | Path, cfg: RoomConfig | None = None, progress: bool = True) -> Path:
    """Render every split's rooms into ``root`` (same atomic replacement as `generate_toy_dataset`)."""
    cfg = cfg or RoomConfig()
    final = Path(root)
    tmp = final.with_name(final.name + ".genvs-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # the object writer renders, antialiases and writes the views; only its image settings matter here
    view_cfg = ToyConfig(resolution=cfg.resolution, fov_deg=cfg.fov_deg, supersample=cfg.supersample)
    total = sum(cfg.num_rooms.values())
    done = 0
    for split, n in cfg.num_rooms.items():
        for i in range(n):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + SPLIT_OFFSETS.get(split, 3) * 100_003 + i + 7)
            room = random_room(g, cfg.min_objects, cfg.max_objects)
            _, poses = _ring(room, cfg, cfg.resolution)
            folder = tmp / split / f"room_{split}_{i:05d}"
            _write_object(folder, room_primitives(room), poses, view_cfg)
            prompts = room_prompts(room, intrinsics_from_fov(cfg.fov_deg, 32), poses)
            (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
            done += 1
            if progress and (done % 20 == 0 or done == total):
                print(f"genvs: rendered {done}/{total} procedural rooms into {tmp}", flush=True)
    (tmp / "rooms.json").write_text(json.dumps({"version": ROOMS_FORMAT_VERSION, **dataclasses.asdict(cfg)}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def ensure_toy_rooms(root: str | Path, cfg: RoomConfig | None = None) -> Path:
    """Generate the rooms on first use, or again when ``rooms.json`` records other settings."""
    cfg = cfg or RoomConfig()
    root = Path(root)
    meta = root / "rooms.json"
    want = {"version": ROOMS_FORMAT_VERSION, **dataclasses.asdict(cfg)}
    if meta.exists():
        try:
            have = json.loads(meta.read_text())
        except json.JSONDecodeError:
            have = None
        if have == want:
            return root
        if have is not None:
            print(f"genvs: {meta} records other generator settings; regenerating the procedural rooms")
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists, is not empty and holds no rooms.json: it is not a genvs procedural room dataset. "
            "Point data.init_args.root at an empty or new folder."
        )
    return generate_toy_rooms(root, cfg)
