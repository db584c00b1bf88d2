"""DFM parts: projection, volume rendering of analytic fields, the denoiser, training and sampling helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genvs.core.cameras import (
    camera_rays,
    intrinsics_from_fov,
    look_at,
    optical_axes_center,
    orbit_around,
    orbit_poses,
    pixel_rays,
)
from genvs.core.diffusion import DiscreteSchedule, dynamic_threshold
from genvs.core.samplers import Sampler
from genvs.core.views import Views
from genvs.methods.dfm import (
    DFMDenoiser,
    PixelNeRFField,
    Scene,
    TimmEncoder,
    VolumeRenderer,
    dfm_sample,
    dfm_sample_autoregressive,
    dfm_training_losses,
    edge_aware_smoothness,
    init_joint_field_from_context_field,
    pixelnerf_losses,
    random_patches,
)
from genvs.methods.dfm.pixelnerf import DiTEncoder, harmonic_embedding
from genvs.methods.dfm.render import composite_weights, distortion_loss, interval_edges, sample_pdf


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Tiny tensors: one thread is faster than two (and far faster on a shared, busy CPU)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2, stem_channels=8)
TINY_TIMM = dict(backbone="resnet18", backbone_kwargs=dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)))


def tiny_denoiser(encoder="dit", **kw) -> DFMDenoiser:
    args = dict(
        encoder=encoder,
        encoder_kwargs=TINY_DIT if encoder == "dit" else TINY_TIMM,
        feature_dim=16,
        cond_features=4,
        mlp_hidden=32,
        near=0.5,
        far=2.5,
        n_coarse=8,
        n_fine=8,
        cond_n_coarse=8,
        chunk_rays=1024,
    )
    args.update(kw)
    return DFMDenoiser(**args)


def cameras(B: int, V: int, H: int, radius: float = 1.5):
    c2w = orbit_poses(V, radius=radius, elevation_deg=20.0).expand(B, V, 4, 4).clone()
    K = intrinsics_from_fov(50.0, H).expand(B, V, 3, 3).clone()
    return K, c2w


# ----------------------------------------------------------------------------------------- core additions
def test_pixel_rays_match_camera_rays_and_have_unit_z():
    K, c2w = cameras(2, 3, 8)
    K[..., 0, 2] += 0.7  # off-centre principal point
    o, d = camera_rays(K, c2w, 8, 6, normalize=False)
    uv = torch.stack(torch.meshgrid(torch.arange(8) + 0.5, torch.arange(6) + 0.5, indexing="ij")[::-1], -1)
    o2, d2 = pixel_rays(uv.reshape(1, 1, -1, 2).expand(2, 3, -1, 2), K, c2w)
    assert torch.allclose(d.reshape(2, 3, -1, 3), d2, atol=1e-6)
    assert torch.allclose(o.reshape(2, 3, -1, 3), o2)
    z_cam = (d2 @ c2w[..., :3, :3]).select(-1, 2)  # camera-frame z of each direction
    assert torch.allclose(z_cam, torch.ones_like(z_cam), atol=1e-6)


def test_optical_axes_center_and_orbit_around_an_object():
    target = torch.tensor([0.3, -0.2, 0.1])
    eye = torch.tensor([[2.0, 0.0, 0.5], [0.0, 2.5, 1.0], [-1.5, -1.0, 0.2]]) + target
    c2w = look_at(eye, target)
    assert torch.allclose(optical_axes_center(c2w), target, atol=1e-3)
    assert torch.allclose(optical_axes_center(c2w[None].expand(2, 3, 4, 4)), target.expand(2, 3), atol=1e-3)
    single = optical_axes_center(c2w[:1])  # one camera: ill-posed, stays finite near the camera
    assert torch.isfinite(single).all()
    up = torch.tensor([0.0, 0.0, 1.0])
    orbit = orbit_around(c2w[0], 4, axis=up, center=target)
    assert orbit.shape == (4, 4, 4) and torch.allclose(orbit[0], c2w[0], atol=1e-6)
    # an independent construction: a quarter turn about +z through the target = a camera at the rotated eye
    # looking at the target (the look-at frame of the rotated eye, up stays +z)
    rel = eye[0] - target
    rot = torch.tensor([-rel[1], rel[0], rel[2]]) + target
    assert torch.allclose(orbit[1], look_at(rot[None], target)[0], atol=1e-5)
    R = orbit[:, :3, :3]
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(4, 3, 3), atol=1e-5)
    dist = (orbit[:, :3, 3] - target).norm(dim=-1)
    assert torch.allclose(dist, dist[:1].expand(4), atol=1e-5)


def test_dynamic_threshold():
    x = torch.tensor([[0.5, -0.9, 0.2, 0.1], [4.0, -4.0, 4.0, -4.0]])
    y = dynamic_threshold(x, 0.95)
    assert torch.allclose(y[0], x[0])  # quantile < 1: plain clipping, values inside stay
    assert torch.allclose(y[1], x[1] / 4.0)  # quantile 4: whole example scaled into [-1, 1]


# ---------------------------------------------------------------------------------------- projection
def test_field_samples_features_at_the_numpy_projection():
    """Feature maps that store their own pixel coordinates read back K[R|t] X / z exactly."""
    B, N, H, W = 1, 3, 24, 32
    eye = torch.tensor([[2.0, 0.3, 0.5], [-1.5, 1.2, 0.4], [0.3, -2.0, 1.0]])
    c2w = look_at(eye)[None]
    K = torch.tensor([[[30.0, 0, 15.3], [0, 28.0, 12.9], [0, 0, 1]]]).repeat(1, N, 1, 1)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    fmap = torch.stack([xs, ys]).expand(B, N, 2, H, W).clone()  # channel 0 = u, channel 1 = v
    scene = Scene(fmap, K, c2w, torch.zeros(B, N), (H, W))
    field = PixelNeRFField(feat_dim=2, hidden=8, n_blocks=2, combine_layer=1, n_feats_out=0)
    pts = torch.randn(B, 50, 3) * 0.2
    feats, p_cam = field.sample_features(scene, pts)

    for v in range(N):  # independent computation: x = K [R | t] X with numpy
        Twc = c2w[0, v].double().numpy()
        Rcw = Twc[:3, :3].T
        tcw = -Rcw @ Twc[:3, 3]
        Xc = pts[0].double().numpy() @ Rcw.T + tcw
        x = Xc @ K[0, v].double().numpy().T
        uv = x[:, :2] / x[:, 2:]
        inside = (uv[:, 0] > 0.5) & (uv[:, 0] < W - 0.5) & (uv[:, 1] > 0.5) & (uv[:, 1] < H - 0.5)
        assert inside.sum() > 40
        np.testing.assert_allclose(feats[0, v, inside].numpy(), uv[inside], atol=1e-3)
        np.testing.assert_allclose(p_cam[0, v].numpy(), Xc, atol=1e-5)


# ------------------------------------------------------------------------------------------- rendering
def _slab_field(z0: float, z1: float, sigma: float, color: float):
    def field(p):
        inside = ((p[..., 2] >= z0) & (p[..., 2] <= z1)).float()
        rgb = torch.full((*p.shape[:-1], 3), color)
        return sigma * inside, rgb, p[..., :1] * 0 + 1.0  # one feature channel = 1 everywhere

    return field


def test_render_constant_slab_matches_analytic_opacity_depth_and_colour():
    H = W = 8
    K = intrinsics_from_fov(60.0, H)[None, None]
    c2w = torch.eye(4)[None, None]  # camera at the origin looking along +z
    z0, z1, sigma, color = 1.5, 2.5, 2.0, 0.6
    r = VolumeRenderer(near=0.5, far=4.0, n_coarse=64, n_fine=128, chunk_rays=16).eval()
    out = r.render_views(_slab_field(z0, z1, sigma, color), K, c2w, (H, W))
    _, d = camera_rays(K[0, 0], c2w[0, 0], H, W, normalize=False)
    k = sigma * d.norm(dim=-1)  # density per unit z-depth along each ray
    L = z1 - z0
    opacity = 1 - torch.exp(-k * L)
    # E[z w] over the slab: integral_{z0}^{z1} z k exp(-k (z - z0)) dz
    depth = z0 * opacity + (1 - torch.exp(-k * L) * (1 + k * L)) / k
    assert torch.allclose(out.opacity[0, 0, 0], opacity, atol=3e-3)
    assert torch.allclose(out.depth[0, 0, 0], depth, atol=1e-2)
    rgb = color * opacity + (-1.0) * (1 - opacity)  # black background = -1
    assert torch.allclose(out.rgb[0, 0], rgb.expand(3, H, W), atol=3e-3)
    assert torch.allclose(out.feats[0, 0, 0], opacity, atol=3e-3)  # features are not composited with background
    assert out.rgb.shape == (1, 1, 3, H, W) and out.depth.shape == (1, 1, 1, H, W)


def test_render_sphere_chord_lengths_from_an_orbit_camera():
    H = W = 12
    radius, sigma = 0.6, 3.0
    c2w = look_at(torch.tensor([[2.0, 1.0, 0.5]]))[None]  # [1, 1, 4, 4]
    K = intrinsics_from_fov(45.0, H)[None, None]

    def field(p):
        inside = (p.norm(dim=-1) <= radius).float()
        return sigma * inside, torch.zeros(*p.shape[:-1], 3), None

    r = VolumeRenderer(near=1.0, far=4.0, n_coarse=64, n_fine=128).eval()
    out = r.render_views(field, K, c2w, (H, W))
    o, d = camera_rays(K[0, 0], c2w[0, 0], H, W, normalize=True)
    b = (o * d).sum(-1)
    disc = b**2 - (o * o).sum(-1) + radius**2
    chord = 2 * disc.clamp_min(0).sqrt()
    expected = 1 - torch.exp(-sigma * chord)
    assert (chord > 0).sum() > 20 and (chord == 0).sum() > 20
    assert torch.allclose(out.opacity[0, 0, 0], expected, atol=0.02)
    assert out.feats.shape == (1, 1, 0, H, W)


def test_importance_samples_follow_the_pdf():
    edges = torch.linspace(0, 4, 5).expand(2, 5)
    w = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    z = sample_pdf(edges, w, 64, perturb=False)
    assert ((z[0] > 1) & (z[0] < 2)).float().mean() > 0.99  # all mass in bin [1, 2]
    assert torch.allclose(z[1], (torch.arange(64) + 0.5) / 64 * 4, atol=0.01)  # uniform pdf = quantiles
    z = sample_pdf(edges, w, 1000, perturb=True)
    assert ((z[0] > 1) & (z[0] < 2)).float().mean() > 0.99


def test_composite_weights_exact_for_piecewise_constant_density():
    z = torch.tensor([[0.5, 1.5, 2.5]])
    e = interval_edges(z, 0.0, 3.0)
    assert torch.equal(e, torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    w = composite_weights(torch.tensor([[1.0, 0.0, 2.0]]), e)
    expected = torch.tensor([[1 - math.exp(-1), 0.0, math.exp(-1) * (1 - math.exp(-2))]])
    assert torch.allclose(w, expected, atol=1e-6)


def test_chunking_and_checkpointing_do_not_change_values_or_gradients():
    den = tiny_denoiser()
    B, Nc, H = 1, 2, 8
    K, c2w = cameras(B, Nc + 1, H)
    scene = den.encode_context(torch.rand(B, Nc, 3, H, H) * 2 - 1, K[:, :Nc], c2w[:, :Nc])

    def run(chunk: int, ckpt: bool):
        den.renderer.chunk_rays, den.renderer.checkpoint = chunk, ckpt
        den.zero_grad()
        torch.manual_seed(1)
        out = den.render(scene, K[:, Nc:], c2w[:, Nc:])
        (out.rgb.square().mean() + out.depth.mean()).backward(retain_graph=True)
        return out.rgb.detach(), den.field.lin_pe.weight.grad.clone(), den.field.blocks[0].fc0.weight.grad.clone()

    def same(a, b):
        return all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))

    den.eval()  # deterministic samples: any chunking gives the same image and gradients
    ref = run(10**6, False)
    assert same(run(7, False), ref) and same(run(7, True), ref)
    den.train()  # jittered samples: checkpoint recomputation replays the same random samples
    a, b = run(7, False), run(7, True)
    assert same(a, b)
    assert not torch.allclose(a[0], ref[0])  # (jitter is on in training)


def test_distortion_loss_matches_the_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    z = torch.sort(torch.rand(3, 10, generator=g) * 3 + 1, dim=-1).values
    w = torch.rand(3, 10, generator=g) / 5
    near, far = 0.5, 4.5
    e = interval_edges(z, near, far)
    got = distortion_loss(w, e, near, far)
    s_e = (e - near) / (far - near)
    mid = 0.5 * (s_e[:, 1:] + s_e[:, :-1])
    pair = (w[:, :, None] * w[:, None, :] * (mid[:, :, None] - mid[:, None, :]).abs()).sum((1, 2))
    uni = (w**2 * (s_e[:, 1:] - s_e[:, :-1])).sum(1) / 3
    assert torch.allclose(got, pair + uni, atol=1e-6)
    one_spike = torch.zeros(1, 10)
    one_spike[0, 4] = 1.0
    spread = torch.full((1, 10), 0.1)
    assert distortion_loss(one_spike, e[:1], near, far) < distortion_loss(spread, e[:1], near, far)


def test_edge_aware_smoothness():
    depth = torch.ones(2, 1, 6, 6)
    img = torch.zeros(2, 3, 6, 6)
    assert torch.allclose(edge_aware_smoothness(img, depth), torch.zeros(2))  # constant depth: smooth
    depth[:, :, :, 3:] = 2.0  # a depth step between columns 2 and 3
    flat = edge_aware_smoothness(img, depth)
    inv = 1 / depth[0, 0]
    expected = ((inv / inv.mean())[:, 2] - (inv / inv.mean())[:, 3]).abs().sum() / 36
    assert torch.allclose(flat[0], expected)
    img[:, :, :, 3:] = 1.0  # an image edge at the same place discounts the depth step by exp(-1)
    assert torch.allclose(edge_aware_smoothness(img, depth), flat * math.exp(-1.0))


# ---------------------------------------------------------------------------------------------- encoders
def test_dit_absolute_pose_conditioning():
    x = harmonic_embedding(torch.tensor([[0.5, -1.0]]), n_freqs=3)
    f = torch.tensor([1.0, 2.0, 4.0])
    expected = torch.cat([torch.sin(torch.outer(torch.tensor([0.5, -1.0]), f)).flatten(),
                          torch.cos(torch.outer(torch.tensor([0.5, -1.0]), f)).flatten(), torch.tensor([0.5, -1.0])])
    assert torch.allclose(x[0], expected)
    enc = DiTEncoder(in_channels_target=7, out_channels=8, abs_pose=True, **TINY_DIT)
    assert enc.pose_mlp[0].in_features == 156  # 12 pose numbers x (2 x 6 + 1), as PyTorch3D's HarmonicEmbedding
    for p in enc.parameters():  # wake the zero-initialised layers up
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    img = torch.randn(2, 3, 8, 8)
    c2w = orbit_poses(2)
    a = enc(img, torch.zeros(2), c2w=c2w)
    b = enc(img, torch.zeros(2), c2w=c2w.flip(0))
    assert not torch.allclose(a, b)  # the camera pose conditions the features
    with pytest.raises(ValueError, match="abs_pose"):
        enc(img, torch.zeros(2))



def test_timm_encoder_multiscale_features_and_local_pretrained(tmp_path):
    import timm

    enc = TimmEncoder(in_channels_target=9, **TINY_TIMM)
    assert enc.out_channels == 64 + 8 + 16 + 32  # conv1 + layer1..3, as pixelNeRF's 4 levels
    x = torch.randn(2, 3, 32, 32)
    f = enc(x, torch.zeros(2))
    assert f.shape == (2, enc.out_channels, 16, 16)  # half resolution (first pool skipped)
    # zero-initialised FiLM and target stem: at init time and extra channels change nothing
    f_t = enc(torch.cat([x, torch.randn(2, 6, 32, 32)], 1), torch.full((2,), 0.7), target=True)
    assert torch.allclose(f, f_t, atol=1e-5)

    ref = timm.create_model("resnet18", pretrained=False, **TINY_TIMM["backbone_kwargs"])
    path = tmp_path / "resnet18_tiny.pth"
    torch.save(ref.state_dict(), path)
    enc2 = TimmEncoder(pretrained=str(path), in_channels_target=9, **TINY_TIMM)
    assert torch.equal(enc2.backbone.conv1.weight, ref.conv1.weight)
    assert torch.equal(enc2.backbone.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="missing_weights.pth"):
        TimmEncoder(pretrained=str(tmp_path / "missing_weights.pth"), **TINY_TIMM)


# ---------------------------------------------------------------------------------------------- denoiser
@pytest.mark.parametrize("encoder, injection", [("dit", "input"), ("timm", "blocks")])
def test_denoiser_shapes_at_32px(encoder, injection):
    den = tiny_denoiser(encoder, cond_features=64, n_coarse=4, n_fine=4, cond_n_coarse=4, feature_injection=injection)
    assert len(den.field.lin_z) == (1 if injection == "input" else 3)
    assert den.target_in_channels == 71  # noisy RGB 3 + rendered RGB 3 + depth 1 + features 64, as official
    B, Nc, M, H = 1, 2, 2, 32
    K, c2w = cameras(B, Nc + M, H)
    ctx = torch.rand(B, Nc, 3, H, H) * 2 - 1
    cams = (K[:, :Nc], c2w[:, :Nc])
    tgt = (K[:, Nc], c2w[:, Nc], K[:, Nc:], c2w[:, Nc:])
    out = den(ctx, *cams, torch.randn(B, 3, H, H), torch.rand(B), *tgt)
    assert out.render.rgb.shape == (B, M, 3, H, H)
    assert out.render.depth.shape == (B, M, 1, H, H)
    assert out.cond.shape == (B, 3 + 1 + 64, H, H)
    assert out.cond_render.rgb.shape == (B, 1, 3, H, H)
    assert out.scene.N == Nc + 1 and torch.equal(out.scene.t[:, :Nc], torch.zeros(B, Nc))
    assert out.render.rgb.abs().max() <= 1.0 and torch.isfinite(out.render.rgb).all()
    uv, idx = random_patches(B, M, H, H, 8)
    out = den(ctx, *cams, torch.randn(B, 3, H, H), torch.rand(B), *tgt, uv)
    assert out.render.rgb.shape == (B, M, 64, 3)


def test_random_patches_index_the_same_pixels_as_their_uv():
    uv, idx = random_patches(3, 2, 20, 30, 6, generator=torch.Generator().manual_seed(0))
    assert uv.shape == (3, 2, 36, 2) and idx.shape == (3, 2, 36)
    x, y = (uv[..., 0] - 0.5).long(), (uv[..., 1] - 0.5).long()
    assert torch.equal(idx, y * 30 + x)
    assert torch.equal(uv[:, 0], uv[:, 1])  # same patch in every target view of a scene (official)
    assert (x.amax(-1) - x.amin(-1) == 5).all() and (y.amax(-1) - y.amin(-1) == 5).all()


def test_scene_renders_many_poses_and_reproduces_the_x0_render():
    den = tiny_denoiser().eval()
    B, Nc, H = 1, 2, 16
    K, c2w = cameras(B, Nc + 1, H)
    with torch.no_grad():
        ctx = torch.rand(B, Nc, 3, H, H) * 2 - 1
        out = den(ctx, K[:, :Nc], c2w[:, :Nc], torch.randn(B, 3, H, H), torch.tensor([0.3]), K[:, Nc], c2w[:, Nc])
        orbit = orbit_poses(5, radius=1.5)[None]
        video = den.render(out.scene, K[:, :1].expand(B, 5, 3, 3), orbit)
        again = den.render(out.scene, K[:, Nc:], c2w[:, Nc:])
    assert video.rgb.shape == (1, 5, 3, H, H) and video.depth.shape == (1, 5, 1, H, H)
    assert torch.allclose(again.rgb, out.render.rgb, atol=1e-5)
    assert (video.rgb[0, 0] - video.rgb[0, 2]).abs().mean() > 1e-4  # different poses, different images


def test_bf16_autocast_and_channels_last():
    den = tiny_denoiser().to(memory_format=torch.channels_last)
    B, Nc, H = 1, 2, 16
    K, c2w = cameras(B, Nc + 1, H)
    ctx = (torch.rand(B, Nc, 3, H, H) * 2 - 1)
    args = (ctx, K[:, :Nc], c2w[:, :Nc], torch.randn(B, 3, H, H), torch.tensor([0.5]), K[:, Nc], c2w[:, Nc])
    den.eval()
    with torch.no_grad():
        ref = den(*args).render.rgb
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = den(*args)
    assert torch.isfinite(out.render.rgb).all()
    assert (out.render.rgb.float() - ref).abs().mean() < 0.05


# -------------------------------------------------------------------------------------------- training
def _batch(B=1, Nc=1, M=2, H=16):
    K, c2w = cameras(B, Nc + M, H)
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, H), indexing="ij")
    base = torch.stack([xx, yy, xx * yy])  # smooth, structured images
    images = (base[None, None] * 0.8 + 0.1 * torch.randn(B, Nc + M, 3, H, H, generator=g)).clamp(-1, 1)
    return Views(images, K, c2w, num_context=Nc)


def test_training_loss_falls_on_a_fixed_batch():
    den = tiny_denoiser(n_coarse=6, n_fine=6, cond_n_coarse=6)
    schedule = DiscreteSchedule("cosine")
    views = _batch()
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        g = torch.Generator().manual_seed(0)  # same t, noise and patches every step
        terms = dfm_training_losses(den, schedule, views, lpips=None, patch_size=8, generator=g)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
        assert set(terms) >= {"loss", "mse", "lpips", "cond_mse"}
    assert losses[-1] < 0.5 * losses[0], losses


def test_training_losses_use_lpips_and_drop_context_for_cfg():
    den = tiny_denoiser(n_coarse=4, n_fine=4, cond_n_coarse=4)
    views = _batch(B=2)
    calls = []

    def fake_lpips(a, b):
        calls.append(a.shape)
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    terms = dfm_training_losses(den, DiscreteSchedule("cosine"), views, lpips=fake_lpips, patch_size=8, p_uncond=1.0)
    assert calls == [torch.Size([4, 3, 8, 8])]  # B * M patches of 8 x 8
    assert terms["lpips"] > 0 and terms["cond_mse"] == 0  # every scene unconditional: no cond loss


def test_pixelnerf_stage_and_joint_field_initialisation():
    den = tiny_denoiser(n_coarse=4, n_fine=4, cond_n_coarse=4)
    views = _batch(B=1, Nc=2, M=1)
    terms = pixelnerf_losses(den, views, patch_size=8, generator=torch.Generator().manual_seed(0))
    terms["loss"].backward()
    assert den.cond_field.lin_out.weight.grad.abs().sum() > 0 and den.field.lin_out.weight.grad is None
    init_joint_field_from_context_field(den)
    K, c2w = views.K, views.c2w
    scene = den.encode_context(views.images[:, :2], K[:, :2], c2w[:, :2])
    pts = torch.randn(1, 30, 3) * 0.3
    with torch.no_grad():
        s1, c1, f1 = den.cond_field(scene, pts)
        s2, c2, f2 = den.field(scene, pts)
    assert torch.allclose(s1, s2) and torch.allclose(c1, c2) and f1.shape[-1] == 4 and f2.shape[-1] == 0


# -------------------------------------------------------------------------------------------- sampling
def test_sampling_with_guidance_temperature_and_autoregressive_mode():
    den = tiny_denoiser(n_coarse=4, n_fine=4, cond_n_coarse=4).eval()
    schedule = DiscreteSchedule("cosine")
    sampler = Sampler(num_steps=3, guidance_scale=2.0, noise_temperature=0.85)
    B, Nc, H = 1, 1, 16
    K, c2w = cameras(B, Nc + 2, H)
    ctx = torch.rand(B, Nc, 3, H, H) * 2 - 1
    g = torch.Generator().manual_seed(0)
    x, scene = dfm_sample(den, schedule, sampler, ctx, K[:, :Nc], c2w[:, :Nc], K[:, Nc], c2w[:, Nc], generator=g)
    assert x.shape == (B, 3, H, H) and x.abs().max() <= 1.0 + 1e-5
    assert scene.N == Nc + 1 and scene.B == B
    assert scene.t[0, -1].item() == pytest.approx(333 / 1000)  # (i + 1) / T of the last trailing timestep 332
    with torch.no_grad():
        video = den.render(scene, K[:, :1].expand(B, 3, 3, 3), orbit_poses(3, radius=1.5)[None])
    assert video.rgb.shape == (B, 3, 3, H, H)
    xs, scene = dfm_sample_autoregressive(
        den, schedule, sampler.replace(guidance_scale=1.0), ctx, K[:, :Nc], c2w[:, :Nc], K[:, Nc:], c2w[:, Nc:],
        generator=g,
    )
    assert xs.shape == (B, 2, 3, H, H) and scene.N == Nc + 1 + 1  # context + first sample + target
