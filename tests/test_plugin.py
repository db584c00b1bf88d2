"""Methods from outside genvs: the example plugin package installed with pip and run by name, broken
plugins contained, and what `BaseNVSModel` guarantees to a minimal subclass."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from conftest import TINY_TOY, printed_config
from genvs.cli import main, run
from genvs.core.diffusion import CosineLogSNRSchedule, diffusion_loss, q_sample
from genvs.core.model import BaseNVSModel, OptimConfig
from genvs.core.registry import MethodLoadError, load_method, method_entries, resolve_method
from genvs.core.samplers import Sampler
from genvs.core.views import Views
from genvs.data import EvalProtocol, ToyDataModule
from genvs.methods.threedim import ThreeDiM

EXAMPLE = Path(__file__).parents[1] / "examples" / "genvs-plugin-example"
TINY_UNET = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "emb_ch": 16, "origin_octaves": 2, "dir_octaves": 2}


def toy_data_args(toy_root: Path, out: Path) -> list[str]:
    return [
        "--data", "genvs.data.ToyDataModule",
        "--data.init_args.root", str(toy_root),
        "--data.init_args.toy", json.dumps(TINY_TOY.__dict__),
        "--data.init_args.image_size", "16",
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2",
        "--data.init_args.val_protocol", json.dumps({"input_views": [0], "num_scenes": 2, "num_targets": 2}),
        "--data.init_args.test_protocol", json.dumps({"input_views": [0], "num_targets": 2}),
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
    ]


def _forget_plugin_modules() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in ("genvs_plugin_example", "broken_genvs_plugin")]:
        del sys.modules[name]


# ------------------------------------------------------------------------ the example plugin, pip-installed
@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """``pip install --target`` of examples/genvs-plugin-example (built from a copy, so the repo stays clean)."""
    root = tmp_path_factory.mktemp("plugin")
    src, site = root / "src", root / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "genvs_plugin_example" / "model.py").is_file()
    return site


@pytest.fixture
def installed(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))  # a site dir on sys.path: importlib.metadata sees its dist-info
    yield plugin_site
    _forget_plugin_modules()


def test_installed_plugin_is_listed_and_fits_by_name(installed, toy_root, tmp_path, capsys):
    entry = method_entries()["tinydiff"]
    assert entry.distribution == "genvs-plugin-example" and entry.version == "0.1.0"
    assert resolve_method("TinyDiff") == "genvs_plugin_example.TinyDiff"
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    line = next(ln for ln in listing.splitlines() if ln.startswith("tinydiff"))
    assert "genvs_plugin_example.TinyDiff" in line and "genvs-plugin-example 0.1.0" in line
    assert "BROKEN" not in listing and listing.splitlines()[0].startswith("threedim")

    cli = run(["fit", "--model", "tinydiff", "--model.init_args.network.init_args", json.dumps(TINY_UNET),
               "--model.init_args.sampler.init_args.num_steps", "2", *toy_data_args(toy_root, tmp_path),
               "--trainer.fast_dev_run", "1"])
    model = cli.model
    assert f"{type(model).__module__}.{type(model).__name__}" == "genvs_plugin_example.model.TinyDiff"
    assert str(installed) in sys.modules["genvs_plugin_example"].__file__  # the pip-installed copy ran
    assert cli.trainer.global_step == 1 and model.ema is not None and int(model.ema.num_updates) == 1
    assert math.isfinite(float(cli.trainer.callback_metrics["val/psnr"]))


def test_plugin_and_builtin_results_merge_into_one_table(installed, toy_root, tmp_path, capsys):
    """`genvs test` scores the plugin like a built-in method; `genvs table` puts both in one table."""
    from conftest import TINY_XUNET

    common = [*toy_data_args(toy_root, tmp_path), "--model.init_args.sampler.init_args.num_steps", "2",
              "--evaluation.cache", "false"]
    run(["test", "--model", "tinydiff", "--model.init_args.network.init_args", json.dumps(TINY_UNET), *common,
         "--evaluation.results_dir", str(tmp_path / "tinydiff")])
    run(["test", "--model", "threedim", "--model.init_args.network.init_args", json.dumps(dict(TINY_XUNET, image_size=16)),
         *common, "--evaluation.results_dir", str(tmp_path / "threedim")])
    capsys.readouterr()
    assert main(["table", str(tmp_path / "tinydiff"), str(tmp_path / "threedim"), "--out", str(tmp_path / "both")]) == 0
    table = json.loads((tmp_path / "both.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert set(rows) == {"TinyDiff", "ThreeDiM"}
    for row in rows.values():  # same dataset column, both scored on the same 2 scenes x 2 targets
        assert math.isfinite(row["toy/psnr"]) and math.isfinite(row["toy/ssim"])
    assert [r["metrics"]["num_images"] for r in table["results"]] == [4, 4]


def test_example_config_names_the_plugin(installed, toy_root, tmp_path, capsys):
    """The tutorial's YAML selects the method by its registry name and matches 3DiM's toy data settings."""
    config = EXAMPLE / "configs" / "tinydiff_toy.yaml"
    cfg = printed_config(capsys, ["--config", str(config)])
    assert cfg["model"]["class_path"] == "genvs_plugin_example.TinyDiff"
    assert cfg["model"]["init_args"]["network"]["init_args"]["ch_mult"] == [1, 2, 2]
    threedim = yaml.safe_load((Path(__file__).parents[1] / "configs" / "3dim_toy.yaml").read_text())
    for key in ("class_path",):
        assert cfg["data"][key] == threedim["data"][key]
    def agrees(printed, written):  # --print_config fills in defaults the YAML leaves out
        return {k: printed[k] for k in written} == written if isinstance(written, dict) else printed == written

    for key in ("image_size", "n_context", "n_target", "root", "toy", "val_protocol", "test_protocol"):
        assert agrees(cfg["data"]["init_args"][key], threedim["data"]["init_args"][key]), key


def test_tinydiff_samples_targets_and_learns(installed):
    """The tutorial network is real: its loss falls on a fixed batch, and both samplers give [-1, 1] views."""
    from genvs_plugin_example import TinyDiff, TinyUNet

    torch.manual_seed(0)
    model = TinyDiff(network=TinyUNet(**TINY_UNET), sampler=Sampler(num_steps=2, guidance_scale=2.0), p_uncond=0.0)
    views = _fixed_views(n=4, size=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(30):
        torch.manual_seed(step % 3)  # the same 3 (t, eps) draws over and over: the loss must fall
        loss = model.training_loss(views)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses
    ctx, tgt = views.split()
    tgt = Views.cat([tgt, views.select([0])]).cameras_only()  # 2 targets
    for stochastic in (False, True):
        model.use_stochastic_conditioning = stochastic
        out = model.sample(ctx, tgt, generator=g)
        assert out.images.shape == (4, 2, 3, 16, 16) and out.images.abs().max() <= 1
        torch.testing.assert_close(out.c2w, tgt.c2w)


def _fixed_views(n: int, size: int) -> Views:
    from genvs.core.cameras import intrinsics_from_fov, orbit_poses

    g = torch.Generator().manual_seed(0)
    c2w = orbit_poses(2 * n, radius=1.3).view(n, 2, 4, 4)
    K = intrinsics_from_fov(52.0, size).expand(n, 2, 3, 3)
    # a smooth image per view: a random low-res pattern upsampled
    images = torch.nn.functional.interpolate(torch.rand(2 * n, 3, 4, 4, generator=g) * 2 - 1, size=(size, size),
                                             mode="bilinear", align_corners=False).view(n, 2, 3, size, size)
    return Views(images, K, c2w, num_context=1, scene=[f"s{i}" for i in range(n)])


# ------------------------------------------------------------------------------------ broken plugins
BROKEN_ENTRY_POINTS = """\
[genvs.methods]
brokenmethod = broken_genvs_plugin:Method
notamodel = genvs.core.views:Views
threedim = broken_genvs_plugin:Method
"""


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """An installed distribution (dist-info as pip writes it) whose method module raises ImportError."""
    site = tmp_path / "site"
    (site / "broken_genvs_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "broken_genvs_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-genvs-plugin\nVersion: 1.0\n"
    )
    (site / "broken_genvs_plugin-1.0.dist-info" / "entry_points.txt").write_text(BROKEN_ENTRY_POINTS)
    (site / "broken_genvs_plugin.py").write_text("raise ImportError('needs the frobnicate library (pip install frobnicate)')\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    _forget_plugin_modules()


def test_broken_plugin_is_reported_with_its_package(broken_plugin, toy_root, tmp_path, capsys):
    with pytest.raises(MethodLoadError) as err:
        load_method("brokenmethod")
    msg = str(err.value)
    assert err.value.distribution == "broken-genvs-plugin"
    assert "package broken-genvs-plugin 1.0" in msg and "needs the frobnicate library" in msg
    assert "Fix or upgrade that package (pip install -U broken-genvs-plugin)" in msg
    assert "pip uninstall broken-genvs-plugin" in msg
    with pytest.raises(MethodLoadError, match="not a genvs.core.model.BaseNVSModel subclass"):
        load_method("notamodel")
    # a plugin cannot take a built-in's name: threedim stays genvs', the clash is reported
    assert resolve_method("threedim") == "genvs.methods.threedim.ThreeDiM" and load_method("threedim") is ThreeDiM
    assert "already taken by the built-in method" in method_entries()["threedim@broken-genvs-plugin"].problem

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "brokenmethod" in listing and "broken-genvs-plugin 1.0" in listing
    assert "BROKEN: method 'brokenmethod'" in listing and "needs the frobnicate library" in listing
    threedim = next(ln for ln in listing.splitlines() if ln.startswith("threedim "))
    assert "genvs.methods.threedim.ThreeDiM" in threedim and "[built-in]" in threedim

    # selecting the broken method: a clear error, exit status 2, nothing trained
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--model", "brokenmethod", *toy_data_args(toy_root, tmp_path), "--trainer.fast_dev_run", "1"])
    assert exit_.value.code == 2
    err_text = capsys.readouterr().err
    assert "genvs: error: method 'brokenmethod'" in err_text and "broken-genvs-plugin" in err_text
    assert not list(tmp_path.rglob("*.ckpt"))


def test_other_methods_still_train_next_to_a_broken_plugin(broken_plugin, toy_root, tmp_path, capsys):
    from conftest import TINY_XUNET

    cli = run(["fit", "--model", "threedim", "--model.init_args.network.init_args", json.dumps(dict(TINY_XUNET, image_size=16)),
               "--model.init_args.sampler.init_args.num_steps", "2", *toy_data_args(toy_root, tmp_path),
               "--trainer.fast_dev_run", "1"])
    assert isinstance(cli.model, ThreeDiM) and cli.trainer.global_step == 1
    warning = capsys.readouterr().err
    assert "genvs: warning: method 'brokenmethod'" in warning and "broken-genvs-plugin" in warning


# ------------------------------------------------------------- what BaseNVSModel gives a minimal subclass
class MinimalNet(nn.Module):
    """(noisy target, context image, logSNR) -> eps: two convs, no cameras (enough to test the base)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(7, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: Tensor, context: Tensor, logsnr: Tensor) -> Tensor:
        level = (logsnr / 20).view(-1, 1, 1, 1).expand(-1, 1, *z.shape[2:]).to(z.dtype)
        return self.conv2(torch.relu(self.conv1(torch.cat([z, context, level], dim=1))))


class Minimal(BaseNVSModel):
    """The smallest method: a network, a loss, a sampler. Everything else is inherited."""

    def __init__(self, width: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.denoiser = MinimalNet(width)
        self.seen: dict[str, object] = {}

    def training_loss(self, views: Views) -> dict[str, Tensor]:
        x, x0 = views.images[:, 0], views.images[:, views.num_context]
        logsnr = self.noise_schedule.logsnr(self.noise_schedule.sample_t(views.B, device=self.device))
        eps = torch.randn_like(x0)
        pred = self.denoiser(q_sample(x0, logsnr, eps), x, logsnr)
        self.seen["train_dtype"] = pred.dtype
        loss = diffusion_loss(pred, x0, eps, logsnr, "eps").mean()
        return {"loss": loss, "extra_term": loss.detach() * 0 + 1.5}

    def sample(self, context: Views, targets: Views, sampler: Sampler | None = None, generator=None) -> Views:
        sampler = sampler or self.sampler
        self.seen["weights"] = [p.detach().clone() for p in self.denoiser.parameters()]
        B, N, H, W = targets.B, targets.V, targets.H, targets.W
        cond = context.images[:, :1].expand(B, N, 3, H, W).flatten(0, 1)
        x = sampler.loop(lambda z, logsnr, t: self.denoiser(z, cond, logsnr), tuple(cond.shape),
                         self.noise_schedule, "eps", generator, device=cond.device)
        out = targets.with_images(x.clamp(-1, 1).unflatten(0, (B, N)))
        self.seen["sample"] = out.images.detach().clone()
        return out


def _minimal_datamodule(toy_root: Path) -> ToyDataModule:
    return ToyDataModule(
        root=str(toy_root), toy=TINY_TOY, image_size=16, batch_size=4, num_workers=0,
        val_protocol=EvalProtocol(input_views=[0], num_scenes=2, num_targets=2),
        test_protocol=EvalProtocol(input_views=[0], num_scenes=2, num_targets=2),
    )


def test_minimal_subclass_gets_ema_logging_metrics_checkpoints(toy_root, tmp_path):
    model = Minimal(
        width=6, noise_schedule=CosineLogSNRSchedule(), sampler=Sampler(num_steps=2),
        optim=OptimConfig(lr=1e-2, warmup_steps=4), ema_decay=0.5, sample_seed=3,
    )
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(
        max_steps=3, val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=1, log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="logs"), callbacks=[ckpt_cb], enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )
    dm = _minimal_datamodule(toy_root)
    trainer.fit(model, dm)

    # optimizer and LR schedule from OptimConfig: linear warmup over 4 steps, 3 steps taken
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 4 / 4)
    # channels_last convolutions
    assert model.denoiser.conv1.weight.is_contiguous(memory_format=torch.channels_last)

    # EMA: 3 updates with the warm-up decay min(0.5, (1 + n) / (10 + n)) -> differs from the live weights
    assert model.ema is not None and int(model.ema.num_updates) == 3
    live = [p.detach().clone() for p in model.denoiser.parameters()]
    shadow = [s.clone() for s in model.ema.shadow()]
    assert all(not torch.allclose(a, b) for a, b in zip(live, shadow))

    # validation sampled with the EMA weights, and the live weights came back afterwards
    assert all(torch.equal(a, b) for a, b in zip(model.seen["weights"], shadow))
    # ... and scored: val/psnr is the mean per-image PSNR of those samples (independent computation)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    target = (batch.targets.images.clamp(-1, 1) + 1) / 2
    pred = (model.seen["sample"].clamp(-1, 1) + 1) / 2
    mse = (pred - target).pow(2).flatten(2).mean(-1)  # [B, V]
    psnr = (10 * torch.log10(1 / mse)).mean()
    assert float(trainer.callback_metrics["val/psnr"]) == pytest.approx(float(psnr), abs=1e-3)
    assert "val/ssim" in trainer.callback_metrics

    # logging: every loss term, per step, in the logger's files
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert [float(r["train/extra_term"]) for r in rows if r.get("train/extra_term")] == [1.5] * 3
    assert any(r.get("val/psnr") for r in rows)
    assert list((Path(trainer.logger.log_dir) / "samples").glob("*.png"))  # the image grid (no TensorBoard)

    # checkpoint: EMA and hyperparameters round-trip outside any CLI, loaded with weights_only=True
    state = torch.load(ckpt_cb.last_model_path, map_location="cpu", weights_only=True)
    assert state["genvs"]["method"] == f"{Minimal.__module__}.Minimal"
    again = Minimal.load_from_checkpoint(ckpt_cb.last_model_path, map_location="cpu", weights_only=True)
    assert again.hparams["width"] == 6 and again.ema_decay == 0.5 and again.sample_seed == 3
    assert again.optim.warmup_steps == 4 and again.sampler.num_steps == 2
    assert int(again.ema.num_updates) == 3
    for a, b in zip(again.ema.shadow(), shadow):
        torch.testing.assert_close(a, b)
    for a, b in zip(again.denoiser.parameters(), live):
        torch.testing.assert_close(a.detach(), b)

    # test: metrics and a results table written by the base
    again.evaluation.results_dir, again.evaluation.cache = str(tmp_path / "results"), False
    tester = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                       default_root_dir=tmp_path)
    tester.test(again, dm)
    result = json.loads(again.last_results["json"].read_text())
    record = result["results"][0] if "results" in result else result
    assert record["method"] == "Minimal" and record["dataset"] == "toy"
    assert record["metrics"]["psnr"] == pytest.approx(float(tester.callback_metrics["test/psnr"]), abs=1e-4)


def test_minimal_subclass_runs_under_bf16_mixed(toy_root, tmp_path):
    """One training step under ``precision="bf16-mixed"`` on CPU: the subclass's code runs in autocast."""
    model = Minimal(width=4, sampler=Sampler(num_steps=1), ema_decay=0.9)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, precision="bf16-mixed", accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, _minimal_datamodule(toy_root))
    assert trainer.global_step == 1 and model.seen["train_dtype"] == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.denoiser.parameters())  # master weights stay fp32
    assert all(torch.isfinite(s).all() for s in model.ema.shadow())


def test_contract_errors_name_the_method(toy_root):
    class NoNetwork(BaseNVSModel):
        pass

    with pytest.raises(TypeError, match="NoNetwork must set self.denoiser"):
        NoNetwork().setup_ema()

    class BadLoss(Minimal):
        def training_loss(self, views):
            return super().training_loss(views)["loss"]  # a tensor, not a dict

    class TooFewViews(Minimal):
        def sample(self, context, targets, sampler=None, generator=None):
            return super().sample(context, targets.select([0]), sampler, generator)

    dm = _minimal_datamodule(toy_root)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))  # 2 scenes x (1 context + 2 targets)
    with pytest.raises(TypeError, match="BadLoss.training_loss must return a dict with a 'loss' entry"):
        BadLoss(sampler=Sampler(num_steps=1)).training_step(batch, 0)
    with pytest.raises(ValueError, match=r"TooFewViews.sample returned images for \(B, V, H, W\) = \(2, 1, 16, 16\).*\(2, 2, 16, 16\)"):
        TooFewViews(sampler=Sampler(num_steps=1)).generate(batch)
    with pytest.raises(NotImplementedError, match="NoNetwork must implement training_loss"):
        NoNetwork().training_loss(batch)
