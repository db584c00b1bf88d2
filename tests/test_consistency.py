"""genvs.eval.consistency: the 3D-consistency score separates consistent from inconsistent view sets.

The views are ray-cast analytically here (two coloured spheres on white, SRN-like cameras at radius
1.3), independently of the voxel field being tested. Run this file as a script to write the figure of
docs/consistency.md: ``python tests/test_consistency.py docs/figures/consistency_toy.png``.
"""

from __future__ import annotations

import sys

import pytest
import torch

from genvs.core.cameras import camera_rays, intrinsics_from_fov, sphere_poses
from genvs.eval.consistency import ConsistencyConfig, consistency_score, held_out_indices

FAST = dict(iterations=150, rays_per_step=1024, samples_per_ray=32, grid_size=32, num_threads=1)


def _sphere_colors(kind: str):
    if kind == "a":
        return lambda n: torch.stack([0.5 + 0.4 * n[..., 0], 0.5 + 0.4 * torch.sin(3 * n[..., 1]), 0.5 + 0.4 * n[..., 2]], -1)
    if kind == "b":
        return lambda n: torch.stack([0.2 + 0 * n[..., 0], 0.3 + 0.5 * (n[..., 2] > 0).float(), 0.8 - 0.3 * n[..., 0]], -1)
    rgb = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.2)}[kind]
    return lambda n: torch.tensor(rgb).expand(*n.shape[:-1], 3)


SCENE_A = [((0.0, 0.0, 0.0), 0.35, "a"), ((0.25, 0.2, 0.25), 0.15, "red")]
SCENE_B = [((0.1, -0.15, 0.0), 0.3, "b"), ((-0.25, 0.2, -0.1), 0.18, "green")]


def render_spheres(K: torch.Tensor, c2w: torch.Tensor, H: int, W: int, spheres) -> torch.Tensor:
    """Analytic ray cast of opaque spheres on a white background -> ``[V, 3, H, W]`` in [-1, 1]."""
    o, d = camera_rays(K, c2w, H, W)  # [V, H, W, 3]
    best = torch.full(o.shape[:-1], float("inf"))
    col = torch.ones(*o.shape[:-1], 3)
    for c, r, kind in spheres:
        oc = o - torch.tensor(c)
        b = (oc * d).sum(-1)
        disc = b * b - (oc * oc).sum(-1) + r * r
        t = -b - disc.clamp_min(0).sqrt()
        hit = (disc > 0) & (t > 0) & (t < best)
        n = (o + t[..., None] * d - torch.tensor(c)) / r
        col = torch.where(hit[..., None], _sphere_colors(kind)(n).clamp(0, 1), col)
        best = torch.where(hit, t, best)
    return col.permute(0, 3, 1, 2) * 2 - 1


def toy_views(V: int = 20, H: int = 32, seed: int = 0):
    """Consistent views of scene A, plus two corruptions of the second half of the views."""
    c2w = sphere_poses(V, radius=1.3, generator=torch.Generator().manual_seed(seed), upper_hemisphere=False)
    K = intrinsics_from_fov(52.0, H).expand(V, 3, 3).clone()
    a = render_spheres(K, c2w, H, H, SCENE_A)
    half = torch.arange(V // 2, V)
    shuffled = a.clone()  # views of the right scene, but at the wrong poses
    shuffled[half] = a[half.roll(1)]
    other = a.clone()  # a different object in the second half
    other[half] = render_spheres(K[half], c2w[half], H, H, SCENE_B)
    return a, shuffled, other, K, c2w


@pytest.fixture(scope="module")
def views():
    return toy_views()


@pytest.fixture(scope="module")
def consistent_score(views):
    a, _, _, K, c2w = views
    return consistency_score(a, K, c2w, **FAST)


def test_consistent_views_are_fitted_well(consistent_score):
    r = consistent_score
    assert r.held_out == [4, 9, 14, 19] and len(r.train) == 16
    assert r.psnr > 20 and r.ssim > 0.85, r
    assert r.train_psnr >= r.psnr - 1
    assert r.seconds < 60


@pytest.mark.parametrize("corruption", ["shuffled", "other"])
def test_inconsistent_views_score_clearly_lower(views, consistent_score, corruption):
    a, shuffled, other, K, c2w = views
    bad = {"shuffled": shuffled, "other": other}[corruption]
    r = consistency_score(bad, K, c2w, **FAST)
    assert r.psnr < consistent_score.psnr - 5, (r.psnr, consistent_score.psnr)
    assert r.ssim < consistent_score.ssim - 0.15, (r.ssim, consistent_score.ssim)
    assert r.train_psnr < consistent_score.train_psnr - 3  # the field cannot explain the training views either


def test_deterministic_with_seed_and_renders(views):
    a, _, _, K, c2w = views
    kw = dict(FAST, iterations=20)
    r1 = consistency_score(a, K, c2w, seed=3, return_renders=True, **kw)
    r2 = consistency_score(a, K, c2w, seed=3, return_renders=True, **kw)
    r3 = consistency_score(a, K, c2w, seed=4, **kw)
    assert r1.psnr == r2.psnr and torch.equal(r1.renders, r2.renders)
    assert r1.psnr != r3.psnr
    assert r1.renders.shape == (4, 3, 32, 32) and r1.renders.min() >= -1 and r1.renders.max() <= 1
    d = r1.to_dict()
    assert "renders" not in d and d["config"]["seed"] == 3 and d["held_out"] == [4, 9, 14, 19]


def test_custom_held_out_sh_and_bf16_autocast(views):
    a, _, _, K, c2w = views
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = consistency_score(a, K, c2w, held_out=[0, 7], config=ConsistencyConfig(**dict(FAST, iterations=10, sh_degree=1)))
    assert r.held_out == [0, 7] and len(r.per_view_psnr) == 2 and torch.isfinite(torch.tensor(r.psnr))


def test_bad_inputs_are_named():
    V, H = 6, 16
    imgs, K, c2w = torch.zeros(V, 3, H, H), torch.eye(3).expand(V, 3, 3), torch.eye(4).expand(V, 4, 4)
    with pytest.raises(ValueError, match=r"images must be \[V, 3, H, W\]"):
        consistency_score(imgs[:, :2], K, c2w)
    with pytest.raises(ValueError, match=r"K \[V, 3, 3\] and c2w \[V, 4, 4\]"):
        consistency_score(imgs, K[:3], c2w)
    with pytest.raises(ValueError, match="held_out"):
        consistency_score(imgs, K, c2w, held_out=[0, 0])
    with pytest.raises(ValueError, match="holdout_every"):
        held_out_indices(3, 5)
    with pytest.raises(ValueError, match="sh_degree"):
        ConsistencyConfig(sh_degree=2)
    assert held_out_indices(20, 5) == [4, 9, 14, 19]


# --------------------------------------------------------------------------------- the figure
def write_figure(path: str) -> None:
    """Rows: for each view set, its held-out views (top) and the field's renders of them (below)."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    a, shuffled, other, K, c2w = toy_views(H=64)
    rows, labels = [], []
    for name, imgs in [("consistent", a), ("shuffled poses", shuffled), ("other object", other)]:
        r = consistency_score(imgs, K, c2w, return_renders=True)
        rows += [imgs[r.held_out], r.renders]
        labels += [f"{name}: held-out generated views", f"field renders  PSNR {r.psnr:.1f} dB  SSIM {r.ssim:.3f}  ({r.seconds:.0f} s)"]
        print(name, r.to_dict())
    pad, label_h, n = 2, 14, rows[0].shape[0]
    grid = make_grid((torch.cat(rows) + 1) / 2, nrow=n, padding=pad, pad_value=1.0)
    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    tile = rows[0].shape[-1] + pad
    out = Image.new("RGB", (max(img.width, 420), img.height + label_h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(labels):
        y = i * (tile + label_h)
        draw.text((4, y + 1), label, fill=(0, 0, 0))
        out.paste(img.crop((0, i * tile, img.width, (i + 1) * tile + pad)), (0, y + label_h))
    out.save(path)


if __name__ == "__main__":
    write_figure(sys.argv[1] if len(sys.argv) > 1 else "consistency_toy.png")


def test_ring_overlap_psnr_separates_real_rings_from_shuffled_ones():
    """Neighbouring views of a rendered room ring agree where they overlap; a ring whose views are put in
    the wrong order, or replaced by another room's, does not."""
    from genvs.data.toy import RoomConfig, random_room, render_room_ring
    from genvs.eval.consistency import ring_overlap_psnr

    cfg = RoomConfig(resolution=32, supersample=2)
    g = torch.Generator().manual_seed(0)
    a, b = render_room_ring(random_room(g), cfg), render_room_ring(random_room(g), cfg)
    K, c2w = a["K"], a["c2w"]
    real = ring_overlap_psnr(a["images"], K, c2w)
    assert real.shape == (8,) and float(real.min()) > 20
    shuffled = ring_overlap_psnr(a["images"][torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])], K, c2w)
    assert float(shuffled.mean()) < float(real.mean()) - 6
    mixed = torch.cat([a["images"][:4], b["images"][4:]])  # pairs 3-4 and 7-0 join different rooms
    per_pair = ring_overlap_psnr(mixed, K, c2w)
    assert float(per_pair[3]) < float(real[3]) - 4 and float(per_pair[7]) < float(real[7]) - 4
    real_b = ring_overlap_psnr(b["images"], b["K"], b["c2w"])  # (the same ring cameras)
    assert torch.allclose(per_pair[:3], real[:3]) and torch.allclose(per_pair[4:7], real_b[4:7])
    with pytest.raises(ValueError, match="share a camera centre"):
        moved = c2w.clone()
        moved[1, :3, 3] += 0.5
        ring_overlap_psnr(a["images"], K, moved)
