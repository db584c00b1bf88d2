"""CO3D and RealEstate10K readers on tiny fake datasets written in the published layouts."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from genvs.core.cameras import look_at
from genvs.core.geometry import project_points
from genvs.core.views import Views
from genvs.data import CO3DDataModule, EvalProtocol, RealEstate10KDataModule
from genvs.data.co3d import CO3DScenes, co3d_camera_to_opencv, optical_axes_center, read_co3d_set_list
from genvs.data.frames import FrameWindowDataset, VideoRecord, frame_window_views
from genvs.data.realestate10k import RealEstate10KScenes, parse_re10k_pose_file, re10k_to_opencv

FLIP = np.diag([-1.0, -1.0, 1.0])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _pytorch3d_project(X, R, T, f, p, H, W, fmt):
    """Pixel coordinates by PyTorch3D's own formulas (row vectors, NDC +x left / +y up), in numpy."""
    Xv = X @ R + T  # world -> PyTorch3D view space
    ndc = f * Xv[:, :2] / Xv[:, 2:] + p
    s = np.array([W / 2.0, H / 2.0]) if fmt == "ndc_norm_image_bounds" else min(H, W) / 2.0
    return np.array([W / 2.0, H / 2.0]) - ndc * s  # NDC -> screen: flip both axes, centres at i + 0.5


@pytest.mark.parametrize("fmt", ["ndc_isotropic", "ndc_norm_image_bounds"])
def test_co3d_conversion_matches_pytorch3d_ndc_projection(fmt):
    rng = np.random.default_rng(0)
    H, W = 30, 50
    for _ in range(3):
        R = _random_rotation(rng)
        T = np.array([0.1, -0.2, 4.0]) + rng.normal(size=3) * 0.1
        f = np.array([1.7, 1.9])
        p = np.array([0.05, -0.08])
        Xv = np.concatenate([rng.uniform(-1, 1, (20, 2)), rng.uniform(3, 5, (20, 1))], 1)  # points in front
        X = (Xv - T) @ R.T  # invert X_view = X R + T
        expected = _pytorch3d_project(X, R, T, f, p, H, W, fmt)
        K, c2w = co3d_camera_to_opencv(
            torch.tensor(R), torch.tensor(T), torch.tensor(f), torch.tensor(p), torch.tensor([H, W]), fmt
        )
        uv, z = project_points(torch.tensor(X, dtype=torch.float32), K, c2w)
        np.testing.assert_allclose(uv.numpy(), expected, atol=2e-3)
        assert (z > 0).all()
        assert torch.allclose(c2w[:3, :3] @ c2w[:3, :3].T, torch.eye(3), atol=1e-5)
        assert torch.linalg.det(c2w[:3, :3]) > 0  # a proper rotation: OpenCV is right-handed like PyTorch3D


# --------------------------------------------------------------------------------------------- CO3D
def _opencv_to_co3d(K: np.ndarray, c2w: np.ndarray, H: int, W: int):
    """Inverse of the conversion, for writing annotations: OpenCV camera -> PyTorch3D R, T, NDC f, p."""
    w2c = np.linalg.inv(c2w)
    R_cv, t_cv = w2c[:3, :3], w2c[:3, 3]
    R = R_cv.T @ FLIP
    T = FLIP @ t_cv
    s = min(H, W) / 2.0
    f = np.array([K[0, 0], K[1, 1]]) / s
    p = (np.array([W / 2.0, H / 2.0]) - np.array([K[0, 2], K[1, 2]])) / s
    return R, T, f, p


def _dot_image(H, W, u, v, color=255):
    img = np.zeros((H, W, 3), np.uint8)
    x, y = int(u), int(v)
    img[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = color
    return img


def _write_co3d(root, H=24, W=32, radii=(2.0, 3.0), views=4):
    cat = root / "hydrant"
    (cat / "set_lists").mkdir(parents=True)
    frames, seq_ann, set_list = [], [], {"train": [], "val": [], "test": []}
    truth = {}
    K = np.array([[28.0, 0, W / 2 + 1.0], [0, 28.0, H / 2 - 0.5], [0, 0, 1]])
    for si, radius in enumerate(radii):
        seq = f"{100 + si}_seq"
        for d in ("images", "masks", "depths"):
            (cat / seq / d).mkdir(parents=True)
        az = torch.arange(views) * 2 * math.pi / views
        eye = torch.stack([radius * torch.cos(az), radius * torch.sin(az), torch.full_like(az, 0.4 * radius)], -1)
        c2ws = look_at(eye).double().numpy()
        truth[seq] = (K, c2ws, radius)
        for j in range(views):
            num = j + 1
            img_rel = f"hydrant/{seq}/images/frame{num:06d}.jpg"
            mask_rel = f"hydrant/{seq}/masks/frame{num:06d}.png"
            depth_rel = f"hydrant/{seq}/depths/frame{num:06d}.jpg.geometric.png"
            o = np.linalg.inv(c2ws[j]) @ np.array([0, 0, 0, 1.0])  # world origin in the camera
            uv = (K @ o[:3])[:2] / o[2]
            Image.fromarray(_dot_image(H, W, uv[0], uv[1])).save(root / img_rel, quality=95)
            Image.fromarray(np.full((H, W), 255, np.uint8)).save(root / mask_rel)
            depth = np.full((H, W), o[2], np.float16).view(np.uint16)  # CO3D: float16 bits in a 16-bit PNG
            Image.fromarray(depth).save(root / depth_rel)
            R, T, f, p = _opencv_to_co3d(K, c2ws[j], H, W)
            frames.append(
                {
                    "sequence_name": seq,
                    "frame_number": num,
                    "frame_timestamp": j * 0.1,
                    "image": {"path": img_rel, "size": [H, W]},
                    "depth": {"path": depth_rel, "scale_adjustment": 1.0, "mask_path": mask_rel},
                    "mask": {"path": mask_rel, "mass": float(H * W)},
                    "viewpoint": {
                        "R": R.tolist(), "T": T.tolist(), "focal_length": f.tolist(),
                        "principal_point": p.tolist(), "intrinsics_format": "ndc_isotropic",
                    },
                    "meta": {},
                }
            )
            set_list["train" if si == 0 else "val"].append([seq, num, img_rel])
        seq_ann.append(
            {"sequence_name": seq, "category": "hydrant", "video_length": views, "viewpoint_quality_score": float(si)}
        )
    with gzip.open(cat / "frame_annotations.jgz", "wt", encoding="utf8") as f:
        json.dump(frames[::-1], f)  # unsorted on purpose
    with gzip.open(cat / "sequence_annotations.jgz", "wt", encoding="utf8") as f:
        json.dump(seq_ann, f)
    (cat / "set_lists" / "set_lists_fewview_dev.json").write_text(json.dumps(set_list))
    return truth


def test_co3d_reader_on_fake_layout(tmp_path):
    truth = _write_co3d(tmp_path)
    assert read_co3d_set_list(tmp_path, "hydrant", "fewview_dev", "val") == {"101_seq": [1, 2, 3, 4]}
    ds = CO3DScenes(tmp_path, "hydrant", "fewview_dev", "train", image_size=16, scene_scale="none")
    assert ds.sequences == ["100_seq"] and len(ds) == 1 and ds.num_frames(0) == 4
    item = ds[0]
    K0, c2ws, _ = truth["100_seq"]
    assert item["images"].shape == (4, 3, 16, 16) and item["images"].min() >= -1 and item["images"].max() <= 1
    assert torch.equal(item["frame_numbers"], torch.tensor([1, 2, 3, 4]))
    assert torch.allclose(item["c2w"], torch.tensor(c2ws, dtype=torch.float32), atol=1e-5)
    # 24x32 centre-cropped to 24x24 (x offset 4), resized by 16/24
    s = 16 / 24
    Kexp = torch.tensor([[28 * s, 0, (32 / 2 + 1 - 4) * s], [0, 28 * s, (24 / 2 - 0.5) * s], [0, 0, 1]])
    assert torch.allclose(item["K"], Kexp.expand(4, 3, 3), atol=1e-4)
    # the dot drawn at the world origin's projection is where the returned camera projects the origin
    uv, _ = project_points(torch.zeros(4, 1, 3), item["K"], item["c2w"])
    for v in range(4):
        lum = item["images"][v].mean(0)
        y, x = divmod(int(lum.argmax()), 16)
        assert abs(x + 0.5 - uv[v, 0, 0]) <= 1.0 and abs(y + 0.5 - uv[v, 0, 1]) <= 1.0

    sub = ds.load(0, [2, 0])
    assert torch.equal(sub["frame_numbers"], torch.tensor([3, 1]))
    with pytest.raises(IndexError, match="out of range"):
        ds.load(0, [7])


def test_co3d_scene_scale_from_cameras_and_depth_agree(tmp_path):
    truth = _write_co3d(tmp_path)
    for mode in ("cameras", "depth"):
        ds = CO3DScenes(tmp_path, "hydrant", subset=None, image_size=8, scene_scale=mode, target_scale=10.0)
        assert ds.sequences == ["100_seq", "101_seq"]
        for i, seq in enumerate(ds.sequences):
            _, c2ws, radius = truth[seq]
            c2w = ds.load(i)["c2w"]
            dist = (c2w[:, :3, 3] - optical_axes_center(c2w)).norm(dim=-1)
            assert torch.allclose(dist, torch.full_like(dist, 10.0), rtol=2e-3), (mode, dist)
            assert torch.allclose(c2w[:, :3, :3], torch.tensor(c2ws[:, :3, :3], dtype=torch.float32), atol=1e-5)
    best = CO3DScenes(tmp_path, "hydrant", subset=None, image_size=8, top_quality=1)
    assert best.sequences == ["101_seq"]  # highest viewpoint_quality_score


def test_co3d_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="frame_annotations.jgz"):
        CO3DScenes(tmp_path, "hydrant")
    _write_co3d(tmp_path)
    with pytest.raises(FileNotFoundError, match="set_lists_manyview_dev_0.json"):
        CO3DScenes(tmp_path, "hydrant", subset="manyview_dev_0")
    ds = CO3DScenes(tmp_path, "hydrant", image_size=8)
    (tmp_path / "hydrant" / "100_seq" / "images" / "frame000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="frame000002.jpg"):
        ds.load(0)


# ---------------------------------------------------------------------------------------- RealEstate10K
def _write_re10k(root, H=36, W=64, n=3, seq="0a1b2c3d4e5f6a7b"):
    (root / "poses" / "test").mkdir(parents=True)
    (root / "frames" / "test" / seq).mkdir(parents=True)
    fx, fy, cx, cy = 0.5, 0.9, 0.52, 0.47
    eye = torch.tensor([[1.0 + 0.2 * i, -2.0, 0.3 * i] for i in range(n)])
    c2ws = look_at(eye, torch.tensor([0.2, 0.1, 0.0])).double().numpy()
    lines = ["https://www.youtube.com/watch?v=FAKE"]
    stamps = []
    for i in range(n):
        ts = 1_000_000 + 33_366 * i
        stamps.append(ts)
        w2c = np.linalg.inv(c2ws[i])[:3]
        lines.append(" ".join([str(ts)] + [f"{v:.9f}" for v in (fx, fy, cx, cy, 0, 0, *w2c.reshape(-1))]))
        K = np.array([[fx * W, 0, cx * W], [0, fy * H, cy * H], [0, 0, 1]])
        o = w2c @ np.array([0.2, 0.1, 0.0, 1.0])
        uv = (K @ o)[:2] / o[2]
        Image.fromarray(_dot_image(H, W, uv[0], uv[1])).save(root / "frames" / "test" / seq / f"{ts}.png")
    (root / "poses" / "test" / f"{seq}.txt").write_text("\n".join(lines) + "\n")
    return c2ws, stamps, (fx, fy, cx, cy)


def test_re10k_reader_on_fake_layout(tmp_path):
    c2ws, stamps, (fx, fy, cx, cy) = _write_re10k(tmp_path)
    url, ts, intr, w2c = parse_re10k_pose_file(tmp_path / "poses" / "test" / "0a1b2c3d4e5f6a7b.txt")
    assert url.startswith("https://") and ts.tolist() == stamps
    K, c2w = re10k_to_opencv(intr, w2c, 36, 64)
    assert torch.allclose(c2w, torch.tensor(c2ws, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(K[0], torch.tensor([[fx * 64, 0, cx * 64], [0, fy * 36, cy * 36], [0, 0, 1]]), atol=1e-4)

    ds = RealEstate10KScenes(tmp_path / "poses", tmp_path / "frames", split="test", image_size=18)
    item = ds.load(0, [0, 2])
    assert item["images"].shape == (2, 3, 18, 18) and item["timestamps"].tolist() == [stamps[0], stamps[2]]
    assert torch.allclose(item["c2w"], torch.tensor(c2ws[[0, 2]], dtype=torch.float32), atol=1e-5)
    s = 18 / 36  # 36x64 centre-cropped to 36x36 (x offset 14), then halved
    Kexp = torch.tensor([[fx * 64 * s, 0, (cx * 64 - 14) * s], [0, fy * 36 * s, cy * 36 * s], [0, 0, 1]])
    assert torch.allclose(item["K"][0], Kexp, atol=1e-4)
    uv, _ = project_points(torch.tensor([[[0.2, 0.1, 0.0]]]).expand(2, 1, 3), item["K"], item["c2w"])
    for v in range(2):
        y, x = divmod(int(item["images"][v].mean(0).argmax()), 18)
        assert abs(x + 0.5 - uv[v, 0, 0]) <= 1.0 and abs(y + 0.5 - uv[v, 0, 1]) <= 1.0
    assert len(ds) == 1 and ds.num_frames(0) == 3


def test_re10k_clear_errors(tmp_path):
    c2ws, stamps, _ = _write_re10k(tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        RealEstate10KScenes(tmp_path / "poses", tmp_path / "frames", split="train")
    ds = RealEstate10KScenes(tmp_path / "poses", tmp_path / "frames", split="test")
    (tmp_path / "frames" / "test" / "0a1b2c3d4e5f6a7b" / f"{stamps[1]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"{stamps[1]}.png"):
        ds.load(0)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        RealEstate10KScenes(tmp_path / "poses", tmp_path / "frames", split="test", sequences=["nope"])
    import shutil

    shutil.rmtree(tmp_path / "poses" / "test")
    with pytest.raises(FileNotFoundError, match="(?s)poses/test/<sequence>.txt or .*test.mat.*realestate10k"):
        RealEstate10KScenes(tmp_path / "poses", tmp_path / "frames", split="test")
    bad = tmp_path / "bad.txt"
    bad.write_text("url\n123 0.5 0.5 0.5\n")
    with pytest.raises(ValueError, match="bad.txt:2: expected 19 numbers"):
        parse_re10k_pose_file(bad)


def test_re10k_mat_layout_and_sequences_without_frames(tmp_path, capsys):
    scipy_io = pytest.importorskip("scipy.io")
    c2ws, stamps, _ = _write_re10k(tmp_path)
    seq = "0a1b2c3d4e5f6a7b"
    rows = np.loadtxt(tmp_path / "poses" / "test" / f"{seq}.txt", skiprows=1)
    (tmp_path / "poses" / "test" / "ffff0000ffff0000.txt").write_text("url\n" + "\n".join(" ".join(map(str, r)) for r in rows))
    txt = RealEstate10KScenes(tmp_path / "poses", tmp_path / "frames", split="test", image_size=18)
    assert txt.sequences == [seq] and "1 of 2 sequences have cameras but no extracted frames" in capsys.readouterr().out
    assert txt.scenes[0].scene_id == seq and txt.scenes[0].num_views == 3
    (tmp_path / "mat").mkdir()
    scipy_io.savemat(tmp_path / "mat" / "test.mat", {seq: rows})  # the layout the official DFM code reads
    mat = RealEstate10KScenes(tmp_path / "mat", tmp_path / "frames", split="test", image_size=18)
    a, b = txt.load(0, [0, 2]), mat.load(0, [0, 2])
    assert torch.equal(a["timestamps"], b["timestamps"]) and torch.allclose(a["c2w"], b["c2w"], atol=1e-6)
    assert torch.equal(a["images"], b["images"]) and torch.allclose(a["K"], b["K"])


# ------------------------------------------------------------------------------------ training views
def test_frame_window_views_follow_the_official_sampling():
    g = torch.Generator().manual_seed(0)
    flips = 0
    for _ in range(200):
        ctx, tgt = frame_window_views(300, 3, 2, 20, 40, g)
        assert len(set(ctx + tgt)) == 5 and all(0 <= f < 300 for f in ctx + tgt)
        span = abs(tgt[0] - ctx[0])
        assert 60 <= span < 120  # [min, max) * num_context frames between the context and target 0
        lo, hi = sorted((ctx[0], tgt[0]))
        assert all(lo < f < hi for f in ctx[1:] + tgt[1:])  # everything else inside the window
        assert abs(tgt[1] - ctx[0]) <= span  # targets ordered from the farthest
        flips += tgt[0] < ctx[0]
    assert 60 < flips < 140  # the context is at either end of the window
    ctx, tgt = frame_window_views(5, 2, 2, 20, 40, g)  # a short video: every frame still distinct
    assert len(set(ctx + tgt)) == 4


class _FakeSource:
    def __init__(self, n=3, V=50):
        self.scenes = [VideoRecord(f"v{i}", V) for i in range(n)]

    def __len__(self):
        return len(self.scenes)

    def load(self, i, views, load_depth=True):
        V = len(views)
        c2w = torch.eye(4).repeat(V, 1, 1)
        c2w[:, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
        return {"images": torch.zeros(V, 3, 8, 8), "K": torch.eye(3).repeat(V, 1, 1), "c2w": c2w,
                "depth": torch.ones(V, 1, 8, 8)}


def test_frame_window_dataset_is_deterministic_and_scale_augments():
    ds = FrameWindowDataset(_FakeSource(), 2, 2, min_distance=5, max_distance=10, scale_augmentation=0.2, load_depth=True)
    a, b = ds[1], ds[1]
    assert torch.equal(a.index, b.index) and torch.equal(a.c2w, b.c2w)  # a function of (seed, epoch, index)
    f = a.c2w[0, 0, 0, 3] / 1.0
    assert 0.8 <= f <= 1.2 and f != 1.0
    assert torch.allclose(a.c2w[0, :, :3, 3], torch.tensor([1.0, 2.0, 3.0]) * f)
    assert torch.allclose(a.depth, torch.full_like(a.depth, float(f)))  # depth scales with the scene
    ds.epoch = 1
    assert not torch.equal(ds[1].index, a.index)
    assert a.num_context == 2 and a.V == 4


def test_co3d_and_re10k_datamodules_give_views_batches(tmp_path):
    _write_co3d(tmp_path / "co3d", views=6)
    dm = CO3DDataModule(root=str(tmp_path / "co3d"), image_size=16, n_context=2, n_target=2, batch_size=1,
                        num_workers=0, min_distance=1, max_distance=3, top_quality=None,
                        val_protocol=EvalProtocol(input_views=[0], num_targets=2))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Views) and batch.images.shape == (1, 4, 3, 16, 16) and batch.num_context == 2
    val = next(iter(dm.val_dataloader()))
    assert val.scene == ["101_seq"] and val.V == 3 and val.index[0].tolist() == [0, 1, 3]
    _write_re10k(tmp_path / "re", n=5)
    dm = RealEstate10KDataModule(pose_root=str(tmp_path / "re" / "poses"), frames_root=str(tmp_path / "re" / "frames"),
                                 image_size=16, n_context=1, n_target=2, batch_size=1, num_workers=0,
                                 min_distance=1, max_distance=3,
                                 val_protocol=EvalProtocol(input_views=[0], num_targets=2))
    dm.setup("validate")  # validation reads the test split: the release has only train and test
    val = next(iter(dm.val_dataloader()))
    assert val.images.shape == (1, 3, 3, 16, 16) and val.scene == ["0a1b2c3d4e5f6a7b"]
    with pytest.raises(FileNotFoundError, match="train"):
        dm.setup("fit")
