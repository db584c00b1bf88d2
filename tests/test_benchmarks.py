"""benchmarks/run.py and benchmarks/samplers.py on tiny references and a tiny checkpoint."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_TOY, printed_config

BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    key = f"genvs_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def bench():
    return _load("run")


def test_cpu_attention_flops_are_counted(bench):
    """torch's FlopCounterMode has no formula for the CPU attention kernel; count_flops adds it."""
    b, h, s, d = 2, 3, 40, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    with bench.count_flops() as fc:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == 2 * (2 * b * h * s * s * d)  # QK^T and PV, 2 FLOPs per multiply-add
    with bench.count_flops() as fc:
        out.sum().backward()
    # torch's convention for flash-attention backward (as on CUDA): recomputed scores, then dP, dV, dQ, dK
    assert fc.get_total_flops() == 5 * (2 * b * h * s * s * d)


def test_one_tiny_threedim_fp32(bench, capsys):
    bench.main(["--one", "threedim", "fp32", "--tiny", "--repeats", "2", "--peak-seconds", "0.1"])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["method"] == "threedim" and r["variant"] == "fp32" and r["dtype"] == "fp32"
    assert len(r["train_step_times"]) == 2 and len(r["eval_step_times"]) == 2
    assert r["train_step_s"] == pytest.approx(sorted(r["train_step_times"])[0] / 2 + sorted(r["train_step_times"])[1] / 2)
    assert r["train_samples_per_s"] == pytest.approx(r["samples_per_step"] / r["train_step_s"])
    assert r["train_gflops"] == pytest.approx(r["train_tflop_per_step"] * 1e3 / r["train_step_s"])
    # 3DiM guides (CFG 3.0): one sampling step runs the network on both branches
    assert r["steps_per_view"] == 256 and r["net_images_per_eval"] == 2 * r["views_per_eval"] == 4
    assert r["denoiser_evals_per_s"] == pytest.approx(r["net_images_per_eval"] / r["eval_step_s"])
    expect = (256 * r["eval_step_s"] + r["sample_call_overhead_s"]) / r["views_per_eval"]
    assert r["seconds_per_novel_view"] == pytest.approx(expect)
    # a training step is forward + backward (~2x forward) of B pairs, a guided sampling step a forward of 2B
    # pairs (~2/3 of it) less the pose embeddings, which the sampler computes once per target, not per step
    ratio = r["eval_gflop_per_step"] / (r["train_tflop_per_step"] * 1e3)
    assert 0.3 < ratio < 2 / 3
    assert r["peak_train_gib"] > 0.1 and r["peak_memory_kind"] == "process max RSS"


def test_parent_ratios_mfu_merge_and_tables(bench, tmp_path, monkeypatch):
    calls = []

    def in_process(method, variant, device, repeats, tiny, timeout, peak_seconds):  # the subprocess, in process
        calls.append((method, variant, tiny))
        if out.exists():  # what a run stopped here would leave
            saved.append([r["variant"] for r in json.loads(out.read_text())["runs"]])
        return bench.run_variant(method, variant, device, repeats, tiny, peak_seconds)

    saved = []

    monkeypatch.setattr(bench, "run_child", in_process)
    out = tmp_path / "res.json"
    common = ["--tiny", "--repeats", "1", "--peak-seconds", "0.1", "--out", str(out), "--no-readme"]
    bench.main(["--methods", "threedim", "--variants", "fp32", "fp32_cl", *common])
    bench.main(["--methods", "threedim", "--variants", "fp32_cl", "--merge", *common])
    assert calls == [("threedim", "fp32", True), ("threedim", "fp32_cl", True), ("threedim", "fp32_cl", True)]
    assert saved == [["fp32"], ["fp32", "fp32_cl"]]  # the file is written after every subprocess
    data = json.loads(out.read_text())
    assert len(data["sessions"]) == 2 and [r["variant"] for r in data["runs"]] == ["fp32", "fp32_cl"]
    base, cl = data["runs"]
    assert base["speedup_vs_fp32"] == 1.0 and base["eval_speedup_vs_fp32"] == 1.0
    assert cl["speedup_vs_fp32"] == pytest.approx(base["train_step_s"] / cl["train_step_s"])
    assert cl["session"] != base["session"] and cl["baseline_same_session"] is False
    peak = data["machine_fp32_peak_gflops"]
    assert peak >= max(r["cpu_fp32_matmul_gflops"] for r in data["runs"])
    assert cl["mfu"] == pytest.approx(cl["train_gflops"] / peak)
    table = bench.results_table(data)
    assert "| threedim | fp32_cl |" in table and "fp32 baseline from another session" in table
    readme = tmp_path / "README.md"
    readme.write_text("# B\n\nkept text\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nafter\n")
    readme.write_text(bench.replace_block(readme.read_text(), "results", table))
    text = readme.read_text()
    assert "kept text" in text and "after" in text and "old" not in text and text.count("<!-- results:start -->") == 1


def test_default_results_file_separates_cpu_capabilities(bench):
    cpu = {"cpu": "AMD EPYC 9B14", "cores": 2, "cpu_capability": "AVX512"}
    assert bench.default_results_file(cpu).name == "cpu-amd-2c-avx512.json"
    assert bench.default_results_file({**cpu, "cpu_capability": "AVX2"}, tiny=True).name == "cpu-amd-2c-avx2-tiny.json"
    assert bench.default_results_file({"cpu": "AMD EPYC", "cores": 2}).name == "cpu-amd-2c.json"  # unknown capability
    amx = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "cpu_capability": "AVX512", "amx": True}
    assert bench.default_results_file(amx).name == "cpu-intel-2c-avx512-amx.json"  # AMX tiles: a file of its own
    assert bench.default_results_file({**amx, "amx": False}).name == "cpu-intel-2c-avx512.json"
    gpu = {**cpu, "cores": 16, "gpu": "NVIDIA H200"}
    assert bench.default_results_file(gpu).name == "cuda-h200-16c.json"  # GPUs: no CPU capability
    assert bench.default_results_file(gpu).parent == bench.RESULTS


def test_child_time_limit_is_reported(bench):
    r = bench.run_child("threedim", "fp32", "cpu", 1, True, timeout=1.0)
    assert r["failed"] == "timed out after 1 s" and r["method"] == "threedim"


@pytest.fixture
def tiny_config(toy_root, tmp_path) -> Path:
    """A run config whose data section is the tiny toy set (what samplers.py reads the test split from)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "genvs.data.ToyDataModule", "init_args": {
        "root": str(toy_root), "toy": TINY_TOY.__dict__, "image_size": 32, "n_context": 1, "n_target": 1}}}))
    return config


def _first_test_batch(samplers, config: Path, num_targets: int):
    """samplers.py's first test batch of ``config`` (input view 0, one scene), split into context and target."""
    args = argparse.Namespace(data_root=None, batch_size=None, input_views=[0], num_scenes=1, num_targets=num_targets,
                              config=[str(config)])
    return next(iter(samplers.build_datamodule(yaml.safe_load(config.read_text()), args).test_dataloader())).split()


def test_samplers_merges_config_overlays_as_genvs_fit(capsys, tmp_path):
    """``--config A --config B``: every key the YAMLs set has the value `genvs fit` resolves it to."""
    samplers = _load("samplers")
    configs = [str(BENCH.parent / "configs" / name) for name in ("dfm_toy.yaml", "dfm_toy_cars.yaml")]
    merged = samplers.merged_config(configs)
    resolved = printed_config(capsys, [arg for c in configs for arg in ("--config", c)])

    def check(set_here: dict, full: dict, where: str) -> None:
        for key, value in set_here.items():
            if isinstance(value, dict) and isinstance(full[key], dict):
                check(value, full[key], f"{where}.{key}")
            else:
                assert full[key] == value, f"{where}.{key}"

    check(merged, resolved, "config")
    assert merged["data"]["init_args"]["root"] == "data/toy_cars" and merged["data"]["init_args"]["image_size"] == 32
    # a section naming another class replaces the earlier one whole
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"data": {"class_path": "genvs.data.SRNDataModule", "init_args": {"root": "srn"}}}))
    assert samplers.merged_config([*configs, str(other)])["data"] == yaml.safe_load(other.read_text())["data"]


def test_samplers_on_tiny_checkpoint(trained, tiny_config, tmp_path):
    samplers = _load("samplers")
    _, ckpt, _ = trained
    out = tmp_path / "samplers.json"
    data = samplers.main(["--config", str(tiny_config), "--ckpt", str(ckpt), "--num-scenes", "1", "--num-targets", "1",
                          "--input-views", "0", "--steps", "2", "--paper-steps", "2", "--precision", "32-true",
                          "--out", str(out), "--no-readme"])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(data["rows"]))
    assert data["precision"] == "32-true"
    assert data["method"] == "ThreeDiM" and data["num_views"] == 1
    written = json.loads(out.read_text())
    assert all(r["psnr_se"] is None for r in [*written["rows"], written["baseline"]])  # one view: no spread
    assert set(data["missing_metrics"]) == {"lpips", "fid", "kid"}  # no weights under the tests' TORCH_HOME
    assert not any(str(Path.home()) in m or str(BENCH.parent) in m for m in data["missing_metrics"].values())
    rows = {r["sampler"]: r for r in data["rows"]}
    assert [r["sampler"] for r in data["rows"]] == ["paper", "ddim", "dpmpp"]
    assert rows["paper"]["scheduler"] == "DDPMScheduler" and rows["ddim"]["scheduler"] == "DDIMScheduler"
    assert rows["dpmpp"]["scheduler"] == "DPMSolverMultistepScheduler"
    assert rows["dpmpp"]["scheduler_spec"]["init_args"]["algorithm_type"] == "dpmsolver++"
    assert all(r["steps"] == 2 and r["num_views"] == 1 and r["seconds_per_view"] > 0 for r in rows.values())
    toy = yaml.safe_load((BENCH.parent / "configs" / "3dim_toy.yaml").read_text())
    scale = toy["model"]["init_args"]["sampler"]["init_args"]["guidance_scale"]
    assert all(r["guidance_scale"] == scale for r in rows.values())  # the checkpoint's (configs/3dim_toy.yaml)
    assert all(0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 for r in rows.values())
    # two steps of DPM-Solver++ with a first-order final step are DDIM on the same timesteps and seeds
    assert rows["dpmpp"]["psnr"] == pytest.approx(rows["ddim"]["psnr"], abs=1e-3)
    md = out.with_suffix(".md").read_text()
    assert f"| dpmpp | DPMSolverMultistepScheduler | 2 | {scale:g} |" in md and "no local weights" in md
    # the copy baseline on the same view: input view 0 copied onto the target, PSNR by hand
    context, target = _first_test_batch(samplers, tiny_config, num_targets=1)
    mse = float(((target.images - context.images[:, :1]) / 2).pow(2).mean())
    assert data["baseline"]["method"] == "copy_input"
    assert data["baseline"]["psnr"] == pytest.approx(-10 * math.log10(mse), abs=1e-4)
    assert "| copy the input view (baseline) | – | 0 |" in md


def test_samplers_precision_autocasts_generation_as_genvs_test(trained, tiny_config, tmp_path, monkeypatch):
    """``--precision bf16-mixed`` generates under bf16 autocast (as Lightning runs ``genvs test``) with the
    denoiser in channels_last, ``32-true`` without; the table says which; bf16 changes PSNR only a little."""
    from genvs.core.model import BaseNVSModel

    samplers = _load("samplers")
    _, ckpt, _ = trained
    seen = []
    generate = BaseNVSModel.generate

    def spy(self, *args, **kwargs):
        conv = next((p for p in self.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)  # a conv kernel
        if conv is not None:  # not the copy baseline
            seen.append((torch.is_autocast_enabled("cpu"), conv.is_contiguous(memory_format=torch.channels_last)))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(BaseNVSModel, "generate", spy)
    psnr = {}
    for precision in ("32-true", "bf16-mixed"):
        seen.clear()
        out = tmp_path / f"{precision}.json"
        data = samplers.main(["--config", str(tiny_config), "--ckpt", str(ckpt), "--num-scenes", "1", "--num-targets",
                              "1", "--input-views", "0", "--samplers", "ddim", "--steps", "2", "--metrics",
                              "--precision", precision, "--device", "cpu", "--out", str(out), "--no-readme"])
        assert data["precision"] == precision and f"cpu, {precision}," in out.with_suffix(".md").read_text()
        assert seen and all(s == (precision == "bf16-mixed", True) for s in seen), seen
        psnr[precision] = data["rows"][0]["psnr"]
    assert psnr["bf16-mixed"] == pytest.approx(psnr["32-true"], abs=1.0)


def test_samplers_several_precisions_share_one_table(trained, tiny_config, tmp_path):
    """``--precision 32-true bf16-mixed`` runs every row at each precision on the same views and seeds: a
    precision column, "faster than paper" against the paper sampler at the same precision, bf16 PSNR close
    to fp32's."""
    samplers = _load("samplers")
    _, ckpt, _ = trained
    out = tmp_path / "both.json"
    data = samplers.main(["--config", str(tiny_config), "--ckpt", str(ckpt), "--num-scenes", "1", "--num-targets", "1",
                          "--input-views", "0", "--samplers", "paper", "ddim", "--steps", "2", "--paper-steps", "2",
                          "--metrics", "--precision", "32-true", "bf16-mixed", "--device", "cpu", "--out", str(out),
                          "--no-readme"])
    assert data["precision"] == ["32-true", "bf16-mixed"]
    assert [(r["sampler"], r["precision"]) for r in data["rows"]] == [
        ("paper", "32-true"), ("ddim", "32-true"), ("paper", "bf16-mixed"), ("ddim", "bf16-mixed")]
    fp32, bf16 = data["rows"][1], data["rows"][3]
    assert bf16["psnr"] == pytest.approx(fp32["psnr"], abs=1.0)
    md = out.with_suffix(".md").read_text()
    assert "| sampler | scheduler | steps | guidance | precision | PSNR ↑ |" in md
    assert "cpu, 32-true" not in md  # the heading names no single precision
    paper_rows = [line for line in md.splitlines() if line.startswith("| paper |")]
    assert [line.split(" | ")[4] for line in paper_rows] == ["32-true", "bf16-mixed"]
    assert all(line.endswith("| 1.0x |") for line in paper_rows)  # each against its own precision
    baseline = next(line for line in md.splitlines() if line.startswith("| copy the input view"))
    assert baseline.count("|") == paper_rows[0].count("|")  # the baseline row fills the extra column


def test_samplers_guidance_sweep_and_psnr_spread(trained, tiny_config, tmp_path):
    """``--guidance-scales`` repeats every sampler row at each scale; ``psnr_se`` is the standard error of the
    per-view PSNRs, checked by hand on the copy baseline's two views."""
    samplers = _load("samplers")
    _, ckpt, _ = trained
    out = tmp_path / "sweep.json"
    data = samplers.main(["--config", str(tiny_config), "--ckpt", str(ckpt), "--num-scenes", "1", "--num-targets", "2",
                          "--input-views", "0", "--samplers", "paper", "ddim", "--steps", "2", "--paper-steps", "2",
                          "--guidance-scales", "1", "3", "--metrics", "--out", str(out), "--no-readme"])
    assert [(r["sampler"], r["guidance_scale"]) for r in data["rows"]] == [
        ("paper", 1.0), ("ddim", 1.0), ("paper", 3.0), ("ddim", 3.0)]
    ddim = [r for r in data["rows"] if r["sampler"] == "ddim"]
    assert all(r["num_views"] == 2 and r["psnr_se"] > 0 for r in data["rows"])
    context, target = _first_test_batch(samplers, tiny_config, num_targets=2)
    a, b = (-10 * math.log10(float(((target.images[:, v] - context.images[:, 0]) / 2).pow(2).mean())) for v in (0, 1))
    assert data["baseline"]["psnr"] == pytest.approx((a + b) / 2, abs=1e-4)
    assert data["baseline"]["psnr_se"] == pytest.approx(abs(a - b) / 2, abs=1e-4)
    md = out.with_suffix(".md").read_text()
    assert "| ddim | DDIMScheduler | 2 | 3 | " in md and f"± {ddim[1]['psnr_se']:.2f}" in md
    paper3 = next(r for r in data["rows"] if r["sampler"] == "paper" and r["guidance_scale"] == 3.0)
    paper_rows = [line for line in md.splitlines() if line.startswith("| paper |")]
    assert len(paper_rows) == 2 and all(line.endswith("| 1.0x |") for line in paper_rows)  # against its own scale
    assert paper3["seconds_per_view"] > 0


# ------------------------------------------------------------------------------------- memory tracer
def test_live_bytes_counts_each_storage_once_until_it_is_freed():
    """Known allocations, on real and on fake tensors: views share their base's bytes, a freed tensor stops
    counting, the peak is the high-water mark, and `hold` counts tensors made before the mode."""
    from torch._subclasses import FakeTensorMode

    LiveBytes = _load("memtrace").LiveBytes
    MiB = 2**20
    for fake in (False, True):
        with FakeTensorMode() if fake else torch.autograd.grad_mode.no_grad():
            w = torch.empty(MiB // 4)  # 1 MiB, made before the mode
            with LiveBytes() as mem:
                assert mem.hold([w, w.view(-1)]) == MiB and mem.held == MiB
                a = torch.empty(MiB // 2)  # 2 MiB
                v = a[:10].view(2, 5)
                b = torch.ones(MiB // 4, dtype=torch.float64)  # 2 MiB
                assert (mem.live, mem.peak) == (5 * MiB, 5 * MiB)
                del a, b
                assert mem.live == 3 * MiB  # v keeps a's storage alive
                del v
                c = torch.zeros(MiB // 8, dtype=torch.bfloat16)  # 0.25 MiB
                assert (mem.live, mem.peak) == (MiB + MiB // 4, 5 * MiB)
                del c


def test_traced_dfm_step_matches_the_profiler_replay():
    """The fake-tensor count of a DFM training step against the torch profiler's allocation events of the
    real step (an independent measurement): within 5%, with and without chunked checkpointing."""
    dfm_memory = _load("dfm_memory")
    base = dict(size=16, num_context=2, num_targets=1, batch=1, hidden=64, feature_dim=32, cond_features=16,
                n_coarse=8, n_fine=8, cond_n_coarse=8, patch=8, dit=dict(hidden_size=32, depth=1, num_heads=2),
                bf16=False)
    peaks = {}
    for chunk, ckpt in ((10**9, False), (32, True)):
        res = dfm_memory.run_one(dict(base, chunk_rays=chunk, checkpoint=ckpt))
        assert res["traced_peak_mib"] == pytest.approx(res["tensor_peak_mib"], rel=0.05), res
        peaks[ckpt] = res["traced_peak_mib"]
    assert peaks[True] < peaks[False] / 2


def test_memory_traces_whole_training_steps_of_a_config(tmp_path):
    """memory.py on the DFM and 3DiM toy configs: weights, EMA and Adam's moments equal their sizes computed
    from the parameter count; the peak holds them plus the gradients; for DFM, dropping chunking and
    checkpointing raises it; bf16 autocast changes activations only."""
    memory = _load("memory")
    out = tmp_path / "mem.json"
    configs = ["configs/dfm_toy.yaml", "configs/3dim_toy.yaml"]
    done = memory.main([arg for c in configs for arg in ("--config", c)] + ["--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(done)) and list(done) == configs
    names = {c: [r["name"] for r in done[c]["rows"]] for c in configs}
    assert len(names["configs/dfm_toy.yaml"]) == 4 and names["configs/3dim_toy.yaml"][2].startswith("gradient_checkp")
    GiB = 2**30
    for c in configs:
        for r in done[c]["rows"]:
            weights = 4 * r["params"] / GiB
            assert r["weights_gib"] == pytest.approx(weights, abs=0.006)
            assert r["ema_gib"] == pytest.approx(weights, abs=0.006)  # EMA in float32
            assert r["adam_gib"] == pytest.approx(2 * weights, abs=0.006)  # every weight is trained
            assert r["peak_gib"] >= 5 * weights - 0.02  # + gradients
    dfm = {r["name"]: r["peak_gib"] for r in done["configs/dfm_toy.yaml"]["rows"]}
    assert dfm["no chunking, no checkpointing, fp32"] >= dfm["as configured, fp32"]
    threedim = [r["peak_gib"] for r in done["configs/3dim_toy.yaml"]["rows"]]
    assert threedim[2] <= threedim[1]  # recomputing X-UNet blocks stores fewer activations
    assert done["configs/3dim_toy.yaml"]["machine"]["torch"] == torch.__version__


def test_memory_traces_frozen_backbones_and_value_dependent_steps(tmp_path):
    """memory.py on the MVDiffusion and warping toy configs: every parameter counts as a weight, only the
    trained ones get Adam's moments, EMA and gradients (the frozen SD UNet / VAE / text encoder, the warping
    method's frozen G_u do not); the correspondences and the forward-backward warp, which run on real tensors
    before the trace, enter it, and the peak is within 2-3% of the same steps on real tensors with them inline;
    without an SD folder the UNet and CAA blocks have SD 2's published sizes."""
    from torch._subclasses import FakeTensorMode

    from genvs.methods.mvdiffusion.network import MultiViewUNet

    memory = _load("memory")
    mv = yaml.safe_load(Path("configs/mvdiffusion_toy.yaml").read_text())
    mv["model"]["init_args"]["sd_path"] = str(tmp_path / "tiny_sd")  # written as genvs fit writes it
    (tmp_path / "mv.yaml").write_text(yaml.safe_dump(mv))
    warp = yaml.safe_load(Path("configs/warping_toy.yaml").read_text())
    warp["model"]["init_args"]["stage"] = "conditional"  # G_u frozen next to the trained G_c
    (tmp_path / "warp.yaml").write_text(yaml.safe_dump(warp))
    configs = [str(tmp_path / "mv.yaml"), str(tmp_path / "warp.yaml")]
    args = [arg for c in configs for arg in ("--config", c)] + ["--out", str(tmp_path / "m.json"), "--real"]
    done = memory.main(args)
    assert (tmp_path / "tiny_sd" / "unet" / "config.json").is_file()
    GiB = 2**30
    for c in configs:
        names = [r["name"] for r in done[c]["rows"]]
        assert names[2] == ("unet_checkpoint: true, bf16 autocast" if c.endswith("mv.yaml") else
                            "gradient_checkpointing: true, bf16 autocast")  # fmt: skip
        for r in done[c]["rows"]:
            assert 0 < r["trained_params"] < r["params"]
            trained = 4 * r["trained_params"] / GiB
            assert r["weights_gib"] == pytest.approx(4 * r["params"] / GiB, abs=0.006)
            assert r["adam_gib"] == pytest.approx(2 * trained, abs=0.006)
            assert r["peak_gib"] >= r["weights_gib"] + r["ema_gib"] + r["adam_gib"] + trained - 0.02
        assert done[c]["rows"][2]["peak_gib"] <= done[c]["rows"][1]["peak_gib"]  # recomputation stores less
        for r in done[c]["rows"]:  # the same steps computed on real tensors, the warp and correspondences inline
            assert 0.98 <= r["fake_over_real"] <= 1.03, (c, r["name"], r["peak_bytes"], r["real_peak_bytes"])
    mv_row, warp_row = done[configs[0]]["rows"][0], done[configs[1]]["rows"][0]
    assert (mv_row["batch"], mv_row["context_views"], mv_row["target_views"]) == (1, 0, 8)  # a ring of 8 views
    assert mv_row["ema_gib"] == 0  # the toy config has ema_decay 0
    assert warp_row["context_views"] + warp_row["target_views"] == 1 and warp_row["warp_gib"] > 0  # single images
    assert warp_row["ema_gib"] == pytest.approx(4 * warp_row["trained_params"] / GiB, abs=0.006)
    with FakeTensorMode():  # no folder: SD 2's architecture (866 M UNet, 84 M VAE; 148 M CAA parameters)
        sd = memory.stable_diffusion_architecture(str(tmp_path / "missing"), False, 4)
        adapter = MultiViewUNet(sd.unet).adapter
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert (count(sd.unet), count(sd.vae), count(adapter)) == (865_910_724, 83_653_863, 147_572_480)


def test_memory_init_patch_stays_right_after_libraries_record_it():
    """The fake-tensor trace skips trunc_normal_ on fake tensors only. diffusers records the torch.nn.init
    functions when first imported, and an MVDiffusion trace imports it under the patch: its no_init_weights
    (every later from_pretrained) then puts the patched function back for the rest of the process, where a
    no-op patch left the X-UNet's LeCun init undone (a CI failure in test_threedim). Run in a fresh process,
    where diffusers is not imported yet."""
    script = f"""
import sys, importlib.util, torch
from torch._subclasses import FakeTensorMode
spec = importlib.util.spec_from_file_location("memory", {str(BENCH / "memory.py")!r})
memory = importlib.util.module_from_spec(spec); spec.loader.exec_module(memory)
assert "diffusers" not in sys.modules
with memory.skip_trunc_normal_on_fake_tensors():
    import diffusers.models.modeling_utils as mu
    with FakeTensorMode():
        torch.nn.init.trunc_normal_(torch.empty(8, 8))  # skipped: no scalar read back
with mu.no_init_weights():
    pass
torch.manual_seed(0)
w = torch.nn.init.trunc_normal_(torch.zeros(256, 576), std=0.1, a=-0.2, b=0.2)
print(w.std().item(), w.abs().max().item())
"""
    import subprocess

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    std, top = map(float, out.stdout.split()[-2:])
    assert std == pytest.approx(0.1 * 0.8796, rel=0.03) and 0.19 < top <= 0.2  # truncated unit normal's std 0.88


def test_a6o_reference_names_the_missing_port(tmp_path):
    """a6o_reference.py needs a clone of the port; without one it says where to get it."""
    with pytest.raises(SystemExit, match="no xunet.py there; clone https://github.com/a6o/3d-diffusion-pytorch"):
        _load("a6o_reference").main(["--a6o", str(tmp_path)])


def test_gpu_wheels_cover_the_dependencies_the_gpu_image_lacks():
    """benchmarks/gpu_wheels.sh downloads, for the lent GPU machines, every dependency of pyproject.toml that
    their image does not have (a new dependency must be added to one of its two lists)."""
    import re
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    script = Path("benchmarks/gpu_wheels.sh").read_text()
    names = {k: set(re.search(rf"^{k}=\(([^)]*)\)", script, re.M).group(1).split()) for k in ("IMAGE_HAS", "PKGS")}
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    deps = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
    required = {norm(re.match(r"[A-Za-z0-9_.-]+", d).group(0)) for d in deps}
    covered = {norm(n) for n in names["IMAGE_HAS"] | names["PKGS"]}
    assert required <= covered, required - covered
    assert not {norm(n) for n in names["IMAGE_HAS"]} & {norm(n) for n in names["PKGS"]}
    subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_memory_device_needs_real_and_an_available_device(capsys):
    memory = _load("memory")
    for extra, said in ((["--device", "cuda"], "add --real"), (["--device", "cuda", "--real"], "no CUDA device here")):
        with pytest.raises(SystemExit):
            memory.main(["--config", "configs/dfm_toy.yaml", *extra])
        assert said in capsys.readouterr().err
