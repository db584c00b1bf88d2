"""MVDiffusion building blocks on a tiny random-weight Stable Diffusion saved to a temp folder."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from genvs.core.cameras import camera_rays, intrinsics_from_fov, look_at
from genvs.core.geometry import apply_homography, project_points, rotation_homography, unproject_depth
from genvs.core.samplers import Sampler
from genvs.methods.mvdiffusion.caa import CorrespondenceAttention, load_adapter, save_adapter
from genvs.methods.mvdiffusion.correspondences import (
    depth_correspondences,
    homography_correspondences,
    overlap_neighbors,
    ring_neighbors,
)
from genvs.methods.mvdiffusion.network import (
    MultiViewUNet,
    default_sampler,
    depth_channel,
    inpaint_channels,
    keyframe_condition,
    keyframe_segments,
    sample_latents,
    sd_schedule,
    training_loss,
)
from genvs.core.geometry import (
    cube_cameras,
    equirect_directions,
    equirect_to_perspective,
    panorama_cameras,
    perspective_to_equirect,
)
from genvs.methods.mvdiffusion.sd import (
    PromptEmbeddings,
    PromptEncoder,
    StableDiffusionError,
    build_tiny_sd,
    check_sd_folder,
    decode_latents,
    encode_images,
    load_stable_diffusion,
    vae_scale_factor,
)


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {
        k: build_tiny_sd(root / k, kind=k, text_encoder=False, seed=i)
        for i, k in enumerate(["base", "inpainting", "depth"])
    }


@pytest.fixture(scope="module")
def base_sd(sd_dirs):
    return load_stable_diffusion(sd_dirs["base"], text_encoder=False)


def ring(B: int, V: int, size: int, fov: float = 90.0):
    K, c2w = panorama_cameras(V, fov, size)
    return K[None].expand(B, V, 3, 3), c2w[None].expand(B, V, 4, 4)


def plain_unet(unet, latents, t, emb):
    B, V = latents.shape[:2]
    out = unet(latents.flatten(0, 1), t[:, None].expand(B, V).reshape(-1), encoder_hidden_states=emb.flatten(0, 1))
    return out.sample.unflatten(0, (B, V))


# ------------------------------------------------------------------------------------------ loading


def test_tiny_sd_loads_through_real_path(base_sd, sd_dirs):
    assert type(base_sd.unet).__name__ == "UNet2DConditionModel" and type(base_sd.vae).__name__ == "AutoencoderKL"
    assert base_sd.kind == "base" and base_sd.text_encoder is None
    assert base_sd.scheduler_config["beta_schedule"] == "scaled_linear"
    for m in (base_sd.unet, base_sd.vae):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert vae_scale_factor(base_sd.vae) == 8
    x = torch.rand(1, 2, 3, 32, 48) * 2 - 1
    z = encode_images(base_sd.vae, x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 2, 4, 4, 6) and not z.requires_grad
    assert decode_latents(base_sd.vae, z).shape == x.shape
    assert load_stable_diffusion(sd_dirs["inpainting"], text_encoder=False).in_channels == 9
    with pytest.raises(StableDiffusionError, match="stable-diffusion-2-inpainting"):
        load_stable_diffusion(sd_dirs["base"], text_encoder=False, expect_in_channels=9)


def test_clip_text_encoder_loads(tmp_path):
    path = build_tiny_sd(tmp_path / "sd", text_encoder=True)
    parts = load_stable_diffusion(path)
    enc = parts.text_encoder
    emb = enc(["a cozy living room", ""])
    assert emb.shape == (2, enc.max_length, parts.unet.config.cross_attention_dim) and not emb.requires_grad
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert not torch.allclose(emb[0], emb[1])


def test_clip_without_transformers_names_the_extra(monkeypatch, tmp_path, sd_dirs):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"genvs\[mvdiffusion\]"):
        build_tiny_sd(tmp_path / "sd", text_encoder=True)
    with pytest.raises(ImportError, match="PromptEmbeddings"):
        PromptEncoder.from_pretrained(_with_text_files(tmp_path / "sd2", sd_dirs["base"]))


def _with_text_files(dst, src):
    """A copy of a tiny SD folder plus placeholder text-encoder/tokenizer files (for the import check)."""
    import shutil

    shutil.copytree(src, dst)
    for sub, files in {"text_encoder": ["config.json", "model.safetensors"], "tokenizer": ["vocab.json", "merges.txt"]}.items():
        (dst / sub).mkdir()
        for f in files:
            (dst / sub / f).write_text("{}")
    return dst


def test_missing_sd_files_name_the_fix(tmp_path, sd_dirs):
    with pytest.raises(StableDiffusionError, match="does not exist.*huggingface-cli download"):
        check_sd_folder(tmp_path / "nope")
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    with pytest.raises(StableDiffusionError, match=r"vae.*config\.json"):
        check_sd_folder(tmp_path / "sd")
    with pytest.raises(StableDiffusionError, match="no text_encoder/ subfolder"):
        check_sd_folder(sd_dirs["base"], ("vae", "unet", "text_encoder"))
    (tmp_path / "sd" / "vae" / "config.json").write_text("{}")
    with pytest.raises(StableDiffusionError, match="holds no weights.*diffusion_pytorch_model.safetensors"):
        check_sd_folder(tmp_path / "sd", ("vae",))


def test_prompt_embeddings_roundtrip(tmp_path):
    table = {"a": torch.randn(4, 8), "b": torch.randn(4, 8)}
    enc = lambda prompts: torch.stack([table[p] for p in prompts])  # noqa: E731
    path = PromptEmbeddings.save(enc, ["a", "b", "a"], tmp_path / "emb.safetensors")
    loaded = PromptEmbeddings.load(path)
    assert torch.equal(loaded(["b", "a"]), torch.stack([table["b"], table["a"]]))
    with pytest.raises(KeyError, match="no precomputed embedding"):
        loaded(["c"])


# ----------------------------------------------------------------------------------------- geometry


def test_rotation_homography_matches_projection():
    g = torch.Generator().manual_seed(0)
    eye = torch.zeros(3)
    c_src = look_at(eye[None], torch.randn(1, 3, generator=g))[0]
    c_dst = look_at(eye[None], c_src[None, :3, 2] + 0.4 * torch.randn(1, 3, generator=g))[0]
    K_src, K_dst = intrinsics_from_fov(70, 40, 60), intrinsics_from_fov(90, 32)
    # directions in front of both cameras, projected explicitly
    d = c_src[:3, 2] + 0.3 * torch.randn(200, 3, generator=g)
    uv_s, z_s = project_points(d, K_src, c_src)
    uv_d, z_d = project_points(d, K_dst, c_dst)
    keep = (z_s > 0) & (z_d > 0)
    mapped, w = apply_homography(rotation_homography(K_src, c_src, K_dst, c_dst), uv_s[keep])
    assert keep.sum() > 100 and (w > 0).all()
    torch.testing.assert_close(mapped, uv_d[keep], atol=1e-3, rtol=1e-4)


def test_ring_correspondences_match_explicit_projection():
    B, V, size = 1, 8, 64
    K, c2w = ring(B, V, size)
    corr = homography_correspondences(K, c2w, (size, size), [(8, 8), (4, 4)])
    assert set(corr.levels) == {(8, 8), (4, 4)}
    lvl = corr[(8, 8)]
    assert lvl.src.shape == (1, 8, 2) and lvl.grid.shape == (1, 8, 2, 9, 8, 8, 2)
    assert torch.equal(lvl.src[0], ring_neighbors(8))
    assert lvl.mask.any(2).any(2).all(), "every pixel of a 90 deg view overlaps a 45 deg neighbour"
    # independent: ray of every level-pixel of view i, projected into its neighbour j with the level's K
    Kl = K * torch.tensor([[8 / size], [8 / size], [1.0]])
    _, d = camera_rays(Kl, c2w, 8, 8)  # [B, V, 8, 8, 3]
    for i in (0, 3):
        for jj, j in enumerate(lvl.src[0, i].tolist()):
            uv, z = project_points(d[0, i].reshape(-1, 3), Kl[0, j], c2w[0, j])
            centre = lvl.grid[0, i, jj, 4].reshape(-1, 2)  # S index 4 = offset (0, 0)
            uv_grid = (centre + 1) / 2 * 8
            m = lvl.mask[0, i, jj, 4].reshape(-1)
            assert m.sum() > 10
            torch.testing.assert_close(uv_grid[m], uv[m], atol=1e-4, rtol=1e-5)
            # the exact correspondence maps back onto the query pixel: zero displacement
            assert lvl.pe[0, i, jj, 4].reshape(-1, 2)[m].abs().max() < 1e-4
            # a neighbour one source pixel to the right maps back 1 to ~2.5 query pixels away (the
            # perspective stretch between views 45 deg apart is up to 1 / cos^2(45 deg) = 2, more off-axis)
            disp = lvl.pe[0, i, jj, 5].reshape(-1, 2)[lvl.mask[0, i, jj, 5].reshape(-1)]
            assert ((disp.norm(dim=-1) > 0.7) & (disp.norm(dim=-1) < 2.7)).all()


def _floor_scene(V: int = 3, size: int = 32):
    """Cameras looking down at the plane z = 0 from different places; analytic z-depth."""
    eye = torch.tensor([[0.0, 0, 2], [0.4, 0.1, 2.1], [-0.3, 0.3, 1.9]])[:V]
    c2w = look_at(eye, torch.tensor([[0.1, 0.0, 0.0]]).expand(V, 3), up=torch.tensor([1.0, 0, 0]))
    K = intrinsics_from_fov(60, size).expand(V, 3, 3)
    o, d = camera_rays(K, c2w, size, size, normalize=False)  # d has camera z = 1: t is z-depth
    depth = (-o[..., 2] / d[..., 2])[:, None]  # [V, 1, H, W]
    return K[None], c2w[None], depth[None]


def test_depth_correspondences_match_explicit_projection():
    K, c2w, depth = _floor_scene()
    corr = depth_correspondences(K, c2w, depth, [(8, 8)])
    lvl = corr[(8, 8)]
    assert lvl.src.shape == (1, 3, 2) and lvl.pe.shape[-1] == 1 and lvl.mask.any()
    Kl = K * torch.tensor([[8 / 32], [8 / 32], [1.0]])
    d8 = F.interpolate(depth[0], size=(8, 8), mode="nearest-exact")[:, 0]
    X = unproject_depth(d8, Kl[0], c2w[0])  # [V, 8, 8, 3]
    for i in range(3):
        for jj, j in enumerate(lvl.src[0, i].tolist()):
            uv, _ = project_points(X[i].reshape(-1, 3), Kl[0, j], c2w[0, j])
            m = lvl.mask[0, i, jj, 0].reshape(-1)
            torch.testing.assert_close(
                ((lvl.grid[0, i, jj, 0].reshape(-1, 2) + 1) / 2 * 8)[m], uv[m], atol=1e-4, rtol=1e-5
            )
            # a plane occludes nothing: the depth ratio is ~0 up to nearest-pixel depth lookup
            assert lvl.pe[0, i, jj, 0].reshape(-1)[m].abs().max() < 0.05
    # a source surface closer than the query point (occluder) gives a positive encoding
    near = depth.clone()
    near[:, 1] *= 0.5
    lvl2 = depth_correspondences(K, c2w, near, [(8, 8)])[(8, 8)]
    m = lvl2.mask[0, 0, 0, 0]  # view 0 reading view 1
    assert m.any() and torch.allclose(
        lvl2.pe[0, 0, 0, 0][m], torch.full_like(lvl2.pe[0, 0, 0, 0][m], math.log(2)), atol=0.05
    )


def test_overlap_neighbors_filter_and_fallback():
    o = torch.tensor([[[1.0, 0.5, 0.0, 0.0], [0.6, 1, 0.0, 0.0], [0.0, 0.0, 1, 0.1], [0.0, 0.0, 0.1, 1]]])
    src, ok = overlap_neighbors(o, 0.3)
    assert src.shape == (1, 4, 3)
    picked = [[int(s) for s, k in zip(src[0, v], ok[0, v]) if k] for v in range(4)]
    assert picked == [[1], [0], [1, 3], [2]]  # 2 and 3 overlap nobody: fall back to sequence neighbours


# ------------------------------------------------------------------------------------------------ CAA


def test_caa_gathers_bilinear_keys_and_mixes_only_neighbours():
    torch.manual_seed(0)
    B, V, C, h = 1, 6, 32, 4
    K, c2w = ring(B, V, 32, fov=100.0)
    lvl = homography_correspondences(K, c2w, (32, 32), [(h, h)])[(h, h)]
    caa = CorrespondenceAttention(C)
    x = torch.randn(B * V, C, h, h)
    keys = caa.gather_keys(x.unflatten(0, (B, V)), lvl)  # [B, V, h, w, J S, C]
    # independent bilinear read of one key: view 2, pixel (1, 3), source group 1, sample 7
    v, py, px, jj, s = 2, 1, 3, 1, 7
    g = lvl.grid[0, v, jj, s, py, px]
    u = (g[0] + 1) / 2 * h - 0.5
    w_ = (g[1] + 1) / 2 * h - 0.5
    src = x[int(lvl.src[0, v, jj])]
    x0, y0 = int(math.floor(u)), int(math.floor(w_))
    val = torch.zeros(C)
    for yy, wy in ((y0, 1 - (w_ - y0)), (y0 + 1, w_ - y0)):
        for xx, wx in ((x0, 1 - (u - x0)), (x0 + 1, u - x0)):
            if 0 <= yy < h and 0 <= xx < h:
                val += wx * wy * src[:, yy, xx]
    torch.testing.assert_close(keys[0, v, py, px, jj * 9 + s], val, atol=1e-5, rtol=1e-4)
    # zero-init block is the identity; with a trained output layer a view only sees its ring neighbours
    assert torch.equal(caa(x, lvl, V), x)
    torch.nn.init.normal_(caa.to_out.weight)
    y0_ = caa(x, lvl, V)
    x2 = x.clone()
    x2[3] += 1.0
    changed = (caa(x2, lvl, V) - y0_).flatten(1).abs().amax(1) > 1e-6
    assert changed.tolist() == [False, False, True, True, True, False]


def test_caa_attention_matches_manual_softmax_and_checkpointing():
    torch.manual_seed(1)
    B, V, C, h = 1, 4, 64, 4
    K, c2w = ring(B, V, 32, fov=100.0)
    lvl = homography_correspondences(K, c2w, (32, 32), [(h, h)])[(h, h)]
    caa = CorrespondenceAttention(C, head_dim=32, checkpoint=False)
    for p in caa.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(B * V, C, h, h, requires_grad=True)
    out = caa(x, lvl, V)
    # one pixel by hand: masked keys take no part in the softmax; 2 heads of 32
    v, py, px = 1, 2, 0
    keys = caa.gather_keys(x.unflatten(0, (B, V)), lvl)[0, v, py, px]  # [18, C]
    pe = lvl.pe[0, v, :, :, py, px].reshape(-1, 2)
    m = lvl.mask[0, v, :, :, py, px].reshape(-1)
    assert 0 < m.sum() < 18
    xq = x[v, :, py, px]
    q = caa.to_q(caa.norm1(xq + caa._encode(torch.zeros(1, 2))[0]))
    kv = caa.norm1(keys[m] + caa._encode(pe[m]))
    k, val = caa.to_k(kv), caa.to_v(kv)
    heads = []
    for hd in range(2):
        sl = slice(32 * hd, 32 * (hd + 1))
        a = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(32), dim=0)
        heads.append(a @ val[:, sl])
    y = xq + caa.to_out(torch.cat(heads))
    y = y + caa.ff(caa.norm2(y))
    torch.testing.assert_close(out[v, :, py, px], y, atol=1e-5, rtol=1e-4)
    # activation checkpointing changes memory, not values or gradients
    out.square().sum().backward()
    g_ref = {n: p.grad.clone() for n, p in caa.named_parameters()}
    gx = x.grad.clone()
    caa.zero_grad()
    x.grad = None
    caa.checkpoint = True
    out2 = caa(x, lvl, V)
    out2.square().sum().backward()
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(x.grad, gx)
    for n, p in caa.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], msg=n)


@pytest.mark.parametrize("channels_last", [False, True])
def test_multiview_unet_zero_init_equals_base_unet(base_sd, channels_last):
    net = MultiViewUNet(base_sd.unet)
    B, V = 1, 8
    K, c2w = ring(B, V, 64)
    corr = homography_correspondences(K, c2w, (64, 64), net.feature_sizes((8, 8)))
    g = torch.Generator().manual_seed(0)
    lat, emb = torch.randn(B, V, 4, 8, 8, generator=g), torch.randn(B, V, 16, 32, generator=g)
    t = torch.tensor([321])
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = net(lat, t, emb, corr)
        ref = plain_unet(base_sd.unet, lat, t, emb)
    assert out.shape == (B, V, 4, 8, 8)
    assert torch.equal(out, ref)
    net.adapter.detach_hooks()


def test_depth_unet_with_condition_zero_init_equals_base(sd_dirs):
    sd = load_stable_diffusion(sd_dirs["depth"], text_encoder=False)
    net = MultiViewUNet(sd.unet, variant="depth", condition_channels=5)
    assert net.adapter.mid.resnet is not None and net.adapter.condition is not None
    K, c2w, depth = _floor_scene(3, 64)
    corr = depth_correspondences(K, c2w, depth, net.feature_sizes((8, 8)))
    g = torch.Generator().manual_seed(1)
    lat, emb = torch.randn(1, 3, 4, 8, 8, generator=g), torch.randn(1, 3, 16, 32, generator=g)
    dch = depth_channel(depth, (8, 8))
    assert dch.shape == (1, 3, 1, 8, 8) and dch.min() >= -1 and dch.max() <= 1
    key = torch.tensor([[True, False, True]])
    cond = keyframe_condition(torch.randn(1, 3, 4, 8, 8, generator=g), key)
    assert torch.equal(cond[0, 1], torch.zeros(5, 8, 8)) and (cond[0, 0, 4] == 1).all()
    t = torch.tensor([500])
    with torch.no_grad():
        out = net(lat, t, emb, corr, extra=dch, condition=cond)
        ref = plain_unet(sd.unet, torch.cat([lat, dch], 2), t, emb)
    assert torch.equal(out, ref)


def test_frozen_parts_get_no_grad_and_caa_learns(base_sd):
    torch.manual_seed(0)
    net = MultiViewUNet(base_sd.unet)
    net.train()
    assert not net.unet.training and net.adapter.training
    B, V = 1, 4
    K, c2w = ring(B, V, 64, fov=100.0)
    corr = homography_correspondences(K, c2w, (64, 64), net.feature_sizes((8, 8)))
    schedule, pred = sd_schedule(base_sd.scheduler_config)
    lat = encode_images(base_sd.vae, torch.rand(B, V, 3, 64, 64) * 2 - 1)
    emb = torch.randn(B, V, 16, 32)
    opt = torch.optim.Adam(net.trainable_parameters(), lr=3e-3)
    losses = []
    for step in range(6):
        loss = training_loss(
            net, schedule, lat, emb, corr, prediction=pred, generator=torch.Generator().manual_seed(3)
        ).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is None and not p.requires_grad for p in base_sd.unet.parameters())
            assert all(p.grad is None for p in base_sd.vae.parameters())
            grads = {n: p.grad for n, p in net.adapter.named_parameters()}
            assert all(gr is not None for gr in grads.values())
            assert grads["down.0.to_out.weight"].abs().sum() > 0 and grads["up.2.ff.1.weight"].abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    net.adapter.detach_hooks()


def test_adapter_save_load_and_deepcopy(base_sd, tmp_path):
    net = MultiViewUNet(base_sd.unet)
    torch.manual_seed(0)
    for p in net.adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    B, V = 1, 4
    K, c2w = ring(B, V, 64, fov=100.0)
    corr = homography_correspondences(K, c2w, (64, 64), net.feature_sizes((8, 8)))
    lat, emb, t = torch.randn(B, V, 4, 8, 8), torch.randn(B, V, 16, 32), torch.tensor([100])
    with torch.no_grad():
        out = net(lat, t, emb, corr)
        ref = plain_unet(base_sd.unet, lat, t, emb)
        assert not torch.allclose(out, ref)
        path = save_adapter(net.adapter, tmp_path / "caa.safetensors")
        net.adapter.detach_hooks()
        net2 = MultiViewUNet(base_sd.unet)
        torch.testing.assert_close(net2(lat, t, emb, corr), ref, rtol=0, atol=0)
        load_adapter(net2.adapter, path)
        torch.testing.assert_close(net2(lat, t, emb, corr), out)
        # a deep copy (EMA, averaging) owns its hooks: changing the copy leaves the original alone
        net3 = copy.deepcopy(net2)
        torch.nn.init.zeros_(net3.adapter.up[0].to_out.weight)
        torch.testing.assert_close(net2(lat, t, emb, corr), out)
        assert not torch.allclose(net3(lat, t, emb, corr), out)
    with pytest.raises(ValueError, match="variant"):
        load_adapter(MultiViewUNet(copy.deepcopy(base_sd.unet), variant="depth").adapter, path)


def test_bf16_autocast_channels_last(base_sd):
    net = MultiViewUNet(copy.deepcopy(base_sd.unet)).to(memory_format=torch.channels_last)
    for p in net.adapter.parameters():
        torch.nn.init.normal_(p, std=0.02)
    K, c2w = ring(1, 4, 64, fov=100.0)
    corr = homography_correspondences(K, c2w, (64, 64), net.feature_sizes((8, 8)))
    lat, emb = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(lat, torch.tensor([10]), emb, corr)
        out.float().square().mean().backward()
    assert out.shape == (1, 4, 4, 8, 8) and torch.isfinite(out.float()).all()
    assert net.adapter.mid.to_q.weight.grad is not None


# ----------------------------------------------------------------------------------- pipelines


def test_inpainting_unet_and_cfg_sampling(sd_dirs):
    sd = load_stable_diffusion(sd_dirs["inpainting"], text_encoder=False)
    net = MultiViewUNet(sd.unet)
    B, V = 1, 4
    K, c2w = ring(B, V, 64, fov=100.0)
    corr = homography_correspondences(K, c2w, (64, 64), net.feature_sizes((8, 8)))
    given = torch.tensor([[True, False, False, False]])
    images = torch.rand(B, V, 3, 64, 64) * 2 - 1
    masked = encode_images(sd.vae, images * given[..., None, None, None], sample=False)
    extra = inpaint_channels(masked, given)
    assert extra.shape == (B, V, 5, 8, 8) and (extra[0, 0, 0] == 0).all() and (extra[0, 1:, 0] == 1).all()
    emb, null = torch.randn(B, V, 16, 32), torch.randn(16, 32)
    with pytest.raises(ValueError, match="inpaint_channels"):
        net(torch.randn(B, V, 4, 8, 8), torch.tensor([5]), emb, corr)
    schedule, pred = sd_schedule(sd.scheduler_config)
    sampler = default_sampler(num_steps=2)
    assert sampler.guidance_scale == 9.0
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    z = sample_latents(net, sampler, schedule, emb, null, corr, (8, 8), extra=extra, generator=g())
    assert z.shape == (B, V, 4, 8, 8) and torch.isfinite(z).all()
    # guidance 1 (one pass, no unconditional branch) differs from guidance 9 on the same noise
    z1 = sample_latents(
        net, sampler.replace(guidance_scale=1.0), schedule, emb, None, corr, (8, 8), extra=extra, generator=g()
    )
    assert not torch.allclose(z, z1)
    with pytest.raises(ValueError, match="uncond_emb"):
        sample_latents(net, sampler, schedule, emb, None, corr, (8, 8), extra=extra)


def test_sd_schedule_matches_diffusers_scaled_linear():
    from diffusers import DDIMScheduler

    schedule, pred = sd_schedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert pred == "eps"
    torch.testing.assert_close(schedule.alphas_cumprod().float(), ref, rtol=1e-5, atol=1e-7)
    assert isinstance(default_sampler(), Sampler)


def test_keyframe_segments_cover_all_pairs():
    assert keyframe_segments([True, False, False, True, True, False, True]) == [(0, 3), (4, 6)]
    assert keyframe_segments(torch.tensor([True, True, True])) == []


# ---------------------------------------------------------------------------------------- panorama


def _pano_fn(d: torch.Tensor) -> torch.Tensor:
    """A smooth colour function of direction (3 channels)."""
    return torch.stack(
        [d[..., 0] * d[..., 1] * 2, torch.cos(3 * d[..., 1]) * d[..., 2], d[..., 2] + 0.3 * d[..., 0]], 0
    )


def test_equirect_views_roundtrip_inside_latitude_band():
    He, We = 64, 128
    d = equirect_directions(He, We)
    pano = _pano_fn(d)[None]
    K, c2w = panorama_cameras(8, 90.0, 64)
    views = equirect_to_perspective(pano, K[None], c2w[None], (64, 64))
    assert views.shape == (1, 8, 3, 64, 64)
    # independent check of one view: its pixel rays, evaluated with the analytic function
    _, rays = camera_rays(K[3], c2w[3], 64, 64)
    torch.testing.assert_close(views[0, 3], _pano_fn(rays), atol=0.02, rtol=0)
    back, cov = perspective_to_equirect(views, K[None], c2w[None], (He, We))
    lat = torch.asin(d[..., 2])
    band = lat.abs() < math.radians(40)
    assert cov[0, 0][band].all() and not cov[0, 0][lat.abs() > math.radians(50)].any()
    assert (back - pano)[0][:, band].abs().max() < 0.01
    # view 2 (yaw 90 deg) is centred at longitude -90: equirect column W/4
    _, ray_c = camera_rays(K[2], c2w[2], 64, 64)
    centre = ray_c[31:33, 31:33].mean((0, 1))
    torch.testing.assert_close(
        centre, d[He // 2 - 1 : He // 2 + 1, We // 4 - 1 : We // 4 + 1].mean((0, 1)), atol=0.03, rtol=0
    )


def test_cubemap_stitches_the_full_sphere():
    d = equirect_directions(32, 64)
    pano = _pano_fn(d)[None]
    K, c2w = cube_cameras(32)
    assert torch.allclose(c2w[4, :3, 1], torch.tensor([1.0, 0, 0]))  # up face: its bottom edge meets the front
    faces = equirect_to_perspective(pano, K[None], c2w[None], (32, 32))
    back, cov = perspective_to_equirect(faces, K[None], c2w[None], (32, 64), blend="nearest")
    assert cov.all()
    assert (back - pano).abs().mean() < 0.01
