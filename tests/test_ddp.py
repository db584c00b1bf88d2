"""Multi-process runs on CPU (gloo): real 2-process Lightning DDP and FSDP training of the tiny 3DiM, and a
2-process `genvs test`.

Two processes with batch ``b`` each must train exactly like one process with batch ``2b``: the
`EpochSampler` gives the two ranks the same examples (interleaved) as the single process's batch, and
`BatchRNG` draws each example's noise level, noise and CFG drop from its global position. Each
multi-process run is a script in a subprocess with a timeout, so a hang fails the test instead of
blocking; its DDP ranks are forked by Lightning (``ddp_fork``: the same `DDPStrategy` as ``ddp``), its
FSDP ranks started by Lightning's script launcher (as ``ddp`` on one node). The reference single-process
run runs in the test process.

The runs train with SGD (with momentum): its update is linear in the gradient, so weights agree to float
rounding. Adam divides each gradient by its own magnitude, which turns the rounding noise of gradients
that are zero in exact arithmetic (e.g. of a bias followed by a GroupNorm of one channel per group) into
full ``lr``-sized steps of random sign: any two runs that add the same numbers in another order differ.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_PROTOCOL_ARGS, TINY_TOY, TINY_XUNET

HELPER = Path(__file__).parent / "helpers" / "ddp_fit.py"
CONFIG = Path(__file__).parents[1] / "configs" / "3dim_toy.yaml"
STEPS = 4
GLOBAL_BATCH = 4


def fit_args(toy_root: Path, out: Path, processes: int, *extra: str, network: dict | None = None) -> list[str]:
    args = [
        "fit", "--config", str(CONFIG),
        "--model.init_args.network.init_args", json.dumps(network or TINY_XUNET),
        # SGD, no warmup: see the module docstring
        "--model.init_args.optim", json.dumps({"name": "SGD", "lr": 0.1, "momentum": 0.5, "warmup_steps": 0}),
        "--data.init_args.root", str(toy_root), "--data.init_args.toy", json.dumps(TINY_TOY.__dict__),
        *TINY_PROTOCOL_ARGS,
        "--data.init_args.num_workers", "0", "--data.init_args.batch_size", str(GLOBAL_BATCH // processes),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(processes),
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_model_summary", "false",
        # fp32 whatever the CPU: the comparisons below are to 1e-4, tighter than bf16's rounding
        "--trainer.precision", "32-true",
        "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1",
    ]
    if processes > 1 and "--trainer.strategy" not in extra:
        # ddp_fork: Lightning's DDPStrategy (gloo on CPU) exactly as `ddp`, but the ranks are forked from the
        # launching process instead of re-running the script (which re-imports torch and Lightning per rank)
        args += ["--trainer.strategy", "ddp_fork"]
    return [*args, *extra]


def read_record(record: Path) -> dict:
    return {
        "losses": json.loads((record / "losses.json").read_text()),
        "writers": (record / "writers.txt").read_text().split("\n")[:-1],
    }


def launch(record: Path, args: list[str], timeout: float = 300) -> dict:
    """Run the helper script in a subprocess (its ranks are forked or re-launched by Lightning)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        proc = subprocess.run(
            [sys.executable, str(HELPER), str(record), *args], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"training run hung (>{timeout} s): {(e.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return read_record(record)


def checkpoint(out: Path, step: int) -> dict:
    (path,) = out.rglob(f"*step={step}.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


def weights(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("denoiser.", "ema.shadow"))}


def assert_same_weights(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(toy_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    spec = importlib.util.spec_from_file_location("ddp_fit", HELPER)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    helper.recorded_run(root / "rec1", fit_args(toy_root, root / "one", 1))  # the reference: one process, in this one
    single = read_record(root / "rec1")
    ddp = launch(root / "rec2", fit_args(toy_root, root / "two", 2))
    return root, single, ddp


def test_two_processes_train_like_one_with_the_global_batch(runs):
    root, single, ddp = runs
    assert len(single["losses"]) == len(ddp["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-6)
    one, two = checkpoint(root / "one", STEPS), checkpoint(root / "two", STEPS)
    init = checkpoint(root / "one", 2)
    moved = max((one["state_dict"][k] - init["state_dict"][k]).abs().max() for k in weights(one) if k.startswith("denoiser."))
    assert moved > 1e-3  # the steps changed the weights: equality below is not trivial
    assert_same_weights(weights(two), weights(one), rtol=1e-4, atol=1e-6)  # weights and EMA
    assert int(two["state_dict"]["ema.num_updates"]) == STEPS


def test_only_rank_zero_writes_checkpoints(runs):
    root, _, ddp = runs
    ranks = {line.split()[0] for line in ddp["writers"]}
    assert ranks == {"0"}, ddp["writers"]
    # steps 2 and 4, each a step checkpoint and last.ckpt (.temp.ckpt: the forked ranks' hand-over to the launcher)
    assert [w.split()[1] for w in ddp["writers"] if ".temp" not in w] == [
        "epoch=1-step=2.ckpt", "last.ckpt", "epoch=3-step=4.ckpt", "last.ckpt"
    ]
    assert not list((root / "two").rglob("*.tmp"))


def test_ddp_resume_loads_on_every_rank_and_continues_exactly(runs, toy_root):
    root, _, ddp = runs
    resume = fit_args(toy_root, root / "two_resumed", 2, "--ckpt_path", str(next((root / "two").rglob("*step=2.ckpt"))))
    resumed = launch(root / "rec3", resume)
    saved = weights(checkpoint(root / "two", 2))
    for rank in (0, 1):  # every process starts from the checkpoint's weights and EMA
        start = torch.load(root / "rec3" / f"rank{rank}_start.pt", weights_only=True)
        for k, v in saved.items():
            assert torch.equal(start[k], v), (rank, k)
    assert resumed["losses"] == ddp["losses"][2:]
    full, cont = checkpoint(root / "two", STEPS), checkpoint(root / "two_resumed", STEPS)
    for k, v in full["state_dict"].items():
        assert torch.equal(cont["state_dict"][k], v), k


def test_fsdp_resumes_a_ddp_checkpoint_shards_blocks_and_saves_a_full_checkpoint(runs, toy_root):
    """FSDP (the genvs strategy, on CPU with gloo) with gradient checkpointing resumes the DDP run's
    step-2 checkpoint: the EMA is sharded with the weights, and the step-4 checkpoint it writes (full
    weights and EMA, same keys) matches the DDP run's."""
    root, _, ddp = runs
    ckpt = next((root / "two").rglob("*step=2.ckpt"))
    net = {**TINY_XUNET, "gradient_checkpointing": True}
    strategy = json.dumps({"class_path": "genvs.core.distributed.NVSFSDPStrategy"})
    args = fit_args(toy_root, root / "fsdp", 2, "--trainer.strategy", strategy, "--ckpt_path", str(ckpt), network=net)
    fsdp = launch(root / "rec4", args)
    start = torch.load(root / "rec4" / "rank0_start.pt", weights_only=True)  # gathered from both shards
    for k, v in checkpoint(root / "two", 2)["state_dict"].items():
        if k.startswith(("denoiser.", "ema.")):
            assert torch.equal(start[k], v), k
    units = json.loads((root / "rec4" / "fsdp_units.json").read_text())
    n_res = sum(1 for k in checkpoint(root / "two", 2)["state_dict"] if k.endswith("conv1.weight"))
    n_attn = sum(1 for k in checkpoint(root / "two", 2)["state_dict"] if k.endswith(".q.weight") and k.startswith("denoiser."))
    assert sorted(units) == sorted(["ThreeDiM"] + ["ResnetBlock"] * n_res + ["AttnBlock"] * n_attn)
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"][2:]), rtol=1e-4, atol=1e-6)
    assert {line.split()[0] for line in fsdp["writers"]} == {"0"}
    got, want = checkpoint(root / "fsdp", STEPS), checkpoint(root / "two", STEPS)
    assert_same_weights(weights(got), weights(want), rtol=1e-4, atol=1e-6)
    assert int(got["state_dict"]["ema.num_updates"]) == STEPS


def test_ddp_genvs_test_scores_every_scene_once_as_one_process(toy_root, tmp_path):
    """`genvs test` on 2 processes scores each test scene once, and the metrics reduced over the processes
    equal the single process's. The copy baseline has no sampling noise (which is seeded per rank), so the
    two runs score the same images. Lightning must not warn that the epoch-level metrics are unsynchronised."""
    from conftest import tiny_args
    from genvs.cli import run

    def test_args(out: Path) -> list[str]:
        return ["test", *tiny_args(toy_root, out), "--model", "copy_input", "--evaluation.results_dir", str(out),
                "--trainer.accelerator", "cpu"]

    def record(out: Path) -> dict:
        (path,) = out.glob("copyinput_toy_*.json")
        return json.loads(path.read_text())["results"][0]

    run(test_args(tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    script = "import sys; from genvs.cli import main; main(sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", script, *test_args(tmp_path / "two"), "--trainer.devices", "2",
         "--trainer.strategy", "ddp_fork"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    one, two = record(tmp_path / "one"), record(tmp_path / "two")
    assert (one["meta"]["world_size"], two["meta"]["world_size"]) == (1, 2)
    assert two["metrics"]["num_images"] == one["metrics"]["num_images"] == 2 * 3  # 2 scenes x 3 targets
    for metric in ("psnr", "ssim"):
        assert two["metrics"][metric] == pytest.approx(one["metrics"][metric], abs=1e-5), metric
    assert "sync_dist" not in proc.stderr
