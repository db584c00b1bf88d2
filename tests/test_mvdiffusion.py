"""MVDiffusion as a genvs method: model, data (rooms, Matterport skyboxes, ScanNet sequences), CLI.

Every model loads a tiny random-weight Stable Diffusion (UNet, VAE, CLIP text encoder + tokenizer) written
to a temp folder, through the real `from_pretrained` loading path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import printed_config
from genvs.cli import main, run
from genvs.core.cameras import intrinsics_from_fov
from genvs.core.geometry import equirect_directions, equirect_to_perspective, project_points, unproject_depth
from genvs.core.views import Views
from genvs.data import DepthSequenceDataModule, PanoramaDataModule, RoomConfig, ToyRoomsDataModule
from genvs.data.panorama import matterport_skybox_cameras
from genvs.data.scannet import DepthSequenceDataset, ModeEpochSampler, ScanNetScenes, scannet_intrinsics
from genvs.data.srn import DatasetError, SRNScenes
from genvs.data.toy import generate_toy_rooms, random_room, render_room_ring
from genvs.methods.mvdiffusion import ADAPTER_FILE, MVDiffusion
from genvs.methods.mvdiffusion import model as mv_model
from genvs.methods.mvdiffusion.correspondences import axis_neighbors, pair_overlap
from genvs.methods.mvdiffusion.sd import StableDiffusionError, build_tiny_sd

TINY_ROOMS = RoomConfig(resolution=32, num_rooms={"train": 2, "val": 1, "test": 1}, supersample=1)
ROOT = Path(__file__).parents[1]
FAST_SAMPLER = {
    "class_path": "genvs.core.samplers.Sampler",
    "init_args": {
        "scheduler": {
            "class_path": "genvs.core.samplers.DDIMScheduler",
            "init_args": {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False},
        },
        "num_steps": 3,
        "guidance_scale": 9.0,
    },
}


@pytest.fixture(scope="module")
def rooms_root(tmp_path_factory):
    return generate_toy_rooms(tmp_path_factory.mktemp("rooms") / "rooms", TINY_ROOMS, progress=False)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    return {k: build_tiny_sd(root / k, kind=k, seed=i) for i, k in enumerate(["base", "inpainting", "depth"])}


def make_model(sd, task="panorama", **kw):
    kind = {"panorama": "base", "image_panorama": "inpainting", "depth": "depth"}[task]
    kw.setdefault("sampler", FAST_SAMPLER)
    m = MVDiffusion(sd_path=str(sd[kind]), task=task, caa_checkpoint=False, **kw)
    m.setup_ema()
    return m


def perturb_adapter(m, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.denoiser.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def ring_batch(rooms_root, num_context=0, stage="predict"):
    dm = ToyRoomsDataModule(root=str(rooms_root), rooms=TINY_ROOMS, image_size=32, num_workers=0, num_context=num_context)
    dm.setup(stage)
    return next(iter(dm.predict_dataloader() if stage == "predict" else dm.train_dataloader()))


# ----------------------------------------------------------------------------------- procedural rooms


def test_rooms_are_deterministic_with_prompts_and_consistent_depth(rooms_root):
    prompts = (rooms_root / "train/room_train_00001/prompts.txt").read_text().splitlines()
    assert len(prompts) == 8 and all(p.startswith("a room with ") and " wall" in p for p in prompts)
    scenes = SRNScenes(rooms_root, "train")
    d = scenes.load(1, list(range(8)))
    assert d["images"].shape == (8, 3, 32, 32) and (d["depth"] > 0).all()  # closed room: depth everywhere
    # the ring: one centre, 90 deg field of view, yaw steps of 45 deg turning right (towards -y)
    c2w = d["c2w"]
    assert (c2w[:, :3, 3] - c2w[:1, :3, 3]).abs().max() < 1e-5
    torch.testing.assert_close(d["K"][0], intrinsics_from_fov(90.0, 32))
    fwd = c2w[:, :3, 2]
    assert torch.allclose((fwd[:-1] * fwd[1:]).sum(-1), torch.full((7,), math.cos(math.pi / 4)), atol=1e-5)
    assert torch.cross(fwd[0], fwd[1], dim=0)[2] < 0  # right turn seen from above (z up)
    # depth: view 0 unprojected and projected into view 1 lands on the same surface with the same colour
    pts = unproject_depth(d["depth"][0, 0], d["K"][0], c2w[0]).reshape(-1, 3)
    uv, z = project_points(pts, d["K"][1], c2w[1])
    ij = uv.floor().long()
    inside = (ij >= 0).all(-1) & (ij < 32).all(-1) & (z > 0)
    seen = d["depth"][1, 0][ij[inside, 1], ij[inside, 0]]
    same = (seen - z[inside]).abs() < 0.05 * z[inside]
    assert inside.sum() > 300 and same.float().mean() > 0.9
    src = d["images"][0].permute(1, 2, 0).reshape(-1, 3)[inside][same]
    dst = d["images"][1].permute(1, 2, 0)[ij[inside, 1][same], ij[inside, 0][same]]
    assert (src - dst).abs().mean() < 0.15
    # deterministic: rendering the room again from its seed (in memory) gives the written ring
    ring = render_room_ring(random_room(torch.Generator().manual_seed(TINY_ROOMS.seed * 1_000_003 + 1 + 7)), TINY_ROOMS)
    assert ring["prompts"] == prompts
    assert (ring["images"] - d["images"]).abs().max() < 2.5 / 255 * 2


def test_room_datamodule_batches_whole_rings_with_prompts(rooms_root):
    batch = ring_batch(rooms_root, stage="fit")
    assert batch.V == 8 and batch.num_context == 0 and len(batch.prompts[0]) == 8
    order = batch.index[0].tolist()
    assert sorted(order) == list(range(8)) and all((b - a) % 8 == 1 for a, b in zip(order, order[1:]))  # rotated ring
    prompts = (rooms_root / "train" / batch.scene[0] / "prompts.txt").read_text().splitlines()
    assert batch.prompts[0] == [prompts[i] for i in order]
    ctx = ring_batch(rooms_root, num_context=1)
    assert ctx.num_context == 1 and ctx.index[0].tolist() == list(range(8))  # evaluation: no rotation


# ------------------------------------------------------------------------------- Matterport skyboxes


def test_matterport_skybox_faces_follow_the_official_convention():
    K, c2w = matterport_skybox_cameras(16)
    R = c2w[:, :3, :3]
    fwd = R[:, :, 2]
    expect = torch.tensor([[0, 0, 1.0], [0, 1, 0], [1, 0, 0], [0, -1, 0], [-1, 0, 0], [0, 0, -1]])
    torch.testing.assert_close(fwd, expect, atol=1e-6, rtol=0)  # up, left (yaw 270), front, right, back, down
    torch.testing.assert_close(R[0, :, 1], torch.tensor([0.0, 1, 0]), atol=1e-6, rtol=0)  # up face: bottom meets the yaw 270 face
    torch.testing.assert_close(R[5, :, 1], torch.tensor([0.0, -1, 0]), atol=1e-6, rtol=0)  # down face: bottom meets the yaw 90 face
    assert torch.allclose(torch.det(R), torch.ones(6))


def _pano_colour(d):
    return torch.stack([d[..., 0] * d[..., 1] * 2, torch.cos(3 * d[..., 1]) * d[..., 2], d[..., 2] + 0.3 * d[..., 0]], 0)


def test_skybox_datamodule_resamples_faces_into_the_ring(tmp_path):
    root = tmp_path / "mp3d"
    pano = _pano_colour(equirect_directions(128, 256))[None].clamp(-1, 1)
    K, c2w = matterport_skybox_cameras(64)
    faces = equirect_to_perspective(pano, K[None], c2w[None], (64, 64))[0]
    rows = []
    for scan, pano_id in [("scanA", "p0"), ("scanB", "p1")]:
        d = root / scan / "matterport_skybox_images"
        d.mkdir(parents=True)
        (root / scan / "blip3").mkdir()
        row = []
        for k in range(6):
            path = d / f"{pano_id}_skybox{k}_sami.png"
            Image.fromarray(((faces[k].permute(1, 2, 0).numpy() + 1) * 127.5 + 0.5).astype(np.uint8)).save(path)
            row.append(str(path.relative_to(root)))
        rows.append(row)
        for deg in range(0, 360, 45):
            (root / scan / "blip3" / f"{pano_id}_{deg}.txt").write_text(f"view at {deg}\n")
    np.save(root / "train.npy", np.array(rows))
    np.save(root / "test.npy", np.array(rows[:1]))
    dm = PanoramaDataModule(root=str(root), image_size=32, num_workers=0)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch.V == 8 and batch.scene == ["scanA_p0"]
    assert batch.prompts[0] == [f"This is one view of a scene. view at {45 * v}" for v in range(8)]
    ref = equirect_to_perspective(pano, batch.K, batch.c2w, (32, 32))
    assert (batch.images - ref).abs().mean() < 0.03  # faces -> ring = equirect -> ring
    fwd = batch.c2w[0, :, :3, 2]
    torch.testing.assert_close(fwd[2], torch.tensor([0.0, -1, 0]), atol=1e-5, rtol=0)  # view 2 = yaw 90 right
    dm.setup("fit")
    train = dm.dataset("fit")[1]
    yaw = math.degrees(math.atan2(-float(train.c2w[0, 0, 1, 2]), float(train.c2w[0, 0, 0, 2]))) % 360
    assert train.prompts[0][0].endswith(f"view at {int(round(yaw / 45) * 45) % 360}")  # captions follow the yaw
    with pytest.raises(DatasetError, match="Matterport3D"):
        PanoramaDataModule(root=str(tmp_path / "none")).dataset("fit")


# --------------------------------------------------------------------------------- ScanNet sequences


def _write_scannet(rooms_root: Path, root: Path) -> list[dict]:
    """Two rooms' rings written as ScanNet scenes: frame ids 0, 10, ..., key frames every other frame."""
    src = SRNScenes(rooms_root, "train")
    written = []
    for i in range(2):
        d = src.load(i, list(range(8)))
        scene = root / "train" / f"scene{i:04d}_00"
        for sub in ("color", "depth", "pose", "prompt", "intrinsic"):
            (scene / sub).mkdir(parents=True)
        for v in range(8):
            f = 10 * v
            img = ((d["images"][v].permute(1, 2, 0).numpy() + 1) * 127.5 + 0.5).astype(np.uint8)
            Image.fromarray(np.kron(img, np.ones((2, 2, 1), np.uint8))).save(scene / "color" / f"{f}.jpg", quality=95)
            Image.fromarray((d["depth"][v, 0].numpy() * 1000).astype(np.uint16)).save(scene / "depth" / f"{f}.png")
            np.savetxt(scene / "pose" / f"{f}.txt", d["c2w"][v].numpy())
            (scene / "prompt" / f"{f}.txt").write_text(f"frame {f} of scene {i}\n")
        K = np.eye(4)
        K[:3, :3] = d["K"][0].numpy()
        K[0, 2] -= 0.5  # ScanNet: pixel centres at integers
        K[1, 2] -= 0.5
        np.savetxt(scene / "intrinsic" / "intrinsic_depth.txt", K)
        (scene / "key_frame_0.6.txt").write_text("\n".join(str(f) for f in (0, 20, 40, 60, 70)) + "\n")
        np.save(scene / "valid_frames.npy", np.array([0, 10, 20, 30, 40, 50, 60, 70]))
        written.append(d)
    return written


def test_scannet_sequences_keyframe_and_interpolation_examples(rooms_root, tmp_path):
    d = _write_scannet(rooms_root, tmp_path / "scannet")[0]
    torch.testing.assert_close(
        scannet_intrinsics(tmp_path / "scannet/train/scene0001_00/intrinsic/intrinsic_depth.txt"), d["K"][0]
    )
    dm = DepthSequenceDataModule(root=str(tmp_path / "scannet"), num_views=3, keyframe_gap=2, image_size=32,
                                 frame_interval=10, eval_keyframes=3, batch_size=2, num_workers=0)  # fmt: skip
    ds = dm.dataset("fit")
    gen = ds[0]
    assert gen.num_context == 0 and gen.index[0].tolist() == [0, 20, 40] and gen.depth.shape == (1, 3, 1, 32, 32)
    assert gen.prompts[0] == ["frame 0 of scene 0", "frame 20 of scene 0", "frame 40 of scene 0"]
    interp = ds[len(ds) + 1]  # interpolation example of anchor key frame 20: key frames 20 and 60 first
    assert interp.num_context == 2 and interp.index[0, :2].tolist() == [20, 60]
    between = interp.index[0, 2:].tolist()
    assert between == sorted(between) and all(20 < f < 60 for f in between)
    # the scene's own images, depth and cameras (colour frames are twice the depth maps' size)
    torch.testing.assert_close(gen.depth[0, 1], d["depth"][2], atol=1e-3, rtol=0)
    torch.testing.assert_close(gen.c2w[0, 1], d["c2w"][2], atol=1e-5, rtol=0)
    assert (gen.images[0, 1] - d["images"][2]).abs().mean() < 0.05
    # batches hold one kind of example each, both kinds occur, and the order is a function of the epoch
    assert {b.num_context for b in dm.train_dataloader()} <= {0, 2}
    N = len(ds)
    sampler = ModeEpochSampler(ds, batch_size=2, p_generation=0.5, seed=0)
    batches = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert order == list(sampler) and sorted(i % N for i in order) == list(range(N))
        sampler.start = 4  # a run resumed after two batches continues with the same indices
        assert list(sampler) == order[4:]
        batches += [order[j : j + 2] for j in range(0, len(order), 2)]
    assert all(len({i >= N for i in b}) == 1 for b in batches) and {b[0] >= N for b in batches} == {True, False}
    # evaluation: key frames 0, 20, 40 and the frames every 10 ids between them, in temporal order
    ev = DepthSequenceDataset(ScanNetScenes(tmp_path / "scannet", "train"), eval_keyframes=3, frame_interval=10)
    assert ev[0].num_context == 0 and ev[0].index[0].tolist() == [0, 10, 20, 30, 40]
    with pytest.raises(DatasetError, match="split folder"):
        dm.dataset("predict")  # no test/ split here


# ------------------------------------------------------------------------------------------ model


def test_missing_or_wrong_weights_give_clear_errors(sd, tmp_path):
    with pytest.raises(StableDiffusionError, match="stable-diffusion-2-base.*huggingface-cli download"):
        MVDiffusion(sd_path=str(tmp_path / "missing"))
    with pytest.raises(StableDiffusionError, match="needs 5 .*stable-diffusion-2-depth"):
        MVDiffusion(sd_path=str(sd["base"]), task="depth")
    m = MVDiffusion(sd_path=str(tmp_path / "built"), build_tiny_sd_if_missing=True, task="image_panorama")
    assert m.denoiser.in_channels == 9 and (tmp_path / "built/text_encoder").is_dir()


def test_defaults_follow_the_paper(sd):
    m = MVDiffusion(sd_path=str(sd["base"]))
    s = m.sampler
    assert s.num_steps == 50 and s.guidance_scale == 9.0
    cfg = s.scheduler.config
    assert cfg.timestep_spacing == "leading" and cfg.steps_offset == 1 and cfg.clip_sample is False
    assert m.optim.name == "AdamW" and m.optim.lr == 2e-4 and m.kernel_size == 3 and m.prediction == "eps"
    assert MVDiffusion(sd_path=str(sd["depth"]), task="depth").kernel_size == 1
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("denoiser.adapter.") for n in trainable)


def test_ring_neighbours_from_geometry_and_cached_correspondences(sd, rooms_root):
    m = make_model(sd)
    batch = ring_batch(rooms_root, stage="fit")
    shuffled = batch.select(torch.tensor([3, 0, 6, 1, 7, 2, 5, 4]))  # views in any order
    nb = axis_neighbors(shuffled.c2w)[0]  # neighbours from the optical axes, as positions in the shuffled batch
    ids = shuffled.index[0]
    for q in range(8):
        assert sorted(ids[nb[q]].tolist()) == sorted(((int(ids[q]) + d) % 8) for d in (-1, 1))
    c1 = m.correspondences(batch.K, batch.c2w, (32, 32))
    c2 = m.correspondences(torch.cat([batch.K] * 2), _yaw(30.0) @ torch.cat([batch.c2w] * 2), (32, 32))
    assert c1 is c2 and c1.B == 1  # the same ring, rotated as a whole: computed once, shared by the batch


def _yaw(deg):
    a = math.radians(deg)
    R = torch.eye(4)
    R[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return R


@pytest.mark.parametrize("task", ["panorama", "image_panorama", "depth"])
def test_loss_falls_on_a_fixed_batch(sd, rooms_root, task):
    torch.manual_seed(0)
    m = make_model(sd, task)
    if task == "depth":
        dm = DepthSequenceDataModule(root=str(rooms_root), layout="rings", num_views=4, keyframe_gap=3, image_size=32,
                                     num_workers=0, batch_size=1)  # fmt: skip
        ds = dm.dataset("fit")
        batch = Views.collate([ds[len(ds)]])  # interpolation example: condition encoder used too
        assert batch.num_context == 2
    else:
        batch = ring_batch(rooms_root, num_context=int(task == "image_panorama"), stage="fit")
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(6):
        torch.manual_seed(123)  # same VAE sample, timestep and noise every step: only the adapter changes
        loss = m.training_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        if step == 0:
            frozen = [p for n, p in m.named_parameters() if not p.requires_grad]
            assert frozen and all(p.grad is None for p in frozen)
            if task == "depth":
                assert m.denoiser.adapter.condition.down[0].net[-1].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_sampling_shapes_and_seeded_reproducibility(sd, rooms_root):
    m = make_model(sd).eval()
    perturb_adapter(m)
    batch = ring_batch(rooms_root)
    ctx, pred = m.generate(batch)
    assert ctx.V == 0 and pred.images.shape == (1, 8, 3, 32, 32) and pred.images.abs().max() <= 1
    assert pred.prompts == batch.prompts
    again = m.sample(ctx, batch.targets.cameras_only(), generator=m._generator(0))
    torch.testing.assert_close(again.images, pred.images)
    other = m.sample(ctx, batch.targets.cameras_only(), generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(other.images, pred.images)
    # image-conditioned: view 0 given, the 7 others generated
    mi = make_model(sd, "image_panorama").eval()
    b1 = ring_batch(rooms_root, num_context=1)
    c1, p1 = mi.generate(b1)
    assert c1.V == 1 and p1.images.shape == (1, 7, 3, 32, 32)
    with pytest.raises(ValueError, match="num_context: 1"):
        mi.sample(ctx, batch.targets.cameras_only())
    with pytest.raises(ValueError, match="image_panorama"):
        m.sample(c1, b1.targets.cameras_only())


def test_depth_two_stage_sampling_generates_every_segment(sd, rooms_root, monkeypatch):
    """Stage 1 generates all key frames jointly; stage 2 every segment between consecutive key frames (all
    of them, batched), conditioned on the two key frames' stage-1 latents; nothing else is generated."""
    m = make_model(sd, "depth", keyframe_stride=2).eval()
    dm = DepthSequenceDataModule(root=str(rooms_root), layout="rings", num_views=4, image_size=32, eval_keyframes=7,
                                 num_workers=0)  # fmt: skip
    dm.setup("predict")
    batch = Views.collate([dm.dataset("predict")[0]] * 2)  # 2 scenes x 7 views: key frames 0, 2, 4, 6
    calls = []
    real = mv_model.sample_latents

    def spy(net, sampler, schedule, text, null, corr, hw, extra=None, condition=None, **kw):
        z = real(net, sampler, schedule, text, null, corr, hw, extra=extra, condition=condition, **kw)
        z = torch.full_like(z, float(len(calls) + 1))  # tag each call's output
        calls.append((tuple(text.shape[:2]), None if condition is None else condition.clone()))
        return z

    monkeypatch.setattr(mv_model, "sample_latents", spy)
    decoded = []
    monkeypatch.setattr(mv_model, "decode_latents", lambda vae, z: decoded.append(z.clone()) or torch.zeros(*z.shape[:2], 3, 32, 32))
    ctx, pred = m.generate(batch)
    assert pred.images.shape == (2, 7, 3, 32, 32) and pred.depth is not None
    assert [c[0] for c in calls] == [(2, 4), (6, 3)]  # key frames of both scenes; 3 segments x 2 scenes at once
    assert calls[0][1] is None
    cond = calls[1][1]  # [6, 3, 5, h, w]: key latents (stage-1 output = 1) at both ends, mask channel
    assert (cond[:, [0, 2], :4] == 1).all() and (cond[:, 1] == 0).all() and (cond[:, [0, 2], 4] == 1).all()
    z = decoded[0]
    assert (z[:, [0, 2, 4, 6]] == 1).all() and (z[:, [1, 3, 5]] == 2).all()  # every frame between key frames
    # given key frames (context with images and depth): one joint generation conditioned on them
    calls.clear()
    decoded.clear()
    interp = dm.dataset("predict")[0].select([0, 2, 1], num_context=2)
    ctx, pred = m.generate(interp)
    assert ctx.V == 2 and pred.V == 1 and len(calls) == 1 and calls[0][0] == (1, 3)
    assert (calls[0][1][0, :2, 4] == 1).all() and (calls[0][1][0, 2] == 0).all()


def test_keyframes_by_overlap_are_greedy(sd):
    from genvs.data.toy import render_room_ring

    cfg = RoomConfig(resolution=32, num_views=10, yaw_step_deg=-12.0, supersample=1)
    ring = render_room_ring(random_room(torch.Generator().manual_seed(3)), cfg)
    v = Views(ring["images"][None], ring["K"][None], ring["c2w"][None], depth=ring["depth"][None])
    thr = 0.6
    m = make_model(sd, "depth", keyframe_overlap=thr)
    key = m.keyframes(v)[0]
    o = pair_overlap(v.K, v.c2w, v.depth)[0]
    sym = torch.minimum(o, o.T)
    idx = key.nonzero()[:, 0].tolist()
    assert idx[0] == 0 and idx[-1] == 9 and 2 < len(idx) < 10  # some frames are left to the interpolation stage
    for a, b in zip(idx[:-1], idx[1:]):
        if sym[a, b] >= thr:  # consecutive key frames overlap enough, and each is the furthest that does
            assert b == 9 or sym[a, b + 1] < thr
        else:  # unless even the next frame does not: then it is the next key frame
            assert b == a + 1


def test_checkpoint_holds_only_trainable_weights_and_reloads(sd, rooms_root, tmp_path):
    import lightning as L

    m = make_model(sd, ema_decay=0.99).eval()
    perturb_adapter(m)
    m.ema = None
    m.setup_ema()  # the EMA (used for sampling) starts from the perturbed weights
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(m)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith(("denoiser.unet.", "vae.", "prompt_encoder."))]
    assert any(k.startswith("denoiser.adapter.") for k in state) and any(k.startswith("ema.") for k in state)
    n_saved = sum(v.numel() for v in state.values() if v.is_floating_point())
    assert n_saved <= 2 * sum(p.numel() for p in m.denoiser.adapter.parameters()) + 10  # adapter + its EMA
    again = MVDiffusion.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
    for k, v in m.trainable_state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, msg=k)
    batch = ring_batch(rooms_root)
    torch.testing.assert_close(again.generate(batch)[1].images, m.generate(batch)[1].images)
    # the adapter alone, as safetensors, from the model or from the checkpoint on the command line
    # (`load_adapter` itself is tested in test_mvdiffusion_parts.py)
    from safetensors.torch import load_file

    from genvs.methods.mvdiffusion.export import main as export_main

    saved = load_file(m.save_adapter(tmp_path / ADAPTER_FILE, ema=False))
    assert export_main([str(path), str(tmp_path / "cli.safetensors")]) == 0
    exported = load_file(tmp_path / "cli.safetensors")
    assert saved.keys() == exported.keys() == m.denoiser.adapter.state_dict().keys()
    for k, v in m.denoiser.adapter.state_dict().items():
        torch.testing.assert_close(saved[k], v, msg=k)
        torch.testing.assert_close(exported[k], v, msg=k)  # EMA weights = these (EMA restarted from them)


# -------------------------------------------------------------------------------------------- CLI


def _cli_args(config: str, sd_path: Path, rooms_root: Path, out: Path) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / config),
        "--model.init_args.sd_path", str(sd_path),
        "--model.init_args.sampler.init_args.num_steps", "2",
        "--data.init_args.root", str(rooms_root),
        "--data.init_args.rooms", json.dumps(TINY_ROOMS.__dict__),
        "--data.init_args.image_size", "32",
        "--data.init_args.num_workers", "0",
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


@pytest.mark.parametrize("config", ["mvdiffusion_toy.yaml", "mvdiffusion_depth_toy.yaml"])
def test_cli_fit_predict_roundtrip(config, rooms_root, tmp_path):
    sd_path = tmp_path / "tiny_sd"  # built on first use: the toy configs set build_tiny_sd_if_missing
    args = _cli_args(config, sd_path, rooms_root, tmp_path / "run")
    cli = run(["fit", *args, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"])
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert ckpt.exists() and (Path(cli.trainer.log_dir) / ADAPTER_FILE).exists()
    assert "val/psnr" in cli.trainer.callback_metrics
    pred = tmp_path / "pred"
    assert main(["predict", *args, "--ckpt_path", str(ckpt), "--predict_writer.output_dir", str(pred)]) == 0
    scene = next(p for p in pred.iterdir() if p.is_dir())
    if config == "mvdiffusion_toy.yaml":
        assert len(list(scene.glob("view_*.png"))) == 8
        assert Image.open(scene / "panorama.png").size == (128, 64)  # 4 view widths x 2
    else:
        assert len(list(scene.glob("view_*.png"))) == 5  # the evaluation sequence: ring views 0-4


def test_paper_configs_parse_and_name_missing_weights(tmp_path, capsys):
    import yaml

    model = printed_config(capsys, ["--config", str(ROOT / "configs/mvdiffusion_panorama.yaml")])["model"]["init_args"]
    sampler = model["sampler"]["init_args"]
    assert sampler["num_steps"] == 50 and sampler["guidance_scale"] == 9.0 and model["build_tiny_sd_if_missing"] is False
    assert sampler["scheduler"]["init_args"]["clip_sample"] is False
    for name, need in [("panorama_outpaint", "stable-diffusion-2-inpainting"), ("depth", "stable-diffusion-2-depth")]:
        cfg = yaml.safe_load((ROOT / f"configs/mvdiffusion_{name}.yaml").read_text())
        assert cfg["model"]["init_args"]["sd_path"].endswith(need.split("/")[-1])
    with pytest.raises(Exception, match="stable-diffusion-2-depth.*huggingface-cli download"):
        run(["fit", "--config", str(ROOT / "configs/mvdiffusion_depth.yaml"),
             "--model.init_args.sd_path", str(tmp_path / "nope"), "--trainer.max_steps", "1"])  # fmt: skip


def test_prediction_writer_saves_extra_images(tmp_path):
    from genvs.callbacks import PredictionWriter

    K = intrinsics_from_fov(90, 8).expand(1, 2, 3, 3)
    pred = Views(torch.zeros(1, 2, 3, 8, 8), K, torch.eye(4).expand(1, 2, 4, 4), scene=["s"])
    ctx = pred.select(slice(0, 0))
    writer = PredictionWriter(output_dir=str(tmp_path))
    pano = torch.linspace(-1, 1, 3 * 16 * 32).reshape(1, 3, 16, 32)
    writer.on_predict_batch_end(None, None, {"context": ctx, "pred": pred, "panorama": pano}, None, 0)
    img = np.asarray(Image.open(tmp_path / "s" / "panorama.png"))
    assert img.shape == (16, 32, 3) and img[0, 0, 0] == 0 and img[-1, -1, -1] == 255


def test_data_command_renders_rooms(tmp_path):
    assert main(["data", "rooms", "--root", str(tmp_path / "r"), "--rooms.resolution", "16", "--rooms.supersample", "1",
                 "--rooms.num_rooms", "{train: 1, val: 0, test: 0}"]) == 0  # fmt: skip
    assert len(list((tmp_path / "r/train").glob("*/rgb/*.png"))) == 8
    assert len((tmp_path / "r/train/room_train_00000/prompts.txt").read_text().splitlines()) == 8
