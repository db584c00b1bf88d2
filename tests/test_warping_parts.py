"""Parts of the warping RGBD method: training pairs, augmentations, depth, networks, aggregation."""

import math

import pytest
import torch
import torch.nn.functional as F

from genvs.core.cameras import camera_rays, intrinsics_from_fov, look_at
from genvs.core.diffusion import DiscreteSchedule, diffusion_loss, q_sample
from genvs.core.geometry import transform_points, world_to_camera
from genvs.methods.warping.aggregate import aggregate_views, guide_eps, guide_x0, view_weights, viewset
from genvs.methods.warping.augment import (
    TrainingPairs,
    erode_mask,
    forward_backward_warp,
    gaussian_blur3,
    orbit_camera,
    random_orbit_cameras,
)
from genvs.methods.warping.depth import (
    DepthEstimator,
    DepthWeightsNotFound,
    DPT,
    DPTDepthEstimator,
    TorchHubDepthEstimator,
    denormalize_depth,
    disparity_to_depth,
    normalize_depth,
)
from genvs.methods.warping.network import (
    CONDITIONAL_IN_CHANNELS,
    ADMUNet,
    WarpCondition,
    conditional_from_unconditional,
    conditional_input,
    drop_class_labels,
)

S = 24  # image size for pair tests




def _smooth_rgbd(B=2, H=S, W=S):
    y, x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    rgb = torch.stack([torch.sin(3 * x + k) * torch.cos(2 * y) for k in range(3)])[None].repeat(B, 1, 1, 1)
    depth = (1.0 + 0.1 * x + 0.05 * y)[None, None].repeat(B, 1, 1, 1)
    return rgb, depth


# ---------------------------------------------------------------------------------------------- pairs
def test_identity_camera_gives_no_holes_and_the_original_image():
    rgb, depth = _smooth_rgbd()
    tp = TrainingPairs(prewarp_noise=0.0, blur_prob=0.0, erode_sizes=(1,))
    pair = tp(rgb, depth, c2w=torch.eye(4).expand(2, 4, 4))
    assert pair.cond.mask.min() == 1 and pair.cond.mask_rgb.min() == 1
    torch.testing.assert_close(pair.cond.rgb, rgb, atol=1e-5, rtol=0)
    torch.testing.assert_close(pair.cond.depth, normalize_depth(depth), atol=1e-4, rtol=0)
    torch.testing.assert_close(pair.target, torch.cat([rgb, normalize_depth(depth)], 1))
    assert torch.allclose(orbit_camera(torch.tensor(0.0), torch.tensor(0.0), 1.0), torch.eye(4), atol=1e-6)


def test_pair_holes_are_where_the_novel_camera_cannot_see():
    """Foreground square (depth 0.7) over a background plane (1.5); the camera orbits the pivot to the
    right, the square slides left over the background: the background just left of the square is hidden
    from the novel camera. Expected holes from an analytic occlusion test (segment to the novel camera
    crossing the square)."""
    H = W = 32
    K = intrinsics_from_fov(45.0, H, W)
    depth = torch.full((1, 1, H, W), 1.5)
    depth[..., 10:22, 12:20] = 0.7
    rgb = torch.zeros(1, 3, H, W)
    c2w = orbit_camera(torch.tensor([0.25]), torch.tensor([0.0]), 1.0)
    _, _, mask = forward_backward_warp(rgb, depth, K[None], c2w)
    m = mask[0, 0] > 0.5

    # analytic occlusion of each view-0 background point by the square, seen from the novel camera
    o, d = camera_rays(K, torch.eye(4), H, W, normalize=False)
    X = d * depth[0, 0, ..., None]  # [H, W, 3] world points (view 0 = world)
    cam = c2w[0, :3, 3]
    s = (0.7 - X[..., 2]) / (cam[2] - X[..., 2])  # where the segment X -> camera meets the plane z = 0.7
    Y = X + s[..., None] * (cam - X)
    uv = Y[..., :2] / Y[..., 2:] * K[0, 0] + K[:2, 2]
    # the square's surface spans its pixel centres (the mesh runs through pixel centres)
    in_square = (uv[..., 0] >= 12.5) & (uv[..., 0] <= 19.5) & (uv[..., 1] >= 10.5) & (uv[..., 1] <= 21.5)
    hidden = (depth[0, 0] > 1.0) & (s > 0) & (s < 1) & in_square
    # and points outside the novel camera's frame
    p1 = transform_points(world_to_camera(c2w[0]), X.reshape(-1, 3))
    uv1 = p1[:, :2] / p1[:, 2:] * K[0, 0] + K[:2, 2]
    outside = ((uv1 < 0) | (uv1 > W)).any(-1).reshape(H, W)
    assert hidden.sum() >= 12, "the setup must produce an occluded strip"
    assert not (m & hidden).any(), "pixels occluded in the novel view must be holes"
    assert not (m & outside).any(), "pixels outside the novel view must be holes"
    # everything else survives, except within a pixel of those regions (partial coverage) and within two
    # pixels of the square's depth edge (edge test and stretched triangles of both passes)
    outside_1 = ((uv1 < 1) | (uv1 > W - 1)).any(-1).reshape(H, W)
    near = F.max_pool2d((hidden | outside_1).float()[None, None], 3, 1, 1)[0, 0] > 0
    band = torch.zeros(H, W, dtype=torch.bool)
    band[8:24, 10:22] = True
    band[12:20, 14:18] = False
    keep = ~near & ~band
    assert keep.sum() > 0.45 * H * W
    assert m[keep].float().mean() > 0.99
    assert hidden[:, :12].sum() == hidden.sum(), "the strip lies left of the square"


def test_training_pairs_batch_invariants_and_reproducibility():
    rgb, depth = _smooth_rgbd(B=6)
    depth[:, :, 8:16, 8:16] = 0.6
    tp = TrainingPairs()
    a = tp(rgb, depth, generator=torch.Generator().manual_seed(3))
    b = tp(rgb, depth, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.cond.mask, b.cond.mask) and torch.equal(a.cond.rgb, b.cond.rgb)
    c = a.cond
    assert c.rgb.shape == (6, 3, S, S) and c.depth.shape == (6, 1, S, S) and a.target.shape == (6, 4, S, S)
    assert ((c.mask_rgb <= c.mask)).all(), "the colour mask is an erosion of the depth mask"
    assert (c.rgb * (1 - c.mask_rgb)).abs().max() == 0 and (c.depth * (1 - c.mask)).abs().max() == 0
    assert c.mask.mean() < 1.0 and c.mask.mean() > 0.3
    # the colour mask is the mask eroded by one of the official kernel sizes, per example
    for i in range(6):
        ok = [torch.equal(c.mask_rgb[i : i + 1], erode_mask(c.mask[i : i + 1], k)) for k in (1, 3, 5, 7, 9)]
        assert any(ok)
    cams = random_orbit_cameras(2000, generator=torch.Generator().manual_seed(0))
    eye = cams[:, :3, 3] - torch.tensor([0.0, 0.0, 1.0])
    r = eye.norm(dim=-1)
    assert abs(r.mean() - 1) < 0.01 and abs(r.std() - 0.1) < 0.01
    yaw = torch.atan2(eye[:, 0], -eye[:, 2])
    assert abs(yaw.std() - 0.15) < 0.01


def test_blur_augmentation_uses_the_blurred_original():
    rgb, depth = _smooth_rgbd(B=4)
    I4 = torch.eye(4).expand(4, 4, 4)
    g = torch.Generator().manual_seed(0)
    always = TrainingPairs(prewarp_noise=0.0, blur_prob=1.0, erode_sizes=(1,))(rgb, depth, c2w=I4, generator=g)
    g = torch.Generator().manual_seed(0)
    torch.rand(4, generator=g)  # the blur draws: decision, then sigma
    sigma = torch.rand(4, generator=g) + 1e-3
    torch.testing.assert_close(always.cond.rgb, gaussian_blur3(rgb, sigma))
    assert (always.cond.rgb - rgb).abs().max() > 1e-3
    never = TrainingPairs(prewarp_noise=0.0, blur_prob=0.0, erode_sizes=(1,))(rgb, depth, c2w=I4)
    torch.testing.assert_close(never.cond.rgb, rgb, atol=1e-5, rtol=0)


def test_gaussian_blur3_kernel():
    x = torch.zeros(2, 1, 5, 5)
    x[:, :, 2, 2] = 1
    sigma = torch.tensor([0.5, 1.0])
    y = gaussian_blur3(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        e = math.exp(-1 / (2 * s * s))
        g = torch.tensor([e, 1.0, e]) / (1 + 2 * e)
        torch.testing.assert_close(y[i, 0, 1:4, 1:4], g[:, None] * g[None])
    # reflect-101 borders keep a constant image constant
    torch.testing.assert_close(gaussian_blur3(torch.ones(1, 3, 4, 4), torch.tensor([0.7])), torch.ones(1, 3, 4, 4))


def test_erode_mask_square_kernels_and_borders():
    m = torch.ones(5, 1, 15, 15)
    m[:, :, 7, 7] = 0
    sizes = torch.tensor([1, 3, 5, 7, 9])
    out = erode_mask(m, sizes)
    for i, k in enumerate(sizes.tolist()):
        assert (1 - out[i]).sum() == k * k
    assert erode_mask(torch.ones(1, 1, 6, 6), 9).min() == 1, "the image border does not erode"
    with pytest.raises(ValueError, match="odd"):
        erode_mask(m, 4)


# ---------------------------------------------------------------------------------------------- depth
def test_depth_normalisation_is_invertible_and_matches_the_zbuffer_encoding():
    d = torch.tensor([0.5, 0.7, 1.0, 3.0, 50.0, 100.0])
    x = normalize_depth(d)
    assert x[0] == -1 and x[-1] == 1 and (x.diff() > 0).all()
    torch.testing.assert_close(denormalize_depth(x[1:-1]), d[1:-1], rtol=1e-5, atol=0)
    # linear in disparity: the midpoint of [-1, 1] is the harmonic midpoint
    mid = 2 / (1 / 0.5 + 1 / 100)
    torch.testing.assert_close(normalize_depth(torch.tensor(mid)), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(denormalize_depth(torch.tensor([0.0]), 0.6, 5.0), torch.tensor([2 / (1 / 0.6 + 1 / 5)]))


def test_disparity_to_depth_follows_the_official_rule():
    disp = torch.zeros(2, 1, 2, 2)
    disp[0] = torch.tensor([[6250.0, 3125.0], [0.0, 625.0]])  # max 1.0 after /6250 < 1/near = 2: kept
    disp[1] = torch.tensor([[25000.0, 12500.0], [1.0, 6250.0]])  # max 4 > 2: rescaled so the max is 2
    d = disparity_to_depth(disp)
    torch.testing.assert_close(d[0, 0], torch.tensor([[1.0, 2.0], [1000.0, 10.0]]))
    torch.testing.assert_close(d[1, 0], torch.tensor([[0.5, 1.0], [1000.0, 2.0]]))


def _tiny_dpt():
    torch.manual_seed(0)
    return DPT(
        "vit_tiny_patch16_224",
        dict(img_size=32, depth=4, embed_dim=32, num_heads=2),
        hooks=(0, 1, 2, 3),
        channels=(8, 16, 32, 32),
        features=16,
    )


def test_dpt_depth_estimator_roundtrips_local_weights(tmp_path):
    dpt = _tiny_dpt()
    with torch.no_grad():  # a bias so the disparity is not all zero
        dpt.head[-2].bias.fill_(500.0)
    est = DPTDepthEstimator(dpt, input_size=32)
    assert isinstance(est, DepthEstimator)
    x = torch.rand(2, 3, 20, 28) * 2 - 1
    d = est(x)
    assert d.shape == (2, 1, 20, 28) and (d >= 0.5).all() and torch.isfinite(d).all()
    assert d.std() > 0
    est.save_pretrained(tmp_path / "dpt")
    loaded = DPTDepthEstimator.from_pretrained(tmp_path / "dpt")
    torch.testing.assert_close(loaded(x), d)
    with pytest.raises(DepthWeightsNotFound, match="model.safetensors"):
        DPTDepthEstimator.from_pretrained(tmp_path / "missing")


def test_torch_hub_depth_estimator_from_a_local_checkout(tmp_path):
    (tmp_path / "hubconf.py").write_text(
        "import torch\n"
        "class _M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return 6250.0 * (x[:, 0] + 2.0)\n"  # [B, h, w] disparity in [6250, 18750]
        "def tiny(**kw):\n"
        "    return _M()\n"
    )
    est = TorchHubDepthEstimator(tmp_path, "tiny", input_size=32)
    d = est(torch.zeros(1, 3, 16, 16))
    torch.testing.assert_close(d, torch.ones(1, 1, 16, 16) * 0.5)  # disparity 2 -> depth 1/2
    with pytest.raises(DepthWeightsNotFound, match="hubconf.py"):
        TorchHubDepthEstimator(tmp_path / "nope")


# --------------------------------------------------------------------------------------------- network
def _tiny_unet(in_channels=4, num_classes=5):
    torch.manual_seed(0)
    return ADMUNet(
        in_channels=in_channels,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        image_size=16,
        num_head_channels=8,
        num_classes=num_classes,
        num_groups=8,
    )


def _randomize(model):
    with torch.no_grad():  # zero-initialised output layers would hide everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_networks_shapes_null_label_and_paper_size():
    u = _randomize(_tiny_unet())
    x = torch.randn(3, 4, 16, 16)
    t = torch.tensor([0, 500, 999])
    assert u(x, t, torch.tensor([0, 4, -1])).shape == (3, 4, 16, 16)
    torch.testing.assert_close(u(x, t, None), u(x, t, torch.full((3,), -1)))
    assert not torch.allclose(u(x, t, torch.tensor([1, 1, 1])), u(x, t, None))
    c = conditional_from_unconditional(u)
    assert c.in_channels == CONDITIONAL_IN_CHANNELS == 10
    assert c(torch.randn(3, 10, 16, 16), t, torch.tensor([0, 1, 2])).shape == (3, 4, 16, 16)
    with pytest.raises(ValueError, match="input channels"):
        c(x, t)
    with pytest.raises(ValueError, match="class_labels"):
        u(x, t, torch.tensor([0, 5, 1]))
    # the paper's ADM-128 configuration builds (parameters only counted, on the meta device)
    with torch.device("meta"):
        big = ADMUNet()
    assert 400e6 < sum(p.numel() for p in big.parameters()) < 450e6


def test_conditional_model_starts_equal_to_the_unconditional_one():
    u = _randomize(_tiny_unet())
    c = conditional_from_unconditional(u)
    z = torch.randn(2, 4, 16, 16)
    cond = WarpCondition(
        rgb=torch.rand(2, 3, 16, 16),
        depth=torch.rand(2, 1, 16, 16),
        mask_rgb=(torch.rand(2, 1, 16, 16) > 0.5).float(),
        mask=torch.ones(2, 1, 16, 16),
    )
    t, y = torch.tensor([10, 700]), torch.tensor([3, -1])
    inp = conditional_input(z, cond, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c(inp, t, y), u(z, t, y))
    zero = torch.cat([z, torch.zeros(2, 6, 16, 16)], 1)
    torch.testing.assert_close(c(zero, t, y), u(z, t, y))
    # once trained the new channels matter
    with torch.no_grad():
        c.input_conv.weight[:, 4:] += 0.1
    assert not torch.allclose(c(inp, t, y), u(z, t, y))


def test_conditional_input_layout():
    z = torch.randn(1, 4, 8, 8)
    m_rgb = torch.zeros(1, 1, 8, 8)
    m_rgb[..., :4] = 1
    m = torch.zeros(1, 1, 8, 8)
    m[..., :6] = 1
    cond = WarpCondition(rgb=torch.full((1, 3, 8, 8), 0.5), depth=torch.full((1, 1, 8, 8), -0.25), mask_rgb=m_rgb, mask=m)
    x = conditional_input(z, cond, generator=torch.Generator().manual_seed(0))
    assert x.shape == (1, 10, 8, 8)
    assert torch.equal(x[:, :4], z) and torch.equal(x[:, 4:5], m_rgb) and torch.equal(x[:, 9:10], m)
    assert (x[:, 5:8, :, :4] == 0.5).all() and (x[:, 8, :, :6] == -0.25).all()
    assert x[:, 5:8, :, 4:].std() > 0.5 and x[:, 8, :, 6:].std() > 0.5  # holes are N(0, 1) noise
    labels = drop_class_labels(torch.arange(1000) % 7, 0.1, torch.Generator().manual_seed(0))
    assert 60 < (labels == -1).sum() < 140


def test_unet_channels_last_bf16_autocast():
    u = _randomize(_tiny_unet()).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 16, 16).to(memory_format=torch.channels_last)
    t = torch.tensor([5, 900])
    ref = u(x, t, torch.tensor([1, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = u(x, t, torch.tensor([1, 2]))
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3


def test_unconditional_eps_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    u = _tiny_unet(num_classes=3)
    sched = DiscreteSchedule("linear")
    g = torch.Generator().manual_seed(0)
    rgb, depth = _smooth_rgbd(B=4, H=16, W=16)
    x0 = torch.cat([rgb, normalize_depth(depth)], 1)
    labels = torch.tensor([0, 1, 2, -1])
    t = sched.sample_t(8, generator=g)  # fixed (x0, t, eps) set: 8 examples
    eps = torch.randn(8, 4, 16, 16, generator=g)
    X0 = x0.repeat(2, 1, 1, 1)
    logsnr = sched.logsnr(t)
    z = q_sample(X0, logsnr, eps)
    ts = sched.timestep_index(t)
    y = labels.repeat(2)

    def loss():
        return diffusion_loss(u(z, ts, y), X0, eps, logsnr, "eps").mean()

    opt = torch.optim.Adam(u.parameters(), lr=3e-3)
    with torch.no_grad():
        first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        l = loss()
        l.backward()
        opt.step()
    with torch.no_grad():
        last = loss().item()
    assert abs(first - 1.0) < 0.1  # zero-initialised output: predicts eps = 0
    assert last < 0.6 * first, (first, last)


# ------------------------------------------------------------------------------------------- aggregation
def _plane_view(K, c2w, n, p0, H, W):
    """z-depth of the plane through p0 with normal n, seen by camera c2w."""
    o, d = camera_rays(K, c2w, H, W, normalize=False)
    t = ((p0 - o) @ n) / (d @ n)
    return t[None]


def test_view_weights_of_a_tilted_plane():
    H = W = 33
    K = intrinsics_from_fov(45.0, H, W)
    for ang in (0.0, 0.1, 0.3):
        n = torch.tensor([math.sin(ang), 0.0, -math.cos(ang)])
        dep = _plane_view(K, torch.eye(4), n, torch.tensor([0.0, 0.0, 2.0]), H, W)
        w = view_weights(dep, K)
        # at the centre pixel the direction to the camera is the optical axis: theta = ang
        expected = max(math.exp(-20 * ang), 1e-4)
        assert abs(w[0, 16, 16].item() - expected) < 0.02 * expected


def test_aggregation_favours_the_camera_facing_the_surface():
    """Two views of one plane, coloured differently (A red, B blue); the new view sees the plane.
    Each pixel's colour must be the exp(-20 theta) weighted mix computed analytically."""
    H = W = 32
    K = intrinsics_from_fov(45.0, H, W)
    p0 = torch.tensor([0.0, 0.0, 1.0])  # plane through the pivot
    cam_a = torch.eye(4)
    cam_b = orbit_camera(torch.tensor(0.4), torch.tensor(0.0), 1.0)
    cam_t = orbit_camera(torch.tensor(0.15), torch.tensor(0.05), 1.0)
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    for yaw_n in (0.1, 0.3):  # the plane's normal turned toward A (0.1) or toward B (0.3)
        n = torch.tensor([math.sin(yaw_n), 0.0, -math.cos(yaw_n)])
        deps = torch.stack([_plane_view(K, c, n, p0, H, W) for c in (cam_a, cam_b)])[None]  # [1, 2, 1, H, W]
        imgs = torch.stack([red.view(3, 1, 1).expand(3, H, W), blue.view(3, 1, 1).expand(3, H, W)])[None]
        cond = aggregate_views(imgs, deps, K.expand(1, 2, 3, 3), torch.stack([cam_a, cam_b])[None], K[None], cam_t[None])
        m = cond.mask_rgb[0, 0] > 0.5
        assert m.float().mean() > 0.8
        # analytic: the surface point of every target pixel and its angles to both cameras
        dep_t = _plane_view(K, cam_t, n, p0, H, W)[0]
        o, d = camera_rays(K, cam_t, H, W, normalize=False)
        X = o + d * dep_t[..., None]
        w, ambiguous = [], torch.zeros(H, W, dtype=torch.bool)
        for c in (cam_a, cam_b):
            cos = (F.normalize(c[:3, 3] - X, dim=-1) @ n).clamp(0, 1)  # n faces the cameras
            uv = transform_points(world_to_camera(c), X.reshape(-1, 3)) @ K.T
            uv = (uv[:, :2] / uv[:, 2:]).reshape(H, W, 2)
            inside = ((uv > 0) & (uv < W)).all(-1)  # seen by this camera at all
            ambiguous |= ((uv > -1.5) & (uv < W + 1.5)).all(-1) & ~((uv > 1.5) & (uv < W - 1.5)).all(-1)
            w.append(torch.where(inside, torch.exp(-20 * torch.acos(cos)).clamp_min(1e-4), torch.zeros_like(cos)))
        frac_a = w[0] / (w[0] + w[1])
        expect = frac_a[None] * red.view(3, 1, 1) + (1 - frac_a[None]) * blue.view(3, 1, 1)
        m = m & ~ambiguous  # pixels near a source frame border: partial coverage
        err = (cond.rgb[0] - expect).abs().amax(0)[m]
        assert err.max() < 0.05, err.max()
        # at the pivot (image centre of the new view) theta_A, theta_B = (0.1, 0.3) or (0.3, 0.1)
        red_frac = (cond.rgb[0, 0, 15:17, 15:17].mean() + 1) / 2
        assert red_frac > 0.95 if yaw_n == 0.1 else red_frac < 0.05
        # depth: the plane's depth in the new camera (normalised with the sampling near/far)
        d_err = (denormalize_depth(cond.depth[0, 0], 0.6, 5.0) - dep_t).abs() / dep_t
        assert d_err[cond.mask[0, 0] > 0.5].max() < 2e-3
    # without view A only B's colour remains
    cond = aggregate_views(
        imgs, deps, K.expand(1, 2, 3, 3), torch.stack([cam_a, cam_b])[None], K[None], cam_t[None],
        view_mask=torch.tensor([[False, True]]),
    )
    m = cond.mask_rgb[0, 0] > 0.5
    assert m.any() and ((cond.rgb[0] - blue.view(3, 1, 1)).abs().amax(0)[m] < 1e-5).all()


def test_aggregation_holes_get_the_stretched_depth_as_lower_bound():
    H = W = 32
    K = intrinsics_from_fov(45.0, H, W)
    dep = torch.full((1, 1, 1, H, W), 2.0)
    dep[..., 10:22, 10:22] = 1.0
    img = torch.zeros(1, 1, 3, H, W)
    cam_t = torch.eye(4)
    cam_t[0, 3] = 0.15
    cond = aggregate_views(img, dep, K.expand(1, 1, 3, 3), torch.eye(4)[None, None], K[None], cam_t[None])
    holes = cond.mask[0, 0] < 0.5
    inner = holes.clone()
    inner[:, :] = False
    inner[12:20, :] = holes[12:20, :]
    convex = denormalize_depth(cond.depth_convex[0, 0], 0.6, 5.0)
    gap = inner & (convex > 1.05) & (convex < 1.95)
    assert gap.sum() >= 8, "the disocclusion behind the square has the stretched (bridging) depth"


def test_guidance_blends_x0_as_the_official_sampler():
    B, H, W = 1, 4, 4
    x0 = torch.zeros(B, 4, H, W)
    m = torch.zeros(B, 1, H, W)
    m[..., :2] = 1
    cond = WarpCondition(
        rgb=torch.ones(B, 3, H, W), depth=torch.ones(B, 1, H, W), mask_rgb=m, mask=m, depth_convex=torch.full((B, 1, H, W), 0.5)
    )
    g = guide_x0(x0, cond)
    torch.testing.assert_close(g[:, :3, :, :2], torch.full((B, 3, H, 2), 0.1))
    torch.testing.assert_close(g[:, 3:, :, :2], torch.full((B, 1, H, 2), 0.2))
    torch.testing.assert_close(g[:, :3, :, 2:], torch.zeros(B, 3, H, 2))
    torch.testing.assert_close(g[:, 3:, :, 2:], torch.full((B, 1, H, 2), 0.25))  # 0.5 * max(0, 0.5)
    last = guide_x0(x0, cond, last_step=True)
    assert (last[:, :3] == 0).all()
    # guide_eps is the same step expressed on eps: no guidance returns eps unchanged
    eps, z, logsnr = torch.randn(B, 4, H, W), torch.randn(B, 4, H, W), torch.tensor([0.3])
    out = guide_eps(eps, z, logsnr, cond, rgb_weight=0.0, depth_weight=0.0)
    torch.testing.assert_close(out, eps, atol=1e-5, rtol=1e-5)


def test_official_viewset():
    cams = viewset("3x9")
    assert cams.shape == (27, 4, 4)
    torch.testing.assert_close(cams[0], torch.eye(4), atol=1e-6, rtol=0)
    pivot = torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close((cams[:, :3, 3] - pivot).norm(dim=-1), torch.ones(27))
    fwd = F.normalize(pivot - cams[:, :3, 3], dim=-1)
    torch.testing.assert_close(cams[:, :3, 2], fwd)


def test_iterative_sampling_pipeline_composes():
    """The call sequence the LightningModule's sample() will use, with tiny random networks:
    view 0 from the unconditional model, each later view from the conditional one on the aggregation
    of the previous views, with CFG on the class label and the official x0 guidance."""
    from genvs.core.samplers import DDIMScheduler, Sampler, cfg_combine
    from genvs.methods.warping.depth import SAMPLE_FAR, SAMPLE_NEAR

    H = W = 16
    uncond = _randomize(_tiny_unet())
    cond_net = conditional_from_unconditional(uncond)
    sched = DiscreteSchedule("linear")
    sampler = Sampler(DDIMScheduler(timestep_spacing="trailing"), num_steps=3, guidance_scale=1.5)
    g = torch.Generator().manual_seed(0)
    B = 2
    labels = torch.tensor([1, 3])
    K = intrinsics_from_fov(45.0, H, W).expand(B, 3, 3)
    cams = viewset("3x9")[:3]  # views 0, 1, 2

    def uncond_fn(z, logsnr, t):
        both = uncond(torch.cat([z, z]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, -1)]))
        c, u = both.chunk(2)
        return cfg_combine(c, u, sampler.guidance_scale)

    views = [sampler.loop(uncond_fn, (B, 4, H, W), sched, "eps", generator=g)]
    bound = sampler.bind(sched, "eps")
    bound.set_timesteps(sampler.num_steps)
    t_min = int(bound.timesteps[-1])  # the last step: no colour guidance there (official)
    for j in range(1, 3):
        prev = torch.stack(views, 1).clamp(-1, 1)  # [B, j, 4, H, W]
        depths = denormalize_depth(prev[:, :, 3:], SAMPLE_NEAR, SAMPLE_FAR)
        c2w_prev = cams[:j].expand(B, j, 4, 4)
        c = aggregate_views(prev[:, :, :3], depths, K[:, None].expand(B, j, 3, 3), c2w_prev, K, cams[j].expand(B, 4, 4))
        assert c.rgb.shape == (B, 3, H, W) and c.depth_convex.shape == (B, 1, H, W)

        def cond_fn(z, logsnr, t, c=c):
            x = conditional_input(z, c, generator=g)
            both = cond_net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, -1)]))
            cc, uu = both.chunk(2)
            eps = cfg_combine(cc, uu, sampler.guidance_scale)
            return guide_eps(eps, z, logsnr, c, last_step=bool((t == t_min).all()))

        views.append(sampler.loop(cond_fn, (B, 4, H, W), sched, "eps", generator=g))
    out = torch.stack(views, 1)
    assert out.shape == (B, 3, 4, H, W) and torch.isfinite(out).all()


def _to_ivid_layout(sd, head_channels):
    """genvs ADMUNet state dict -> the official AdmUnet2d key layout (independent inverse of the converter)."""
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}
    out = {"time_embed.0.freqs": torch.zeros(1)}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "time_embed":
            out[f"time_embed.{int(p[1]) + 1}.{p[2]}"] = v
        elif p[0] in ("label_emb",):
            out[k] = v
        elif p[0] == "input_conv":
            out[f"input_blocks.0.0.{p[1]}"] = v
        elif p[0] in ("out_norm", "out_conv"):
            out[f"out.{0 if p[0] == 'out_norm' else 2}.{p[1]}"] = v
        else:
            if p[0] == "down":
                pre, rest = f"input_blocks.{int(p[1]) + 1}.{p[2]}", p[3:]
            elif p[0] == "mid":
                pre, rest = f"middle_block.{p[1]}", p[2:]
            else:
                pre, rest = f"output_blocks.{p[1]}.{p[2]}", p[3:]
            if rest[0] in res:
                out[f"{pre}.{res[rest[0]]}.{rest[1]}"] = v
            else:
                name = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}[rest[0]]
                if rest[0] in ("qkv", "proj") and v.ndim == 4:
                    v = v[..., 0]
                if rest[0] == "qkv":
                    C = v.shape[0] // 3
                    v = v.reshape(3, C // head_channels, head_channels, *v.shape[1:]).transpose(0, 1).reshape(3 * C, *v.shape[1:])
                out[f"{pre}.{name}.{rest[1]}"] = v
    return out


def test_official_checkpoint_conversion():
    from genvs.methods.warping.network import Attention, convert_ivid_state_dict

    u = _randomize(_tiny_unet())
    official = _to_ivid_layout(u.state_dict(), 8)
    assert "input_blocks.0.0.weight" in official and "middle_block.1.qkv.weight" in official
    v = _tiny_unet()
    v.load_state_dict(convert_ivid_state_dict(official, num_head_channels=8), strict=True)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 800])
    torch.testing.assert_close(v(x, t, torch.tensor([0, -1])), u(x, t, torch.tensor([0, -1])))

    # the attention of the official layout (QKV interleaved per head, Conv1d), written out here, equals
    # genvs' attention on the converted weights
    C, hc, T = 32, 8, 36
    torch.manual_seed(1)
    qkv_w, qkv_b = torch.randn(3 * C, C, 1) * 0.2, torch.randn(3 * C) * 0.1
    proj_w, proj_b = torch.randn(C, C, 1) * 0.2, torch.randn(C) * 0.1
    x = torch.randn(2, C, 6, 6)
    gn = torch.nn.GroupNorm(8, C)
    h = gn(x).reshape(2, C, T)
    qkv = F.conv1d(h, qkv_w, qkv_b).reshape(2 * (C // hc), 3 * hc, T)
    q, k, vv = qkv.split(hc, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(hc), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, vv).reshape(2, C, T)
    ref = x + F.conv1d(a, proj_w, proj_b).reshape(2, C, 6, 6)
    conv = convert_ivid_state_dict(
        {"middle_block.1.norm.weight": gn.weight, "middle_block.1.norm.bias": gn.bias, "middle_block.1.qkv.weight": qkv_w,
         "middle_block.1.qkv.bias": qkv_b, "middle_block.1.proj_out.weight": proj_w, "middle_block.1.proj_out.bias": proj_b},
        num_head_channels=hc,
    )
    att = Attention(C, hc, 8)
    att.load_state_dict({k.split(".", 2)[2]: v for k, v in conv.items()})
    torch.testing.assert_close(att(x), ref, atol=1e-5, rtol=1e-4)
