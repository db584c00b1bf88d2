"""genvs.eval.tables: result files -> Markdown / CSV / JSON, and the merged comparison table."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from genvs.eval.tables import Result, Table, TableError, comparison_table, load_results, merge_results, results_table


def _results() -> list[Result]:
    return [
        Result("3dim", "srn_cars", {"psnr": 21.01, "ssim": 0.57, "lpips": 0.2, "fid": 8.99}, checkpoint="c.ckpt",
               sampler="ddpm", steps=256, wall_time_s=120.5, seed=0),
        Result("3dim", "srn_chairs", {"psnr": 17.05, "fid": 6.57}, sampler="ddpm", steps=256),
        Result("pixelnerf", "srn_cars", {"psnr": 23.17, "ssim": 0.9, "lpips": 0.146, "fid": 59.24}),
        Result("dfm", "srn_cars", {"psnr": 22.5, "ssim": 0.88, "lpips": 0.11, "fid": float("nan")}),
    ]  # fmt: skip


def test_results_table_markdown_csv_json():
    t = results_table(_results())
    assert t.columns == ["method", "dataset", "checkpoint", "sampler", "steps", "psnr", "ssim", "lpips", "fid", "wall_time_s"]
    md = t.to_markdown().splitlines()
    assert md[0] == "| method | dataset | checkpoint | sampler | steps | PSNR↑ | SSIM↑ | LPIPS↓ | FID↓ | wall time (s) |"
    assert md[1] == "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    assert md[2] == "| 3dim | srn_cars | c.ckpt | ddpm | 256 | 21.01 | 0.570 | 0.200 | 8.99 | 120.5 |"
    assert md[3] == "| 3dim | srn_chairs |  | ddpm | 256 | 17.05 |  |  | 6.57 |  |"
    assert md[5].endswith("| 0.110 | n/a |  |")  # NaN shows as n/a; rows mix datasets, so nothing is bold
    assert "**" in t.to_markdown(highlight_best=True)
    rows = list(csv.DictReader(io.StringIO(t.to_csv())))
    assert len(rows) == 4 and float(rows[0]["psnr"]) == 21.01 and rows[1]["ssim"] == "" and rows[1]["steps"] == "256"
    js = json.loads(t.to_json())
    assert js["results"][0]["seed"] == 0 and js["rows"][2]["method"] == "pixelnerf"


def test_result_roundtrip_create_and_no_overwrite(tmp_path):
    r = Result.create("3dim", "toy", {"psnr": 20.0, "num_images": 8}, sampler="ddim", steps=50, seed=1, meta={"notes": ["x"]})
    assert r.versions["torch"] and "python" in r.versions and "date" in r.meta
    p = r.save(tmp_path / "r.json")
    (back,), sources = load_results([p])
    assert back == r and sources == [str(p)]
    with pytest.raises(FileExistsError, match="never overwritten"):
        r.save(p)


def test_merge_results_builds_paper_style_comparison(tmp_path):
    paths = []
    for i, r in enumerate(_results()):
        paths.append(r.save(tmp_path / f"{i}_{r.method}_{r.dataset}.json"))
    t = merge_results(paths)
    assert isinstance(t, Table)
    assert [r["method"] for r in t.rows] == ["3dim", "pixelnerf", "dfm"]
    assert t.columns == ["method", "srn_cars/psnr", "srn_cars/ssim", "srn_cars/lpips", "srn_cars/fid", "srn_chairs/psnr", "srn_chairs/fid"]
    md = t.to_markdown().splitlines()
    assert md[0] == "| method | srn_cars PSNR↑ | srn_cars SSIM↑ | srn_cars LPIPS↓ | srn_cars FID↓ | srn_chairs PSNR↑ | srn_chairs FID↓ |"
    assert md[2] == "| 3dim | 21.01 | 0.570 | 0.200 | **8.99** | 17.05 | 6.57 |"  # single-entry columns are not bolded
    assert md[3] == "| pixelnerf | **23.17** | **0.900** | 0.146 | 59.24 |  |  |"
    # a directory works too, and a saved table's JSON can be merged again
    t2 = merge_results([tmp_path], metrics=["psnr"], datasets=["srn_cars"])
    assert t2.columns == ["method", "srn_cars/psnr"] and len(t2.rows) == 3
    saved = t.save(tmp_path / "out" / "comparison")
    assert set(saved) == {"md", "csv", "json"} and saved["md"].read_text() == t.to_markdown()
    again = merge_results([saved["json"]])
    assert again.rows[0]["srn_cars/psnr"] == 21.01 and math.isnan(again.rows[2]["srn_cars/fid"])
    with pytest.raises(FileExistsError, match="overwrite"):
        t.save(tmp_path / "out" / "comparison")


def test_merge_collisions_and_bad_files_are_named(tmp_path):
    a = Result("3dim", "cars", {"psnr": 20.0}, sampler="ddpm").save(tmp_path / "a.json")
    b = Result("3dim", "cars", {"psnr": 21.0}, sampler="ddim").save(tmp_path / "b.json")
    with pytest.raises(TableError, match=r"a\.json and .*b\.json.*row_by"):
        merge_results([a, b])
    t = merge_results([a, b], row_by=("method", "sampler"))
    assert [(r["method"], r["sampler"], r["cars/psnr"]) for r in t.rows] == [("3dim", "ddpm", 20.0), ("3dim", "ddim", 21.0)]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TableError, match="bad.json is not valid JSON"):
        merge_results([bad])
    (tmp_path / "nom.json").write_text(json.dumps({"dataset": "cars", "metrics": {}}))
    with pytest.raises(TableError, match=r"nom.json: result is missing \['method'\]"):
        load_results([tmp_path / "nom.json"])
    with pytest.raises(TableError, match="does not exist"):
        merge_results([tmp_path / "missing.json"])
    with pytest.raises(TableError, match="not a number"):
        Result.from_dict({"method": "m", "dataset": "d", "metrics": {"psnr": "high"}})


def test_comparison_table_from_results_directly():
    t = comparison_table(_results(), metrics=["fid"])
    assert t.columns == ["method", "srn_cars/fid", "srn_chairs/fid"]
    assert t.best("srn_cars/fid") == 8.99
