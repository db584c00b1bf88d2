"""genvs.eval.metrics: values against independent computations, local weight loading, offline errors."""

from __future__ import annotations

import math
import urllib.request
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import torch

from genvs.eval import metrics as M
from genvs.eval.metrics import InceptionFID, InceptionKID, MetricsConfig, MissingWeightsError, NVSMetrics, psnr_per_image


# ----------------------------------------------------------------------------------- fixtures
def _random_inception_state_dict() -> dict:
    """State dict of a randomly initialised torch-fidelity Inception (no weights read or downloaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    torch.manual_seed(0)
    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: None), mock.patch.object(
        tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None
    ):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    return net.state_dict()


def _random_alexnet_state_dict() -> dict:
    import torchvision

    torch.manual_seed(1)
    return torchvision.models.alexnet(weights=None).state_dict()


@pytest.fixture(scope="session")
def weights_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub/checkpoints holds random-init Inception and AlexNet weights."""
    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(_random_inception_state_dict(), ckpt / M.INCEPTION_WEIGHTS.filenames[0])
    torch.save(_random_alexnet_state_dict(), ckpt / M.LPIPS_BACKBONE_WEIGHTS["alex"].filenames[0])
    return home


@pytest.fixture
def torch_home(weights_home, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(weights_home))
    return weights_home


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    return tmp_path / "empty_torch_home"


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a URL."""
    calls = []

    def _urlopen(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(urllib.request, "urlopen", _urlopen)
    return calls


def _smooth_images(n: int, H: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, H // 4, H // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(H, H), mode="bilinear", align_corners=False) * 2 - 1


# ---------------------------------------------------------------------- independent references
def _psnr_ref(p: np.ndarray, t: np.ndarray) -> float:
    """Mean over images of per-image PSNR, images in [0, 1]."""
    mse = ((p - t) ** 2).reshape(p.shape[0], -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / mse)))


def _ssim_ref(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. SSIM: 11x11 Gaussian window (sigma 1.5), K1 .01, K2 .03, L 1, valid region, mean."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g /= g.sum()
    w = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for a, b in zip(x, y):  # images
        for ca, cb in zip(a, b):  # channels
            f = lambda z: scipy.signal.convolve2d(z, w, mode="valid")  # noqa: E731
            mx, my = f(ca), f(cb)
            sxx, syy, sxy = f(ca * ca) - mx**2, f(cb * cb) - my**2, f(ca * cb) - mx * my
            s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
            vals.append(s.mean())
    per_image = np.asarray(vals).reshape(len(x), -1).mean(1)
    return float(per_image.mean())


def _fid_ref(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _kid_ref(f1: np.ndarray, f2: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 on the full sets (equal sizes)."""
    d = f1.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = f1.shape[0]
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


# ------------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_is_mean_of_per_image_psnr():
    t = _smooth_images(4, seed=1)
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(2))
    scales = torch.tensor([0.01, 0.05, 0.2, 0.5]).view(4, 1, 1, 1)  # very different errors per image
    p = (t + scales * noise).clamp(-1, 1)
    m = NVSMetrics(metrics=["psnr"])
    m.update(p[:3], t[:3])
    m.update(p[3:], t[3:])  # accumulation over batches
    out = m.compute()
    p01, t01 = ((p + 1) / 2).numpy().astype(np.float64), ((t + 1) / 2).numpy().astype(np.float64)
    ref = _psnr_ref(p01, t01)
    pooled = 10 * math.log10(1 / ((p01 - t01) ** 2).mean())
    assert out["psnr"] == pytest.approx(ref, abs=1e-3)
    assert abs(ref - pooled) > 3  # the convention matters on these inputs
    assert out["num_images"] == 4


def test_ssim_matches_reference_implementation():
    t = _smooth_images(3, seed=3)
    p = (0.8 * t + 0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(4))).clamp(-1, 1)
    m = NVSMetrics(metrics=["ssim", "psnr"])
    m.update(p, t)
    out = m.compute()
    ref = _ssim_ref(((p + 1) / 2).double().numpy(), ((t + 1) / 2).double().numpy())
    assert out["ssim"] == pytest.approx(ref, abs=1e-6)
    assert 0.2 < out["ssim"] < 0.99


def test_update_accepts_views_layout_and_bf16_autocast():
    t = _smooth_images(6, seed=5)
    p = (t + 0.1).clamp(-1, 1)
    ref = NVSMetrics(metrics=["psnr", "ssim"])
    ref.update(p, t)
    m = NVSMetrics(metrics=["psnr", "ssim"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.update(p.view(2, 3, 3, 32, 32), t.view(2, 3, 3, 32, 32).contiguous(memory_format=torch.contiguous_format))
    a, b = ref.compute(), m.compute()
    assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-5) and a["ssim"] == pytest.approx(b["ssim"], abs=1e-6)


def test_bad_input_and_config_errors():
    with pytest.raises(ValueError, match="Unknown metric"):
        NVSMetrics(metrics=["psnr", "ms-ssim"])
    m = NVSMetrics(metrics=["psnr"])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        m.update(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9))
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()


# ---------------------------------------------------------------------------------- FID / KID
def test_fid_matches_scipy_sqrtm_on_fixed_features():
    g = torch.Generator().manual_seed(0)
    D = 16
    A = torch.randn(D, D, generator=g) / 4
    real = torch.randn(300, D, generator=g).double()
    fake = (torch.randn(250, D, generator=g) @ A.T + 0.3).double()
    fid = InceptionFID(D)
    fid.update(real[:100], real=True)
    fid.update(real[100:], real=True)
    fid.update(fake, real=False)
    ref = _fid_ref(real.numpy(), fake.numpy())
    assert float(fid.compute()) == pytest.approx(ref, rel=1e-6)
    assert fid.notes == []


def test_fid_small_sample_is_nan_with_note():
    fid = InceptionFID(8)
    fid.update(torch.randn(1, 8), real=True)
    fid.update(torch.randn(1, 8), real=False)
    assert math.isnan(float(fid.compute()))
    assert "undefined" in fid.notes[0]


def test_kid_matches_unbiased_poly_mmd_and_adapts_subset_size():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(40, 12, generator=g).double()
    fake = (torch.randn(40, 12, generator=g) * 1.3 + 0.2).double()
    kid = InceptionKID(subsets=5, subset_size=1000, seed=0)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    state = torch.random.get_rng_state()
    mean, std = kid.compute()
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    # subset size shrinks to all 40 samples: every subset is a permutation of the full sets
    assert float(mean) == pytest.approx(_kid_ref(real.numpy(), fake.numpy()), rel=1e-9)
    assert float(std) == pytest.approx(0.0, abs=1e-12)
    assert "subset size reduced from 1000 to 40" in kid.notes[0]


def test_kid_subsets_are_seeded():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(60, 8, generator=g), torch.randn(60, 8, generator=g) + 0.5
    vals = []
    for seed in (0, 0, 1):
        kid = InceptionKID(subsets=10, subset_size=20, seed=seed)
        kid.update(real, real=True)
        kid.update(fake, real=False)
        vals.append(tuple(float(v) for v in kid.compute()))
        assert kid.notes == []
    assert vals[0] == vals[1] and vals[0] != vals[2]
    assert vals[0][1] > 0  # subsets of 20 out of 60 differ


# --------------------------------------------------------------------- weights: missing / local
def test_missing_lpips_backbone_error_names_file_and_fix(empty_home, no_network):
    with pytest.raises(MissingWeightsError) as e:
        NVSMetrics(metrics=["psnr", "lpips"])
    msg = str(e.value)
    dest = empty_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert str(dest) in msg
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in msg
    assert "lpips_backbone_weights" in msg and "remove 'lpips' from `metrics`" in msg
    assert no_network == []


def test_missing_inception_error_names_file_and_fix(empty_home, no_network):
    with pytest.raises(MissingWeightsError) as e:
        NVSMetrics(metrics=["fid"])
    msg = str(e.value)
    assert str(empty_home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in msg
    assert M.INCEPTION_WEIGHTS.url in msg and "inception_weights" in msg
    assert "'fid' and 'kid'" in msg
    assert no_network == []


def test_configured_path_missing_is_named(tmp_path, no_network):
    bad = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(MissingWeightsError, match="inception_weights: .*nowhere.*inception.pth"):
        NVSMetrics(metrics=["kid"], inception_weights=str(bad))


def test_corrupt_weights_file_is_reported(tmp_path):
    bad = tmp_path / "alexnet-owt-7be5be79.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MissingWeightsError, match="corrupt"):
        NVSMetrics(metrics=["lpips"], lpips_backbone_weights=str(bad))


def test_no_downloads_blocks_torchvision_hub(empty_home, no_network):
    import torchvision

    with M.no_downloads(), pytest.raises(MissingWeightsError, match="blocked a download of https://download.pytorch.org"):
        torchvision.models.alexnet(weights="IMAGENET1K_V1")
    assert no_network == []


def test_lpips_loads_local_weights_and_matches_direct_lpips(torch_home, no_network):
    import lpips

    t = _smooth_images(4, seed=6)
    p = (t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(7))).clamp(-1, 1)
    m = NVSMetrics(metrics=["lpips"])
    m.update(p, t)
    val = m.compute()["lpips"]
    # direct: lpips.LPIPS with the same (random) backbone and the packaged linear layers
    ref_net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    alex = torch.load(torch_home / "hub/checkpoints/alexnet-owt-7be5be79.pth", weights_only=True)
    for name, mod in ref_net.net.named_children():
        for idx, layer in mod.named_children():
            if hasattr(layer, "weight"):
                layer.weight.data.copy_(alex[f"features.{idx}.weight"])
                layer.bias.data.copy_(alex[f"features.{idx}.bias"])
    with torch.no_grad():
        ref = ref_net(p, t).mean().item()
    assert val == pytest.approx(ref, rel=1e-5)
    same = NVSMetrics(metrics=["lpips"])
    same.update(t, t)
    assert same.compute()["lpips"] == pytest.approx(0.0, abs=1e-7)
    assert no_network == []


def test_lpips_from_configured_path(weights_home, empty_home, tmp_path):
    src = weights_home / "hub/checkpoints/alexnet-owt-7be5be79.pth"
    m = NVSMetrics(metrics=["lpips"], lpips_backbone_weights=str(src))
    t = _smooth_images(2)
    m.update(-t, t)
    assert m.compute()["lpips"] > 0


def test_fid_kid_with_local_inception_match_direct_features(torch_home, no_network):
    import torch_fidelity

    path = torch_home / "hub/checkpoints" / M.INCEPTION_WEIGHTS.filenames[0]
    t = _smooth_images(12, seed=8)
    p = (0.7 * t + 0.2).clamp(-1, 1)
    m = NVSMetrics(metrics=["fid", "kid", "psnr"], fid_feature_dim=64, kid_subsets=3)
    m.update(p[:7], t[:7])
    m.update(p[7:], t[7:])
    with pytest.warns(UserWarning, match="KID subset size reduced from 1000 to 12"):
        out = m.compute()
    assert any("FID from 12 real / 12 generated" in n for n in m.notes)
    # independent: torch-fidelity's own extractor reading the same file, on PNG-style uint8 images
    ext = torch_fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path=str(path))
    u8 = lambda x: ((x + 1) / 2 * 255).round().to(torch.uint8)  # noqa: E731
    with torch.no_grad():
        fr, ff = ext(u8(t))[0].double().numpy(), ext(u8(p))[0].double().numpy()
    assert np.isfinite(fr).all() and fr.std() > 0
    assert out["fid"] == pytest.approx(_fid_ref(fr, ff), rel=1e-4)
    assert out["kid"] == pytest.approx(_kid_ref(fr, ff), rel=1e-4)
    assert no_network == []


def test_feature_networks_stay_out_of_state_dict_and_follow_config(torch_home):
    m = NVSMetrics(MetricsConfig(metrics=["psnr", "lpips", "fid"], fid_feature_dim=64))
    keys = list(m.state_dict())
    assert not any("Conv2d" in k or "slice" in k or "lin0" in k for k in keys), keys
    assert sum(p.numel() for p in m.parameters()) == 0
    assert m.names == ["psnr", "lpips", "fid"]
    m2 = NVSMetrics({"metrics": ["psnr"]})
    assert m2.names == ["psnr"] and "lpips" not in m2._nets
    m.update(_smooth_images(3), _smooth_images(3, seed=9))
    out = m.compute()
    assert set(out) == {"psnr", "lpips", "fid", "num_images"}
    m.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    # forked child: the parent's OpenMP thread pool does not exist here; one thread avoids entering it
    # (as torch's DataLoader does in its forked workers)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        t, p, fr, ff = _ddp_data()
        sl = slice(rank * 3, (rank + 1) * 3)  # rank 0 gets images 0-2, rank 1 images 3-5
        m = NVSMetrics(metrics=["psnr", "ssim"])
        m.update(p[sl], t[sl])
        fid, kid = InceptionFID(8), InceptionKID(subsets=4, subset_size=30, seed=0)
        fs = slice(rank * 20, (rank + 1) * 20)
        for metric in (fid, kid):
            metric.update(fr[fs], real=True)
            metric.update(ff[fs], real=False)
        res = m.compute()  # every rank calls compute (collective)
        res["fid"] = float(fid.compute())
        res["kid"] = float(kid.compute()[0])
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def _ddp_data():
    t = _smooth_images(6, seed=10)
    p = (t + 0.2 * torch.randn(t.shape, generator=torch.Generator().manual_seed(11))).clamp(-1, 1)
    g = torch.Generator().manual_seed(12)
    return t, p, torch.randn(40, 8, generator=g).double(), (torch.randn(40, 8, generator=g) + 0.3).double()


def test_ddp_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    # fork: the children reuse the imported modules (spawn would re-import torch: ~10 s per process here)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True, start_method="fork")
    got = torch.load(out, weights_only=True)
    t, p, fr, ff = _ddp_data()
    m = NVSMetrics(metrics=["psnr", "ssim"])
    m.update(p, t)
    ref = m.compute()
    fid, kid = InceptionFID(8), InceptionKID(subsets=4, subset_size=30, seed=0)
    for metric in (fid, kid):
        metric.update(torch.cat([fr[:20], fr[20:]]), real=True)
        metric.update(torch.cat([ff[:20], ff[20:]]), real=False)
    assert got["num_images"] == 6
    assert got["psnr"] == pytest.approx(ref["psnr"], abs=1e-5)
    assert got["ssim"] == pytest.approx(ref["ssim"], abs=1e-9)
    assert got["fid"] == pytest.approx(float(fid.compute()), rel=1e-9)
    assert got["kid"] == pytest.approx(float(kid.compute()[0]), rel=1e-9)


def test_psnr_per_image_by_hand_and_as_nvsmetrics_mean():
    """Per-image PSNR over any leading shape: a uniform error of 0.1 is 20 dB, identical images hit the
    1e-10 MSE floor (100 dB), and the mean over images is NVSMetrics' PSNR."""
    target = torch.rand(2, 3, 3, 16, 16)
    pred = (target + 0.1).clone()
    pred[1, 2] = target[1, 2]
    p = psnr_per_image(pred, target)
    assert p.shape == (2, 3)
    assert torch.allclose(p[0], torch.full((3,), 20.0), atol=1e-4) and p[1, 2] == pytest.approx(100.0)
    m = NVSMetrics(metrics=["psnr"])
    pred2, target2 = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    m.update(pred2 * 2 - 1, target2 * 2 - 1)
    assert m.compute()["psnr"] == pytest.approx(float(psnr_per_image(pred2, target2).mean()), abs=1e-4)
