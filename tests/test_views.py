import pytest
import torch

from genvs.core.cameras import intrinsics_from_fov, orbit_poses
from genvs.core.views import Views, ViewsError


def make(B=2, V=3, H=8, W=12, **kw):
    K = intrinsics_from_fov(50, H, W).expand(B, V, 3, 3).clone()
    c2w = orbit_poses(V).expand(B, V, 4, 4).clone()
    return Views(torch.rand(B, V, 3, H, W) * 2 - 1, K, c2w, **kw)


def test_validation_names_the_field():
    v = make()
    with pytest.raises(ViewsError, match=r"Views.c2w must be \[B, V, 4, 4\]"):
        Views(v.images, v.K, v.c2w[:, :2])
    with pytest.raises(ViewsError, match=r"Views.images must be \[B, V, C, H, W\]"):
        Views(v.images[0], v.K, v.c2w)
    with pytest.raises(ViewsError, match=r"Views.depth must be \[B, V, 1, H, W\]"):
        Views(v.images, v.K, v.c2w, depth=torch.zeros(2, 3, 8, 12))
    with pytest.raises(ViewsError, match="float"):
        Views(v.images.to(torch.uint8), v.K, v.c2w)
    with pytest.raises(ViewsError, match="num_context=5"):
        Views(v.images, v.K, v.c2w, num_context=5)
    with pytest.raises(ViewsError, match="size"):
        Views(None, v.K, v.c2w)


def test_split_select_cat():
    v = make(num_context=1, index=torch.arange(3).expand(2, 3), scene=["a", "b"])
    ctx, tgt = v.split()
    assert ctx.V == 1 and tgt.V == 2 and tgt.num_context == 0
    torch.testing.assert_close(tgt.images, v.images[:, 1:])
    per_scene = v.select(torch.tensor([[2], [0]]))
    torch.testing.assert_close(per_scene.images[0, 0], v.images[0, 2])
    torch.testing.assert_close(per_scene.images[1, 0], v.images[1, 0])
    both = Views.cat([ctx, tgt], dim=1)
    assert both.num_context == 1 and torch.equal(both.images, v.images)
    batch = Views.collate([v, v])
    assert batch.B == 4 and batch.scene == ["a", "b", "a", "b"]


def test_resize_rescales_intrinsics_and_masks():
    v = make(H=8, W=12, mask=torch.ones(2, 3, 1, 8, 12), depth=torch.ones(2, 3, 1, 8, 12))
    r = v.resize((4, 6))
    assert r.images.shape[-2:] == (4, 6) and r.depth.shape[-2:] == (4, 6)
    torch.testing.assert_close(r.K[..., :2, :], v.K[..., :2, :] * 0.5)
    cams = v.cameras_only()
    assert cams.images is None and (cams.H, cams.W) == (8, 12)
    assert cams.resize((4, 6)).K[0, 0, 0, 0] == pytest.approx(float(v.K[0, 0, 0, 0]) * 0.5)
    assert cams.resize((4, 6)).size == (4, 6)


def test_labels_and_prompts_follow_views():
    v = make(B=2, V=3, labels=torch.tensor([3, -1]), prompts=[["a0", "a1", "a2"], ["b0", "b1", "b2"]])
    sub = v.select([2, 0])
    assert sub.prompts == [["a2", "a0"], ["b2", "b0"]] and torch.equal(sub.labels, v.labels)
    assert v.select(torch.tensor([[1], [2]])).prompts == [["a1"], ["b2"]]
    ctx, tgt = v.split(1)
    assert Views.cat([ctx, tgt], dim=1).prompts == v.prompts
    both = Views.collate([v, v])
    assert both.labels.tolist() == [3, -1, 3, -1] and len(both.prompts) == 4
    with pytest.raises(ViewsError, match="one prompt per view"):
        make(B=2, V=3, prompts=[["x"], ["y"]])
    with pytest.raises(ViewsError, match="labels must be"):
        make(B=2, V=3, labels=torch.tensor([1]))
