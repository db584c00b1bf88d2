"""The warping RGBD method as a genvs plugin: stages, training loss, iterative sampling, checkpoints,
the image-folder datamodule with cached monocular depth, and the prediction writer's depth output."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from genvs.callbacks import PredictionWriter, colorize_depth
from genvs.core.cameras import intrinsics_from_fov, orbit_camera, pivot_viewset
from genvs.core.config import spec
from genvs.core.samplers import DDIMScheduler, Sampler
from genvs.core.views import Views
from genvs.data.images import DepthCache, ImageFolderDataModule, scan_image_folder
from genvs.data.srn import DatasetError
from genvs.methods.warping import ADMUNet, WarpingRGBD
from genvs.methods.warping.depth import DepthWeightsNotFound, load_depth_estimator, normalize_depth
from genvs.methods.warping.model import load_network_weights

TINY_ADM = dict(
    image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
    num_head_channels=16, num_classes=None, num_groups=8,
)


def ddim(n=3, scale=1.0):
    return spec(Sampler, scheduler=spec(DDIMScheduler, timestep_spacing="trailing", clip_sample=False), num_steps=n, guidance_scale=scale)


def tiny_model(stage="joint", num_classes=None, **kw):
    kw.setdefault("sampler", ddim())
    kw.setdefault("first_view_sampler", ddim())
    kw.setdefault("sample_near", None)
    kw.setdefault("sample_far", None)
    kw.setdefault("pairs", spec("genvs.methods.warping.TrainingPairs", supersample=1))
    kw.setdefault("aggregation", {"supersample": 1})
    m = WarpingRGBD(network=spec(ADMUNet, **{**TINY_ADM, "num_classes": num_classes}), stage=stage, **kw)
    m.setup_ema()
    return m


def randomize(module, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised output layers would hide every path
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def rgbd_views(B=2, V=2, H=16, labels=None, seed=0):
    """A smooth textured plane 1.3 units ahead of cameras orbiting it, with its exact depth."""
    g = torch.Generator().manual_seed(seed)
    yaw = (torch.rand(B, V, generator=g) - 0.5) * 0.4
    c2w = orbit_camera(yaw, torch.zeros(B, V), 1.3, pivot=1.3)
    K = intrinsics_from_fov(45.0, H).expand(B, V, 3, 3).clone()
    y, x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, H), indexing="ij")
    img = torch.stack([torch.sin(3 * x + k) * torch.cos(2 * y) for k in range(3)])
    images = (img + 0.1 * torch.randn(B, V, 3, H, H, generator=g)).clamp(-1, 1)
    depth = (1.3 + 0.2 * x)[None, None, None].expand(B, V, 1, H, H).clone()
    return Views(images, K, c2w, depth=depth, num_context=1, scene=[f"s{i}" for i in range(B)], labels=labels)


# ------------------------------------------------------------------------------------------- cameras
def test_pivot_viewsets_orbit_the_pivot():
    cams = pivot_viewset("3x9")
    assert cams.shape == (27, 4, 4)
    torch.testing.assert_close(cams[0], torch.eye(4), atol=1e-6, rtol=0)
    pivot = torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close((cams[:, :3, 3] - pivot).norm(dim=-1), torch.ones(27))  # radius 1
    torch.testing.assert_close(cams[:, :3, 2], torch.nn.functional.normalize(pivot - cams[:, :3, 3], dim=-1))  # look at it
    yaw = torch.atan2(cams[:, 0, 3], 1 - cams[:, 2, 3])
    assert math.isclose(float(yaw.max()), 0.6, abs_tol=1e-5) and math.isclose(float(yaw[3]), 0.15, abs_tol=1e-5)
    swing = pivot_viewset("swing", num_frames=8)
    torch.testing.assert_close(swing[0], torch.eye(4), atol=1e-6, rtol=0)  # the loop passes through the input view
    sweep = pivot_viewset("sweep", num_frames=5, pivot=2.0)
    assert torch.allclose(sweep[2], torch.eye(4), atol=1e-6) and sweep[0, 0, 3] < 0 < sweep[-1, 0, 3]
    with pytest.raises(ValueError, match="3x9"):
        pivot_viewset("spiral")


# -------------------------------------------------------------------------------------- stages
def test_stages_hold_and_train_the_right_networks():
    u = tiny_model("unconditional")
    assert set(u.denoiser) == {"unconditional"} and u.conditional is None
    c = tiny_model("conditional")
    assert set(c.denoiser) == {"unconditional", "conditional"}
    assert not any(p.requires_grad for p in c.unconditional.parameters())  # frozen: not optimised
    assert all(n.startswith("conditional.") for n in c.ema.names)  # and not copied by the EMA
    assert c.conditional.in_channels == 10 and c.unconditional.in_channels == 4
    j = tiny_model("joint")
    assert {n.split(".")[0] for n in j.ema.names} == {"unconditional", "conditional"}
    with pytest.raises(ValueError, match="stage"):
        WarpingRGBD(network=spec(ADMUNet, **TINY_ADM), stage="both")
    with pytest.raises(ValueError, match="in_channels=4"):
        WarpingRGBD(network=spec(ADMUNet, **{**TINY_ADM, "in_channels": 10}))


def _save(model, path):
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)


def test_conditional_stage_starts_from_the_stage1_ema_weights(tmp_path):
    from test_warping_parts import _to_ivid_layout  # independent inverse of the official-key converter

    stage1 = randomize(tiny_model("unconditional"))
    stage1.ema.update(stage1.denoiser)
    randomize(stage1.denoiser, seed=2)  # raw weights now differ from the EMA
    _save(stage1, tmp_path / "stage1.ckpt")
    ema = stage1.ema
    expected = {n.split(".", 1)[1]: getattr(ema, ema._key(n)) for n in ema.names}

    m = tiny_model("conditional", unconditional_weights=str(tmp_path / "stage1.ckpt"))
    m._maybe_load_pretrained(fitting=True)
    for k, v in m.unconditional.state_dict().items():
        torch.testing.assert_close(v, expected[k], msg=k)
    # the conditional model starts as the unconditional one: new input channels have zero weights
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    x = torch.cat([z, torch.randn(2, 6, 16, 16)], 1)
    torch.testing.assert_close(m.conditional(x, t), m.unconditional(z, t))
    for shadow, p in zip(m.ema.shadow(), m.ema._params(m.denoiser)):  # the EMA restarts from the loaded weights
        torch.testing.assert_close(shadow, p.float())

    # official ivid checkpoints (raw AdmUnet2d state dicts) load through the converter
    torch.save(_to_ivid_layout(stage1.unconditional.state_dict(), 16), tmp_path / "official.pt")
    sd = load_network_weights(tmp_path / "official.pt", "unconditional", num_head_channels=16)
    for k, v in stage1.unconditional.state_dict().items():
        torch.testing.assert_close(sd[k], v, msg=k)
    with pytest.raises(FileNotFoundError, match="huggingface.co/JeffreyXiang/ivid"):
        load_network_weights(tmp_path / "missing.pt", "unconditional")
    with pytest.raises(KeyError, match="conditional"):
        load_network_weights(tmp_path / "stage1.ckpt", "conditional")


# -------------------------------------------------------------------------------------- training
def test_loss_falls_on_a_fixed_batch():
    m = tiny_model("joint")
    v = rgbd_views(B=2, V=2)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    first = last = None
    for step in range(30):
        torch.manual_seed(123)  # same t, noise and random cameras every step: only the weights change
        losses = m.training_loss(v)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        vals = {k: float(x.detach()) for k, x in losses.items()}
        first = first or vals
        last = vals
    assert set(last) == {"loss", "loss_unconditional", "loss_conditional"}
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["loss_conditional"] < 0.7 * first["loss_conditional"], (first, last)


def test_training_feeds_rgbd_pairs_and_drops_class_labels(monkeypatch):
    m = tiny_model("joint", num_classes=5)
    seen = {}

    def spy(name):
        def fwd(x, timestep, class_labels=None):
            seen[name] = (x.shape[1], class_labels.clone(), timestep.clone())
            return torch.zeros(x.shape[0], 4, *x.shape[-2:])
        return fwd

    monkeypatch.setattr(m.unconditional, "forward", spy("u"))
    monkeypatch.setattr(m.conditional, "forward", spy("c"))
    labels = torch.arange(100) % 5
    v = rgbd_views(B=100, V=2, H=8, labels=labels)
    m.training_loss(v)
    assert seen["u"][0] == 4 and seen["c"][0] == 10  # noisy RGBD; noisy RGBD + warped condition
    for _, lab, t in seen.values():
        assert lab.shape == (200,) and t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
        kept = lab >= 0
        assert torch.equal(lab[kept], labels.repeat_interleave(2)[kept])  # one label per view of its scene
        assert 0.03 < float((~kept).float().mean()) < 0.2  # ~10% null labels
    with pytest.raises(ValueError, match="num_classes"):
        tiny_model("joint").training_loss(rgbd_views(labels=torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="depth"):
        m.training_loss(Views(v.images, v.K, v.c2w, num_context=1))


def test_guidance_is_the_same_for_every_parameterisation():
    from genvs.core.diffusion import predict_x0_eps, prediction_target
    from genvs.methods.warping.aggregate import guide_prediction
    from genvs.methods.warping.network import WarpCondition

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cond = WarpCondition(r(2, 3, 8, 8), r(2, 1, 8, 8), (r(2, 1, 8, 8) > 0).float(), (r(2, 1, 8, 8) > 0).float(), r(2, 1, 8, 8))
    z, logsnr, x0, eps = r(2, 4, 8, 8), torch.tensor([-3.0, 2.0]), r(2, 4, 8, 8), r(2, 4, 8, 8)
    guided = {}
    for kind in ("eps", "v", "x0"):
        pred = prediction_target(x0, (z - torch.sigmoid(logsnr).sqrt().view(-1, 1, 1, 1) * x0) / torch.sigmoid(-logsnr).sqrt().view(-1, 1, 1, 1), logsnr, kind)
        guided[kind] = predict_x0_eps(guide_prediction(pred, z, logsnr, cond, kind), z, logsnr, kind)[0]
    torch.testing.assert_close(guided["v"], guided["eps"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided["x0"], guided["eps"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(guided["eps"], x0)  # the guidance did move x0


def test_training_and_sampling_under_bf16_autocast_and_channels_last():
    m = randomize(tiny_model("joint", prediction="v"))
    v = rgbd_views()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.training_loss(v)["loss"]
        loss.backward()
        ctx, tgt = v.split()
        out = m.sample(ctx, tgt.cameras_only(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and torch.isfinite(out.images).all() and torch.isfinite(out.depth).all()
    assert m.unconditional.input_conv.weight.is_contiguous(memory_format=torch.channels_last)


# -------------------------------------------------------------------------------------- sampling
def test_sampling_nvs_and_generation_condition_each_view_on_all_previous(monkeypatch):
    m = randomize(tiny_model("joint", num_classes=5, sampler=ddim(2, 2.0), first_view_sampler=ddim(2, 2.0))).eval()
    calls = {"first": 0, "aggregate": [], "labels": []}
    agg, first = m.aggregate, m.sample_first_view

    def spy_agg(images, depths, *a):
        calls["aggregate"].append(images.shape[1])
        return agg(images, depths, *a)

    def spy_first(*a, **k):
        calls["first"] += 1
        return first(*a, **k)

    net_fwd = m.conditional.forward
    monkeypatch.setattr(m, "aggregate", spy_agg)
    monkeypatch.setattr(m, "sample_first_view", spy_first)
    monkeypatch.setattr(m.conditional, "forward", lambda x, t, y=None: (calls["labels"].append(y.clone()), net_fwd(x, t, y))[1])

    base = rgbd_views(B=2, V=4, labels=torch.tensor([1, 3]))
    ctx, tgt = base.split()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = m.sample(ctx, tgt.cameras_only(), generator=g())
    assert out.images.shape == (2, 3, 3, 16, 16) and out.depth.shape == (2, 3, 1, 16, 16)
    assert calls == {"first": 0, "aggregate": [1, 2, 3], "labels": calls["labels"]}  # context, then all previous
    assert torch.equal(calls["labels"][0], torch.tensor([1, 3, -1, -1]))  # label guidance: (1 + w) e(c) - w e(null)
    assert out.images.abs().max() <= 1 and (out.depth >= m.sample_near).all() and (out.depth <= m.sample_far).all()
    again = m.sample(ctx, tgt.cameras_only(), generator=g())
    torch.testing.assert_close(out.images, again.images)  # seeded sampling is reproducible
    torch.testing.assert_close(out.depth, again.depth)
    other = m.sample(ctx, tgt.cameras_only(), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(out.images, other.images)

    calls.update(first=0, aggregate=[])
    gen = m.sample(ctx.select([]), tgt.cameras_only(), generator=g())  # no context: pure generation
    assert gen.images.shape == (2, 3, 3, 16, 16)
    assert calls["first"] == 1 and calls["aggregate"] == [1, 2]
    with pytest.raises(ValueError, match="depth of the context"):
        m.sample(Views(ctx.images, ctx.K, ctx.c2w, num_context=1), tgt.cameras_only())

    stage1 = tiny_model("unconditional")  # no conditional network: independent first-view samples
    ctx1, tgt1 = rgbd_views(B=2, V=4).split()
    assert stage1.sample(ctx1, tgt1.cameras_only(), generator=g()).images.shape == (2, 3, 3, 16, 16)


def test_nearest_generation_order_and_depth_units():
    m = tiny_model("joint", generation_order="nearest")
    yaws = torch.tensor([0.6, 0.15, 0.45, 0.3])
    tgt = orbit_camera(yaws, torch.zeros(4))[None]
    assert m._order(torch.eye(4)[None, None], tgt) == [1, 3, 2, 0]  # outward from the context
    assert m._order(tgt[:, :0], tgt) == [0, 2, 3, 1]  # generation: the first camera is the unconditional view
    assert tiny_model("joint")._order(torch.eye(4)[None, None], tgt) == [0, 1, 2, 3]
    d = torch.tensor([0.0, 0.7, 3.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(m._to_sample_units(d), torch.tensor([m.far, 0.7, 3.0]).view(1, 3, 1, 1))
    official = tiny_model("joint", sample_near=0.6, sample_far=5.0)  # same normalised value, official decoding
    torch.testing.assert_close(normalize_depth(official._to_sample_units(d), 0.6, 5.0), normalize_depth(d.clamp_min(1e-3).where(d > 0, torch.tensor(100.0)), 0.5, 100.0))


# --------------------------------------------------------------------------------- image folders
HUBCONF = (
    "import torch\n"
    "class _M(torch.nn.Module):\n"
    "    def forward(self, x):\n"
    "        return 6250.0 * (2.0 + x[:, 0])\n"  # disparity from the (normalised) red channel
    "def tiny(**kw):\n"
    "    return _M()\n"
)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs" / "train"
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i, size in enumerate([(40, 30), (30, 50), (24, 24)]):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{cls}_{i}.png")
    hub = tmp_path / "midas"
    hub.mkdir()
    (hub / "hubconf.py").write_text(HUBCONF)
    return root, hub


def test_image_folder_depth_is_estimated_once_and_cached(image_folder, tmp_path, monkeypatch):
    root, hub = image_folder
    recs, classes = scan_image_folder(root)
    assert classes == ["cat", "dog"] and [r.label for r in recs] == [0, 0, 0, 1, 1, 1]
    dm = ImageFolderDataModule(root=str(root), image_size=16, estimate_size=32, batch_size=4, num_workers=0,
                               trajectory="swing", num_frames=4, predict_num_images=2, val_num_samples=3, val_num_frames=2)
    with pytest.raises(DatasetError, match="depth_estimator"):
        dm.prepare_data()  # no cache and no estimator: says how to get one
    dm.depth_estimator, dm.depth_hub_model = str(hub), "tiny"
    dm.prepare_data()
    cache = DepthCache(tmp_path / "imgs" / "train_depth", 16)
    assert len(list(cache.folder.rglob("*.npy"))) == 6 and not cache.missing(recs)
    monkeypatch.setattr(DepthCache, "compute", lambda *a, **k: pytest.fail("recomputed a cached depth"))
    dm.prepare_data()  # everything cached: nothing runs

    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (4, 1, 3, 16, 16) and batch.labels.shape == (4,)
    assert batch.depth.shape == (4, 1, 1, 16, 16) and (batch.depth >= 0.5).all()
    # the cached depth is the estimator's on the estimate_size crop, nearest-resized to the training crop
    from genvs.data.images import load_square_image

    est = load_depth_estimator(hub, hub_model="tiny")
    depth32 = est(load_square_image(recs[0].path, 32)[None])
    assert float(depth32.min()) == pytest.approx(0.5, abs=1e-4)  # the paper's normalisation: nearest point at 0.5
    expect = torch.nn.functional.interpolate(depth32, size=(16, 16), mode="nearest-exact")[0]
    torch.testing.assert_close(cache.load(recs[0]), expect, atol=2e-3, rtol=2e-3)  # float16 storage

    val = next(iter(dm.val_dataloader()))  # generation from scratch: cameras and labels only
    assert val.images is None and val.num_context == 0 and val.V == 2 and val.labels.tolist() == [0, 1, 0]
    dm.setup("predict")
    ctx, tgt = next(iter(dm.predict_dataloader()))  # novel views of an image: context + trajectory cameras
    assert ctx.V == 1 and ctx.num_context == 1 and ctx.B == 2 and (ctx.depth > 0).all() and ctx.labels.tolist() == [0, 0]
    assert tgt.images is None and tgt.V == 4 and tgt.index.tolist()[0] == [1, 2, 3, 4]
    torch.testing.assert_close(tgt.c2w[0], pivot_viewset("swing", 4))
    torch.testing.assert_close(ctx.c2w[0, 0], torch.eye(4))

    dm.estimate_size = 64  # other estimator settings: the cache is refused, never mixed or overwritten
    with pytest.raises(DatasetError, match="Delete"):
        dm.prepare_data()


def test_depth_estimator_directories(tmp_path):
    from transformers import DPTConfig, DPTForDepthEstimation

    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3])
    torch.manual_seed(0)
    DPTForDepthEstimation(cfg).save_pretrained(tmp_path / "hf")
    est = load_depth_estimator(tmp_path / "hf")
    d = est(torch.rand(2, 3, 24, 24) * 2 - 1)
    assert type(est).__name__ == "TransformersDepthEstimator" and est.input_size == 32
    assert d.shape == (2, 1, 24, 24) and (d >= 0.5).all() and torch.isfinite(d).all()
    with pytest.raises(DepthWeightsNotFound, match="huggingface-cli download"):
        load_depth_estimator(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------- writer
def test_prediction_writer_writes_depth_and_generated_scenes(tmp_path):
    B, T, H = 1, 3, 8
    K = intrinsics_from_fov(45, H).expand(B, T, 3, 3)
    c2w = pivot_viewset("sweep", T)[None]
    depth = torch.linspace(1, 3, T).view(1, T, 1, 1, 1).expand(B, T, 1, H, H).clone()
    pred = Views(torch.zeros(B, T, 3, H, H), K, c2w, depth=depth, scene=["a"])
    ctx = Views(torch.zeros(B, 1, 3, H, H), K[:, :1], c2w[:, :1], scene=["a"])
    writer = PredictionWriter(output_dir=str(tmp_path / "nvs"))
    writer.on_predict_batch_end(None, None, {"context": ctx, "pred": pred, "target": None}, None, 0)
    files = sorted(p.name for p in (tmp_path / "nvs" / "a").iterdir())
    assert files == ["context_0000.png", "depth_0000.png", "depth_0001.png", "depth_0002.png", "grid.png", "orbit.gif",
                     "view_0000.png", "view_0001.png", "view_0002.png"]
    near, far = (np.asarray(Image.open(tmp_path / "nvs" / "a" / f"depth_{i:04d}.png")).astype(float).mean() for i in (0, 2))
    assert near > far + 50  # bright = near

    gen_ctx = Views(None, K[:, :0], c2w[:, :0], size=(H, H), scene=["g"])  # generation: no input view
    writer = PredictionWriter(output_dir=str(tmp_path / "gen"))
    writer.on_predict_batch_end(None, None, {"context": gen_ctx, "pred": pred, "target": pred.cameras_only()}, None, 0)
    assert (tmp_path / "gen" / "a" / "grid.png").exists() and not list((tmp_path / "gen" / "a").glob("context_*"))
    col = colorize_depth(torch.tensor([[[[1.0, 2.0], [4.0, 0.0]]]]))
    assert col.shape == (1, 3, 2, 2) and col[0, :, 1, 1].sum() == 0  # unknown depth is black
    assert col[0, :, 0, 0].sum() > col[0, :, 0, 1].sum() > col[0, :, 1, 0].sum()
