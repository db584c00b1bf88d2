"""Projective geometry shared by the methods: transforms, projection, unprojection.

Same conventions as `genvs.core.cameras`: OpenCV ``c2w``, ``K`` in pixels, pixel centres at ``i + 0.5``,
depth is z-depth along the optical axis.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genvs.core.cameras import pixel_centers

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
