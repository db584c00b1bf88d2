import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from genvs.core.geometry import project_points, unproject_depth
from genvs.data import EvalProtocol, MultiViewDataset, SRNScenes, ToyDataModule
from genvs.data.srn import DatasetError, read_intrinsics
from genvs.data.toy import ToyConfig, ensure_toy_dataset, generate_toy_dataset

from conftest import TINY_TOY


def test_toy_is_deterministic_and_seeded(tmp_path, toy_root):
    again = generate_toy_dataset(tmp_path / "again", TINY_TOY, progress=False)
    a = np.asarray(Image.open(toy_root / "train/toy_train_00001/rgb/000002.png"))
    b = np.asarray(Image.open(again / "train/toy_train_00001/rgb/000002.png"))
    assert np.array_equal(a, b)
    other = generate_toy_dataset(tmp_path / "other", ToyConfig(**{**TINY_TOY.__dict__, "seed": 1}), progress=False)
    c = np.asarray(Image.open(other / "train/toy_train_00001/rgb/000002.png"))
    assert not np.array_equal(a, c)
    assert a.shape == (32, 32, 3) and 0.05 < (a < 250).any(-1).mean() < 0.95  # an object on white


def test_toy_patterns_primitives_and_scale_settings(tmp_path):
    """The generator's knobs do what they say: only the chosen patterns, the primitive count, the size."""
    from genvs.data.toy import random_object

    g = torch.Generator().manual_seed(3)
    objs = [random_object(g, 2, 3, scale=1.0, patterns=["solid"]) for _ in range(30)]
    assert {p.pattern for o in objs for p in o} == {"solid"}
    assert {len(o) for o in objs} == {2, 3}
    g = torch.Generator().manual_seed(3)
    big = [random_object(g, 2, 3, scale=2.0, patterns=["solid"]) for _ in range(30)]
    for small, large in zip(objs, big):  # same draws, every length doubled
        for a, b in zip(small, large):
            assert torch.allclose(b.center, 2 * a.center) and torch.allclose(b.size, 2 * a.size)
    # the settings reach the written dataset and its record (a change regenerates it)
    cfg = ToyConfig(**{**TINY_TOY.__dict__, "patterns": ["solid"], "num_objects": {"train": 1}, "supersample": 1})
    root = generate_toy_dataset(tmp_path / "solid", cfg, progress=False)
    assert json.loads((root / "toy.json").read_text())["patterns"] == ["solid"]
    with pytest.raises(DatasetError, match=r"toy.patterns=\['marble'\]: choose one or more of"):
        ToyConfig(patterns=["marble"])
    with pytest.raises(DatasetError, match="toy.min_primitives=3, toy.max_primitives=2"):
        ToyConfig(min_primitives=3, max_primitives=2)
    with pytest.raises(DatasetError, match="toy.object_scale=0.0: must be positive"):
        ToyConfig(object_scale=0.0)
    assert ToyConfig().patterns == ["solid", "checker", "stripes", "dots"]  # every pattern by default


def test_toy_turntable_cameras(tmp_path):
    """``elevation_deg`` puts every camera at that elevation and radius, looking at the origin: train azimuths
    at random, test azimuths evenly spaced from 0. Datasets written without the setting keep their record."""
    from genvs.data.srn import read_pose

    cfg = ToyConfig(**{**TINY_TOY.__dict__, "num_objects": {"train": 1, "test": 1}, "elevation_deg": 30.0})
    root = generate_toy_dataset(tmp_path / "turntable", cfg, progress=False)
    assert json.loads((root / "toy.json").read_text())["elevation_deg"] == 30.0
    for split, n in (("train", 6), ("test", 8)):
        poses = torch.stack([read_pose(f) for f in sorted((root / split / f"toy_{split}_00000/pose").glob("*.txt"))])
        eye = poses[:, :3, 3].double()
        assert len(poses) == n
        torch.testing.assert_close(eye.norm(dim=-1), torch.full((n,), 1.3, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(eye[:, 2], torch.full((n,), 1.3 * 0.5, dtype=torch.float64), atol=1e-5, rtol=0)
        forward = poses[:, :3, 2].double()  # OpenCV: +z looks forward, at the origin
        torch.testing.assert_close(forward, -eye / eye.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)
        az = torch.rad2deg(torch.atan2(eye[:, 1], eye[:, 0])).remainder(360)
        if split == "test":
            torch.testing.assert_close(az, torch.arange(8, dtype=torch.float64) * 45, atol=1e-3, rtol=0)
        else:
            assert len({round(float(a)) for a in az}) == n and not torch.allclose(az.diff(), az.diff()[:1])
    assert "elevation_deg" not in ToyConfig().metadata()  # the default (SRN cameras) leaves older records valid
    with pytest.raises(DatasetError, match="toy.elevation_deg=90.0: give an elevation strictly between"):
        ToyConfig(elevation_deg=90.0)


def test_toy_car_category_is_canonically_aligned(tmp_path):
    """``category: car`` draws one aligned class: the body is longer along x than wide, the cabin sits back
    (-x) on its roof, four wheels below, and a camera on the +y side sees a wider silhouette than one in front
    (+x), for every object. Its record names the category; unknown categories are refused."""
    import math

    from genvs.core.cameras import intrinsics_from_fov, look_at, spherical_to_cartesian
    from genvs.data.toy import car_object, render_object

    K = intrinsics_from_fov(51.98, 32)
    for seed in range(6):
        body, cabin, *wheels = car_object(torch.Generator().manual_seed(seed), scale=1.5, patterns=["solid"])
        assert body.kind == cabin.kind == "box" and [w.kind for w in wheels] == ["sphere"] * 4
        assert body.size[0] > 1.5 * body.size[1] and cabin.center[0] < 0 < cabin.center[2]
        assert all(w.center[2] < body.center[2] for w in wheels) and not torch.equal(body.color, cabin.color)
        widths = []
        for az in (0.0, 90.0):  # in front (+x), on the side (+y)
            eye = spherical_to_cartesian(torch.tensor([1.3]), torch.tensor([math.radians(az)]), torch.tensor([0.2]))
            _, depth = render_object([body, cabin, *wheels], K, look_at(eye)[0], 32, 32)
            widths.append(int((depth > 0).any(0).sum()))
        assert widths[1] >= widths[0] + 4, widths
    cfg = ToyConfig(**{**TINY_TOY.__dict__, "num_objects": {"train": 1}, "category": "car"})
    root = generate_toy_dataset(tmp_path / "cars", cfg, progress=False)
    assert json.loads((root / "toy.json").read_text())["category"] == "car"
    assert "category" not in ToyConfig().metadata()  # random composites by default; older records stay valid
    with pytest.raises(DatasetError, match="toy.category='plane': choose one of"):
        ToyConfig(category="plane")


def test_toy_depth_is_geometrically_consistent(toy_root):
    """Unproject view 0 with its depth, project into view 1: colours agree where view 1 sees the same surface."""
    scenes = SRNScenes(toy_root, "train")
    d = scenes.load(0, [0, 1])
    pts = unproject_depth(d["depth"][0, 0], d["K"][0], d["c2w"][0])  # [H, W, 3]
    valid = d["depth"][0, 0] > 0
    uv, z = project_points(pts[valid], d["K"][1], d["c2w"][1])
    ij = uv.floor().long()
    inside = (ij[:, 0] >= 0) & (ij[:, 0] < 32) & (ij[:, 1] >= 0) & (ij[:, 1] < 32)
    ij, z = ij[inside], z[inside]
    seen_depth = d["depth"][1, 0][ij[:, 1], ij[:, 0]]
    visible = (seen_depth - z).abs() < 0.02  # same surface, not occluded
    assert visible.sum() > 50
    src_rgb = d["images"][0].permute(1, 2, 0)[valid][inside][visible]
    dst_rgb = d["images"][1].permute(1, 2, 0)[ij[visible, 1], ij[visible, 0]]
    assert (src_rgb - dst_rgb).abs().mean() < 0.12  # same colours up to shading and pixel snapping


def test_srn_intrinsics_variants(tmp_path):
    f = tmp_path / "intrinsics.txt"
    f.write_text("131.25 64. 64. 0.\n0. 0. 0.\n1.\n128 128\n")
    K128 = read_intrinsics(f, (128, 128))
    f.write_text("525. 256. 256. 0.\n0. 0. 0.\n1.\n512 512\n")  # original SRN: written for 512 px renders
    K512 = read_intrinsics(f, (128, 128))
    torch.testing.assert_close(K128, K512)
    assert float(K128[0, 0]) == pytest.approx(131.25) and float(K128[0, 2]) == pytest.approx(64)
    f.write_text("525. 256. 256. 0.\n")  # no size line: a centred principal point gives the size
    torch.testing.assert_close(read_intrinsics(f, (128, 128)), K128)
    torch.testing.assert_close(read_intrinsics(f, (64, 64))[:2], K128[:2] / 2)


def test_srn_reader_both_variants_and_white_images(tmp_path, toy_root):
    root = tmp_path / "srn_cars"
    shutil.copytree(toy_root / "test", root / "cars_test")  # pixelNeRF's '<category>_<split>' naming
    obj = sorted((root / "cars_test").iterdir())[0]
    ref = SRNScenes(root, "test").load(0, [0, 1])
    f, c = (float(x) for x in (obj / "intrinsics.txt").read_text().split()[:2])
    (obj / "intrinsics.txt").write_text(f"{4 * f} {4 * c} {4 * c} 0.\n0. 0. 0.\n1.\n128 128\n")
    torch.testing.assert_close(SRNScenes(root, "test").load(0, [0, 1])["K"], ref["K"])
    Image.new("RGB", (32, 32), (255, 255, 255)).save(obj / "rgb/000001.png")  # an all-white test view
    shutil.rmtree(obj / "depth")  # like real SRN: no depth maps
    d = SRNScenes(root, "test").load(0, [0, 1])
    assert torch.all(d["images"][1] == 1.0) and d["mask"][1].sum() == 0 and d["mask"][0].sum() > 0


def test_protocol_conditions_on_view_64_and_targets_the_rest(tmp_path):
    root = ensure_toy_dataset(
        tmp_path / "toy70",
        ToyConfig(resolution=16, num_objects={"test": 1}, num_views={"test": 70}, supersample=1),
    )
    ds = MultiViewDataset(SRNScenes(root, "test"), protocol=EvalProtocol(input_views=[64]))
    v = ds[0]
    assert v.num_context == 1 and v.V == 70 and int(v.index[0, 0]) == 64
    assert sorted(v.index[0, 1:].tolist()) == [i for i in range(70) if i != 64]
    sub = MultiViewDataset(SRNScenes(root, "test"), protocol=EvalProtocol(input_views=[64], num_targets=5))[0]
    assert sub.V == 6 and sub.index[0, 1:].tolist() == [0, 13, 27, 41, 55]
    with pytest.raises(DatasetError, match="conditions on view"):
        MultiViewDataset(SRNScenes(root, "test"), protocol=EvalProtocol(input_views=[80]))


def test_datamodule_batches(toy_root):
    dm = ToyDataModule(root=str(toy_root), toy=TINY_TOY, image_size=16, batch_size=3, num_workers=0,
                       val_protocol=EvalProtocol(input_views=[0], num_targets=2))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (3, 2, 3, 16, 16) and batch.num_context == 1 and len(batch.scene) == 3
    assert batch.depth.shape == (3, 2, 1, 16, 16)
    assert float(batch.K[0, 0, 0, 2]) == pytest.approx(8.0)  # intrinsics rescaled 32 -> 16
    assert (batch.index[:, 0] != batch.index[:, 1]).all()  # distinct views
    val = next(iter(dm.val_dataloader()))
    assert val.V == 3 and val.index[:, 0].eq(0).all()


def test_bad_dataset_inputs_get_clear_errors(tmp_path, toy_root):
    with pytest.raises(DatasetError, match="not found.*srn_cars.zip"):
        SRNScenes(tmp_path / "missing", "train")
    root = tmp_path / "bad"
    shutil.copytree(toy_root / "train", root / "train")
    obj = sorted((root / "train").iterdir())[0]
    (obj / "pose/000001.txt").write_text("1 0 0\n0 1")
    with pytest.raises(DatasetError, match=r"000001.txt: malformed pose"):
        SRNScenes(root, "train").load(0, [1])
    (obj / "pose/000001.txt").write_text(" ".join(["nan"] * 16))
    with pytest.raises(DatasetError, match="NaN or inf"):
        SRNScenes(root, "train").load(0, [1])
    (obj / "rgb/000002.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"000002.png: corrupt or unreadable image"):
        SRNScenes(root, "train").load(0, [2])
    with pytest.raises(DatasetError, match="only 6 views but 9 are needed"):
        SRNScenes(root, "train", min_views=9)
    (obj / "pose/000003.txt").unlink()
    with pytest.raises(DatasetError, match="6 images in rgb/ but 5 pose files"):
        SRNScenes(root, "train")
