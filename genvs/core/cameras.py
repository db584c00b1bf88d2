"""Pinhole cameras: rays, positional encodings, intrinsics, trajectories.

Conventions (see `genvs.core.views`): OpenCV camera-to-world ``c2w`` (x right, y down, z forward),
intrinsics ``K`` in pixels with pixel centres at ``(i + 0.5)``. Foreign conventions enter through
exactly one function each: `opengl_to_opencv`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "pixel_centers",
    "camera_rays",
    "pixel_rays",
    "posenc_nerf",
    "ray_posenc",
    "scale_intrinsics",
    "intrinsics_from_fov",
    "fov_from_intrinsics",
    "look_at",
    "orbit_poses",
    "spherical_to_cartesian",
    "sphere_poses",
    "ring_poses",
    "orbit_around",
    "opengl_to_opencv",
    "orbit_camera",
    "pivot_viewset",
    "optical_axes_center",
]


def pixel_centers(H: int, W: int, device=None, dtype=torch.float32) -> Tensor:
    """``[H, W, 2]`` pixel-centre coordinates ``(u, v) = (x + 0.5, y + 0.5)``."""
    v, u = torch.meshgrid(
        torch.arange(H, device=device, dtype=dtype) + 0.5,
        torch.arange(W, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def camera_rays(K: Tensor, c2w: Tensor, H: int, W: int, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """World-space rays through every pixel centre.

    K ``[..., 3, 3]``, c2w ``[..., 4, 4]`` -> origins, directions ``[..., H, W, 3]``. Directions are unit
    length when ``normalize`` (else they have z = 1 in camera space, so ``t`` along them is z-depth).
    """
    K = K.float()
    c2w = c2w.float()
    uv = pixel_centers(H, W, device=K.device)  # [H, W, 2]
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]  # [..., 1, 1]
    cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
    x = (uv[..., 0] - cx) / fx  # [..., H, W]
    y = (uv[..., 1] - cy) / fy
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [..., H, W, 3]
    R = c2w[..., None, None, :3, :3]  # [..., 1, 1, 3, 3]
    dirs = (R @ d_cam[..., None]).squeeze(-1)
    if normalize:
        dirs = F.normalize(dirs, dim=-1)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs



# ----------------------------------------------------------------------------------------------
# Rays through arbitrary pixel coordinates (sparse pixel sets: random patches, single rays)
# ----------------------------------------------------------------------------------------------
def pixel_rays(uv: Tensor, K: Tensor, c2w: Tensor) -> tuple[Tensor, Tensor]:
    """World-space rays through continuous pixel coordinates ``uv [..., N, 2]`` (centres at ``i + 0.5``).

    ``K [..., 3, 3]``, ``c2w [..., 4, 4]`` -> origins, directions ``[..., N, 3]``. Directions are *not*
    normalised: they have z = 1 in camera space, so the ray parameter ``t`` is the z-depth of the point
    ``o + t d`` (what volume rendering in genvs integrates over, so depth comes out as z-depth).
    """
    K = K.float()
    c2w = c2w.float()
    uv = uv.float()
    fx, fy = K[..., 0, 0, None], K[..., 1, 1, None]  # [..., 1]
    cx, cy = K[..., 0, 2, None], K[..., 1, 2, None]
    x = (uv[..., 0] - cx) / fx  # [..., N]
    y = (uv[..., 1] - cy) / fy
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [..., N, 3]
    dirs = d_cam @ c2w[..., :3, :3].transpose(-1, -2)  # R d per point
    origins = c2w[..., None, :3, 3].expand_as(dirs)
    return origins, dirs

def posenc_nerf(x: Tensor, min_deg: int = 0, max_deg: int = 15) -> Tensor:
    """NeRF-style encoding as in 3DiM: ``[x, sin(2^l x), sin(2^l x + pi/2)]`` for ``l in [min_deg, max_deg)``.

    ``[..., D]`` -> ``[..., D + 2 D (max_deg - min_deg)]``. Frequencies are ``2^l`` (no factor pi), as in
    the 3DiM appendix code, so unit-scale scenes are resolved by the low octaves.
    """
    if min_deg == max_deg:
        return x
    scales = 2.0 ** torch.arange(min_deg, max_deg, device=x.device, dtype=x.dtype)  # [L]
    xb = (x[..., None, :] * scales[:, None]).flatten(-2)  # [..., L * D]
    emb = torch.sin(torch.cat([xb, xb + math.pi / 2], dim=-1))
    return torch.cat([x, emb], dim=-1)


def ray_posenc(K: Tensor, c2w: Tensor, H: int, W: int, origin_octaves: int = 15, dir_octaves: int = 8) -> Tensor:
    """Per-pixel ray encoding of 3DiM: ``[..., H, W, 144]`` for the default octaves (93 origin + 51 direction)."""
    o, d = camera_rays(K, c2w, H, W)
    return torch.cat([posenc_nerf(o, 0, origin_octaves), posenc_nerf(d, 0, dir_octaves)], dim=-1)


def ray_posenc_channels(origin_octaves: int = 15, dir_octaves: int = 8) -> int:
    return 3 * (1 + 2 * origin_octaves) + 3 * (1 + 2 * dir_octaves)


def scale_intrinsics(K: Tensor, sx: float, sy: float) -> Tensor:
    """Intrinsics of an image resized by ``(sx, sy)`` (continuous pixel coordinates scale exactly)."""
    S = torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], dtype=K.dtype, device=K.device)
    return S @ K


def intrinsics_from_fov(fov_deg: float, H: int, W: int | None = None) -> Tensor:
    """``[3, 3]`` intrinsics with horizontal field of view ``fov_deg`` and the principal point centred."""
    W = H if W is None else W
    f = 0.5 * W / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=torch.float32)


def fov_from_intrinsics(K: Tensor, W: int) -> Tensor:
    """Horizontal field of view in degrees."""
    return torch.rad2deg(2 * torch.atan(0.5 * W / K[..., 0, 0]))


def look_at(eye: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """OpenCV camera-to-world ``[..., 4, 4]`` of cameras at ``eye [..., 3]`` looking at ``target``.

    ``up`` is the world up vector (default +z); the camera's y axis points down, against it.
    """
    target = torch.zeros_like(eye) if target is None else target.expand_as(eye)
    up = eye.new_tensor([0.0, 0.0, 1.0]) if up is None else up
    up = up.expand_as(eye)
    z = F.normalize(target - eye, dim=-1)  # forward
    x = torch.cross(z, up, dim=-1)
    # Cameras looking straight along `up` have no defined roll: pick any perpendicular x axis.
    degenerate = x.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.cross(z, torch.roll(up, 1, dims=-1), dim=-1)
    x = F.normalize(torch.where(degenerate, alt, x), dim=-1)
    y = torch.cross(z, x, dim=-1)  # down
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = x, y, z, eye
    c2w[..., 3, 3] = 1
    return c2w


def spherical_to_cartesian(radius: Tensor, azimuth: Tensor, elevation: Tensor) -> Tensor:
    """Points on a sphere (z up): azimuth around z from +x, elevation above the xy plane (radians)."""
    ce = torch.cos(elevation)
    return torch.stack(
        [radius * ce * torch.cos(azimuth), radius * ce * torch.sin(azimuth), radius * torch.sin(elevation)], dim=-1
    )


def orbit_poses(
    n: int, radius: float = 1.3, elevation_deg: float = 20.0, start_azimuth_deg: float = 0.0, center=(0.0, 0.0, 0.0)
) -> Tensor:
    """``[n, 4, 4]`` cameras on a horizontal circle looking at ``center`` (a turntable orbit)."""
    az = torch.deg2rad(torch.tensor(start_azimuth_deg)) + torch.arange(n) * (2 * math.pi / n)
    el = torch.full((n,), math.radians(elevation_deg))
    c = torch.tensor(center, dtype=torch.float32)
    eye = spherical_to_cartesian(torch.full((n,), radius), az, el) + c
    return look_at(eye, c)


def sphere_poses(
    n: int,
    radius: float = 1.3,
    generator: torch.Generator | None = None,
    upper_hemisphere: bool = True,
    min_elevation_deg: float = 0.0,
) -> Tensor:
    """``[n, 4, 4]`` cameras uniformly distributed on a sphere (or its upper part) looking at the origin."""
    u = torch.rand(n, generator=generator)
    az = torch.rand(n, generator=generator) * 2 * math.pi
    lo = math.sin(math.radians(min_elevation_deg)) if upper_hemisphere else -1.0
    sin_el = lo + (1 - lo) * u  # uniform in sin(elevation) = uniform area on the sphere
    el = torch.asin(sin_el.clamp(-1 + 1e-6, 1 - 1e-6))
    return look_at(spherical_to_cartesian(torch.full((n,), radius), az, el))


def ring_poses(n: int = 8, yaw_step_deg: float = 45.0, pitch_deg: float = 0.0, position=(0.0, 0.0, 0.0)) -> Tensor:
    """``[n, 4, 4]`` cameras at one point, rotating in yaw by ``yaw_step_deg`` (panorama rings)."""
    yaw = torch.deg2rad(torch.arange(n) * yaw_step_deg)
    pitch = torch.full((n,), math.radians(pitch_deg))
    eye = torch.tensor(position, dtype=torch.float32).expand(n, 3)
    target = eye + spherical_to_cartesian(torch.ones(n), yaw, pitch)
    return look_at(eye, target)


def orbit_around(c2w: Tensor, n: int, axis=(0.0, 0.0, 1.0), center=(0.0, 0.0, 0.0), degrees: float = 360.0) -> Tensor:
    """``[..., n, 4, 4]`` cameras made by rotating camera ``c2w [..., 4, 4]`` about the line through ``center``
    along ``axis`` in ``n`` equal steps over ``degrees`` (the first is ``c2w`` itself). Elevation and roll
    of the starting camera are kept, whatever the dataset's up convention.

    ``axis`` and ``center`` are 3-sequences or tensors ``[..., 3]`` (one per camera of a batch); the
    rotation is right-handed about ``axis``.
    """
    dt, dev = c2w.dtype, c2w.device
    a = F.normalize(torch.as_tensor(axis, dtype=torch.float64, device=dev), dim=-1)[..., None, :]  # [..., 1, 3]
    c = torch.as_tensor(center, dtype=torch.float64, device=dev)[..., None, :, None]  # [..., 1, 3, 1]
    theta = torch.arange(n, dtype=torch.float64, device=dev) * math.radians(degrees) / n
    s, co = torch.sin(theta)[:, None, None], torch.cos(theta)[:, None, None]  # [n, 1, 1]
    zero = torch.zeros_like(a[..., 0])
    Kx = torch.stack(  # cross-product matrix of the axis, [..., 1, 3, 3]
        [
            torch.stack([zero, -a[..., 2], a[..., 1]], -1),
            torch.stack([a[..., 2], zero, -a[..., 0]], -1),
            torch.stack([-a[..., 1], a[..., 0], zero], -1),
        ],
        dim=-2,
    )
    R = torch.eye(3, dtype=torch.float64, device=dev) + s * Kx + (1 - co) * (Kx @ Kx)  # Rodrigues, [..., n, 3, 3]
    base = c2w.double()[..., None, :, :]  # [..., 1, 4, 4]
    rot = R @ base[..., :3, :3]
    trans = R @ (base[..., :3, 3:] - c) + c
    batch = torch.broadcast_shapes(rot.shape[:-2], trans.shape[:-2])
    out = torch.zeros(*batch, 4, 4, dtype=torch.float64, device=dev)
    out[..., :3, :3] = rot
    out[..., :3, 3:] = trans
    out[..., 3, 3] = 1
    return out.to(dt)


def opengl_to_opencv(c2w: Tensor) -> Tensor:
    """Camera-to-world from OpenGL/Blender (y up, z backward) to OpenCV (y down, z forward)."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device))
    return c2w @ flip


# ----------------------------------------------------------------- cameras orbiting a point ahead
# Single-image methods (the warping RGBD model) place the image's camera at the identity and move new
# cameras on a sphere around a pivot straight ahead of it, in the image's depth units.


def orbit_camera(
    yaw: Tensor | float, pitch: Tensor | float, radius: Tensor | float = 1.0, target: Tensor | None = None, pivot: float = 1.0
) -> Tensor:
    """OpenCV c2w ``[..., 4, 4]`` of cameras orbiting a pivot ``pivot`` units in front of the identity camera.

    ``yaw`` turns right (the camera moves to +x), ``pitch`` up (the camera moves to -y); ``radius`` is
    the distance to the pivot; ``target`` an optional ``[..., 3]`` offset of the look-at point from the pivot.
    ``yaw = pitch = 0``, ``radius = pivot`` and no offset give the identity. Radians.
    """
    yaw, pitch = torch.as_tensor(yaw, dtype=torch.float32), torch.as_tensor(pitch, dtype=torch.float32)
    radius = torch.as_tensor(radius, dtype=torch.float32, device=yaw.device)
    center = yaw.new_tensor([0.0, 0.0, pivot])
    direction = torch.stack(
        [torch.cos(pitch) * torch.sin(yaw), -torch.sin(pitch), -torch.cos(pitch) * torch.cos(yaw)], dim=-1
    )
    eye = center + radius[..., None] * direction
    look = center.expand_as(eye) if target is None else center + target
    return look_at(eye, look, up=yaw.new_tensor([0.0, -1.0, 0.0]))


def pivot_viewset(kind: str = "3x9", num_frames: int = 24, step: float = 0.15, pivot: float = 1.0) -> Tensor:
    """Camera sets around a pivot ahead of the identity camera, OpenCV c2w ``[V, 4, 4]``, radius ``pivot``.

    - ``"3x9"``: the warping paper's sampling set: yaws 0, +-step, ..., +-4 step and pitches 0, +-step
      (27 views) in the official generation order (yaw-major, 0 first, then alternating sides);
    - ``"swing"``: ``num_frames`` frames on a closed loop through the identity,
      ``yaw = 4 step sin(s)``, ``pitch = step (1 - cos(s)) / 2``, ``s`` in ``[0, 2 pi)``;
    - ``"sweep"``: ``num_frames`` yaws from ``-4 step`` to ``4 step`` at pitch 0.
    """
    if kind == "3x9":
        yaws = [0.0] + [sgn * (i + 1) * step for i in range(4) for sgn in (1, -1)]
        pitches = [0.0, step, -step]
        yaw = torch.tensor([y for y in yaws for _ in pitches])
        pitch = torch.tensor([p for _ in yaws for p in pitches])
    elif kind == "swing":
        s = torch.arange(num_frames, dtype=torch.float32) * (2 * math.pi / num_frames)
        yaw, pitch = 4 * step * torch.sin(s), step * (1 - torch.cos(s)) / 2
    elif kind == "sweep":
        yaw = torch.linspace(-4 * step, 4 * step, num_frames)
        pitch = torch.zeros(num_frames)
    else:
        raise ValueError(f"pivot_viewset(kind={kind!r}): use '3x9', 'swing' or 'sweep'")
    return orbit_camera(yaw, pitch, pivot, pivot=pivot)


# ----------------------------------------------------------------------------------------------
# Trajectories around a scene known only through its cameras (videos rendered from sampled scenes)
# ----------------------------------------------------------------------------------------------
def optical_axes_center(c2w: Tensor, ridge: float = 1e-4) -> Tensor:
    """The point closest (least squares) to the optical axes of cameras ``c2w [..., N, 4, 4]`` -> ``[..., 3]``.

    For cameras around an object (CO3D, SRN-like data) it is the point they look at. A small ``ridge``
    pulls the solution towards the cameras' mean position when the axes are (nearly) parallel, where the
    problem has no unique solution (a single camera, forward-facing captures).
    """
    o = c2w[..., :3, 3].double()  # [..., N, 3]
    d = F.normalize(c2w[..., :3, 2].double(), dim=-1)
    eye = torch.eye(3, dtype=torch.float64, device=c2w.device)
    P = eye - d[..., :, None] * d[..., None, :]  # [..., N, 3, 3] projectors orthogonal to each axis
    A = P.sum(-3)
    b = (P @ o[..., None]).sum(-3)  # [..., 3, 1]
    lam = ridge * A.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12)[..., None, None]
    mean = o.mean(-2)[..., None]
    x = torch.linalg.solve(A + lam * eye, b + lam * mean)
    return x[..., 0].to(c2w.dtype)
