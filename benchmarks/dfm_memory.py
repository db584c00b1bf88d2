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

Each configuration's step is also counted on fake tensors (`memtrace.LiveBytes` under ``FakeTensorMode``:
the same ops, shapes, dtypes and lifetimes, nothing computed), which checks that counting against the
profiler; `memory.py` uses it alone for whole training steps of paper-scale configs.
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
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each run")
    ap.add_argument("--one", help="JSON configuration to run in this process")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dfm_memory.json"))
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return []
    results = []
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
