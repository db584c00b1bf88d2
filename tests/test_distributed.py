"""Single-process checks of the multi-process machinery: `BatchRNG`, the training order of `EpochSampler`,
the EMA (no host syncs, ignored by DDP's buffer broadcast), FSDP units, gradient checkpointing, the
non-finite loss policy. The multi-process runs themselves are in tests/test_ddp.py."""

from __future__ import annotations

import math
import types
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader

from conftest import TINY_TOY, TINY_XUNET, printed_config
from genvs.core.diffusion import EMA, CosineLogSNRSchedule, DiscreteSchedule
from genvs.core.distributed import BatchRNG, clean_param_name, fsdp_wrapped_types
from genvs.core.model import NonFiniteLossError, OptimConfig
from genvs.data.module import EpochSampler, NVSDataModule, ToyDataModule
from genvs.methods.threedim import ThreeDiM, XUNet
from genvs.methods.threedim.xunet import AttnBlock, ResnetBlock
from test_threedim import pair_views, perturb_zero_init, tiny_model


# ------------------------------------------------------------------------------------------ BatchRNG
def interleave(parts: list[torch.Tensor], group: int = 1) -> torch.Tensor:
    """Rank pieces ``[B * group, ...]`` -> the global batch, examples interleaved over ranks."""
    W = len(parts)
    stacked = torch.stack([p.reshape(-1, group, *p.shape[1:]) for p in parts], 1)  # [B, W, group, ...]
    return stacked.reshape(-1, *parts[0].shape[1:])


@pytest.mark.parametrize("world", [2, 3])
def test_batch_rng_ranks_draw_the_single_process_numbers(world):
    B = 2
    one = BatchRNG(1234, rank=0, world_size=1)
    ranks = [BatchRNG(1234, rank=r, world_size=world) for r in range(world)]
    sched = CosineLogSNRSchedule()
    draws = {
        "rand": lambda g, n: g.rand(n, 3),
        "randn": lambda g, n: g.randn(n, 2, 4, 4),
        "randint": lambda g, n: g.randint(0, 10, (n, 5)),
        "sample_t": lambda g, n: g.draw(lambda m, gen: sched.sample_t(m, generator=gen), n),
        "tuple": lambda g, n: g.draw(lambda m, gen: (torch.rand(m, generator=gen), torch.randn(m, 2, generator=gen)), n),
    }
    for name, fn in draws.items():  # in sequence: the generators advance identically
        full = fn(one, world * B)
        pieces = [fn(r, B) for r in ranks]
        if isinstance(full, tuple):
            for i in range(len(full)):
                torch.testing.assert_close(interleave([p[i] for p in pieces]), full[i], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(interleave(pieces), full, rtol=0, atol=0, msg=name)
        assert not torch.equal(pieces[0], pieces[1]) if not isinstance(full, tuple) else True  # ranks differ
    # views of a scene flattened into the batch: each example keeps its group of rows
    V = 3
    full = one.grouped(V).randn(world * B * V, 2)
    pieces = [r.grouped(V).randn(B * V, 2) for r in ranks]
    torch.testing.assert_close(interleave(pieces, group=V), full, rtol=0, atol=0)
    # per-step values are shared
    assert len({r.step_randint(0, 1000) for r in ranks} | {one.step_randint(0, 1000)}) == 1


def test_batch_rng_without_seed_is_torch_global_rng():
    rng = BatchRNG()
    torch.manual_seed(5)
    a = (rng.rand(4, 2), rng.randn(3), rng.randint(0, 9, (2,)), DiscreteSchedule().sample_t(4))
    torch.manual_seed(5)
    b = (torch.rand(4, 2), torch.randn(3), torch.randint(0, 9, (2,)), DiscreteSchedule().sample_t(4))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        BatchRNG(0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="whole number of examples"):
        BatchRNG(0, rank=0, world_size=2).grouped(3).rand(4)


def test_threedim_step_is_the_same_split_over_processes():
    """The 3DiM loss of a batch of 4 equals the mean of the losses of its two interleaved halves, each
    computed as one of two processes would; so do the gradients (what DDP averages)."""
    torch.manual_seed(0)
    m = tiny_model()
    perturb_zero_init(m.denoiser)
    v = pair_views(4)

    def loss_and_grads(views, rng):
        m.zero_grad()
        m.batch_rng = rng
        loss = m.training_loss(views)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    full, g_full = loss_and_grads(v, BatchRNG(7, 0, 1))
    halves = [loss_and_grads(v.apply(lambda _, t: t[r::2], scene=v.scene[r::2]), BatchRNG(7, r, 2)) for r in (0, 1)]
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, full, rtol=1e-5, atol=1e-6)
    for n, g in g_full.items():
        torch.testing.assert_close((halves[0][1][n] + halves[1][1][n]) / 2, g, rtol=1e-3, atol=1e-5, msg=n)
    other, _ = loss_and_grads(v, BatchRNG(8, 0, 1))
    assert not torch.allclose(other, full)  # the draws matter: the check above is not vacuous


# ---------------------------------------------------------------------------------- EpochSampler
def test_epoch_sampler_ranks_interleave_the_single_process_batches():
    data = list(range(10))
    b, W = 2, 2
    single = list(DataLoader(data, batch_size=W * b, sampler=EpochSampler(data, seed=3), drop_last=True))
    per_rank = [
        list(DataLoader(data, batch_size=b, sampler=EpochSampler(data, seed=3, num_replicas=W, rank=r), drop_last=True))
        for r in range(W)
    ]
    assert len(single) == len(per_rank[0]) == len(per_rank[1]) == 2
    for j, batch in enumerate(single):
        assert torch.equal(interleave([per_rank[r][j] for r in range(W)]), batch)


def test_tiny_dataset_gives_every_rank_a_batch(toy_root):
    dm = ToyDataModule(root=str(toy_root), toy=TINY_TOY, image_size=32, batch_size=4, num_workers=0)
    dm.trainer = None
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1  # 6 scenes, batch 4: one batch (drop_last follows the sampler)


def test_resume_after_an_epochs_last_batch_starts_the_next_epoch_at_its_start():
    progress = types.SimpleNamespace(is_last_batch=False, current=types.SimpleNamespace(ready=3))
    trainer = types.SimpleNamespace(fit_loop=types.SimpleNamespace(restarting=True, epoch_loop=types.SimpleNamespace(batch_progress=progress)))
    assert NVSDataModule._batches_done_this_epoch(trainer) == 3
    progress.is_last_batch = True  # Lightning goes on with the next epoch: nothing of it is done yet
    assert NVSDataModule._batches_done_this_epoch(trainer) == 0
    trainer.fit_loop.restarting = False
    assert NVSDataModule._batches_done_this_epoch(trainer) == 0


# ------------------------------------------------------------------------------------------- EMA
def test_ema_update_reads_no_device_value_and_rereads_after_loading(monkeypatch):
    net = nn.Linear(3, 3)
    ema = EMA(net, decay=0.99)
    calls = []
    real = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: calls.append(1) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("EMA.update called .item()"))
    for _ in range(3):
        ema.update(net)
    assert not calls and ema.current_decay() == pytest.approx(4 / 13)
    monkeypatch.undo()
    state = ema.state_dict()
    state["num_updates"] = torch.tensor(50)
    ema.load_state_dict(state)
    assert ema.current_decay() == pytest.approx(min(0.99, 51 / 60))  # the loaded count, not the old mirror
    ema.update(net)
    assert int(ema.num_updates) == 51 and ema.current_decay() == pytest.approx(min(0.99, 52 / 61))


def test_ddp_does_not_broadcast_the_ema(tmp_path):
    m = tiny_model()
    names = m._ddp_params_and_buffers_to_ignore
    assert names and all(n.startswith("ema.") for n in names)
    assert set(names) == {f"ema.{n}" for n, _ in m.ema.named_buffers()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(m)
        synced = {id(b) for b in ddp.modules_buffers}
        assert not synced & {id(b) for b in m.ema.buffers()}
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- FSDP
def test_fsdp_units_are_the_residual_and_attention_blocks():
    m = tiny_model()
    assert m.fsdp_wrap_modules() == {ResnetBlock, AttnBlock} == fsdp_wrapped_types(m.denoiser)
    assert clean_param_name("denoiser.down.0._fsdp_wrapped_module.res._checkpoint_wrapped_module.conv1.weight") == (
        "denoiser.down.0.res.conv1.weight"
    )


def test_fsdp_needs_the_genvs_strategy_for_the_ema():
    from lightning.pytorch.strategies import FSDPStrategy

    m = tiny_model()
    m._trainer = types.SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(ValueError, match="NVSFSDPStrategy"):
        m.configure_model()


# ------------------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_xunet_gradient_checkpointing_gives_the_same_loss_and_gradients(dropout):
    torch.manual_seed(0)
    net = XUNet(**{**TINY_XUNET, "dropout": dropout})
    perturb_zero_init(net)
    ckpt = XUNet(**{**TINY_XUNET, "dropout": dropout, "gradient_checkpointing": True})
    ckpt.load_state_dict(net.state_dict())
    m = ThreeDiM(network=net)
    v = pair_views(2)

    def run(model):
        model.train()
        torch.manual_seed(3)  # same noise, CFG mask and dropout masks
        m.denoiser = model
        loss = m.training_loss(v)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (a, ga), (b, gb) = run(net), run(ckpt)
    torch.testing.assert_close(a, b)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], msg=n)


def _same_loss_and_grads(make, run):
    """``make(flag)`` builds a module (same weights for both flags), ``run(module)`` returns a loss."""
    results = []
    for flag in (False, True):
        m = make(flag)
        torch.manual_seed(3)
        loss = run(m)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], msg=n)


def test_admunet_and_dit_gradient_checkpointing_give_the_same_loss_and_gradients():
    from genvs.methods.dfm.pixelnerf import DiTBlock, DiTEncoder
    from genvs.methods.warping.network import ADMUNet, Attention, ResBlock

    def adm(flag):
        torch.manual_seed(0)
        net = ADMUNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                      image_size=16, num_head_channels=8, num_classes=5, num_groups=8, dropout=0.1,
                      gradient_checkpointing=flag)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return net.train()

    x = torch.randn(2, 4, 16, 16)
    _same_loss_and_grads(adm, lambda n: n(x, torch.tensor([3, 700]), torch.tensor([1, -1])).pow(2).mean())
    assert fsdp_wrapped_types(adm(False)) == {ResBlock, Attention}

    def dit(flag):
        torch.manual_seed(0)
        enc = DiTEncoder(in_channels_target=7, out_channels=8, hidden_size=32, depth=2, num_heads=2, stem_channels=8,
                         gradient_checkpointing=flag)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return enc

    img = torch.randn(2, 3, 8, 8)
    _same_loss_and_grads(dit, lambda e: e(img, torch.tensor([0.2, 0.7])).pow(2).mean())
    assert fsdp_wrapped_types(dit(False)) == {DiTBlock}


def test_mvdiffusion_unet_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    from genvs.core.geometry import panorama_cameras
    from genvs.methods.mvdiffusion.correspondences import homography_correspondences
    from genvs.methods.mvdiffusion.network import MultiViewUNet, sd_schedule, training_loss
    from genvs.methods.mvdiffusion.sd import build_tiny_sd, load_stable_diffusion

    folder = build_tiny_sd(tmp_path / "sd", kind="base", text_encoder=False, seed=0)
    B, V = 1, 3
    K, c2w = panorama_cameras(V, 120.0, 32)
    K, c2w = K[None], c2w[None]
    torch.manual_seed(1)
    lat, emb = torch.randn(B, V, 4, 4, 4), torch.randn(B, V, 16, 32)
    adapter = None

    def make(flag):
        nonlocal adapter
        sd = load_stable_diffusion(folder, text_encoder=False)
        net = MultiViewUNet(sd.unet, checkpoint=False, gradient_checkpointing=flag).train()
        if adapter is None:
            torch.manual_seed(2)
            for p in net.adapter.parameters():
                torch.nn.init.normal_(p, std=0.05)
            adapter = net.adapter.state_dict()
        net.adapter.load_state_dict(adapter)
        assert any(getattr(m, "gradient_checkpointing", False) for m in net.unet.modules()) == flag
        return net

    def run(net):
        corr = homography_correspondences(K, c2w, (32, 32), net.feature_sizes((4, 4)))
        schedule, pred = sd_schedule(load_stable_diffusion(folder, text_encoder=False).scheduler_config)
        return training_loss(net, schedule, lat, emb, corr, prediction=pred, generator=torch.Generator().manual_seed(3)).mean()

    _same_loss_and_grads(make, run)


# -------------------------------------------------------------------------------- non-finite loss
class NaNAt(L.Callback):
    """Makes the loss of one training step NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        real = type(pl_module).training_loss
        if trainer.global_step == self.step:
            pl_module.training_loss = lambda views: {"loss": real(pl_module, views)["loss"] * math.nan}
        else:
            pl_module.__dict__.pop("training_loss", None)


def fit(toy_root, tmp_path, policy: str, steps: int = 3):
    m = ThreeDiM(network=XUNet(**TINY_XUNET), nonfinite_loss=policy, ema_decay=0.9)
    dm = ToyDataModule(root=str(toy_root), toy=TINY_TOY, image_size=32, batch_size=2, num_workers=0)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[NaNAt(1), L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=2)],  # a checkpoint right after it
    )
    trainer.fit(m, dm)
    return m, trainer


def test_nonfinite_loss_error_names_the_step_and_scenes_and_no_checkpoint_holds_it(toy_root, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 1: loss nan on scenes toy_train_\d+, toy_train_\d+"):
        fit(toy_root, tmp_path, "error")
    assert not list(tmp_path.rglob("*.ckpt"))  # the check runs before any checkpoint of that step is written


def test_nonfinite_loss_skip_leaves_weights_finite(toy_root, tmp_path, capsys):
    m, trainer = fit(toy_root, tmp_path, "skip")
    assert "genvs: skipping the update of step 1 (1 skipped so far): non-finite training loss at step 1: loss nan" in capsys.readouterr().out
    assert trainer.global_step == 3  # Lightning counts the skipped step (no update of the weights or the EMA)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert all(torch.isfinite(s).all() for s in m.ema.shadow())


def test_sgd_momentum_and_its_errors():
    m = tiny_model(optim=OptimConfig(name="SGD", lr=0.1, momentum=0.9))
    opt = m.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="Adagrad has no momentum"):
        tiny_model(optim=OptimConfig(name="Adagrad", momentum=0.9)).configure_optimizers()


# ------------------------------------------------------------------------------------ multi-GPU configs
MULTIGPU = Path(__file__).parents[1] / "configs" / "multigpu"
BASE_CARS = Path(__file__).parents[1] / "configs" / "3dim_cars.yaml"


@pytest.mark.parametrize(
    "overlay, nodes, strategy",
    [
        ("3dim_cars_ddp_8gpu.yaml", 1, "lightning.pytorch.strategies.DDPStrategy"),
        ("3dim_cars_2x8gpu.yaml", 2, "lightning.pytorch.strategies.DDPStrategy"),
        ("3dim_cars_fsdp.yaml", 1, "genvs.core.distributed.NVSFSDPStrategy"),
    ],
)
def test_multigpu_overlays_keep_the_model_and_the_global_batch(overlay, nodes, strategy, capsys):
    cfg = printed_config(capsys, ["--config", str(BASE_CARS), "--config", str(MULTIGPU / overlay)])
    base = yaml.safe_load(BASE_CARS.read_text())
    tr = cfg["trainer"]
    assert (tr["num_nodes"], tr["devices"], tr["precision"]) == (nodes, 8, "bf16-mixed")
    assert tr["strategy"]["class_path"] == strategy
    assert tr["num_nodes"] * tr["devices"] * cfg["data"]["init_args"]["batch_size"] == 128  # the paper's batch
    net = cfg["model"]["init_args"]["network"]["init_args"]
    for k, v in base["model"]["init_args"]["network"]["init_args"].items():  # the overlay keeps the model
        assert net[k] == v, k
    assert net["gradient_checkpointing"] == ("fsdp" in overlay)
    assert cfg["model"]["init_args"]["optim"]["lr"] == base["model"]["init_args"]["optim"]["lr"]
    if "fsdp" in overlay:
        from genvs.core.distributed import NVSFSDPStrategy
        from lightning.pytorch.plugins.precision import FSDPPrecision

        args = {k: v for k, v in tr["strategy"]["init_args"].items() if v is not None}
        s = NVSFSDPStrategy(**args, precision_plugin=FSDPPrecision("bf16-mixed"))
        mp = s.mixed_precision_config
        assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, torch.float32)
        assert NVSFSDPStrategy(fp32_reduce=False, precision_plugin=FSDPPrecision("bf16-mixed")).mixed_precision_config.reduce_dtype == torch.bfloat16


def test_toy_cpu_overlay_runs_two_processes_on_the_toy_model(capsys):
    path = Path(__file__).parents[1] / "configs" / "3dim_toy.yaml"
    cfg = printed_config(capsys, ["--config", str(path), "--config", str(MULTIGPU / "3dim_toy_cpu_2proc.yaml")])
    base = yaml.safe_load(path.read_text())
    tr = cfg["trainer"]
    assert (tr["accelerator"], tr["devices"], tr["strategy"]) == ("cpu", 2, "ddp")
    assert 2 * cfg["data"]["init_args"]["batch_size"] == base["data"]["init_args"]["batch_size"] == 16  # the same global batch
    assert cfg["data"]["init_args"]["root"] == "data/toy_cars"
    net = cfg["model"]["init_args"]["network"]["init_args"]
    for k, v in base["model"]["init_args"]["network"]["init_args"].items():
        assert net[k] == v, k


def test_test_scenes_are_sharded_without_repeats():
    from genvs.data.module import unrepeated_sampler

    data = list(range(5))
    parts = [list(unrepeated_sampler(data, num_replicas=2, rank=r)) for r in (0, 1)]
    assert parts == [[0, 2, 4], [1, 3]]  # every scene once (Lightning's sampler would repeat scene 0)
    assert unrepeated_sampler(data) is None  # one process: the plain loader
    assert unrepeated_sampler([0], num_replicas=2, rank=0) is None  # fewer scenes than processes
