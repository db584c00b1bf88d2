"""Panorama <-> perspective views, vectorised with ``grid_sample``.

World convention for panoramas: z up (as `genvs.core.cameras.ring_poses` builds it). An equirectangular
image of ``H x W`` pixels covers longitude ``lon in [-180, 180)`` left to right and latitude
``lat in [90, -90]`` top to bottom; pixel centres at ``i + 0.5``. Longitude 0 (the centre column) looks
along world +x and longitude grows to the *right*, i.e. clockwise seen from above (towards -y), so an
equirect reads like turning one's head to the right. A view of yaw ``a`` (`ring_poses`: ``a`` measured from
+x towards +y) is centred at ``lon = -a``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genvs.core.cameras import camera_rays, intrinsics_from_fov, look_at, ring_poses
from genvs.core.geometry import pixels_to_grid, project_points

__all__ = [
    "equirect_directions",
    "directions_to_equirect",
    "panorama_cameras",
    "cube_cameras",
    "equirect_to_perspective",
    "perspective_to_equirect",
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
    B, V, C, H, W = images.shape
    He, We = size
    d = equirect_directions(He, We, device=images.device).reshape(1, 1, He * We, 3)
    # directions are points at unit distance from camera centres at the origin (rotation-only cameras)
    c2w_rot = c2w.clone().float()
    c2w_rot[..., :3, 3] = 0
    uv, z = project_points(d.expand(B, V, He * We, 3), K.float(), c2w_rot)  # [B, V, N, 2], [B, V, N]
    inside = (z > 1e-6) & (uv[..., 0] >= 0) & (uv[..., 0] <= W) & (uv[..., 1] >= 0) & (uv[..., 1] <= H)
    if blend == "feather":
        border = torch.minimum(
            torch.minimum(uv[..., 0], W - uv[..., 0]) / W, torch.minimum(uv[..., 1], H - uv[..., 1]) / H
        )
        wgt = torch.where(inside, border.clamp_min(1e-4), torch.zeros_like(border))
    elif blend == "nearest":
        cos = z / 1.0  # direction . optical axis (unit directions)
        cos = torch.where(inside, cos, torch.full_like(cos, -2.0))
        best = cos.argmax(dim=1, keepdim=True)
        wgt = torch.zeros_like(cos).scatter_(1, best, 1.0) * inside
    else:
        raise ValueError(f"blend={blend!r}: use 'feather' or 'nearest'")
    grid = pixels_to_grid(uv, H, W).to(images.dtype).reshape(B * V, He, We, 2)
    samp = F.grid_sample(
        images.reshape(B * V, C, H, W), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    samp = samp.reshape(B, V, C, He * We)
    total = wgt.sum(dim=1)  # [B, N]
    pano = (samp * wgt[:, :, None].to(samp.dtype)).sum(dim=1) / total.clamp_min(1e-8)[:, None].to(samp.dtype)
    covered = (total > 0).to(images.dtype)
    return (pano * covered[:, None]).reshape(B, C, He, We), covered.reshape(B, 1, He, We)
