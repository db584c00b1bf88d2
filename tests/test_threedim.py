import math

import pytest
import torch

from conftest import TINY_XUNET
from genvs.core.cameras import intrinsics_from_fov, orbit_poses, ray_posenc
from genvs.core.config import spec
from genvs.core.samplers import DDIMScheduler, Sampler
from genvs.core.views import Views
from genvs.methods.threedim import ThreeDiM, XUNet
from genvs.methods.threedim.xunet import interleave_frames, logsnr_embedding_input


def tiny_model(**kw):
    kw.setdefault("sampler", spec(Sampler, scheduler=spec(DDIMScheduler, timestep_spacing="trailing"), num_steps=4, guidance_scale=2.0))
    m = ThreeDiM(network=spec(XUNet, **TINY_XUNET), **kw)
    m.setup_ema()
    return m


def pair_views(B=4, H=32):
    K = intrinsics_from_fov(52, H).expand(B, 2, 3, 3).clone()
    c2w = orbit_poses(8)[torch.tensor([[0, 2], [1, 4], [3, 5], [6, 7]])][:B]
    return Views(torch.rand(B, 2, 3, H, H) * 2 - 1, K, c2w, num_context=1, scene=[f"s{i}" for i in range(B)])


def inputs(B=2, H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = pair_views(B, H)
    rays = ray_posenc(v.K, v.c2w, H, H)
    return torch.randn(B, 3, H, H, generator=g), torch.randn(B, 3, H, H, generator=g), rays


def perturb_zero_init(net):
    """Give the zero-initialised output layers weights so every path carries signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_noise_level_embedding_input_is_not_raw_logsnr():
    lam = torch.tensor([20.0, 0.0, -20.0, 50.0])
    t = logsnr_embedding_input(lam)
    torch.testing.assert_close(t, torch.tensor([2 * math.atan(math.exp(-10)) / math.pi, 0.5, 2 * math.atan(math.exp(10)) / math.pi, 2 * math.atan(math.exp(-10)) / math.pi]))
    assert t.min() >= 0 and t.max() <= 1


def test_xunet_shapes_and_zero_init_output():
    net = XUNet(**TINY_XUNET)
    x, z, rays = inputs()
    out = net(x, z, torch.tensor([[20.0, 1.0], [20.0, -3.0]]), rays)
    assert out.shape == (2, 3, 32, 32) and torch.all(out == 0)  # zero-initialised final conv
    assert net.pose_dim == 144


def test_initialisation_follows_the_paper_code():
    """Flax defaults: kernels with variance 1/fan_in (truncated normal), zero biases; the output
    layers of residual, attention and final blocks start at zero."""
    torch.manual_seed(0)
    net = XUNet(image_size=32, ch=64, ch_mult=(1, 2), emb_ch=128, num_res_blocks=1, attn_resolutions=(16,))
    w = net.down[0][0].res.conv1.weight  # 64 -> 64, 3x3: fan_in 576
    assert abs(w.std().item() * math.sqrt(576) - 1) < 0.05
    assert w.abs().max() <= 2 / math.sqrt(576) / 0.8796 + 1e-6  # truncated at two standard deviations
    assert torch.all(net.down[0][0].res.conv1.bias == 0) and torch.all(net.logsnr_mlp[0].bias == 0)
    for m in (net.down[0][0].res.conv2, net.down[1][0].attn[1].out, net.conv_out):
        assert torch.all(m.weight == 0) and torch.all(m.bias == 0)


def test_group_norms_keep_the_papers_group_size():
    """The paper's widths keep 32 groups; narrow toy widths keep >= 8 channels per group instead of
    degenerating into per-channel instance norms."""
    groups = lambda net: {m.num_channels: m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}  # noqa: E731
    with torch.device("meta"):
        paper = groups(XUNet())
    assert set(paper.values()) == {32}
    toy = groups(XUNet(image_size=32, ch=32, ch_mult=(1, 2, 2), emb_ch=64, num_res_blocks=1, attn_resolutions=(8, 16)))
    assert toy[32] == 4 and toy[64] == 8 and all(c // g >= 8 for c, g in toy.items())


def test_paper_default_size():
    """The paper's 128x128 X-UNet has ~471M parameters."""
    with torch.device("meta"):
        n = sum(p.numel() for p in XUNet().parameters())
    assert 440e6 < n < 500e6, n


def test_frames_share_weights_and_interact_only_through_cross_attention():
    net = XUNet(**TINY_XUNET).eval()
    perturb_zero_init(net)
    seen = []
    net.conv_in.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x, z, rays = inputs()
    lam = torch.tensor([[20.0, 0.5], [20.0, 0.5]])
    base = net(x, z, lam, rays)
    assert seen == [4]  # one conv_in call over both frames of both scenes: literally shared weights
    assert not torch.allclose(base, net(-x, z, lam, rays))  # the target reads the clean frame
    no_attn = XUNet(**{**TINY_XUNET, "attn_resolutions": ()}).eval()
    perturb_zero_init(no_attn)
    torch.testing.assert_close(no_attn(x, z, lam, rays), no_attn(-x, z, lam, rays))  # no other path between frames
    # both frames go through identical weights: swapping frames (images, cameras, noise levels) swaps roles,
    # which only the learned per-frame embedding distinguishes
    net.ref_pose_emb.data.zero_()
    a = net(x, z, lam, rays)
    with torch.no_grad():
        feats = {}
        net.norm_out.register_forward_hook(lambda m, i, o: feats.setdefault("h", i[0]))
    assert a.shape == base.shape


def test_cfg_dropout_removes_conditioning():
    m = tiny_model(cfg_drop="frame")
    perturb_zero_init(m.denoiser)
    x, z, rays = inputs()
    lam = torch.tensor([0.3, -1.0])
    off = torch.zeros(2, dtype=torch.bool)
    on = torch.ones(2, dtype=torch.bool)
    m.eval()
    uncond = m.denoise(x, z, lam, rays, off)
    torch.testing.assert_close(uncond, m.denoise(-x, z, lam, rays.flip(1), off))  # neither image nor poses matter
    assert not torch.allclose(m.denoise(x, z, lam, rays, on), m.denoise(-x, z, lam, rays, on))
    pose_only = tiny_model(cfg_drop="pose").eval()
    perturb_zero_init(pose_only.denoiser)
    u = pose_only.denoise(x, z, lam, rays, off)
    torch.testing.assert_close(u, pose_only.denoise(x, z, lam, rays.flip(1), off))  # poses dropped
    assert not torch.allclose(u, pose_only.denoise(-x, z, lam, rays, off))  # the image is kept


def test_training_drops_conditioning_for_ten_percent(monkeypatch):
    m = tiny_model()
    masks = []

    def spy(x, z, logsnr, rays, cond_mask=None, pose=None):  # records what the network is given; only masks matter
        masks.append(cond_mask.clone())
        assert torch.all(logsnr[:, 0] == 20.0)  # the clean frame sits at logSNR +20
        return torch.zeros_like(z)

    monkeypatch.setattr(m.denoiser, "forward", spy)
    v = Views.collate([pair_views(4)] * 50)  # 200 examples
    m.training_loss(v)
    drop = 1 - torch.cat(masks).float().mean()
    assert 0.05 < float(drop) < 0.16


def test_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    m = tiny_model()
    v = pair_views(4)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        torch.manual_seed(123)  # same t, noise and CFG mask every step: only the weights change
        loss = m.training_loss(v)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_sample_returns_targets_with_images():
    m = tiny_model().eval()
    v = pair_views(2)
    ctx, tgt = v.split()
    tgt3 = Views.cat([tgt, tgt, tgt], dim=1, num_context=0)
    out = m.sample(ctx, tgt3.cameras_only(), generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 3, 32, 32) and out.images.abs().max() <= 1
    again = m.sample(ctx, tgt3.cameras_only(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.images, again.images)  # seeded sampling is reproducible


def test_precomputed_pose_embeddings_match_the_direct_path():
    """Samplers reuse per-frame pose embeddings across steps; the network must give the same output."""
    net = XUNet(**TINY_XUNET).eval()
    perturb_zero_init(net)
    x, z, rays = inputs()
    lam = torch.tensor([[20.0, 0.5], [20.0, -2.0]])
    mask = torch.tensor([True, False])
    direct = net(x, z, lam, rays, mask)
    cond = net.frame_pose_embedding(rays[:, 0], role=0)
    tgt = net.frame_pose_embedding(rays[:, 1], role=1)
    free = [net.frame_pose_embedding(None, role=r) for r in (0, 1)]
    pose = [torch.stack([torch.cat([c[:1], f0]), torch.cat([t[:1], f1])], 1).flatten(0, 1)
            for c, t, f0, f1 in zip(cond, tgt, free[0], free[1])]
    torch.testing.assert_close(net(x, z, lam, None, mask, pose=pose), direct, atol=1e-5, rtol=1e-5)


def test_interleave_frames_keeps_the_frame_order_and_channels_last():
    """Samplers interleave per-frame pose embeddings; a plain stack + flatten returns channels_last inputs
    contiguous, and every FiLM conv would then convert its emb_ch-wide input again."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 5, 6, generator=g), torch.randn(3, 8, 5, 6, generator=g)
    for fmt in (torch.contiguous_format, torch.channels_last):
        c, t = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
        out = interleave_frames(c, t)
        assert torch.equal(out[0::2], a) and torch.equal(out[1::2], b)
        assert out.is_contiguous(memory_format=fmt)
    one = a[:1].contiguous(memory_format=torch.channels_last).expand(3, -1, -1, -1)  # the unconditional branch's
    out = interleave_frames(one, one)
    assert torch.equal(out, a[:1].expand(6, -1, -1, -1)) and out.is_contiguous(memory_format=torch.channels_last)


def test_sampling_feeds_every_film_conv_channels_last():
    """With guidance and stochastic conditioning, the precomputed pose embeddings reach each FiLM conv in
    channels_last, as in training (no per-block layout conversion of the emb_ch-wide embedding)."""
    m = tiny_model().eval()
    m.configure_model()  # channels_last weights, as Lightning sets the model up
    seen = []
    for module in m.denoiser.modules():
        if type(module).__name__ == "FiLM":
            module.proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    ctx, tgt = pair_views(2).split()
    with torch.no_grad():
        m.sample(ctx, tgt.cameras_only(), generator=torch.Generator().manual_seed(0))
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} FiLM inputs not channels_last"


def _diagnostic_views(B=3):
    """Toy-like pairs: a coloured square (the object) on white, in both frames."""
    v = pair_views(B)
    images = torch.ones(B, 2, 3, 32, 32)
    images[:, 0, :, 8:16, 8:20] = torch.tensor([-1.0, 0.2, 0.5])[:, None, None]  # 8 x 12 object in the input view
    images[:, 1, :, 16:28, 12:28] = torch.tensor([0.5, -1.0, 0.2])[:, None, None]
    return v.with_images(images).split()


def test_diagnostics_uniform_cross_attention_reads_the_object_share():
    from genvs.methods.threedim.diagnostics import cross_attention_stats

    m = tiny_model().eval()
    perturb_zero_init(m.denoiser)
    crosses = [b for b in m.denoiser.modules() if getattr(b, "kind", None) == "cross"]
    with torch.no_grad():
        for b in crosses:  # q = 0: every query weighs every key equally
            b.q.weight.zero_()
            b.q.bias.zero_()
    m.use_ema_for_eval = False  # the weights set here, not the EMA's
    stats = cross_attention_stats(m, *_diagnostic_views())
    assert len(stats) == len(crosses) > 0
    for s in stats:
        assert s.entropy == pytest.approx(math.log(s.resolution**2), abs=1e-4) == pytest.approx(s.uniform_entropy)
        share = (8 * 12) / 32**2  # the object covers whole tokens at 16 and 8 px (grid-aligned)
        assert s.object_share == pytest.approx(share)
        assert s.object_mass_inside == pytest.approx(share, abs=1e-5)
        assert s.object_mass_outside == pytest.approx(share, abs=1e-5)


def test_diagnostics_conditioning_gain_sees_whether_the_input_view_is_read():
    from genvs.methods.threedim.diagnostics import conditioning_gain

    m = tiny_model().eval()
    perturb_zero_init(m.denoiser)
    m.use_ema_for_eval = False
    context, target = _diagnostic_views()
    context = context.with_images(context.images * torch.tensor([1.0, -1.0, 0.5]).view(3, 1, 1, 1, 1))  # 3 different inputs
    gain = conditioning_gain(m, context, target, logsnrs=(-4.0, 0.0))
    assert set(gain) == {-4.0, 0.0}
    assert all(right != other for right, other in gain.values())
    with torch.no_grad():  # cut the only path between the frames: the input view no longer matters
        for b in m.denoiser.modules():
            if getattr(b, "kind", None) == "cross":
                b.out.weight.zero_()
                b.out.bias.zero_()
    for right, other in conditioning_gain(m, context, target, logsnrs=(-4.0, 0.0)).values():
        assert right == pytest.approx(other, abs=1e-6)
