"""End to end through the `genvs` command, in-process: fit -> checkpoint -> predict / reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY_TOY, TINY_XUNET, printed_config, tiny_args
from genvs.cli import main
from genvs.core.registry import UnknownMethodError, resolve_method
from genvs.methods.threedim import ThreeDiM


def test_fit_writes_checkpoint_with_ema_and_logs(trained):
    out, ckpt, cli = trained
    assert ckpt.name == "last.ckpt" and ckpt.exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    assert any(k.startswith("ema.shadow__") for k in state["state_dict"])
    assert int(state["state_dict"]["ema.num_updates"]) == 4
    assert "val/psnr" in cli.trainer.callback_metrics
    assert list(out.rglob("config.yaml"))  # the resolved config is saved next to the logs
    assert not list(out.rglob("*.tmp"))  # atomic checkpoint writes leave no temporaries


def test_predict_from_checkpoint_writes_novel_views(trained, toy_root, tmp_path):
    out, ckpt, _ = trained
    pred_dir = tmp_path / "pred"
    assert main(["predict", *tiny_args(toy_root, out), "--ckpt_path", str(ckpt), "--predict_writer.output_dir", str(pred_dir)]) == 0
    scenes = sorted(p for p in pred_dir.iterdir() if p.is_dir())
    assert len(scenes) == 2
    views = sorted(scenes[0].glob("view_*.png"))
    assert len(views) == 3 and Image.open(views[0]).size == (32, 32)
    assert (scenes[0] / "grid.png").exists() and (scenes[0] / "orbit.gif").exists()
    assert len(list(scenes[0].glob("gt_*.png"))) == 3 and len(list(scenes[0].glob("context_*.png"))) == 1


def test_checkpoint_reloads_outside_the_cli(trained, toy_root):
    _, ckpt, cli = trained
    model = ThreeDiM.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert model.denoiser.image_size == 32 and model.sampler.num_steps == 3
    for k, v in cli.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k].cpu(), v.cpu(), msg=k)
    assert model.ema is not None and int(model.ema.num_updates) == 4
    from genvs.data import ToyDataModule, EvalProtocol

    dm = ToyDataModule(root=str(toy_root), toy=TINY_TOY, image_size=32, num_workers=0,
                       predict_protocol=EvalProtocol(input_views=[0], num_scenes=1, num_targets=2))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    ctx, pred = model.eval().generate(batch)
    assert pred.images.shape == (1, 2, 3, 32, 32)


def test_print_config_shows_every_default(toy_root, tmp_path, capsys):
    cfg = printed_config(capsys, tiny_args(toy_root, tmp_path))
    sched = cfg["model"]["init_args"]["sampler"]["init_args"]["scheduler"]
    assert sched["class_path"] == "genvs.core.samplers.DDIMScheduler"
    assert sched["init_args"]["timestep_spacing"] == "trailing" and "beta_schedule" in sched["init_args"]
    assert cfg["model"]["init_args"]["noise_schedule"]["init_args"]["logsnr_max"] == 20.0
    assert cfg["model"]["init_args"]["optim"]["betas"] == [0.9, 0.99]


def test_method_names_resolve_and_unknown_names_list_known(toy_root, tmp_path, capsys):
    assert resolve_method("threedim") == resolve_method("ThreeDiM") == "genvs.methods.threedim.ThreeDiM"
    with pytest.raises(UnknownMethodError, match="Known methods: .*threedim"):
        resolve_method("nerfdiff")
    with pytest.raises(SystemExit):
        main(["fit", "--model", "nerfdiff", "--print_config"])
    assert "unknown method 'nerfdiff'" in capsys.readouterr().err
    cfg = tmp_path / "named.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"class_path": "threedim", "init_args": {"network": {"init_args": TINY_XUNET}}}}))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg), "--print_config"])
    assert "genvs.methods.threedim.ThreeDiM" in capsys.readouterr().out


def test_data_command_renders_toy_dataset(tmp_path):
    assert main(["data", "toy", "--root", str(tmp_path / "t"), "--toy.resolution", "16",
                 "--toy.num_objects", "{train: 1, val: 1, test: 1}", "--toy.num_views", "{train: 2, val: 2, test: 2}"]) == 0
    assert len(list((tmp_path / "t/train").glob("*/rgb/*.png"))) == 2


def test_python_built_model_saves_plain_hyperparameters(tmp_path):
    """A model built in Python (objects, not specs) still checkpoints as plain data and reloads."""
    import lightning as L

    from genvs.core.diffusion import CosineLogSNRSchedule
    from genvs.core.samplers import DDIMScheduler, Sampler
    from genvs.methods.threedim import XUNet

    model = ThreeDiM(
        network=XUNet(**TINY_XUNET),
        noise_schedule=CosineLogSNRSchedule(logsnr_min=-15.0),
        sampler=Sampler(DDIMScheduler(timestep_spacing="trailing"), num_steps=7),
    )
    hp = model.hparams
    assert hp["network"]["class_path"] == "genvs.methods.threedim.xunet.XUNet"
    assert hp["network"]["init_args"]["ch"] == 16
    assert hp["sampler"]["init_args"]["scheduler"]["init_args"]["timestep_spacing"] == "trailing"
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    again = ThreeDiM.load_from_checkpoint(path, weights_only=True)
    assert again.noise_schedule.logsnr_min == -15.0 and again.sampler.num_steps == 7
    assert again.denoiser.emb_ch == TINY_XUNET["emb_ch"]


def test_model_overrides_replaced_by_the_checkpoint_are_reported(trained, toy_root, tmp_path, capsys):
    """With --ckpt_path the checkpoint's hyperparameters replace the model config (Lightning's rule): a
    --model...sampler override would be silently lost, so genvs names it and points at --sampler."""
    from genvs.cli import run

    _, ckpt, _ = trained
    args = ["test", *tiny_args(toy_root, tmp_path), "--ckpt_path", str(ckpt), "--trainer.limit_test_batches", "1"]
    cli = run([*args, "--model.init_args.sampler.init_args.num_steps", "5"])
    err = capsys.readouterr().err
    assert cli.model.sampler.num_steps == 3  # the checkpoint's
    assert "sampler.init_args.num_steps: 5 -> 3" in err and "--sampler" in err
    run(args)  # the same model config as the checkpoint's: no notice
    assert "replace the configured ones" not in capsys.readouterr().err


def test_default_precision_follows_the_hardware(monkeypatch):
    """bf16-mixed where bf16 is fast (CUDA with bf16; CPUs with AVX-512-BF16 or AMX), else 32-true."""
    from genvs import cli

    def machine(cuda: bool, cuda_bf16: bool, avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    machine(cuda=False, cuda_bf16=False, avx512_bf16=False, amx=False)  # AVX2-only CPU
    assert [cli.default_precision(a) for a in ("auto", "cpu", None)] == ["32-true"] * 3
    machine(cuda=False, cuda_bf16=False, avx512_bf16=True, amx=False)
    assert [cli.default_precision(a) for a in ("auto", "cpu", "gpu")] == ["bf16-mixed", "bf16-mixed", "32-true"]
    machine(cuda=False, cuda_bf16=False, avx512_bf16=False, amx=True)
    assert cli.default_precision("cpu") == "bf16-mixed"
    machine(cuda=True, cuda_bf16=True, avx512_bf16=False, amx=False)
    assert (cli.default_precision("auto"), cli.default_precision("cpu")) == ("bf16-mixed", "32-true")
    machine(cuda=True, cuda_bf16=False, avx512_bf16=True, amx=False)  # old GPU: fp32 on it, bf16 on the CPU
    assert (cli.default_precision("auto"), cli.default_precision("cpu")) == ("32-true", "bf16-mixed")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe
    assert cli.default_precision("cpu") == "32-true"


@pytest.mark.parametrize(
    ("base", "model", "shared", "steps"),
    [("dfm_toy", "genvs.methods.dfm.DFM", ("root", "toy", "val_protocol", "test_protocol"), 12000),
     ("warping_toy", "genvs.methods.warping.WarpingRGBD", ("root", "toy", "test_protocol"), 6000)],
)
def test_toy_cars_overlays_share_the_3dim_toy_data(capsys, base, model, shared, steps):
    # the overlays' runs are scored on the same toy cars and views as the 3DiM toy config (README table)
    root = Path(__file__).resolve().parents[1] / "configs"
    run = printed_config(capsys, ["--config", str(root / f"{base}.yaml"), "--config", str(root / f"{base}_cars.yaml")])
    threedim = printed_config(capsys, ["--config", str(root / "3dim_toy.yaml")])
    assert run["model"]["class_path"] == model
    for key in shared:
        assert run["data"]["init_args"][key] == threedim["data"]["init_args"][key], key
    assert run["trainer"]["max_steps"] == steps
    assert run["trainer"]["default_root_dir"] == f"runs/{base}_cars"


@pytest.mark.parametrize(
    ("bounds", "description"),
    [({"max_steps": 12000}, "Epoch 30 · max_steps 12000"), ({"max_epochs": 5}, "Epoch 30/4"),
     ({"max_steps": 10, "max_epochs": 3}, "Epoch 30/2")],
)
def test_progress_bar_names_the_bound_of_the_run(bounds, description):
    # Lightning's own bar reads "Epoch 30/-2" when only max_steps bounds the run (max_epochs=-1)
    import lightning as L

    from genvs.callbacks import StepBoundProgressBar

    bar = StepBoundProgressBar()
    trainer = L.Trainer(**bounds, callbacks=[bar], logger=False, enable_checkpointing=False)
    bar.setup(trainer, None, "fit")
    assert bar._get_train_description(30).rstrip() == description
