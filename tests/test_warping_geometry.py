"""RGBD forward warping (`genvs.core.geometry.forward_warp`) against an independent computation.

Procedural scenes (a tilted plane and two spheres) are ray-cast analytically, so depth and colour are
known exactly in every camera. The forward warp of the source view must agree on visible pixels with the
analytic target view and with kornia's backward warp driven by the *target* depth, and its mask must be
zero where the analytic scene says the target pixel is hidden from the source camera (disocclusions).
"""

import math

import kornia
import pytest
import torch
import torch.nn.functional as F

from genvs.core.cameras import camera_rays, intrinsics_from_fov, look_at
from genvs.core.geometry import (
    depth_edges,
    depth_normals,
    forward_warp,
    project_points,
    rasterize_depth_mesh,
    unproject_depth,
    world_to_camera,
)

H = W = 40


SPHERES = [((0.0, 0.0, 1.6), 0.45), ((-0.35, 0.25, 1.1), 0.15)]


def _plane_t(o, d):  # plane z = 3 + 0.3 x
    return (3.0 + 0.3 * o[..., 0] - o[..., 2]) / (d[..., 2] - 0.3 * d[..., 0])


def raycast(o: torch.Tensor, d: torch.Tensor, spheres=SPHERES, plane=True) -> torch.Tensor:
    """Nearest hit parameter ``t`` along rays ``o + t d`` (inf if none)."""
    t = _plane_t(o, d) if plane else torch.full(o.shape[:-1], float("inf"), dtype=o.dtype)
    t = torch.where(t > 1e-6, t, torch.full_like(t, float("inf")))
    for c, r in spheres:
        oc = o - torch.tensor(c, dtype=o.dtype)
        a = (d * d).sum(-1)
        b = 2 * (oc * d).sum(-1)
        cc = (oc * oc).sum(-1) - r * r
        disc = b * b - 4 * a * cc
        ts = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
        ts = torch.where((disc > 0) & (ts > 1e-6), ts, torch.full_like(ts, float("inf")))
        t = torch.minimum(t, ts)
    return t


def texture(p: torch.Tensor) -> torch.Tensor:
    """Smooth view-independent colour of world points ``[..., 3]`` -> ``[..., 3]`` in [-1, 1]."""
    k = torch.arange(3, dtype=p.dtype)
    return 0.8 * torch.sin(3.0 * p[..., :1] + 2.0 * p[..., 1:2] + 1.3 * p[..., 2:3] + 2.1 * k)


def render(K, c2w, spheres=SPHERES, plane=True):
    """Analytic RGB ``[3, H, W]`` and z-depth ``[1, H, W]`` of the scene."""
    o, d = camera_rays(K, c2w, H, W, normalize=False)  # camera z of d is 1: t is z-depth
    t = raycast(o.double(), d.double(), spheres, plane)
    p = o.double() + t[..., None] * d.double()
    return texture(p).permute(2, 0, 1).float(), t[None].float()


def orbit(yaw: float, pitch: float = 0.0, pivot=(0.0, 0.0, 1.6)) -> torch.Tensor:
    pv = torch.tensor(pivot)
    r = pv[2]
    eye = pv + r * torch.tensor([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), -math.cos(yaw) * math.cos(pitch)])
    return look_at(eye, pv, up=torch.tensor([0.0, -1.0, 0.0]))


@pytest.fixture(scope="module")
def K():
    return intrinsics_from_fov(45.0, H, W)


def reference_visibility(K, c2w_tgt, depth_tgt):
    """For each target pixel: is its surface point seen by the source camera (identity pose)?

    Returns (visible, hidden): ``visible`` within 0.1% along the source ray, ``hidden`` clearly not
    (occluded by more than 3% of its distance, or projecting at least a pixel outside the source image).
    """
    X = unproject_depth(depth_tgt[0].double(), K.double(), c2w_tgt.double())  # [H, W, 3] world
    uv, z = project_points(X.reshape(-1, 3), K.double(), torch.eye(4, dtype=torch.float64))
    o = torch.zeros_like(X)
    dist = X.norm(dim=-1)
    t_hit = raycast(o, X / dist[..., None])
    inside = ((uv >= 0) & (uv <= W)).all(-1).reshape(H, W)
    inside_margin = ((uv >= 1) & (uv <= W - 1)).all(-1).reshape(H, W)
    outside_margin = ((uv < -1) | (uv > W + 1)).any(-1).reshape(H, W)
    visible = inside & ((t_hit - dist).abs() < 1e-3 * dist)
    hidden = outside_margin | (inside_margin & (t_hit < dist * 0.97))
    return visible, hidden


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x[None, None].float(), k, 1, k // 2)[0, 0] > 0.5


@pytest.mark.parametrize("tol", [0.02, 0.05])
def test_forward_warp_matches_analytic_and_backward_warp(K, tol):
    I = torch.eye(4)
    rgb_s, dep_s = render(K, I)
    c2w_t = orbit(0.3, 0.1)
    rgb_t, dep_t = render(K, c2w_t)
    out = forward_warp(rgb_s, dep_s, K, I, K, c2w_t, supersample=3, atol=tol, rtol=tol)
    m = out.mask[0] > 0.5
    visible, hidden = reference_visibility(K, c2w_t, dep_t)
    assert hidden.sum() > 60, "the scene must contain disocclusions for this test to mean anything"

    # the mask marks disocclusions: no pixel hidden from the source camera is visible in the warp
    assert not (m & hidden).any()
    assert not (m & ~visible).any()
    # and keeps the pixels the source sees, away from the frame border and from depth edges (at this
    # resolution grazing sphere rims fail the discontinuity test by design) in either view
    X = unproject_depth(dep_t[0].double(), K.double(), c2w_t.double())
    uv, _ = project_points(X.reshape(-1, 3), K.double(), torch.eye(4, dtype=torch.float64))
    ij = uv.floor().long().clamp(0, W - 1)
    near_src_edge = _dilate(depth_edges(dep_s, tol, tol)[0], 5)[ij[:, 1], ij[:, 0]].reshape(H, W)
    interior = ~_dilate(~visible, 5) & ~near_src_edge & ~_dilate(depth_edges(dep_t, tol, tol)[0], 3)
    assert interior.sum() > 200
    recall = (m & interior).sum() / interior.sum()
    assert recall > 0.97, f"mask keeps only {recall:.3f} of the clearly visible pixels"

    # warped depth is the target camera's z-depth of the surface (planar triangles on spheres: < 1%)
    rel = ((out.depth[0] - dep_t).abs() / dep_t)[0][m]
    assert rel.max() < 0.01 and rel.mean() < 2e-3, (rel.max(), rel.mean())

    # warped colour agrees with the analytic target colour ...
    err_gt = (out.image - rgb_t).abs().mean(0)[m]
    assert err_gt.mean() < 0.03 and err_gt.quantile(0.95) < 0.08, (err_gt.mean(), err_gt.quantile(0.95))
    # ... and with kornia's backward warp driven by the target depth (integer pixel centres there)
    Kk = K.clone()
    Kk[:2, 2] -= 0.5
    src_trans_dst = world_to_camera(I) @ c2w_t
    back = kornia.geometry.depth.warp_frame_depth(rgb_s[None], dep_t[None], src_trans_dst[None], Kk[None])[0]
    err_bw = (out.image - back).abs().mean(0)[m & interior]
    assert err_bw.mean() < 0.03 and err_bw.quantile(0.95) < 0.08, (err_bw.mean(), err_bw.quantile(0.95))
    # bilinear sampling is closer still
    out_bl = forward_warp(rgb_s, dep_s, K, I, K, c2w_t, atol=tol, rtol=tol, mode="bilinear")
    assert torch.equal(out_bl.mask, out.mask)
    err_bl = (out_bl.image - back).abs().mean(0)[m & interior]
    assert err_bl.mean() < err_bw.mean()


def test_identity_warp_is_exact_without_holes(K):
    I = torch.eye(4)
    rgb, dep = render(K, I, spheres=[((0.0, 0.0, 2.0), 1.2)], plane=False)  # one big sphere: no depth edges
    assert (dep < 100).all()
    out = forward_warp(rgb, dep, K, I, K, I)
    assert out.mask.min() == 1.0
    torch.testing.assert_close(out.image, rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.depth, dep, atol=0, rtol=1e-5)
    # with depth edges, only pixels at the source's depth edges are masked: the edge pixels themselves
    # and the band of stretched triangles next to them
    rgb, dep = render(K, I)
    out = forward_warp(rgb, dep, K, I, K, I, atol=0.02, rtol=0.02)
    m = out.mask[0] > 0.5
    edges = depth_edges(dep, 0.02, 0.02)[0]
    assert not (m & edges).any()
    assert not (~m & ~_dilate(edges, 3)).any()
    assert m.float().mean() > 0.6
    torch.testing.assert_close(out.image * out.mask, rgb * out.mask, atol=1e-6, rtol=0)


def test_stretched_triangles_occlude_but_are_not_visible(K):
    """A foreground square in front of a far plane: a sideways move opens a gap the mesh bridges with
    stretched triangles; the gap is not visible, but the stretched triangles are drawn (depth_raw)."""
    I = torch.eye(4)
    dep = torch.full((1, H, W), 4.0)
    dep[:, 12:28, 12:28] = 1.0
    rgb = torch.zeros(3, H, W)
    rgb[:, 12:28, 12:28] = 1.0
    c2w_t = I.clone()
    c2w_t[0, 3] = 0.2  # move right: the square moves left in the image, a gap opens on its right
    out = forward_warp(rgb, dep, K, I, K, c2w_t)
    f = K[0, 0].item()
    shift_fg, shift_bg = f * 0.2 / 1.0, f * 0.2 / 4.0  # pixels
    gap = slice(int(28 - shift_fg) + 1, int(28 - shift_bg) - 1)
    assert gap.stop - gap.start >= 2
    rows = slice(14, 26)
    assert out.mask[0, rows, gap].sum() == 0
    raw = out.depth_raw[0, rows, gap]
    assert ((raw > 1.0) & (raw < 4.0)).all()  # the bridge between the two depths was rasterised


def test_batched_over_scenes_and_views_equals_single_calls(K):
    I = torch.eye(4)
    rgb, dep = render(K, I)
    cams = torch.stack([orbit(a, b) for a, b in [(0.2, 0.0), (-0.25, 0.1), (0.1, -0.2), (0.0, 0.0)]]).reshape(2, 2, 4, 4)
    img = torch.stack([rgb, rgb.flip(-1), rgb * 0.5, -rgb]).reshape(2, 2, 3, H, W)
    dd = torch.stack([dep, dep.flip(-1), dep, dep * 1.1]).reshape(2, 2, 1, H, W)
    Kb = K.expand(2, 2, 3, 3)
    Ib = I.expand(2, 2, 4, 4)
    out = forward_warp(img, dd, Kb, Ib, Kb, cams)
    assert out.image.shape == (2, 2, 3, H, W) and out.mask.shape == (2, 2, 1, H, W)
    for b in range(2):
        for v in range(2):
            one = forward_warp(img[b, v], dd[b, v], K, I, K, cams[b, v])
            torch.testing.assert_close(out.image[b, v], one.image)
            torch.testing.assert_close(out.depth[b, v], one.depth)
            assert torch.equal(out.mask[b, v], one.mask)


def test_forward_warp_under_bf16_autocast_is_float32(K):
    I = torch.eye(4)
    rgb, dep = render(K, I)
    c2w_t = orbit(0.2)
    ref = forward_warp(rgb, dep, K, I, K, c2w_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward_warp(rgb, dep, K, I, K, c2w_t)
    assert out.depth.dtype == torch.float32
    torch.testing.assert_close(out.depth, ref.depth)


def test_rasterizer_chunking_is_invariant(K):
    I = torch.eye(4)
    _, dep = render(K, I)
    c2w_t = orbit(0.25)
    a = rasterize_depth_mesh(dep, K[None], I[None], K[None], c2w_t[None], (H, W), supersample=3, atol=0.02, rtol=0.02)
    b = rasterize_depth_mesh(
        dep, K[None], I[None], K[None], c2w_t[None], (H, W), supersample=3, atol=0.02, rtol=0.02, max_candidates=997
    )
    assert torch.equal(a.depth, b.depth) and torch.equal(a.visible, b.visible)


def test_rasterizer_is_exact_on_a_plane_across_a_large_raster():
    # A plane's mesh is the plane itself, so every covered pixel's depth and source coordinate are known in
    # closed form; at 512 px (supersample 3 of a 171 px target) the far corners of the raster test that the
    # per-triangle weights lose no precision away from the raster's origin.
    S = 171
    Kp = intrinsics_from_fov(50.0, S, S)
    I = torch.eye(4)
    o, d = camera_rays(Kp, I, S, S, normalize=False)
    dep = _plane_t(o.double(), d.double())[None].float()  # [1, S, S] z-depth of the plane z = 3 + 0.3 x
    c2w_t = orbit(0.2, 0.1, pivot=(0.0, 0.0, 3.0))
    r = rasterize_depth_mesh(dep, Kp[None], I[None], Kp[None], c2w_t[None], (S, S), supersample=3)
    n = 3 * S
    assert r.covered[0].float().mean() > 0.7 and r.covered[0, n - 2:, n - 2:].any()
    Ks = Kp.double().clone()
    Ks[:2] *= 3  # the supersampled raster's camera
    v, u = torch.meshgrid(torch.arange(n, dtype=torch.float64) + 0.5, torch.arange(n, dtype=torch.float64) + 0.5, indexing="ij")
    ray = torch.stack([u, v, torch.ones_like(u)], -1) @ torch.linalg.inv(Ks).T  # target camera, z = 1
    c2w = c2w_t.double()
    o_t, d_t = c2w[:3, 3].expand(n, n, 3), ray @ c2w[:3, :3].T
    t = _plane_t(o_t, d_t)  # the target's z-depth of the plane
    X = o_t + t[..., None] * d_t
    uv_src, _ = project_points(X.reshape(-1, 3), Kp.double(), torch.eye(4, dtype=torch.float64))
    uv_ref = uv_src.reshape(n, n, 2)
    cov = r.covered[0] & ((uv_ref > 0.5) & (uv_ref < S - 0.5)).all(-1)  # inside the pixel centres' mesh (the
    # border ring replicates depth, off the plane)
    assert cov[: n // 8, : n // 8].any() and cov[-n // 8 :, -n // 8 :].any()
    rel = ((r.depth[0].double() - t).abs() / t)[cov]
    err_uv = (r.src_uv[0].double() - uv_ref).norm(dim=-1)[cov]
    assert rel.max() < 2e-6, rel.max()  # (float32 rounding: 3e-7)
    assert err_uv.max() < 2e-3, err_uv.max()  # source pixels (7e-4)


def test_depth_normals_of_a_plane(K):
    # plane through (0, 0, 2) with normal n (pointing at the camera): depth = 2 n_z / (n . ray)
    n = torch.nn.functional.normalize(torch.tensor([0.3, -0.2, -1.0]), dim=0)
    o, d = camera_rays(K, torch.eye(4), H, W, normalize=False)
    dep = (2.0 * n[2] / (d @ n))[None]
    normals = depth_normals(dep, K)
    err = (normals - n[:, None, None]).norm(dim=0)
    assert err.max() < 1e-4
    # world frame: rotate the camera, normals rotate with it
    c2w = look_at(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, -1.0, 0.0]))
    nw = depth_normals(dep, K, c2w)
    assert ((nw - (c2w[:3, :3] @ n)[:, None, None]).norm(dim=0)).max() < 1e-4
