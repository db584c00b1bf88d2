"""Peak memory of one DFM training step (forward + backward of `dfm_training_losses`) on CPU.

Each configuration runs in a fresh subprocess. Two figures: the peak of live tensor bytes during the step
(allocation and free events of the torch profiler, replayed in order: what a GPU caching allocator would
need at least), and the growth of the process's peak resident set size (``ru_maxrss``) over its
high-water mark before the step (glibc's mmap threshold is pinned so freed buffers go back to the OS).
It measures what chunking, per-chunk gradient checkpointing, bf16 autocast and DiT block checkpointing
save; absolute numbers are CPU allocator figures, not CUDA ones. Times are not benchmarks (shared CPU;
bf16 matmuls are far slower than fp32 on CPUs without native bf16, e.g. AVX2-only ones).

    python benchmarks/dfm_memory.py                 # the 32 px table
    python benchmarks/dfm_memory.py --preset 64     # full-width field at 64 px (slow on CPU)
    python benchmarks/dfm_memory.py --config configs/dfm_co3d.yaml   # the official 64 px model, traced

Each configuration's step is also counted on fake tensors (`memtrace.LiveBytes` under ``FakeTensorMode``:
the same ops, shapes, dtypes and lifetimes, nothing computed), which checks the tracer against the profiler.
``--config`` uses the tracer alone, for models too slow to run here: whole training steps of the config's
model as ``genvs fit`` builds it (weights, EMA, Adam's moments, gradients, the frozen LPIPS VGG,
accumulation and clipping), as configured and without chunking or checkpointing, fp32 and bf16 autocast.
    python benchmarks/dfm_memory.py --one '{"size": 32, ...}'   # one configuration (used internally)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # memtrace, when imported from the tests
    sys.path.insert(0, str(ROOT / "benchmarks"))

PRESETS = {
    "32": dict(
        base=dict(size=32, num_context=2, num_targets=2, batch=1, hidden=256, feature_dim=256, cond_features=64,
                  n_coarse=32, n_fine=32, cond_n_coarse=32, patch=24, dit=dict(hidden_size=128, depth=2, num_heads=4)),
        runs=[
            dict(name="no chunking, no checkpoint, fp32", chunk_rays=10**9, checkpoint=False, bf16=False),
            dict(name="chunks of 256 rays, no checkpoint, fp32", chunk_rays=256, checkpoint=False, bf16=False),
            dict(name="chunks of 256 rays + checkpoint, fp32", chunk_rays=256, checkpoint=True, bf16=False),
            dict(name="chunks of 64 rays + checkpoint, fp32", chunk_rays=64, checkpoint=True, bf16=False),
            dict(name="chunks of 64 rays + checkpoint + DiT block checkpoint, fp32", chunk_rays=64, checkpoint=True,
                 bf16=False, dit_checkpoint=True),
            dict(name="chunks of 64 rays + checkpoint, bf16 autocast", chunk_rays=64, checkpoint=True, bf16=True),
        ],
    ),
    "64": dict(
        base=dict(size=64, num_context=3, num_targets=2, batch=1, hidden=512, feature_dim=512, cond_features=64,
                  n_coarse=64, n_fine=64, cond_n_coarse=64, patch=24, dit=dict(hidden_size=128, depth=2, num_heads=4)),
        runs=[
            dict(name="64 px, official field width, chunks of 128 rays + checkpoint, fp32", chunk_rays=128,
                 checkpoint=True, bf16=False),
        ],
    ),
}


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _denoiser_and_views(cfg: dict):
    import torch

    from genvs.core.cameras import intrinsics_from_fov, orbit_poses
    from genvs.core.views import Views
    from genvs.methods.dfm import DFMDenoiser

    H, Nc, M, B = cfg["size"], cfg["num_context"], cfg["num_targets"], cfg["batch"]
    dit = dict(cfg["dit"], stem_channels=64, gradient_checkpointing=cfg.get("dit_checkpoint", False))
    den = DFMDenoiser(
        encoder="dit", encoder_kwargs=dit, feature_dim=cfg["feature_dim"], cond_features=cfg["cond_features"],
        mlp_hidden=cfg["hidden"], near=0.5, far=4.0, n_coarse=cfg["n_coarse"], n_fine=cfg["n_fine"],
        cond_n_coarse=cfg["cond_n_coarse"], chunk_rays=cfg["chunk_rays"], checkpoint=cfg["checkpoint"],
    )
    c2w = orbit_poses(Nc + M, radius=2.0).expand(B, -1, -1, -1).clone()
    K = intrinsics_from_fov(50.0, H).expand(B, Nc + M, 3, 3).clone()
    return den, Views(torch.rand(B, Nc + M, 3, H, H) * 2 - 1, K, c2w, num_context=Nc)


def traced_step_peak(cfg: dict) -> int:
    """Peak live tensor bytes of the same training step, counted on fake tensors (`memtrace.LiveBytes`) over
    the weights and the batch: the figure the profiler replay gives, without computing anything."""
    import torch
    from torch._subclasses import FakeTensorMode

    from genvs.core.diffusion import DiscreteSchedule
    from genvs.methods.dfm import dfm_training_losses
    from memtrace import LiveBytes

    with FakeTensorMode():
        den, views = _denoiser_and_views(cfg)
        with LiveBytes() as mem:
            mem.hold([*den.parameters(), views.images, views.K, views.c2w])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["bf16"]):
                terms = dfm_training_losses(den, DiscreteSchedule("cosine"), views, patch_size=cfg["patch"])
            terms["loss"].backward()
    return mem.peak - mem.held


def run_one(cfg: dict) -> dict:
    import torch

    from genvs.core.diffusion import DiscreteSchedule
    from genvs.methods.dfm import dfm_training_losses

    torch.manual_seed(0)
    den, views = _denoiser_and_views(cfg)
    den = den.to(memory_format=torch.channels_last)
    schedule = DiscreteSchedule("cosine")
    from torch.profiler import profile

    before = rss_peak_mib()
    t0 = time.perf_counter()
    with profile(profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["bf16"]):
            terms = dfm_training_losses(den, schedule, views, patch_size=cfg["patch"])
        terms["loss"].backward()
    seconds = time.perf_counter() - t0
    after = rss_peak_mib()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage  # allocations (+) and frees (-) attributed to the innermost op
        peak = max(peak, live)
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    return dict(cfg, tensor_peak_mib=mib(peak), traced_peak_mib=mib(traced_step_peak(cfg)),
                rss_growth_mib=round(after - before, 1), seconds=round(seconds, 1),
                params=sum(p.numel() for p in den.parameters()), loss=float(terms["loss"].detach()))


CONFIG_VARIANTS = [  # (name, bf16, overrides of the network's init_args; None keeps the config's)
    ("as configured, fp32", False, None),
    ("as configured, bf16 autocast (the GPU default)", True, None),
    ("no chunking, no checkpointing, fp32", False, dict(chunk_rays=10**9, checkpoint=False, dit_checkpoint=False)),
    ("no chunking, no checkpointing, bf16 autocast", True, dict(chunk_rays=10**9, checkpoint=False, dit_checkpoint=False)),
]


def trace_config(path: str, name: str, bf16: bool, overrides: dict | None, steps: int = 2) -> dict:
    """Peak live tensor memory of whole training steps of a DFM config's model, on fake tensors.

    The model is the config's ``model`` section, built as ``genvs fit`` builds it; each step is what
    Lightning runs: ``training_loss`` (with the LPIPS loss' frozen VGG, random weights of the real size) under
    autocast, backward, ``min(accumulate_grad_batches, 2)`` micro-batches, gradient clipping, Adam with the
    config's settings and the EMA update. The second step is the steady state (Adam's moments and the EMA
    exist from the start). The number of context views is the maximum (``random_num_context`` off).
    """
    import lpips as lp
    import torch
    import yaml
    from torch._subclasses import FakeTensorMode

    from genvs.core.cameras import intrinsics_from_fov, orbit_poses
    from genvs.core.config import build
    from genvs.core.diffusion import EMA
    from genvs.core.model import BaseNVSModel
    from genvs.core.views import Views
    from memtrace import LiveBytes

    config = yaml.safe_load(Path(path).read_text())
    model_spec, data, trainer = config["model"], config["data"]["init_args"], config.get("trainer") or {}
    net = model_spec["init_args"]["network"]["init_args"]
    for key, value in (overrides or {}).items():
        if key == "dit_checkpoint":
            net["encoder_kwargs"]["gradient_checkpointing"] = value
        else:
            net[key] = value
    optim = model_spec["init_args"].get("optim") or {}
    H, Nc, M = data["image_size"], data["n_context"], data["n_target"]
    B = data.get("batch_size", 1)
    micro = min(int(trainer.get("accumulate_grad_batches", 1)), 2)
    clip = trainer.get("gradient_clip_val")
    t0 = time.perf_counter()
    with FakeTensorMode():
        model = build(model_spec, BaseNVSModel, "model")
        model.random_num_context = False
        vgg = None
        if model.lpips_weight:  # built like the loss' LPIPS; pretrained=False: same size, nothing to load
            vgg = lp.LPIPS(net=model.lpips_net, pretrained=False, pnet_rand=True, verbose=False).requires_grad_(False)
            model.__dict__["_lpips_module"] = vgg
        trained = [p for p in model.denoiser.parameters() if p.requires_grad]
        radius = data.get("target_scale", 2.0)
        c2w = orbit_poses(Nc + M, radius=radius).expand(B, -1, -1, -1).clone()
        K = intrinsics_from_fov(50.0, H).expand(B, Nc + M, 3, 3).clone()
        views = Views(torch.rand(B, Nc + M, 3, H, H) * 2 - 1, K, c2w, num_context=Nc)
        with LiveBytes() as mem:
            weights = mem.hold(model.denoiser.parameters())
            frozen = mem.hold(vgg.parameters()) if vgg is not None else 0
            mem.hold([views.images, views.K, views.c2w])
            before = mem.live
            ema = EMA(model.denoiser, decay=model.ema_decay) if model.ema_decay > 0 else None
            ema_bytes = mem.live - before
            opt = getattr(torch.optim, optim.get("name", "Adam"))(
                trained, lr=optim.get("lr", 1e-4), **({"betas": tuple(optim["betas"])} if "betas" in optim else {})
            )
            peaks = []
            for _ in range(steps):
                mem.peak = mem.live
                for _ in range(micro):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = model.training_loss(views)["loss"] / micro
                    loss.backward()
                    del loss
                if clip:
                    torch.nn.utils.clip_grad_norm_(trained, clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model.denoiser)
                peaks.append(mem.peak)
            adam = sum(t.untyped_storage().nbytes() for st in opt.state.values() for t in st.values()
                       if isinstance(t, torch.Tensor) and t.dim() > 0)
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    return dict(
        config=path, name=name, bf16=bf16, overrides=overrides or {}, image_size=H, context_views=Nc,
        target_views=M, batch=B, micro_batches=micro, params=sum(p.numel() for p in model.denoiser.parameters()),
        weights_gib=gib(weights), ema_gib=gib(ema_bytes), adam_gib=gib(adam), frozen_lpips_gib=gib(frozen),
        peak_gib=gib(max(peaks)), first_step_peak_gib=gib(peaks[0]),
        trace_seconds=round(time.perf_counter() - t0, 1),
    )


def _save(out: Path, key: str, results: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    old[key] = results
    from run import machine  # benchmarks/run.py

    old.setdefault("machines", {})[key] = dict(machine(), date=time.strftime("%Y-%m-%d"))
    out.write_text(json.dumps(old, indent=1) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="32", choices=sorted(PRESETS))
    ap.add_argument("--config", help="trace whole training steps of this DFM config's model on fake tensors instead")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each run")
    ap.add_argument("--one", help="JSON configuration to run in this process")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dfm_memory.json"))
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return []
    results = []
    if args.config:
        if not Path(args.config).is_file():
            ap.error(f"--config {args.config}: no such file")
        print("| configuration | peak live tensors | weights | EMA | Adam |\n| --- | --- | --- | --- | --- |", flush=True)
        for name, bf16, overrides in CONFIG_VARIANTS:
            res = trace_config(args.config, name, bf16, overrides)
            results.append(res)
            print(f"| {name} | {res['peak_gib']:.2f} GiB | {res['weights_gib']:.2f} | {res['ema_gib']:.2f} "
                  f"| {res['adam_gib']:.2f} |", flush=True)
        _save(Path(args.out), f"config:{Path(args.config).as_posix()}", results)
        return results
    preset = PRESETS[args.preset]
    print("| configuration | peak live tensors | traced (fake tensors) | peak RSS growth |\n| --- | --- | --- | --- |",
          flush=True)
    for run in preset["runs"]:
        cfg = dict(preset["base"], **run)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True, env=env
        )
        if proc.returncode:
            raise SystemExit(f"configuration {run['name']!r} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"| {res['name']} | {res['tensor_peak_mib']:.0f} MiB | {res['traced_peak_mib']:.0f} MiB "
              f"| {res['rss_growth_mib']:.0f} MiB |", flush=True)
    _save(Path(args.out), args.preset, results)
    return results


if __name__ == "__main__":
    main()
