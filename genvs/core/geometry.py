"""Projective geometry shared by the methods: transforms, projection, unprojection.

Same conventions as `genvs.core.cameras`: OpenCV ``c2w``, ``K`` in pixels, pixel centres at ``i + 0.5``,
depth is z-depth along the optical axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# =====================================================================================================
# RGBD forward warping: a depth map as a triangle mesh, rasterised into another camera (pure torch)
# =====================================================================================================
#
# A source view's depth map is read as a triangle mesh: one vertex per pixel centre (plus, with
# ``border``, a ring of vertices on or beyond the image border so the mesh covers whole pixels), two triangles
# per 2x2 block split along the shorter 3D diagonal. The mesh is rasterised into the target camera at
# ``supersample`` times its resolution with a z-buffer (vectorised: every triangle enumerates the pixel
# centres of its bounding box, ``scatter_reduce(amin)`` keeps the nearest fragment per pixel). Triangles
# spanning a depth discontinuity (the "stretched" ones that bridge a foreground edge and the background)
# still occlude but are not visible, like back faces. This is a torch re-derivation of the OpenGL mesh
# renderer of Xiang et al. (2023); the flags follow its semantics (see ``depth_mesh_flags``).

__all__ += [
    "MeshRaster",
    "RGBDWarp",
    "depth_discontinuity",
    "depth_edges",
    "depth_normals",
    "rasterize_depth_mesh",
    "forward_warp",
]


@dataclass
class MeshRaster:
    """Fragments of a depth mesh that won the z-test, per pixel of the supersampled target grid.

    All fields are ``[N, Hs, Ws]`` (``src_uv`` has a trailing 2) with ``Hs = supersample * H``.
    """

    depth: Tensor  # target z-depth of the nearest fragment, 0 where nothing was drawn
    src_uv: Tensor  # [..., 2] continuous source pixel coordinates of that fragment
    covered: Tensor  # bool: some triangle was drawn here
    front: Tensor  # bool: the winning triangle faces the target camera
    edge: Tensor  # bool: the winning triangle spans a depth discontinuity (stretched)
    eroded: Tensor  # bool: the winning triangle lies within ``erode`` vertices of a discontinuity
    supersample: int = 1

    @property
    def visible(self) -> Tensor:
        """Covered by a front-facing triangle that is not stretched across a discontinuity."""
        return self.covered & self.front & ~self.edge


@dataclass
class RGBDWarp:
    """Result of `forward_warp` at the target resolution (leading dims as the input)."""

    image: Tensor  # [..., C, H, W] warped attributes averaged over visible subpixels, 0 elsewhere
    depth: Tensor  # [..., 1, H, W] target z-depth where ``mask``, 0 elsewhere
    mask: Tensor  # [..., 1, H, W] float {0, 1}: visible (coverage and depth-edge tests passed)
    depth_raw: Tensor  # [..., 1, H, W] z-buffer depth of any triangle (stretched, back faces too), 0 if none


def depth_discontinuity(depth: Tensor, other: Tensor, atol: float, rtol: float) -> Tensor:
    """Depth discontinuity test of Xiang et al.: ``|d1 - d2| > atol`` and ``|1/d1 - 1/d2| > rtol``.

    ``atol`` is in depth units; ``rtol`` is a tolerance on inverse depth (at depth 1 it is relative).
    """
    d1, d2 = depth.clamp_min(1e-6), other.clamp_min(1e-6)
    return ((d1 - d2).abs() > atol) & ((1 / d1 - 1 / d2).abs() > rtol)


def depth_edges(depth: Tensor, atol: float, rtol: float, min_count: int = 3) -> Tensor:
    """Pixels on depth edges, ``[..., 1, H, W]`` -> bool of the same shape.

    Each of the 4 neighbour directions (horizontal, vertical, both diagonals) whose pair fails
    `depth_discontinuity` counts once for both pixels of the pair; a pixel with ``min_count`` or more
    counts is an edge pixel (so a pixel on a straight edge, which sees it across 3 of its 8 pairs, is one).
    """
    d = depth
    count = torch.zeros(d.shape, dtype=torch.int32, device=d.device)
    pairs = [
        ((..., slice(None), slice(1, None)), (..., slice(None), slice(None, -1))),  # horizontal
        ((..., slice(1, None), slice(None)), (..., slice(None, -1), slice(None))),  # vertical
        ((..., slice(1, None), slice(1, None)), (..., slice(None, -1), slice(None, -1))),  # diagonal
        ((..., slice(1, None), slice(None, -1)), (..., slice(None, -1), slice(1, None))),  # anti-diagonal
    ]
    for a, b in pairs:
        e = depth_discontinuity(d[a], d[b], atol, rtol).to(torch.int32)
        count[a] += e
        count[b] += e
    return count >= min_count


def depth_normals(depth: Tensor, K: Tensor, c2w: Tensor | None = None) -> Tensor:
    """Unit surface normals of a depth map, ``[..., 1, H, W]`` -> ``[..., 3, H, W]``, facing the camera.

    Central differences of the unprojected points, smoothed across with a (1, 2, 1) Sobel weighting
    (edge-replicated borders). Camera frame unless ``c2w`` is given (then world frame).
    """
    lead = depth.shape[:-3]
    H, W = depth.shape[-2:]
    d = depth.reshape(-1, 1, H, W).float()
    Kf = K.reshape(-1, 3, 3).float()
    p = unproject_depth(d[:, 0], Kf, torch.eye(4, device=d.device).expand(d.shape[0], 4, 4))  # [N, H, W, 3]
    p = F.pad(p.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate")  # [N, 3, H+2, W+2]
    du = p[..., :, 2:] - p[..., :, :-2]  # [N, 3, H+2, W]
    dv = p[..., 2:, :] - p[..., :-2, :]  # [N, 3, H, W+2]
    du = (du[..., :-2, :] + 2 * du[..., 1:-1, :] + du[..., 2:, :]) / 4
    dv = (dv[..., :, :-2] + 2 * dv[..., :, 1:-1] + dv[..., :, 2:]) / 4
    n = F.normalize(torch.cross(dv, du, dim=1), dim=1)  # x right, y down: dv x du points at the camera
    if c2w is not None:
        R = c2w.reshape(-1, 4, 4)[:, :3, :3].float()
        n = torch.einsum("nij,njhw->nihw", R, n)
    return n.reshape(*lead, 3, H, W)


def _cross2(ax: Tensor, ay: Tensor, bx: Tensor, by: Tensor) -> Tensor:
    return ax * by - ay * bx


def _candidate_chunks(csum: Tensor, max_candidates: int) -> list[tuple[int, int, int, int]]:
    """Triangle ranges holding at most ~``max_candidates`` candidate pixels each, from the cumulative counts
    ``csum [T]``: ``(lo, hi, first, count)``, triangles ``lo:hi``, whose candidates are ``first:first+count``.

    The rasteriser's one host-device synchronisation: the number of candidate pixels is data, and it
    sizes the buffers (one copy of ``csum`` to the host per call)."""
    counts = csum.cpu()
    total = int(counts[-1]) if counts.numel() else 0
    if total == 0:
        return []
    cuts = torch.arange(max_candidates, total, max_candidates, dtype=counts.dtype) if total > max_candidates else counts[:0]
    edges = sorted({0, *torch.searchsorted(counts, cuts, right=True).tolist(), counts.numel()})
    before = [0, *counts.tolist()]
    return [(lo, hi, before[lo], before[hi] - before[lo]) for lo, hi in zip(edges[:-1], edges[1:]) if before[hi] > before[lo]]


def rasterize_depth_mesh(
    depth: Tensor,
    K_src: Tensor,
    c2w_src: Tensor,
    K_tgt: Tensor,
    c2w_tgt: Tensor,
    size: tuple[int, int],
    *,
    valid: Tensor | None = None,
    supersample: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    erode: int = 0,
    border: float = 0.5,
    near: float = 1e-4,
    max_candidates: int = 1 << 22,
) -> MeshRaster:
    """Rasterise the triangle mesh of depth maps ``[N, H, W]`` into target cameras.

    Args:
        depth: source z-depth ``[N, H, W]``; pixels with ``depth <= 0`` or non-finite are invalid.
        K_src, c2w_src: source cameras ``[N, 3, 3]``, ``[N, 4, 4]``; ``K_tgt``, ``c2w_tgt`` likewise.
        size: target ``(H, W)`` (the raster is ``supersample`` times larger).
        valid: optional ``[N, H, W]`` bool; triangles touching an invalid vertex are dropped.
        atol, rtol: depth-discontinuity tolerances (`depth_discontinuity`); ``None`` disables the test.
            A triangle whose vertices all touch a discontinuous triangle is an ``edge`` triangle.
        erode: a triangle whose vertices all lie within this many vertices (Chebyshev) of a
            discontinuity vertex is ``eroded`` (used to down-weight colours near edges).
        border: add a ring of vertices ``border`` pixels beyond the outermost pixel centres, with their
            depth (edge-replicated). The default 0.5 puts it on the image border, so the mesh covers whole
            pixels and an identity warp covers the whole image; larger values extend the image plane (the
            official forward pass pads by the image size); 0 disables it.
        near: triangles with a vertex closer than this to the target camera plane are dropped.
        max_candidates: candidate pixels processed at once (memory bound), a chunking knob only.

    Each kept triangle draws the pixel centres of its bounding box that fall inside it; a pixel keeps its
    nearest fragment. The number of candidate pixels is data, so the call reads it once to the host (one
    host-device synchronisation, `_candidate_chunks`); everything else stays on the device.
    """
    if supersample < 1:
        raise ValueError(f"supersample={supersample} must be a positive integer")
    N, H, W = depth.shape
    Ht, Wt = size
    ss = int(supersample)
    Hs, Ws = Ht * ss, Wt * ss
    dev = depth.device
    d = depth.float()
    ok = torch.isfinite(d) & (d > 0)
    if valid is not None:
        ok = ok & valid.bool()
    d = torch.where(ok, d, torch.ones_like(d))

    # ---- vertices (source pixel coordinates, source camera points, target screen coordinates)
    u = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
    v = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
    if border > 0:
        u = torch.cat([u.new_full((1,), 0.5 - border), u, u.new_full((1,), W - 0.5 + border)])
        v = torch.cat([v.new_full((1,), 0.5 - border), v, v.new_full((1,), H - 0.5 + border)])
        d = F.pad(d[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        ok = F.pad(ok[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0] > 0.5
    Hv, Wv = d.shape[-2:]
    P = Hv * Wv
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    src_uv = torch.stack([uu, vv], dim=-1).reshape(P, 2)  # [P, 2]
    Kinv = torch.linalg.inv(K_src.float())  # [N, 3, 3]
    uv1 = torch.cat([src_uv, torch.ones_like(src_uv[:, :1])], dim=-1)  # [P, 3]
    rays = torch.einsum("nij,pj->npi", Kinv, uv1)  # [N, P, 3] camera rays with z = 1
    d_flat = d.reshape(N, P)
    p_cam = rays * d_flat[..., None]  # [N, P, 3]
    p_world = transform_points(c2w_src.float(), p_cam)
    uv_t, z_t = project_points(p_world, K_tgt.float(), c2w_tgt.float())  # [N, P, 2], [N, P]
    uv_t = uv_t * ss

    # ---- triangles: two per 2x2 block of vertices, split along the shorter 3D diagonal
    idx = torch.arange(P, device=dev).reshape(Hv, Wv)
    a, b = idx[:-1, :-1].reshape(-1), idx[:-1, 1:].reshape(-1)
    c, e = idx[1:, :-1].reshape(-1), idx[1:, 1:].reshape(-1)  # e: the diagonal corner of a
    diag_ae = (p_cam[:, a] - p_cam[:, e]).norm(dim=-1) < (p_cam[:, b] - p_cam[:, c]).norm(dim=-1)  # [N, Q]
    A, B, C, E = (t.expand(N, -1) for t in (a, b, c, e))
    # both splits keep the same (counter-clockwise in pixel coordinates) orientation
    t1 = torch.stack([A, B, torch.where(diag_ae, E, C)], dim=-1)
    t2 = torch.stack([torch.where(diag_ae, A, B), E, C], dim=-1)
    faces = torch.cat([t1, t2], dim=1)  # [N, F, 3]
    Fn = faces.shape[1]
    nidx = torch.arange(N, device=dev)[:, None, None]

    fd = d_flat[nidx, faces]  # [N, F, 3] source depth at the vertices
    f_ok = ok.reshape(N, P)[nidx, faces].all(-1)
    edge = torch.zeros(N, Fn, dtype=torch.bool, device=dev)
    eroded = torch.zeros_like(edge)
    if atol is not None or rtol is not None:
        disc = (fd.amax(-1) - fd.amin(-1) > (atol or 0.0)) & ((1 / fd).amax(-1) - (1 / fd).amin(-1) > (rtol or 0.0))
        disc = disc & f_ok
        # vertices of discontinuous triangles (a scatter, not a boolean-mask index: no host synchronisation)
        hits = disc[..., None].expand(N, Fn, 3).reshape(N, -1).float()
        vflag = torch.zeros(N, P, device=dev).scatter_add_(1, faces.reshape(N, -1), hits) > 0
        edge = vflag[nidx, faces].all(-1)
        if erode > 0:
            k = 2 * erode + 1
            vero = F.max_pool2d(vflag.reshape(N, 1, Hv, Wv).float(), k, stride=1, padding=erode).reshape(N, P) > 0
            eroded = vero[nidx, faces].all(-1)

    fz = z_t[nidx, faces]  # [N, F, 3] target depth
    fp = uv_t[nidx, faces]  # [N, F, 3, 2] target screen (supersampled pixels)
    p0, p1, p2 = fp.unbind(-2)
    area = _cross2(p1[..., 0] - p0[..., 0], p1[..., 1] - p0[..., 1], p2[..., 0] - p0[..., 0], p2[..., 1] - p0[..., 1])
    x_lo = torch.ceil(fp[..., 0].amin(-1) - 0.5).clamp(0, Ws)
    x_hi = torch.floor(fp[..., 0].amax(-1) - 0.5).clamp(-1, Ws - 1)
    y_lo = torch.ceil(fp[..., 1].amin(-1) - 0.5).clamp(0, Hs)
    y_hi = torch.floor(fp[..., 1].amax(-1) - 0.5).clamp(-1, Hs - 1)
    wx = (x_hi - x_lo + 1).clamp_min(0)
    wy = (y_hi - y_lo + 1).clamp_min(0)
    finite = torch.isfinite(fp).all(-1).all(-1)
    keep = f_ok & (fz.amin(-1) > near) & (area.abs() > 1e-10) & (wx > 0) & (wy > 0) & finite
    # every triangle keeps its place (triangle t = scene t // F, face t % F); a dropped one has no candidate
    # pixels, so nothing is compacted by a data-dependent size
    T = N * Fn
    if T == 0:  # a mesh without triangles (a single row or column of vertices) covers nothing
        none = torch.zeros(N, Hs, Ws, dtype=torch.bool, device=dev)
        return MeshRaster(none.float(), none.float()[..., None].expand(N, Hs, Ws, 2), none, none, none, none, ss)
    # Per triangle, in the frame of its bounding box (whose pixel centres are at local (x + 0.5, y + 0.5)):
    # two barycentric weights as affine functions of the pixel, w_i = a_i x + b_i y + c_i (the local frame
    # keeps c_i small, so they are as accurate as differences to the vertices), and the vertices' inverse
    # depths; one float row per triangle, gathered once per candidate pixel
    q = fp.reshape(T, 3, 2) - torch.stack([x_lo, y_lo], -1).reshape(T, 1, 2)
    inv_a = 1.0 / area.reshape(T)
    (x0, y0), (x1, y1), (x2, y2) = q[:, 0].unbind(-1), q[:, 1].unbind(-1), q[:, 2].unbind(-1)
    tri_w = torch.stack(
        [(y1 - y2) * inv_a, (x2 - x1) * inv_a, _cross2(x1, y1, x2, y2) * inv_a,  # w0: opposite vertex 0
         (y2 - y0) * inv_a, (x0 - x2) * inv_a, _cross2(x2, y2, x0, y0) * inv_a,  # w1: opposite vertex 1
         *(1.0 / fz.reshape(T, 3)).unbind(-1)],
        dim=-1,
    )  # [T, 9]
    del q, x0, y0, x1, y1, x2, y2
    k_s = src_uv[faces.reshape(T, 3)]  # [T, 3, 2]
    # and the candidates: a triangle's bounding box, row-major from its first raster pixel ``origin``
    wx_k = torch.where(keep, wx, 0).reshape(T).long()
    n_cand = wx_k * torch.where(keep, wy, 0).reshape(T).long()  # [T] candidate pixels
    csum = torch.cumsum(n_cand, 0)
    origin = torch.arange(N, device=dev).repeat_interleave(Fn) * (Hs * Ws)  # the scene's first raster pixel
    origin += (y_lo.reshape(T) * Ws + x_lo.reshape(T)).long().clamp(0, Hs * Ws - 1)
    tri_box = torch.stack([csum - n_cand, wx_k.clamp_min(1), origin], -1)  # [T, 3]: first candidate, width, origin
    eps = -1e-5  # inside tolerance of the weights

    def weights(tri: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Of local pixel coordinates ``(x, y)`` in triangles ``tri``: inside, the barycentric weights
        ``[M, 3]`` and the vertices' inverse depths ``[M, 3]``."""
        c = tri_w.index_select(0, tri)  # [M, 9]
        fx, fy = x.float() + 0.5, y.float() + 0.5
        w0 = c[:, 0] * fx + c[:, 1] * fy + c[:, 2]
        w1 = c[:, 3] * fx + c[:, 4] * fy + c[:, 5]
        del fx, fy  # (the chunk's temporaries are its memory: each is freed as soon as it is used)
        w = torch.stack([w0, w1, 1.0 - w0 - w1], -1)
        del w0, w1
        return (w >= eps).all(-1), w, c[:, 6:]

    # z-buffer of (depth, triangle) pairs packed into one int64: a positive float32's bits order like the
    # float, so the minimum over a pixel's fragments is its nearest fragment (ties: the lower triangle
    # index) in one scatter; nothing per fragment is kept between chunks
    empty = torch.iinfo(torch.int64).max
    zbuf = torch.full((N * Hs * Ws,), empty, dtype=torch.int64, device=dev)
    # chunk the triangles so that at most ~max_candidates candidate pixels exist at once
    for lo, hi, first, M in _candidate_chunks(csum, max_candidates):
        tri = torch.repeat_interleave(torch.arange(lo, hi, device=dev), n_cand[lo:hi], output_size=M)  # [M]
        start, width, key = tri_box.index_select(0, tri).unbind(-1)
        local = torch.arange(first, first + M, device=dev) - start  # candidate pixel within its box ...
        y = local // width
        x = local - y * width
        del local, start
        key = key + y * Ws + x  # ... and in the raster
        inside, w, iz = weights(tri, x, y)
        del x, y
        z = torch.linalg.vecdot(w, iz).reciprocal_()  # perspective-correct depth
        del w, iz
        packed = (z.view(torch.int32).long() << 32).bitwise_or_(tri)
        packed.masked_fill_(~(inside & (z > 0)), empty)  # candidates outside their triangle never win
        del z, inside, tri
        zbuf.scatter_reduce_(0, key, packed, reduce="amin")
        del key, packed

    covered = zbuf != empty
    winner = torch.where(covered, zbuf & 0xFFFFFFFF, -1)
    zb = torch.where(covered, (zbuf >> 32).to(torch.int32).view(torch.float32), 0.0)
    # the winners' source coordinates, interpolated at their pixel centres as the fragments were
    wt = winner.clamp_min(0)
    rel = torch.arange(N * Hs * Ws, device=dev) - tri_box[:, 2].index_select(0, wt)  # inside the winner's box
    _, w, iz = weights(wt, rel % Ws, rel // Ws)
    wiz = w * iz
    s = torch.einsum("mk,mkc->mc", wiz, k_s[wt]) * (1.0 / wiz.sum(-1))[:, None]
    win_s = torch.where(covered[:, None], s, 0.0)
    front = covered & (area.reshape(T)[wt] > 0)
    edge_w = covered & edge.reshape(T)[wt]
    ero_w = covered & eroded.reshape(T)[wt]
    shp = (N, Hs, Ws)
    return MeshRaster(
        depth=zb.reshape(shp),
        src_uv=win_s.reshape(*shp, 2),
        covered=covered.reshape(shp),
        front=front.reshape(shp),
        edge=edge_w.reshape(shp),
        eroded=ero_w.reshape(shp),
        supersample=ss,
    )


def _sample_source(image: Tensor, src_uv: Tensor, mode: str) -> Tensor:
    """Sample ``image [N, C, H, W]`` at continuous pixel coordinates ``src_uv [N, h, w, 2]``."""
    H, W = image.shape[-2:]
    grid = pixels_to_grid(src_uv, H, W)
    return F.grid_sample(image.float(), grid, mode=mode, padding_mode="border", align_corners=False)


def _pool_subpixels(x: Tensor, ss: int) -> Tensor:
    """``[N, C, ss*H, ss*W]`` -> sum over each ss x ss block ``[N, C, H, W]``."""
    return F.avg_pool2d(x, ss, stride=ss) * (ss * ss) if ss > 1 else x


def _center_subpixel(x: Tensor, ss: int) -> Tensor:
    """``[N, C, ss*H, ss*W]`` -> the centre subpixel of each block (``ss`` odd), ``[N, C, H, W]``."""
    o = (ss - 1) // 2
    return x[..., o::ss, o::ss]


# depth given to empty pixels for the depth-edge test (the cleared z-buffer of the official renderer)
_EMPTY_DEPTH = 200.0


def forward_warp(
    image: Tensor,
    depth: Tensor,
    K_src: Tensor,
    c2w_src: Tensor,
    K_tgt: Tensor,
    c2w_tgt: Tensor,
    size: tuple[int, int] | None = None,
    *,
    valid: Tensor | None = None,
    supersample: int = 3,
    atol: float | None = 0.02,
    rtol: float | None = 0.02,
    coverage: float = 0.75,
    mode: str = "nearest",
    border: float = 0.5,
) -> RGBDWarp:
    """Forward-warp source views with their depth into target cameras (z-buffered mesh rasterisation).

    Args:
        image: ``[..., C, H, W]`` any per-pixel attributes (RGB in [-1, 1], features, ...).
        depth: ``[..., 1, H, W]`` source z-depth; ``<= 0`` marks invalid pixels.
        K_src, c2w_src, K_tgt, c2w_tgt: ``[..., 3, 3]``, ``[..., 4, 4]`` (OpenCV, pixels), same leading dims.
        size: target ``(H, W)``, default the source size.
        valid: optional ``[..., 1, H, W]`` source validity.
        supersample: odd rasterisation factor (3 as the official renderer). Depth is read at the centre
            subpixel, attributes are averaged over the visible subpixels, and a pixel is visible when
            more than ``coverage`` of its subpixels are.
        atol, rtol: depth-discontinuity tolerances for stretched triangles and the final depth-edge test
            (`depth_edges` on the warped depth); ``None`` for both disables both.
        mode: ``"nearest"`` (the official texture lookup) or ``"bilinear"`` source sampling.
        border: extension of the source mesh beyond the outermost pixel centres (`rasterize_depth_mesh`).

    Returns `RGBDWarp` with the leading dims of the input. Runs in float32 outside autocast.
    """
    if supersample % 2 != 1:
        raise ValueError(f"forward_warp(supersample={supersample}) must be odd so a centre subpixel exists")
    if depth.shape[-3] != 1 or depth.shape[:-3] != image.shape[:-3] or depth.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"forward_warp: depth must be [..., 1, H, W] matching image {list(image.shape)}, got {list(depth.shape)}")
    lead = image.shape[:-3]
    C, H, W = image.shape[-3:]
    Ht, Wt = size if size is not None else (H, W)
    ss = supersample
    dev_type = image.device.type
    with torch.autocast(dev_type, enabled=False):
        img = image.reshape(-1, C, H, W).float()
        n = img.shape[0]
        r = rasterize_depth_mesh(
            depth.reshape(n, H, W),
            K_src.reshape(n, 3, 3),
            c2w_src.reshape(n, 4, 4),
            K_tgt.reshape(n, 3, 3),
            c2w_tgt.reshape(n, 4, 4),
            (Ht, Wt),
            valid=None if valid is None else valid.reshape(n, H, W),
            supersample=ss,
            atol=atol,
            rtol=rtol,
            border=border,
        )
        vis = r.visible[:, None].float()  # [n, 1, Hs, Ws]
        col = _sample_source(img, r.src_uv, mode) * vis
        nvis = _pool_subpixels(vis, ss)
        out = _pool_subpixels(col, ss) / nvis.clamp_min(1.0)
        mask = nvis > coverage * ss * ss
        depth_raw = _center_subpixel(r.depth[:, None], ss)
        if atol is not None or rtol is not None:
            d_test = torch.where(depth_raw > 0, depth_raw, torch.full_like(depth_raw, _EMPTY_DEPTH))
            mask = mask & ~depth_edges(d_test, atol or 0.0, rtol or 0.0)
        maskf = mask.float()
        return RGBDWarp(
            image=(out * maskf).reshape(*lead, C, Ht, Wt),
            depth=(depth_raw * maskf).reshape(*lead, 1, Ht, Wt),
            mask=maskf.reshape(*lead, 1, Ht, Wt),
            depth_raw=depth_raw.reshape(*lead, 1, Ht, Wt),
        )
