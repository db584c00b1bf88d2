"""Projective geometry shared by the methods: transforms, projection, unprojection.

Same conventions as `genvs.core.cameras`: OpenCV ``c2w``, ``K`` in pixels, pixel centres at ``i + 0.5``,
depth is z-depth along the optical axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genvs.core.cameras import camera_rays, intrinsics_from_fov, look_at, pixel_centers, ring_poses

__all__ = ["transform_points", "world_to_camera", "project_points", "unproject_depth", "pixels_to_grid"]


def transform_points(T: Tensor, p: Tensor) -> Tensor:
    """Apply rigid/affine ``T [..., 4, 4]`` to points ``p [..., N, 3]``."""
    return p @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def world_to_camera(c2w: Tensor) -> Tensor:
    """Inverse of a rigid camera-to-world transform, ``[..., 4, 4]`` (exact, no general inverse)."""
    R = c2w[..., :3, :3]
    t = c2w[..., :3, 3:]
    w2c = torch.zeros_like(c2w)
    w2c[..., :3, :3] = R.transpose(-1, -2)
    w2c[..., :3, 3:] = -R.transpose(-1, -2) @ t
    w2c[..., 3, 3] = 1
    return w2c


def project_points(p_world: Tensor, K: Tensor, c2w: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Project world points ``[..., N, 3]`` into cameras ``K [..., 3, 3]``, ``c2w [..., 4, 4]``.

    Returns pixel coordinates ``uv [..., N, 2]`` (continuous, pixel centres at ``i + 0.5``) and z-depth
    ``[..., N]``; points behind the camera have ``z <= 0`` (their ``uv`` is meaningless).
    """
    p_cam = transform_points(world_to_camera(c2w), p_world)
    z = p_cam[..., 2]
    xy = p_cam[..., :2] / z.unsqueeze(-1).clamp_min(eps)
    uv = xy @ K[..., :2, :2].transpose(-1, -2) + K[..., None, :2, 2]
    return uv, z


def unproject_depth(depth: Tensor, K: Tensor, c2w: Tensor) -> Tensor:
    """World points of every pixel: z-depth ``[..., H, W]`` -> ``[..., H, W, 3]``."""
    H, W = depth.shape[-2:]
    uv = pixel_centers(H, W, device=depth.device, dtype=depth.dtype)  # [H, W, 2]
    Kinv = torch.linalg.inv(K.float()).to(depth.dtype)
    uv1 = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)  # [H, W, 3]
    rays = uv1 @ Kinv[..., None, :, :].transpose(-1, -2)  # [..., H, W, 3] camera rays with z = 1
    p_cam = rays * depth.unsqueeze(-1)
    p_world = transform_points(c2w[..., None, :, :], p_cam)  # treat H as the batch of N=W points
    return p_world


def pixels_to_grid(uv: Tensor, H: int, W: int) -> Tensor:
    """Pixel coordinates -> ``grid_sample`` coordinates in [-1, 1] (``align_corners=False``)."""
    scale = torch.tensor([2.0 / W, 2.0 / H], device=uv.device, dtype=uv.dtype)
    return uv * scale - 1.0


# ------------------------------------------------------------------------------------------------
# Homographies
#
# Two pinhole cameras that share a centre (a panorama ring, a cubemap) see the same ray at pixels
# related by a 3x3 homography. Pixel coordinates follow the module's convention (pixel centres at
# ``i + 0.5``, ``K`` in pixels of the tensor it describes).
# ------------------------------------------------------------------------------------------------

__all__ += ["rotation_homography", "apply_homography"]


def rotation_homography(K_src: Tensor, c2w_src: Tensor, K_dst: Tensor, c2w_dst: Tensor) -> Tensor:
    """Homography ``[..., 3, 3]`` mapping pixels of a source camera to a destination camera with the
    same centre: ``H = K_dst R_dst^T R_src K_src^-1`` (rotations of the OpenCV ``c2w``; translations are
    ignored, which is exact only when the centres coincide)."""
    R_rel = c2w_dst[..., :3, :3].transpose(-1, -2) @ c2w_src[..., :3, :3]  # src camera -> dst camera
    return K_dst @ R_rel @ torch.linalg.inv(K_src.float()).to(K_src.dtype)


def apply_homography(H: Tensor, uv: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Map pixels ``uv [..., N, 2]`` by ``H [..., 3, 3]``.

    Returns the mapped pixels ``[..., N, 2]`` and the homogeneous scale ``w [..., N]``; ``w <= 0`` means
    the ray points away from the destination camera (the mapped pixel is meaningless there).
    """
    uv1 = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)  # [..., N, 3]
    p = uv1 @ H.transpose(-1, -2)
    w = p[..., 2]
    safe = torch.where(w.abs() < eps, torch.full_like(w, eps), w)
    return p[..., :2] / safe.unsqueeze(-1), w


# ------------------------------------------------------------------------------------------------
# Panoramas: equirectangular images <-> perspective views of cameras sharing a centre
# (vectorised with ``grid_sample``).
#
# World convention for panoramas: z up (as `genvs.core.cameras.ring_poses` builds it). An equirectangular
# image of ``H x W`` pixels covers longitude ``lon in [-180, 180)`` left to right and latitude
# ``lat in [90, -90]`` top to bottom; pixel centres at ``i + 0.5``. Longitude 0 (the centre column) looks
# along world +x and longitude grows to the *right*, i.e. clockwise seen from above (towards -y), so an
# equirect reads like turning one's head to the right. A view of yaw ``a`` (`ring_poses`: ``a`` measured from
# +x towards +y) is centred at ``lon = -a``.
# ------------------------------------------------------------------------------------------------

__all__ += [
    "equirect_directions",
    "directions_to_equirect",
    "panorama_cameras",
    "cube_cameras",
    "equirect_to_perspective",
    "perspective_to_equirect",
    "reproject_views",
]


def equirect_directions(H: int, W: int, device=None) -> Tensor:
    """``[H, W, 3]`` unit world directions (z up) of the equirect pixel centres."""
    lon = ((torch.arange(W, device=device, dtype=torch.float32) + 0.5) / W * 2 - 1) * math.pi
    lat = (0.5 - (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / H) * math.pi
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    c = torch.cos(lat)
    return torch.stack([c * torch.cos(lon), -c * torch.sin(lon), torch.sin(lat)], dim=-1)


def directions_to_equirect(d: Tensor, H: int, W: int) -> Tensor:
    """World directions ``[..., 3]`` -> equirect pixel coordinates ``[..., 2]`` (continuous, centres at i + 0.5)."""
    d = F.normalize(d.float(), dim=-1)
    lon = torch.atan2(-d[..., 1], d[..., 0])
    lat = torch.asin(d[..., 2].clamp(-1, 1))
    u = (lon / math.pi + 1) / 2 * W
    v = (0.5 - lat / math.pi) * H
    return torch.stack([u, v], dim=-1)


def panorama_cameras(
    num_views: int = 8, fov_deg: float = 90.0, size: int = 512, yaw_step_deg: float | None = None, yaw0_deg: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``K [V, 3, 3]``, ``c2w [V, 4, 4]`` of the MVDiffusion ring: square views, ``fov_deg`` field of view,
    yaw steps of ``360 / num_views`` degrees (45 for 8 views) starting at ``yaw0_deg``."""
    step = 360.0 / num_views if yaw_step_deg is None else yaw_step_deg
    c2w = ring_poses(num_views, yaw_step_deg=step)
    if yaw0_deg:
        a = math.radians(yaw0_deg)
        Rz = torch.tensor(
            [[math.cos(a), -math.sin(a), 0, 0], [math.sin(a), math.cos(a), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
        )
        c2w = Rz @ c2w
    K = intrinsics_from_fov(fov_deg, size).expand(num_views, 3, 3).clone()
    return K, c2w


def cube_cameras(size: int) -> tuple[Tensor, Tensor]:
    """``K [6, 3, 3]``, ``c2w [6, 4, 4]`` of cubemap faces (90 deg): front (+x), left (+y), back (-x),
    right (-y), up (+z), down (-z). The up and down faces are rolled so that their edge nearest the front
    face is at the bottom (up) / top (down), as when tilting the head from the front view. Map a
    dataset's face order and rolls onto these when loading skyboxes."""
    eye = torch.zeros(4, 3)
    target = torch.tensor([[1.0, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]])
    side = look_at(eye, target, up=torch.tensor([0.0, 0.0, 1.0]))
    c2w = torch.eye(4).repeat(6, 1, 1)
    c2w[:4] = side
    # columns: camera x (right), y (down), z (forward) in world coordinates
    c2w[4, :3, :3] = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]).T  # up: down = +x (front)
    c2w[5, :3, :3] = torch.tensor([[0.0, -1, 0], [-1, 0, 0], [0, 0, -1]]).T  # down: up = +x (front)
    K = intrinsics_from_fov(90.0, size).expand(6, 3, 3).clone()
    return K, c2w


def equirect_to_perspective(pano: Tensor, K: Tensor, c2w: Tensor, size: tuple[int, int]) -> Tensor:
    """Render perspective views from an equirect panorama.

    ``pano [B, C, He, We]``, ``K [B, V, 3, 3]`` (pixels of the ``size`` views), ``c2w [B, V, 4, 4]`` (rotation
    only; z-up world) -> ``[B, V, C, H, W]``, bilinear, wrapping around in longitude.
    """
    B, C, He, We = pano.shape
    V = K.shape[1]
    H, W = size
    _, d = camera_rays(K, c2w, H, W)  # [B, V, H, W, 3]
    uv = directions_to_equirect(d, He, We)
    # wrap: pad one column on each side so bilinear interpolation crosses the seam
    padded = torch.cat([pano[..., -1:], pano, pano[..., :1]], dim=-1)
    uv = uv + torch.tensor([1.0, 0.0], device=uv.device)
    grid = pixels_to_grid(uv, He, We + 2).to(pano.dtype)
    src = padded[:, None].expand(B, V, C, He, We + 2).reshape(B * V, C, He, We + 2)
    out = F.grid_sample(src, grid.reshape(B * V, H, W, 2), mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(B, V, C, H, W)


def _blend_views(images: Tensor, K: Tensor, c2w: Tensor, dirs: Tensor, blend: str) -> tuple[Tensor, Tensor]:
    """Colour of world directions ``dirs [B, N, 3]`` seen by rotation-only cameras: ``images [B, V, C, H, W]``
    -> (colours ``[B, C, N]``, coverage ``[B, N]`` in {0, 1}); see `perspective_to_equirect` for ``blend``."""
    B, V, C, H, W = images.shape
    N = dirs.shape[-2]
    # directions are points at unit distance from camera centres at the origin (rotation-only cameras)
    c2w_rot = c2w.clone().float()
    c2w_rot[..., :3, 3] = 0
    uv, z = project_points(dirs[:, None].float().expand(B, V, N, 3), K.float(), c2w_rot)  # [B, V, N, (2)]
    inside = (z > 1e-6) & (uv[..., 0] >= 0) & (uv[..., 0] <= W) & (uv[..., 1] >= 0) & (uv[..., 1] <= H)
    if blend == "feather":
        border = torch.minimum(
            torch.minimum(uv[..., 0], W - uv[..., 0]) / W, torch.minimum(uv[..., 1], H - uv[..., 1]) / H
        )
        wgt = torch.where(inside, border.clamp_min(1e-4), torch.zeros_like(border))
    elif blend == "nearest":
        cos = z / dirs.float().norm(dim=-1)[:, None]  # direction . optical axis
        cos = torch.where(inside, cos, torch.full_like(cos, -2.0))
        best = cos.argmax(dim=1, keepdim=True)
        wgt = torch.zeros_like(cos).scatter_(1, best, 1.0) * inside
    else:
        raise ValueError(f"blend={blend!r}: use 'feather' or 'nearest'")
    grid = pixels_to_grid(uv, H, W).to(images.dtype).reshape(B * V, N, 1, 2)
    samp = F.grid_sample(
        images.reshape(B * V, C, H, W), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    samp = samp.reshape(B, V, C, N)
    total = wgt.sum(dim=1)  # [B, N]
    out = (samp * wgt[:, :, None].to(samp.dtype)).sum(dim=1) / total.clamp_min(1e-8)[:, None].to(samp.dtype)
    covered = (total > 0).to(images.dtype)
    return out * covered[:, None], covered


def perspective_to_equirect(
    images: Tensor, K: Tensor, c2w: Tensor, size: tuple[int, int], blend: str = "feather"
) -> tuple[Tensor, Tensor]:
    """Stitch perspective views into an equirect panorama.

    For every equirect pixel: its direction is projected into every view; the views that see it are
    sampled (bilinear) and blended. ``blend="feather"`` weights each view by the distance to its image
    border (smooth seams), ``"nearest"`` takes the view whose optical axis is closest.

    ``images [B, V, C, H, W]``, ``K [B, V, 3, 3]``, ``c2w [B, V, 4, 4]`` -> (pano ``[B, C, He, We]``,
    coverage ``[B, 1, He, We]`` in {0, 1}); uncovered pixels are 0.
    """
    B, C = images.shape[0], images.shape[2]
    He, We = size
    d = equirect_directions(He, We, device=images.device).reshape(1, He * We, 3).expand(B, -1, -1)
    pano, covered = _blend_views(images, K, c2w, d, blend)
    return pano.reshape(B, C, He, We), covered.reshape(B, 1, He, We)


def reproject_views(
    images: Tensor, K: Tensor, c2w: Tensor, K_out: Tensor, c2w_out: Tensor, size: tuple[int, int], blend: str = "nearest"
) -> tuple[Tensor, Tensor]:
    """Render new rotation-only cameras from views that share their centre (e.g. a ring from cubemap faces).

    ``images [B, V, C, H, W]`` with ``K``, ``c2w`` ``[B, V, ...]``; new cameras ``K_out``, ``c2w_out``
    ``[B, V', ...]`` of ``size`` -> (views ``[B, V', C, H', W']``, coverage ``[B, V', 1, H', W']``).
    Translations are ignored (exact only for cameras sharing a centre).
    """
    B, C = images.shape[0], images.shape[2]
    Vo = K_out.shape[1]
    H, W = size
    _, d = camera_rays(K_out, c2w_out, H, W)  # [B, V', H, W, 3]
    out, covered = _blend_views(images, K, c2w, d.reshape(B, Vo * H * W, 3), blend)
    return out.reshape(B, C, Vo, H, W).transpose(1, 2), covered.reshape(B, Vo, 1, H, W)
