"""Aggregated conditioning for iterative sampling (Xiang et al. 2023, Sec. "aggregated conditioning").

Each new view is conditioned on *all* previously generated RGBD views warped into it. Every previous view
is rasterised as a mesh into the new camera (its own z-buffer; views are not z-tested against each other,
as in the official renderer) and the views are blended per pixel with weights ``exp(-20 theta)``, where
``theta`` is the angle between the surface normal and the direction from the surface to that view's camera
(a surface seen head-on by a view trusts that view; grazing views count little). Official details kept:
weights clipped to ``[1e-4, 1]`` (``exp`` argument floored at -50); colours within ``erode`` vertices of a
depth discontinuity are down-weighted by 1e-8 (used only where nothing else covers the pixel); stretched
triangles (spanning a discontinuity) carry no colour, and their depth only enters ``depth_convex``, the
lower bound for the depth of hole pixels; depth is averaged in inverse depth (the z-buffer is affine in
1/z); masks need more than 75% subpixel coverage, the depth mask drops depth-edge pixels and the colour
mask is additionally eroded by a ``(2 erode - 1)`` square.

`guide_x0` / `guide_eps` implement the official sampler's use of the condition: known colour and depth
are blended into the predicted x0 at each DDIM step, and hole depth is pushed behind ``depth_convex``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from genvs.core.cameras import pivot_viewset
from genvs.core.diffusion import predict_x0_eps, prediction_target
from genvs.core.geometry import depth_edges, depth_normals, pixels_to_grid, rasterize_depth_mesh, unproject_depth
from genvs.methods.warping.augment import erode_mask
from genvs.methods.warping.depth import SAMPLE_FAR, SAMPLE_NEAR, normalize_depth
from genvs.methods.warping.network import WarpCondition

__all__ = ["view_weights", "aggregate_views", "guide_x0", "guide_eps", "guide_prediction", "viewset"]

_COLOR_EPS, _DEPTH_EPS = 1e-6, 1e-14  # weight thresholds for the colour / depth masks (official)
_ERODED, _EDGE = 1e-8, 1e-16  # weight factor near edges, weight of stretched triangles
_HOLE_DEPTH = 0.01  # depth of empty pixels for the depth-edge test (the official renderer's near plane)


def view_weights(depth: Tensor, K: Tensor, sharpness: float = 20.0) -> Tensor:
    """``exp(-sharpness * theta)`` per pixel of a view, ``[..., 1, H, W]``.

    ``theta`` is the angle between the surface normal (`depth_normals`) and the direction from the surface
    point to this view's camera; clipped to ``[1e-4, 1]`` (and ``exp`` argument at -50) as the official
    shader. It depends on the source view only, so it is computed once per view and warped along.
    """
    lead, (H, W) = depth.shape[:-3], depth.shape[-2:]
    d = depth.reshape(-1, 1, H, W).float()
    Kf = K.reshape(-1, 3, 3).float()
    n = depth_normals(d, Kf)  # [N, 3, H, W] camera frame, facing the camera
    p = unproject_depth(d[:, 0], Kf, torch.eye(4, device=d.device).expand(d.shape[0], 4, 4))  # [N, H, W, 3]
    to_cam = F.normalize(-p, dim=-1).permute(0, 3, 1, 2)
    cos = (n * to_cam).sum(1, keepdim=True).clamp(0.0, 1.0)
    w = torch.exp((-sharpness * torch.acos(cos)).clamp_min(-50.0)).clamp_min(1e-4)
    return w.reshape(*lead, 1, H, W)


def aggregate_views(
    images: Tensor,
    depths: Tensor,
    K: Tensor,
    c2w: Tensor,
    K_tgt: Tensor,
    c2w_tgt: Tensor,
    *,
    view_mask: Tensor | None = None,
    near: float = SAMPLE_NEAR,
    far: float = SAMPLE_FAR,
    sharpness: float = 20.0,
    atol: float = 0.03,
    rtol: float = 0.03,
    erode: int = 3,
    supersample: int = 3,
    coverage: float = 0.75,
) -> WarpCondition:
    """Warp and blend previous views into a new camera: the conditional model's condition.

    Args:
        images: ``[B, V, 3, H, W]`` previous views in [-1, 1]; ``depths`` ``[B, V, 1, H, W]`` their z-depth
            (decode generated normalised depth with `denormalize_depth` and the same ``near``/``far``).
        K, c2w: ``[B, V, 3, 3]``, ``[B, V, 4, 4]`` their cameras; ``K_tgt``, ``c2w_tgt``: ``[B, 3, 3]``,
            ``[B, 4, 4]`` the new view's.
        view_mask: optional ``[B, V]`` bool, which previous views exist (False = ignore).
        near, far: depth normalisation of the returned condition (official sampling: 0.6, 5).
        sharpness: the 20 of ``exp(-20 theta)``; atol, rtol: depth-discontinuity tolerances (0.03 at
            sampling); erode: colour erosion radius (3); supersample, coverage: as `forward_warp`.

    Returns a `WarpCondition` (normalised depth, ``depth_convex`` included).
    """
    B, V, C, H, W = images.shape
    if depths.shape != (B, V, 1, H, W):
        raise ValueError(f"aggregate_views: depths must be [B, V, 1, H, W] = {[B, V, 1, H, W]}, got {list(depths.shape)}")
    if supersample % 2 != 1:
        raise ValueError(f"aggregate_views(supersample={supersample}) must be odd")
    ss = supersample
    N = B * V
    with torch.autocast(images.device.type, enabled=False):
        dep = depths.reshape(N, H, W).float()
        Kv, Cv = K.reshape(N, 3, 3).float(), c2w.reshape(N, 4, 4).float()
        Kt = K_tgt.float()[:, None].expand(B, V, 3, 3).reshape(N, 3, 3)
        Ct = c2w_tgt.float()[:, None].expand(B, V, 4, 4).reshape(N, 4, 4)
        valid = None
        if view_mask is not None:
            valid = view_mask.reshape(N, 1, 1).expand(N, H, W).bool()
        r = rasterize_depth_mesh(
            dep, Kv, Cv, Kt, Ct, (H, W), valid=valid, supersample=ss, atol=atol, rtol=rtol, erode=erode
        )
        grid = pixels_to_grid(r.src_uv, H, W)  # [N, Hs, Ws, 2]
        col = F.grid_sample(images.reshape(N, C, H, W).float(), grid, mode="nearest", padding_mode="border", align_corners=False)
        wmap = view_weights(dep[:, None], Kv, sharpness)
        w = F.grid_sample(wmap, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]  # [N, Hs, Ws]
        w = torch.where(r.eroded, w * _ERODED, w)
        w = torch.where(r.edge, torch.full_like(w, _EDGE), w)
        w = torch.where(r.covered & r.front, w, torch.zeros_like(w))
        Hs, Ws = H * ss, W * ss
        w = w.reshape(B, V, 1, Hs, Ws)
        col = col.reshape(B, V, C, Hs, Ws)
        z = r.depth.reshape(B, V, 1, Hs, Ws)

        wsum = w.sum(1)  # [B, 1, Hs, Ws]
        color_hi = (w * col).sum(1) / wsum.clamp_min(1e-30)
        tier1 = w > _DEPTH_EPS
        n1 = tier1.sum(1)
        disp1 = torch.where(tier1, 1.0 / z.clamp_min(1e-6), torch.zeros_like(z)).sum(1) / n1.clamp_min(1)
        tier2 = (w > 0) & ~tier1
        z2 = torch.where(tier2, z, torch.zeros_like(z)).amax(1)  # stretched surfaces only: the farthest
        depth_hi = torch.where(n1 > 0, 1.0 / disp1.clamp_min(1e-12), z2)
        mask_depth_hi = (n1 > 0).float()
        mask_color_hi = (w > _COLOR_EPS).any(1).float()

        # down to the target resolution
        has_col = (wsum > 0).float()
        n_col = F.avg_pool2d(has_col, ss) * ss * ss
        color = F.avg_pool2d(color_hi * has_col, ss) * ss * ss / n_col.clamp_min(1)
        o = (ss - 1) // 2
        depth = depth_hi[..., o::ss, o::ss]
        mask = F.avg_pool2d(mask_depth_hi, ss) > coverage
        mask_rgb = F.avg_pool2d(mask_color_hi, ss) > coverage
        d_test = torch.where(depth > 0, depth, torch.full_like(depth, _HOLE_DEPTH))
        mask = mask & ~depth_edges(d_test, atol, rtol)
        maskf = mask.float()
        mask_rgb = mask_rgb.float() * erode_mask(maskf, max(1, 2 * erode - 1))
        return WarpCondition(
            rgb=color * mask_rgb,
            depth=normalize_depth(depth, near, far) * maskf,
            mask_rgb=mask_rgb,
            mask=maskf,
            depth_convex=normalize_depth(depth, near, far),  # 0 depth (nothing drawn) -> -1: no constraint
        )


def guide_x0(
    x0: Tensor,
    cond: WarpCondition,
    *,
    rgb_weight: float = 0.1,
    depth_weight: float = 0.2,
    convex_weight: float = 0.5,
    last_step: bool = False,
) -> Tensor:
    """The official sampler's conditioning of the predicted clean RGBD ``x0 [B, 4, H, W]``.

    Inside ``mask_rgb`` the colour moves ``rgb_weight`` of the way to the condition (not at the last step);
    inside ``mask`` the depth moves ``depth_weight`` of the way; in holes, depth moves ``convex_weight`` of
    the way to ``max(depth, depth_convex)`` (new content lies behind the previous views' stretched surfaces).
    """
    rgb, d = x0[:, :3], x0[:, 3:]
    m_rgb, m = cond.mask_rgb.to(x0.dtype), cond.mask.to(x0.dtype)
    if not last_step and rgb_weight > 0:
        rgb = (rgb_weight * cond.rgb + (1 - rgb_weight) * rgb) * m_rgb + rgb * (1 - m_rgb)
    if depth_weight > 0:
        d = (depth_weight * cond.depth + (1 - depth_weight) * d) * m + d * (1 - m)
        if convex_weight > 0 and cond.depth_convex is not None:
            d = d * m + (convex_weight * torch.maximum(d, cond.depth_convex) + (1 - convex_weight) * d) * (1 - m)
    return torch.cat([rgb, d], dim=1)


def guide_eps(eps: Tensor, z: Tensor, logsnr: Tensor, cond: WarpCondition, *, last_step: bool = False, **weights) -> Tensor:
    """`guide_x0` for an eps-prediction model inside a genvs `Sampler` loop: eps -> x0 -> guided x0 -> eps.

    Returning this eps from the sampler's ``model_fn`` makes a DDIM step use the guided x0 exactly as the
    official sampler does (both its x0 and its eps are recomputed from the guided x0).
    """
    return guide_prediction(eps, z, logsnr, cond, "eps", last_step=last_step, **weights)


def guide_prediction(
    pred: Tensor, z: Tensor, logsnr: Tensor, cond: WarpCondition, kind: str = "eps", *, last_step: bool = False, **weights
) -> Tensor:
    """`guide_eps` for any parameterisation (``eps``, ``v``, ``x0``): the prediction whose x0 is the
    guided x0 and whose eps is consistent with it and ``z``."""
    x0, _ = predict_x0_eps(pred, z, logsnr, kind)
    x0 = guide_x0(x0, cond, last_step=last_step, **weights)
    a = torch.sigmoid(logsnr.float()).sqrt().view(-1, 1, 1, 1)
    s = torch.sigmoid(-logsnr.float()).sqrt().view(-1, 1, 1, 1)
    eps = (z.float() - a * x0) / s
    return prediction_target(x0, eps, logsnr.float(), kind).to(pred.dtype)


def viewset(kind: str = "3x9", step: float = 0.15) -> Tensor:
    """Camera sets of the official sampling script, OpenCV c2w ``[V, 4, 4]`` relative to the first view.

    ``"3x9"``: yaws 0, +-0.15, ..., +-0.6 and pitches 0, +-0.15 (27 views, generation order as official:
    yaw-major, 0 first then alternating sides), orbiting the pivot 1 unit ahead at radius 1
    (`genvs.core.cameras.pivot_viewset`, which also has a ``swing`` loop and a ``sweep``).
    """
    if kind != "3x9":
        raise ValueError(f"viewset({kind!r}): only '3x9' is defined; see genvs.core.cameras.pivot_viewset")
    return pivot_viewset("3x9", step=step)
