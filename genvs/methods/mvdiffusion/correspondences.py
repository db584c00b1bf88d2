"""Pixel correspondences between views, computed once per sample at every UNet resolution.

A correspondence-aware attention (CAA) block lets every pixel ``s`` of a query view attend to a few
*keys* in other views. Keys are grouped by source view: ``J`` source views per query view, ``S`` samples
in each (the ``k x k`` neighbourhood around the corresponding location, ``S = k^2``). For every UNet
feature size ``(h, w)`` a `LevelCorrespondence` holds, vectorised over batch, views and pixels:

- ``src [B, V, J]``: which view each key group is read from;
- ``grid [B, V, J, S, h, w, 2]``: where to read it (``grid_sample`` coordinates, ``align_corners=False``);
- ``pe [B, V, J, S, h, w, D]``: what the key's positional encoding encodes (panorama: the displacement
  ``D = 2`` between the neighbour mapped back into the query view and the query pixel, in query pixels;
  depth: ``D = 1`` log-ratio of the query point's depth in the source camera to the source depth there);
- ``mask [B, V, J, S, h, w]``: which keys exist (inside the source image, in front of it, valid depth).

Two constructors: `homography_correspondences` (cameras sharing a centre: the panorama ring, with
``H = K_j R_j^T R_i K_i^-1``) and `depth_correspondences` (z-depth + poses: unproject, project).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from genvs.core.cameras import pixel_centers, scale_intrinsics
from genvs.core.geometry import apply_homography, pixels_to_grid, project_points, rotation_homography, unproject_depth

__all__ = [
    "LevelCorrespondence",
    "Correspondences",
    "ring_neighbors",
    "axis_neighbors",
    "neighborhood_offsets",
    "homography_correspondences",
    "pair_overlap",
    "overlap_neighbors",
    "depth_correspondences",
]


@dataclass
class LevelCorrespondence:
    """Keys of every query pixel at one feature size (see the module docstring for the shapes)."""

    src: Tensor  # [B, V, J] long
    grid: Tensor  # [B, V, J, S, h, w, 2]
    pe: Tensor  # [B, V, J, S, h, w, D]
    mask: Tensor  # [B, V, J, S, h, w] bool

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.grid.shape[-3:-1])  # type: ignore[return-value]

    @property
    def B(self) -> int:
        return self.src.shape[0]

    def _map(self, fn) -> "LevelCorrespondence":
        return LevelCorrespondence(*(fn(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def to(self, device=None) -> "LevelCorrespondence":
        return self._map(lambda t: t.to(device))

    def repeat(self, n: int) -> "LevelCorrespondence":
        """The batch repeated ``n`` times (``cat([self] * n)``, e.g. for classifier-free guidance)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.ndim - 1))))

    def for_batch(self, B: int) -> "LevelCorrespondence":
        """Broadcast a batch of ``b`` (1 for shared geometry) to ``B``, a multiple of ``b``."""
        if self.B == B:
            return self
        if B % self.B:
            raise ValueError(f"correspondences for a batch of {self.B} cannot serve a batch of {B}")
        return self.repeat(B // self.B)


@dataclass
class Correspondences:
    """`LevelCorrespondence` per feature size ``(h, w)``."""

    levels: dict[tuple[int, int], LevelCorrespondence]
    kind: str = "homography"

    def __getitem__(self, size: tuple[int, int]) -> LevelCorrespondence:
        size = tuple(size)
        if size not in self.levels:
            raise KeyError(
                f"no correspondences for features of size {size}; computed for {sorted(self.levels)}. Compute them "
                "for MultiViewUNet.feature_sizes(latent_size) of the latents you denoise"
            )
        return self.levels[size]

    @property
    def B(self) -> int:
        return next(iter(self.levels.values())).B

    def to(self, device=None) -> "Correspondences":
        return Correspondences({k: v.to(device) for k, v in self.levels.items()}, self.kind)

    def repeat(self, n: int) -> "Correspondences":
        return Correspondences({k: v.repeat(n) for k, v in self.levels.items()}, self.kind)

    def select(self, idx: Tensor | Sequence[int]) -> "Correspondences":
        """Samples ``idx`` of the batch."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Correspondences({k: v._map(lambda t: t[idx.to(t.device)]) for k, v in self.levels.items()}, self.kind)


def ring_neighbors(num_views: int, hops: int = 1, device=None) -> Tensor:
    """``[V, 2 hops]`` the views ``i - hops .. i - 1, i + 1 .. i + hops`` (mod V) of a closed ring."""
    i = torch.arange(num_views, device=device)[:, None]
    d = torch.cat([torch.arange(-hops, 0), torch.arange(1, hops + 1)]).to(i.device)
    return (i + d) % num_views


def axis_neighbors(c2w: Tensor, num: int = 2) -> Tensor:
    """``[B, V, num]`` for every view the ``num`` other views whose optical axes are closest to its own
    (sorted by view index). For the 8-view panorama ring these are its two ring neighbours ``i +- 1``,
    whatever order the views come in."""
    B, V = c2w.shape[:2]
    if not 0 < num < V:
        raise ValueError(f"axis_neighbors: num={num} must lie in [1, V-1={V - 1}]")
    z = c2w[..., :3, 2].float()  # optical axes [B, V, 3]
    cos = z @ z.transpose(1, 2)
    cos = cos - 3.0 * torch.eye(V, device=c2w.device)  # never oneself
    return cos.topk(num, dim=-1).indices.sort(dim=-1).values


def neighborhood_offsets(kernel_size: int, device=None) -> Tensor:
    """``[k^2, 2]`` integer ``(dx, dy)`` offsets of a ``k x k`` neighbourhood (row-major, centre included)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size} must be odd and positive")
    r = torch.arange(kernel_size, device=device, dtype=torch.float32) - kernel_size // 2
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dx, dy], dim=-1).reshape(-1, 2)


def _per_view_neighbors(neighbors: Tensor | None, B: int, V: int, device) -> Tensor:
    if neighbors is None:
        neighbors = ring_neighbors(V, device=device)
    neighbors = torch.as_tensor(neighbors, dtype=torch.long)
    if neighbors.ndim == 2:
        neighbors = neighbors.expand(B, -1, -1)
    if neighbors.shape[:2] != (B, V) or neighbors.ndim != 3:
        raise ValueError(f"neighbors must be [V, J] or [B, V, J] with V={V}, got {list(neighbors.shape)}")
    # checked where it is free (on the host): a device check would synchronise every training step
    if neighbors.device.type == "cpu" and (neighbors == torch.arange(V)[None, :, None]).any():
        raise ValueError("neighbors lists a view as its own neighbour; CAA reads keys from *other* views")
    return neighbors.to(device)


def _gather_views(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, V, ...]`` at ``idx [B, V, J]`` -> ``[B, V, J, ...]``."""
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[b, idx]


@torch.no_grad()
def homography_correspondences(
    K: Tensor,
    c2w: Tensor,
    image_size: tuple[int, int],
    sizes: Sequence[tuple[int, int]],
    neighbors: Tensor | None = None,
    kernel_size: int = 3,
) -> Correspondences:
    """Correspondences of cameras sharing a centre (panorama ring), by homography.

    Args:
        K: ``[B, V, 3, 3]`` intrinsics in pixels of the ``image_size`` images.
        c2w: ``[B, V, 4, 4]`` OpenCV camera-to-world (only rotations are used).
        sizes: feature sizes ``(h, w)`` to compute (e.g. `MultiViewUNet.feature_sizes`).
        neighbors: ``[V, J]`` or ``[B, V, J]`` source views of each view (default: the two ring neighbours).
        kernel_size: ``k`` of the ``k x k`` neighbourhood read around each correspondence (3 in the paper).

    For a query pixel ``s`` of view ``i`` and source view ``j``: ``t = H_ij s``; the keys sit at
    ``t* = t + (dx, dy)`` (one feature pixel apart); a key exists when ``t*`` lies inside view ``j`` and
    the ray is in front of both cameras; its encoding input is ``H_ji t* - s`` (query feature pixels).
    """
    H_img, W_img = image_size
    B, V = K.shape[:2]
    device = K.device
    K, c2w = K.float(), c2w.float()
    nb = _per_view_neighbors(neighbors, B, V, device)  # [B, V, J]
    J = nb.shape[-1]
    off = neighborhood_offsets(kernel_size, device)  # [S, 2]
    S = off.shape[0]
    levels = {}
    for h, w in dict.fromkeys(tuple(s) for s in sizes):
        Kl = scale_intrinsics(K, w / W_img, h / H_img)  # [B, V, 3, 3]
        Kq, cq = Kl[:, :, None].expand(B, V, J, 3, 3), c2w[:, :, None].expand(B, V, J, 4, 4)
        Ks, cs = _gather_views(Kl, nb), _gather_views(c2w, nb)  # [B, V, J, ...]
        H_qs = rotation_homography(Kq, cq, Ks, cs)  # query -> source
        H_sq = rotation_homography(Ks, cs, Kq, cq)  # source -> query
        uv_q = pixel_centers(h, w, device=device).reshape(1, 1, 1, h * w, 2)
        t, w_fwd = apply_homography(H_qs, uv_q.expand(B, V, J, h * w, 2))  # [B, V, J, hw, 2]
        t_star = t[:, :, :, None] + off[None, None, None, :, None]  # [B, V, J, S, hw, 2]
        back, w_back = apply_homography(H_sq[:, :, :, None], t_star)
        disp = back - uv_q[:, :, :, None]
        inside = (t_star[..., 0] > 0) & (t_star[..., 0] < w) & (t_star[..., 1] > 0) & (t_star[..., 1] < h)
        mask = inside & (w_fwd[:, :, :, None] > 0) & (w_back > 0)
        grid = pixels_to_grid(t_star, h, w)
        shape = (B, V, J, S, h, w)
        levels[(h, w)] = LevelCorrespondence(
            src=nb,
            grid=grid.reshape(*shape, 2),
            pe=torch.where(mask[..., None], disp, torch.zeros_like(disp)).reshape(*shape, 2),
            mask=mask.reshape(shape),
        )
    return Correspondences(levels, kind="homography")


# --------------------------------------------------------------------------------------- depth


def _depth_at(depth: Tensor, size: tuple[int, int]) -> Tensor:
    """``[..., 1, H, W]`` z-depth read at the pixel centres of an ``(h, w)`` grid (nearest) -> ``[..., h, w]``."""
    lead = depth.shape[:-3]
    d = F.interpolate(depth.reshape(-1, 1, *depth.shape[-2:]).float(), size=size, mode="nearest-exact")
    return d.reshape(*lead, *size)


@torch.no_grad()
def pair_overlap(K: Tensor, c2w: Tensor, depth: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """``[B, V, V]`` fraction of view ``i``'s pixels that land inside view ``j`` (with valid depth, in front).

    Computed at ``size`` (default: the depth maps' size / 8). ``K`` is in pixels of the depth maps.
    """
    B, V = K.shape[:2]
    H, W = depth.shape[-2:]
    h, w = size if size is not None else (max(H // 8, 1), max(W // 8, 1))
    Kl = scale_intrinsics(K.float(), w / W, h / H)
    d = _depth_at(depth, (h, w))  # [B, V, h, w]
    X = unproject_depth(d, Kl, c2w.float()).reshape(B, V, 1, h * w, 3)
    uv, z = project_points(X, Kl[:, None], c2w.float()[:, None])  # [B, V(i), V(j), hw]
    inside = (uv[..., 0] >= 0) & (uv[..., 0] < w) & (uv[..., 1] >= 0) & (uv[..., 1] < h)
    ok = inside & (z > 1e-6) & (d.reshape(B, V, 1, h * w) > 0)
    return ok.float().mean(-1)


def overlap_neighbors(overlap: Tensor, threshold: float = 0.3) -> tuple[Tensor, Tensor]:
    """Which views each view attends to in the depth pipeline, as in the official code: pairs whose
    symmetric overlap ``min(o_ij, o_ji)`` exceeds ``threshold``; a view with none falls back to its
    neighbours in the sequence (``i - 1``, ``i + 1``).

    Returns ``src [B, V, V-1]`` (all other views, in order) and ``pair_ok [B, V, V-1]`` bool.
    """
    B, V, _ = overlap.shape
    device = overlap.device
    sym = torch.minimum(overlap, overlap.transpose(1, 2))
    eye = torch.eye(V, dtype=torch.bool, device=device)
    ok = (sym > threshold) & ~eye
    i = torch.arange(V, device=device)
    seq = (i[:, None] - i[None, :]).abs() == 1  # [V, V] sequence neighbours
    none = ~ok.any(-1, keepdim=True)  # [B, V, 1]
    ok = torch.where(none, seq.expand(B, V, V), ok)
    others = torch.stack([torch.cat([i[:v], i[v + 1 :]]) for v in range(V)]) if V > 1 else i[:, None][:, :0]
    src = others.expand(B, V, V - 1)
    return src, torch.gather(ok, 2, src)


@torch.no_grad()
def depth_correspondences(
    K: Tensor,
    c2w: Tensor,
    depth: Tensor,
    sizes: Sequence[tuple[int, int]],
    overlap_threshold: float = 0.3,
    kernel_size: int = 1,
    src: Tensor | None = None,
    pair_ok: Tensor | None = None,
) -> Correspondences:
    """Correspondences from z-depth and poses (depth-to-image).

    Args:
        K: ``[B, V, 3, 3]`` intrinsics in pixels of the depth maps; c2w ``[B, V, 4, 4]``.
        depth: ``[B, V, 1, H, W]`` z-depth, 0 where unknown.
        sizes: feature sizes ``(h, w)``.
        overlap_threshold: view pairs with less symmetric overlap are not attended (`overlap_neighbors`).
        kernel_size: neighbourhood read around each correspondence (1 = one key per source view, as in
            the official depth model).
        src, pair_ok: override the source views ``[B, V, J]`` and their validity.

    A query pixel with depth ``d`` is unprojected, projected into source view ``j`` at ``t`` with depth
    ``z``; the key at ``t* = t + (dx, dy)`` exists when ``t*`` is inside view ``j``, both depths are valid
    and the pair overlaps; its encoding input is ``log(z / D_j(t*))`` (0 when the point is what view ``j``
    sees there, > 0 when it is hidden behind it).
    """
    B, V = K.shape[:2]
    H_img, W_img = depth.shape[-2:]
    if depth.shape[:3] != (B, V, 1):
        raise ValueError(f"depth must be [B, V, 1, H, W] with B={B}, V={V}, got {list(depth.shape)}")
    device = K.device
    K, c2w, depth = K.float(), c2w.float(), depth.float()
    if src is None:
        src, ok = overlap_neighbors(pair_overlap(K, c2w, depth), overlap_threshold)
        pair_ok = ok if pair_ok is None else pair_ok
    elif pair_ok is None:
        pair_ok = torch.ones(src.shape, dtype=torch.bool, device=device)
    J = src.shape[-1]
    off = neighborhood_offsets(kernel_size, device)
    S = off.shape[0]
    depth_src = _gather_views(depth, src).reshape(B * V * J, 1, H_img, W_img)
    levels = {}
    for h, w in dict.fromkeys(tuple(s) for s in sizes):
        Kl = scale_intrinsics(K, w / W_img, h / H_img)
        d_q = _depth_at(depth, (h, w))  # [B, V, h, w]
        X = unproject_depth(d_q, Kl, c2w).reshape(B, V, 1, h * w, 3)
        t, z = project_points(X, _gather_views(Kl, src), _gather_views(c2w, src))  # [B, V, J, hw, (2)]
        t_star = t[:, :, :, None] + off[None, None, None, :, None]  # [B, V, J, S, hw, 2]
        grid = pixels_to_grid(t_star, h, w)
        d_s = F.grid_sample(
            depth_src, grid.reshape(B * V * J, S * h * w, 1, 2), mode="nearest", align_corners=False
        ).reshape(B, V, J, S, h * w)
        inside = (t_star[..., 0] > 0) & (t_star[..., 0] < w) & (t_star[..., 1] > 0) & (t_star[..., 1] < h)
        zq = z[:, :, :, None].expand_as(d_s)
        valid_q = d_q.reshape(B, V, 1, 1, h * w) > 0
        mask = inside & (zq > 1e-6) & (d_s > 0) & valid_q & pair_ok[..., None, None]
        ratio = torch.log(zq.clamp_min(1e-6) / d_s.clamp_min(1e-6))
        shape = (B, V, J, S, h, w)
        levels[(h, w)] = LevelCorrespondence(
            src=src,
            grid=grid.reshape(*shape, 2),
            pe=torch.where(mask, ratio, torch.zeros_like(ratio)).reshape(*shape, 1),
            mask=mask.reshape(shape),
        )
    return Correspondences(levels, kind="depth")
