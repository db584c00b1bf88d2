"""DFM as a genvs method: training_loss, sampling, stages, checkpoints, the CLI round trip, prediction files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY_TOY
from genvs.callbacks import colorize_depth
from genvs.cli import main, run
from genvs.core.cameras import intrinsics_from_fov, orbit_poses
from genvs.core.config import spec
from genvs.core.samplers import DDIMScheduler, Sampler
from genvs.core.views import Views
from genvs.eval.metrics import MissingWeightsError
from genvs.methods.dfm import DFM, DFMDenoiser

CONFIG = Path(__file__).parents[1] / "configs" / "dfm_toy.yaml"
TINY_NET = dict(
    encoder="dit",
    encoder_kwargs=dict(hidden_size=32, depth=1, num_heads=2, stem_channels=8),
    feature_dim=16,
    cond_features=4,
    mlp_hidden=32,
    near=0.4,
    far=2.4,
    n_coarse=4,
    n_fine=4,
    cond_n_coarse=4,
    background=1.0,
)


def tiny_model(**kw) -> DFM:
    kw.setdefault("sampler", spec(Sampler, scheduler=spec(DDIMScheduler, timestep_spacing="trailing"), num_steps=3))
    kw.setdefault("patch_size", 8)
    m = DFM(network=spec(DFMDenoiser, **{**TINY_NET, **kw.pop("net", {})}), **kw)
    m.setup_ema()
    return m


def perturb_zero_init(m: DFM) -> DFM:
    """Give the zero-initialised layers (DiT's fused output conv, adaLN, residual branches) weights, so that the
    rendered scene depends on the noisy target as after training (at initialisation the features are zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.denoiser.parameters():
            if p.ndim > 1 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def views(B=2, Nc=2, M=2, H=16, seed=3) -> Views:
    V = Nc + M
    c2w = orbit_poses(V, radius=1.3, elevation_deg=25.0).expand(B, V, 4, 4).clone()
    K = intrinsics_from_fov(52.0, H).expand(B, V, 3, 3).clone()
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, H), indexing="ij")
    base = torch.stack([xx, yy, xx * yy])
    images = (base[None, None] * 0.8 + 0.1 * torch.randn(B, V, 3, H, H, generator=g)).clamp(-1, 1)
    return Views(images, K, c2w, num_context=Nc, scene=[f"s{i}" for i in range(B)])


# -------------------------------------------------------------------------------------------- training
def test_loss_falls_on_a_fixed_batch():
    m = tiny_model(ema_decay=0)
    v = views()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(123)  # same context count, t, noise and patches every step: only the weights change
        terms = m.training_loss(v)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert set(terms) == {"loss", "mse", "lpips", "cond_mse", "distortion", "smoothness"}
    assert losses[-1] < 0.5 * losses[0], losses


def test_random_number_of_context_views_keeps_the_first_ones_and_all_targets():
    m = tiny_model()
    v = views(B=1, Nc=3, M=2)
    seen = set()
    for s in range(40):
        torch.manual_seed(s)
        sub = m.context_subset(v)
        n = sub.num_context
        seen.add(n)
        assert torch.equal(sub.images, torch.cat([v.images[:, :n], v.images[:, 3:]], 1))
    assert seen == {1, 2, 3}  # official: randint(1, num_context + 1) per step
    assert tiny_model(random_num_context=False).context_subset(v) is v


def test_pixelnerf_stage_freezes_target_only_parts_and_renders_deterministically():
    m = tiny_model(stage="pixelnerf").eval()
    frozen = {n for n, p in m.denoiser.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("field.", "encoder.stem_target")) for n in frozen)
    assert not any(n.startswith("field.") for n in m.ema.names)  # the EMA tracks trainable weights only
    terms = m.training_loss(views())
    assert set(terms) == {"loss", "mse", "lpips"}
    ctx, tgt = views(B=1).split()
    a = m.sample(ctx, tgt.cameras_only(), generator=torch.Generator().manual_seed(0))
    b = m.sample(ctx, tgt.cameras_only(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.images, b.images) and a.depth.shape == (1, 2, 1, 16, 16)  # no noise involved


def test_lpips_loss_needs_local_weights_but_weight_zero_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    assert tiny_model(lpips_weight=0.0).lpips() is None
    with pytest.raises(MissingWeightsError, match="(?s)alexnet-owt-7be5be79.pth.*lpips_weight: 0"):
        tiny_model(lpips_weight=1.0, lpips_net="alex").training_loss(views())
    import torchvision

    path = tmp_path / "alex_features.pth"  # random weights in the torchvision layout (features only)
    sd = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    torch.save(sd, path)
    m = tiny_model(lpips_weight=1.0, lpips_net="alex", lpips_backbone_weights=str(path), patch_size=32)
    terms = m.training_loss(views(B=1, H=32))  # (AlexNet needs patches of >= 32 pixels; DFM uses VGG on 24)
    assert terms["lpips"] > 0
    assert not any("lpips" in k for k in m.state_dict())  # frozen LPIPS is not part of the model
    terms["loss"].backward()
    assert m.denoiser.field.lin_out.weight.grad is not None


# -------------------------------------------------------------------------------------------- sampling
def test_sample_renders_every_target_from_one_scene_reproducibly():
    m = perturb_zero_init(tiny_model()).eval()
    ctx, tgt = views(B=2, Nc=1, M=3).split()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out, scene = m.sample_scene(ctx, tgt.cameras_only(), generator=g())
    assert out.images.shape == (2, 3, 3, 16, 16) and out.depth.shape == (2, 3, 1, 16, 16)
    assert out.images.abs().max() <= 1 and (out.depth >= 0).all()
    assert scene.N == 2  # context + the sampled first target
    again = m.sample(ctx, tgt.cameras_only(), generator=g())
    torch.testing.assert_close(again.images, out.images)  # seeded sampling is reproducible
    with torch.no_grad():  # every target is a render of the final scene: 3D-consistent by construction
        ren = m.denoiser.render(scene, tgt.K, tgt.c2w)
    torch.testing.assert_close(out.images, ren.rgb.clamp(-1, 1))
    torch.testing.assert_close(out.depth, ren.depth)
    other = m.sample(ctx, tgt.cameras_only(), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other.images, out.images)  # different noise, different scene
    with torch.no_grad():
        orbit = m.render_orbit(scene, ctx, tgt, 5)
    assert orbit.images.shape == (2, 5, 3, 16, 16) and orbit.depth.shape == (2, 5, 1, 16, 16)
    torch.testing.assert_close(orbit.c2w[:, 0], ctx.c2w[:, 0])  # the orbit starts at the context camera
    m.orbit_frames = 3  # predict on camera-only targets (e.g. the datamodule's predict_orbit): no ground truth
    res = m.predict_step((ctx, tgt.cameras_only()), 0)
    assert res["target"] is None and res["pred"].images.shape == (2, 3, 3, 16, 16)
    assert res["orbit"].images.shape == (2, 3, 3, 16, 16) and res["orbit"].depth is not None


def test_autoregressive_sampling_and_guidance():
    m = perturb_zero_init(tiny_model(autoregressive=True, p_uncond=0.1)).eval()
    ctx, tgt = views(B=1, Nc=1, M=3).split()
    out, scene = m.sample_scene(ctx, tgt.cameras_only(), generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 3, 16, 16)
    assert scene.N == 1 + 2 + 1  # context + two sampled targets as context + the last target
    guided = m.sample(ctx, tgt.cameras_only(), sampler=m.sampler.replace(guidance_scale=2.0, noise_temperature=0.85))
    assert guided.images.shape == (1, 3, 3, 16, 16) and torch.isfinite(guided.images).all()


def test_colorize_depth_orders_near_far_and_blanks_unknown():
    d = torch.tensor([[[[1.0, 2.0], [4.0, 0.0]]]])  # [1, 1, 2, 2], 0 = unknown
    c = colorize_depth(d)
    assert c.shape == (1, 3, 2, 2) and c.min() >= 0 and c.max() <= 1
    lum = c.sum(1)[0]
    assert lum[0, 0] > lum[0, 1] > lum[1, 0] > 0 and lum[1, 1] == 0  # near bright, far dark, unknown black


# ------------------------------------------------------------------------------------- CLI round trip
def tiny_args(toy_root: Path, out: Path) -> list[str]:
    return [
        "--config", str(CONFIG),
        "--model.init_args.network.init_args", json.dumps(TINY_NET),
        "--model.init_args.sampler.init_args.num_steps", "2",
        "--model.init_args.patch_size", "8",
        "--model.init_args.orbit_frames", "4",
        "--data.init_args.root", str(toy_root),
        "--data.init_args.toy", json.dumps(TINY_TOY.__dict__),
        "--data.init_args.image_size", "16",
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2",
        "--data.init_args.val_protocol", json.dumps({"input_views": [0], "num_scenes": 1, "num_targets": 2}),
        "--data.init_args.predict_protocol", json.dumps({"input_views": [0], "num_scenes": 2, "num_targets": 3}),
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "2",
    ]


@pytest.fixture(scope="module")
def two_stages(toy_root, tmp_path_factory):
    """Stage 1 (pixelNeRF, 2 steps), then the diffusion stage initialised from it (2 steps)."""
    out1, out2 = tmp_path_factory.mktemp("stage1"), tmp_path_factory.mktemp("stage2")
    cli1 = run(["fit", *tiny_args(toy_root, out1), "--model.init_args.stage", "pixelnerf", "--trainer.max_steps", "2"])
    ckpt1 = Path(cli1.trainer.checkpoint_callback.last_model_path)
    cli2 = run(["fit", *tiny_args(toy_root, out2), "--model.init_args.init_from", str(ckpt1), "--trainer.max_steps", "2"])
    ckpt2 = Path(cli2.trainer.checkpoint_callback.last_model_path)
    return ckpt1, ckpt2, cli2


def test_stage_one_checkpoint_initialises_both_fields(two_stages):
    ckpt1, ckpt2, cli2 = two_stages
    s1 = torch.load(ckpt1, map_location="cpu", weights_only=True)
    assert s1["hyper_parameters"]["stage"] == "pixelnerf" and s1["global_step"] == 2
    m = tiny_model()
    m.load_initial_weights(ckpt1)
    sd1 = s1["state_dict"]
    for name, p in m.denoiser.cond_field.named_parameters():
        torch.testing.assert_close(p, sd1[f"denoiser.cond_field.{name}"])
        q = dict(m.denoiser.field.named_parameters())[name]
        torch.testing.assert_close(q, p[: q.shape[0]])  # joint field = context-only field (minus feature rows)
    for name in m.ema.names:  # the EMA restarts from the initialised weights
        torch.testing.assert_close(getattr(m.ema, "shadow__" + name.replace(".", "__")), dict(m.denoiser.named_parameters())[name])
    s2 = torch.load(ckpt2, map_location="cpu", weights_only=True)
    assert s2["hyper_parameters"]["stage"] == "diffusion" and s2["global_step"] == 2
    assert "val/psnr" in cli2.trainer.callback_metrics
    with pytest.raises(ValueError, match="does not match"):
        tiny_model(net={"mlp_hidden": 16}).load_initial_weights(ckpt1)


def test_checkpoint_reloads_with_weights_only(two_stages):
    _, ckpt2, cli2 = two_stages
    model = DFM.load_from_checkpoint(ckpt2, map_location="cpu", weights_only=True)
    assert model.stage == "diffusion" and model.denoiser.renderer.n_coarse == 4 and model.sampler.num_steps == 2
    for k, v in cli2.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k].cpu(), v.cpu(), msg=k)
    assert model.ema is not None and int(model.ema.num_updates) == 2


def test_predict_writes_views_depth_and_orbit(two_stages, toy_root, tmp_path):
    _, ckpt2, _ = two_stages
    pred_dir = tmp_path / "pred"
    args = tiny_args(toy_root, tmp_path / "run")
    assert main(["predict", *args, "--ckpt_path", str(ckpt2), "--predict_writer.output_dir", str(pred_dir)]) == 0
    scenes = sorted(p for p in pred_dir.iterdir() if p.is_dir())
    assert len(scenes) == 2
    assert len(list(scenes[0].glob("view_*.png"))) == 3 and len(list(scenes[0].glob("depth_*.png"))) == 3
    assert Image.open(next(scenes[0].glob("depth_*.png"))).size == (16, 16)
    with Image.open(scenes[0] / "orbit.gif") as gif:
        assert gif.n_frames == 4  # the orbit rendered from the sampled scene, not the 3 targets


@pytest.mark.parametrize("name, expect", [
    ("dfm_co3d", r"(?s)hydrant.*not found.*download_dataset.py"),
    ("dfm_re10k", r"(?s)RealEstate10K camera files for split 'train' not found.*realestate10k/download"),
])
def test_paper_configs_name_missing_data_and_how_to_get_it(name, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative data paths point into an empty folder
    args = ["fit", "--config", str(CONFIG.with_name(f"{name}.yaml")),
            "--model.init_args.network.init_args", json.dumps({**TINY_NET, "encoder_kwargs": {"hidden_size": 32, "depth": 1, "num_heads": 2}}),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "1"]
    with pytest.raises(FileNotFoundError, match=expect):
        run(args)
