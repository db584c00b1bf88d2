"""Peak memory of whole training steps of a genvs config's model at paper scale, counted on fake tensors.

Models such as DFM's official 64 px CO3D model (DiT-XL/2, 726 M parameters) or 3DiM's 128 px X-UNet are far
too slow to train on a CPU, and their memory question (does a step fit a 24 GB GPU?) needs no computing:
`memtrace.LiveBytes` under ``FakeTensorMode`` runs the same ops with the same shapes, dtypes and tensor
lifetimes on tensors without data, and counts the live storages (checked against the torch profiler on the
steps that can be run: `dfm_memory.py`, benchmarks/README.md). Methods whose batch is context + target
`Views` (3DiM, DFM).

    python benchmarks/memory.py --config configs/dfm_co3d.yaml --config configs/3dim_cars.yaml

Writes ``benchmarks/results/memory.json`` (one entry per config, with the machine). What is not counted:
the CUDA context, the caching allocator's rounding and fragmentation, vendor kernel workspaces, and DDP's
gradient buckets (up to one more copy of the gradients unless ``gradient_as_bucket_view``). CPU autocast's op
lists stand in for CUDA's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # memtrace and run, when imported from the tests
    sys.path.insert(0, str(ROOT / "benchmarks"))


NO_CHUNKS = dict(chunk_rays=10**9, checkpoint=False, dit_checkpoint=False)  # DFM without its memory savers


def variants(config: dict) -> list[tuple[str, bool, dict | None]]:
    """(name, bf16, overrides of the network's init_args) to trace for ``config``: as configured in fp32 and
    bf16 autocast; for ray-chunked networks (DFM) also without chunking and checkpointing, and for networks
    with a ``gradient_checkpointing`` switch that is off (3DiM's X-UNet) also with it on."""
    out = [("as configured, fp32", False, None), ("as configured, bf16 autocast (the GPU default)", True, None)]
    network = config["model"]["init_args"].get("network", {})
    if "chunk_rays" in network.get("init_args", {}):
        out += [("no chunking, no checkpointing, fp32", False, NO_CHUNKS),
                ("no chunking, no checkpointing, bf16 autocast", True, NO_CHUNKS)]
    elif not network.get("init_args", {}).get("gradient_checkpointing") and _takes(network, "gradient_checkpointing"):
        out += [("gradient_checkpointing: true, bf16 autocast", True, {"gradient_checkpointing": True})]
    return out


def _takes(spec: dict, arg: str) -> bool:
    """Whether the class a ``class_path`` spec names takes ``arg``."""
    import importlib
    import inspect

    module, _, name = spec.get("class_path", "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return arg in inspect.signature(cls).parameters


def trace_config(path: str, name: str, bf16: bool, overrides: dict | None, steps: int = 2) -> dict:
    """Peak live tensor memory of whole training steps of a config's model on one device, on fake tensors.

    The model is the config's ``model`` section, built as ``genvs fit`` builds it; the batch is the data
    section's ``batch_size`` scenes of ``n_context`` + ``n_target`` views at ``image_size`` (per device).
    Each step is what Lightning runs: ``training_loss`` under autocast (DFM: with the LPIPS loss' frozen VGG,
    random weights of the real size), backward, ``min(accumulate_grad_batches, 2)`` micro-batches, gradient
    clipping, the config's optimizer and the EMA update. The second step is the steady state (the optimizer's
    moments and the EMA exist from the start). DFM's number of context views is the maximum
    (``random_num_context`` off).
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
    net = model_spec["init_args"].get("network", {}).get("init_args", {})
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
    # initial values do not change memory, and trunc_normal_ needs real data (it reads a scalar back)
    with FakeTensorMode(), mock.patch.object(torch.nn.init, "trunc_normal_", lambda t, *a, **k: t):
        model = build(model_spec, BaseNVSModel, "model")
        if hasattr(model, "random_num_context"):
            model.random_num_context = False
        vgg = None
        if getattr(model, "lpips_weight", 0):  # built like the loss' LPIPS; pretrained=False: same size, nothing to load
            vgg = lp.LPIPS(net=model.lpips_net, pretrained=False, pnet_rand=True, verbose=False).requires_grad_(False)
            model.__dict__["_lpips_module"] = vgg
        trained = [p for p in model.denoiser.parameters() if p.requires_grad]
        radius = data.get("target_scale") or 2.0
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


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, action="append", help="a genvs config YAML; repeat for several")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = ap.parse_args(argv)
    import yaml

    from run import machine  # benchmarks/run.py

    for path in args.config:
        if not Path(path).is_file():
            ap.error(f"--config {path}: no such file")
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    done = {}
    print("| config | variant | peak live tensors (GiB) | weights / EMA / optimizer (GiB) |\n|---|---|---|---|", flush=True)
    for path in args.config:
        rows = []
        for name, bf16, overrides in variants(yaml.safe_load(Path(path).read_text())):
            r = trace_config(path, name, bf16, overrides)
            rows.append(r)
            print(f"| {path} | {name} | {r['peak_gib']:.2f} | {r['weights_gib']:.2f} / {r['ema_gib']:.2f} / "
                  f"{r['adam_gib']:.2f} |", flush=True)
        key = Path(path).as_posix()
        old[key] = done[key] = {"machine": dict(machine(), date=time.strftime("%Y-%m-%d")), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(old, indent=1) + "\n")
    return done


if __name__ == "__main__":
    main()
