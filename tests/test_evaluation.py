"""`genvs test`: metrics, results tables, resumable runs, sampler overrides; `genvs table`; `genvs predict`
from your own image and on orbits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    ]) == 0
    folder = dest / "000000"
    assert len(list(folder.glob("view_*.png"))) == 5 and (folder / "orbit.gif").exists()
    assert not list(folder.glob("gt_*.png"))  # no ground truth for your own image
    assert Image.open(folder / "orbit.gif").n_frames == 5


def test_predict_orbit_of_a_dataset_scene(trained, toy_root, tmp_path):
    out, ckpt, _ = trained
    dest = tmp_path / "orbit"
    main(["predict", *tiny_args(toy_root, out), "--ckpt_path", str(ckpt), "--data.init_args.predict_orbit", "4",
          "--predict_writer.output_dir", str(dest)])
    scenes = sorted(p for p in dest.iterdir() if p.is_dir())
    assert len(scenes) == 2 and len(list(scenes[0].glob("view_*.png"))) == 4
