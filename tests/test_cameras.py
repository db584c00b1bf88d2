import math

import numpy as np
import torch

from genvs.core.cameras import (
    camera_rays,
    intrinsics_from_fov,
    look_at,
    opengl_to_opencv,
    orbit_poses,
    posenc_nerf,
    ray_posenc,
    ring_poses,
    scale_intrinsics,
    sphere_poses,
)
from genvs.core.geometry import project_points, unproject_depth


def test_rays_match_per_pixel_numpy():
    K = torch.tensor([[30.0, 0, 15.5], [0, 28.0, 17.0], [0, 0, 1]])
    c2w = sphere_poses(1, generator=torch.Generator().manual_seed(3))[0]
    H, W = 24, 32
    o, d = camera_rays(K, c2w, H, W)
    Kn, Rn, tn = K.numpy().astype(np.float64), c2w[:3, :3].numpy(), c2w[:3, 3].numpy()
    for y, x in [(0, 0), (5, 17), (23, 31), (12, 3)]:
        pix = np.array([x + 0.5, y + 0.5, 1.0])  # pixel centres
        ray = Rn @ np.linalg.solve(Kn, pix)
        ray /= np.linalg.norm(ray)
        np.testing.assert_allclose(d[y, x].numpy(), ray, atol=1e-5)
        np.testing.assert_allclose(o[y, x].numpy(), tn, atol=1e-6)


def test_center_ray_is_optical_axis_and_looks_at_target():
    eye = torch.tensor([1.0, -0.5, 0.8])
    c2w = look_at(eye, torch.zeros(3))
    K = intrinsics_from_fov(50, 32)
    _, d = camera_rays(K, c2w, 32, 32)
    centre = (d[15, 15] + d[16, 16] + d[15, 16] + d[16, 15]) / 4
    torch.testing.assert_close(torch.nn.functional.normalize(centre, dim=0), -eye / eye.norm(), atol=1e-4, rtol=0)
    R = c2w[:3, :3]
    torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.det(R) > 0.999  # right-handed
    assert (R[:, 1] @ torch.tensor([0, 0, 1.0])) < 0  # camera y (down) points against world up


def test_posenc_formula_and_3dim_width():
    x = torch.randn(5, 3)
    enc = posenc_nerf(x, 0, 4)
    assert enc.shape == (5, 3 + 2 * 3 * 4)
    torch.testing.assert_close(enc[:, :3], x)
    # sin block: scales 2^l for l in 0..3, laid out as [l0 xyz, l1 xyz, ...]
    torch.testing.assert_close(enc[:, 3 + 3 * 2 : 3 + 3 * 3], torch.sin(4 * x))
    torch.testing.assert_close(enc[:, 3 + 12 + 3 : 3 + 12 + 6], torch.cos(2 * x), atol=1e-6, rtol=0)
    K = intrinsics_from_fov(52, 8).expand(2, 3, 3)
    assert ray_posenc(K, orbit_poses(2), 8, 8).shape == (2, 8, 8, 144)  # 3DiM: 93 origin + 51 direction


def test_intrinsics_rescale_keeps_projection_consistent():
    """A 3D point projects to pixel (u, v) at full size and (u s, v s) after resizing by s."""
    K = torch.tensor([[131.25, 0, 64.0], [0, 131.25, 64.0], [0, 0, 1]])
    c2w = orbit_poses(3, radius=1.3)
    p = torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.1, -0.1]])
    uv, _ = project_points(p.expand(3, 2, 3), K.expand(3, 3, 3), c2w)
    K2 = scale_intrinsics(K, 32 / 128, 32 / 128)
    uv2, _ = project_points(p.expand(3, 2, 3), K2.expand(3, 3, 3), c2w)
    torch.testing.assert_close(uv2, uv * 0.25, atol=1e-4, rtol=0)
    # the resized image's pixel grid: pixel centre 0.5 of the small image covers [0, 4) of the large one
    assert math.isclose(float(K2[0, 2]), 16.0)


def test_unproject_project_roundtrip():
    c2w = sphere_poses(2, generator=torch.Generator().manual_seed(1))
    K = intrinsics_from_fov(60, 16, 20).expand(2, 3, 3)
    depth = torch.rand(2, 16, 20) + 0.5
    pts = unproject_depth(depth, K, c2w)
    uv, z = project_points(pts.flatten(1, 2), K, c2w)
    torch.testing.assert_close(z, depth.flatten(1), atol=1e-5, rtol=0)
    grid = torch.stack(torch.meshgrid(torch.arange(16) + 0.5, torch.arange(20) + 0.5, indexing="ij")[::-1], -1)
    torch.testing.assert_close(uv[0], grid.flatten(0, 1).float(), atol=1e-4, rtol=0)


def test_trajectories_and_conventions():
    poses = orbit_poses(8, radius=2.0, elevation_deg=30)
    torch.testing.assert_close(poses[:, :3, 3].norm(dim=-1), torch.full((8,), 2.0))
    torch.testing.assert_close(poses[:, 2, 3], torch.full((8,), 2.0 * math.sin(math.radians(30))))
    ring = ring_poses(8, 45.0)
    fwd = ring[:, :3, 2]
    angles = torch.rad2deg(torch.acos((fwd[:-1] * fwd[1:]).sum(-1).clamp(-1, 1)))
    torch.testing.assert_close(angles, torch.full((7,), 45.0), atol=1e-3, rtol=0)
    gl = torch.eye(4)  # an OpenGL camera at the origin looks down -z with y up
    cv = opengl_to_opencv(gl)
    torch.testing.assert_close(cv[:3, 2], torch.tensor([0, 0, -1.0]))
    torch.testing.assert_close(cv[:3, 1], torch.tensor([0, -1.0, 0]))


def test_orbit_around_keeps_radius_elevation_and_looks_at_centre():
    from genvs.core.cameras import orbit_around

    start = look_at(torch.tensor([1.0, 0.5, 0.7]))
    poses = orbit_around(start, 6)
    torch.testing.assert_close(poses[0], start)
    torch.testing.assert_close(poses[:, :3, 3].norm(dim=-1), start[:3, 3].norm().expand(6))
    torch.testing.assert_close(poses[:, 2, 3], torch.full((6,), 0.7))  # same height: rotation about z
    fwd = poses[:, :3, 2]
    to_centre = torch.nn.functional.normalize(-poses[:, :3, 3], dim=-1)
    torch.testing.assert_close(fwd, to_centre, atol=1e-5, rtol=0)
    torch.testing.assert_close(poses[3, :2, 3], -start[:2, 3], atol=1e-5, rtol=0)  # half way round
