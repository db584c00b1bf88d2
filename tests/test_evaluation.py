"""`genvs test`: metrics, results tables, resumable runs, sampler overrides; `genvs table`; `genvs predict`
from your own image and on orbits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_args
from genvs.cli import main, run
from genvs.methods.threedim import ThreeDiM


def genvs_test_args(toy_root: Path, out: Path, ckpt: Path, results: Path) -> list[str]:
    return ["test", *tiny_args(toy_root, out), "--ckpt_path", str(ckpt), "--evaluation.results_dir", str(results)]


@pytest.fixture(scope="module")
def tested(trained, toy_root, tmp_path_factory):
    out, ckpt, _ = trained
    results = tmp_path_factory.mktemp("results")
    cli = run(genvs_test_args(toy_root, out, ckpt, results))
    return results, cli


def test_genvs_test_writes_results_tables(tested, trained):
    results, cli = tested
    md = sorted(results.glob("threedim_toy_*.md"))
    assert len(md) == 1
    prefix = md[0].with_suffix("")
    table = json.loads(prefix.with_suffix(".json").read_text())
    rec = table["results"][0]
    assert rec["method"] == "ThreeDiM" and rec["dataset"] == "toy"
    assert rec["checkpoint"] == str(trained[1]) and rec["sampler"] == "DDIMScheduler" and rec["steps"] == 3
    metrics = rec["metrics"]
    assert metrics["num_images"] == 2 * 3  # 2 test scenes x 3 targets
    assert metrics["psnr"] == pytest.approx(float(cli.trainer.callback_metrics["test/psnr"]), rel=1e-5)
    assert 0 < metrics["ssim"] < 1
    assert rec["seed"] == 0 and rec["commit"] and "torch" in rec["versions"]
    assert rec["meta"]["hparams"]["network"]["init_args"]["ch"] == 16  # the config travels with the numbers
    assert rec["meta"]["protocol"] == {"input_views": [0], "num_scenes": None, "num_targets": 3}
    assert "PSNR" in md[0].read_text() and prefix.with_suffix(".csv").read_text().startswith("method,dataset")


def test_interrupted_test_resumes_from_cached_samples(tested, trained, toy_root, monkeypatch):
    results, first = tested
    out, ckpt, _ = trained

    def no_sampling(*args, **kwargs):
        raise AssertionError("every scene should come from the evaluation cache")

    monkeypatch.setattr(ThreeDiM, "sample", no_sampling)
    again = run(genvs_test_args(toy_root, out, ckpt, results))
    for k in ("test/psnr", "test/ssim"):
        assert float(again.trainer.callback_metrics[k]) == float(first.trainer.callback_metrics[k])


def test_sampler_override_at_test_time(trained, toy_root, tmp_path):
    out, ckpt, _ = trained
    sampler = {"class_path": "genvs.core.samplers.Sampler", "init_args": {"num_steps": 2}}
    cli = run([*genvs_test_args(toy_root, out, ckpt, tmp_path), "--sampler", json.dumps(sampler)])
    assert cli.model.sampler.num_steps == 2
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())["results"][0]
    assert rec["steps"] == 2


def test_consistency_score_in_genvs_test(trained, toy_root, tmp_path):
    out, ckpt, _ = trained
    fast = {"iterations": 20, "grid_size": 16, "rays_per_step": 256, "samples_per_ray": 16, "holdout_every": 2}
    cli = run([*genvs_test_args(toy_root, out, ckpt, tmp_path), "--evaluation.consistency", json.dumps(fast),
               "--evaluation.cache", "false"])
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())["results"][0]
    assert 0 < rec["metrics"]["consistency_psnr"] < 60 and 0 < rec["metrics"]["consistency_ssim"] <= 1
    assert float(cli.trainer.callback_metrics["test/consistency_psnr"]) == pytest.approx(rec["metrics"]["consistency_psnr"])


def test_missing_metric_weights_fail_early_with_instructions(trained, toy_root, tmp_path, monkeypatch):
    out, ckpt, _ = trained
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match=r"alexnet-owt-7be5be79.pth.*(download|http)"):
        main([*genvs_test_args(toy_root, out, ckpt, tmp_path), "--evaluation.metrics.metrics", '["psnr", "lpips"]'])


def test_genvs_table_merges_runs(tested, tmp_path, capsys):
    results, _ = tested
    table = json.loads(next(results.glob("*.json")).read_text())
    other = dict(table["results"][0], method="OtherMethod")
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["table", str(next(results.glob("*.json"))), str(tmp_path / "other.json"), "--out", str(tmp_path / "cmp")]) == 0
    md = capsys.readouterr().out
    assert "ThreeDiM" in md and "OtherMethod" in md and "toy PSNR" in md
    assert (tmp_path / "cmp.md").exists() and (tmp_path / "cmp.csv").exists()


def test_predict_from_your_own_image(trained, toy_root, tmp_path):
    out, ckpt, _ = trained
    image = next((toy_root / "test").glob("*/rgb/000000.png"))
    dest = tmp_path / "mine"
    assert main([
        "predict", *tiny_args(toy_root, out), "--ckpt_path", str(ckpt),
        "--data", "genvs.data.ImageOrbitDataModule", "--data.images", json.dumps([str(image)]),
        "--data.num_views", "5", "--data.image_size", "32", "--predict_writer.output_dir", str(dest),
        "--predict_writer.mp4", "true",
    ]) == 0
    folder = dest / "000000"
    assert len(list(folder.glob("view_*.png"))) == 5 and (folder / "orbit.gif").exists()
    assert not list(folder.glob("gt_*.png"))  # no ground truth for your own image
    assert Image.open(folder / "orbit.gif").n_frames == 5
    # the MP4 holds the same five views, in order: compare luma (yuv420p keeps it at full resolution but
    # halves chroma, which is far off for the noise-like views of a 4-step model)
    import av

    with av.open(str(folder / "orbit.mp4")) as video:
        frames = [f.to_ndarray(format="rgb24").astype(float) for f in video.decode(video=0)]
    views = [np.asarray(Image.open(p).convert("RGB"), dtype=float) for p in sorted(folder.glob("view_*.png"))]
    assert len(frames) == 5 and frames[0].shape == views[0].shape
    luma = np.array([0.299, 0.587, 0.114])
    errors = np.array([[np.abs(f @ luma - v @ luma).mean() for v in views] for f in frames])
    assert (errors.argmin(axis=1) == np.arange(5)).all() and errors.diagonal().max() < 6


def test_save_mp4_round_trip_and_odd_sizes(tmp_path):
    import av

    from genvs.callbacks import save_mp4

    g = torch.Generator().manual_seed(0)
    frames = torch.rand(6, 3, 1, 1, generator=g).expand(6, 3, 17, 23) * 2 - 1  # flat colours, odd size
    save_mp4(frames, tmp_path / "v.mp4", fps=5)
    with av.open(str(tmp_path / "v.mp4")) as video:
        stream = video.streams.video[0]
        assert (stream.width, stream.height) == (24, 18) and stream.average_rate == 5
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in video.decode(video=0)]).astype(float)
    expected = ((frames[:, :, 0, 0] + 1) / 2 * 255).numpy()  # [6, 3]
    assert decoded.shape == (6, 18, 24, 3)
    # yuv420p rounds colours a little; the pad column/row is white (in luma: chroma is shared by 2x2 blocks)
    assert np.abs(decoded[:, 4:14, 4:18].mean(axis=(1, 2)) - expected).max() < 6
    luma = decoded @ np.array([0.299, 0.587, 0.114])
    assert luma[:, :, -1].min() > 225 and luma[:, -1, :].min() > 225


def test_mp4_without_pyav_says_how_to_install(monkeypatch):
    import sys

    from genvs.callbacks import PredictionWriter

    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(ImportError, match=r"genvs\[video\].*--predict_writer.mp4 false"):
        PredictionWriter(mp4=True)
    PredictionWriter(mp4=False)  # GIF only needs nothing extra


def test_predict_orbit_of_a_dataset_scene(trained, toy_root, tmp_path):
    out, ckpt, _ = trained
    dest = tmp_path / "orbit"
    main(["predict", *tiny_args(toy_root, out), "--ckpt_path", str(ckpt), "--data.init_args.predict_orbit", "4",
          "--predict_writer.output_dir", str(dest)])
    scenes = sorted(p for p in dest.iterdir() if p.is_dir())
    assert len(scenes) == 2 and len(list(scenes[0].glob("view_*.png"))) == 4
