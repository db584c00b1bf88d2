"""REFERENCE.md's 3DiM speed target on one machine: a public PyTorch port's training step against genvs'.

The target: at the X-UNet configuration of ``run.py``'s 3DiM reference (ch 64, ch_mult 1-2-2-4, emb_ch 1024,
2 res blocks, attention at 16 and 8, 64x64 images, batch 8 pairs, one Adam step), genvs should be at least 3x
faster than the a6o port in fp32 eager and reach 30% of the machine's bf16 matmul peak. Both are timed here
in one process on the same batch (the port first, then genvs in fp32 eager and in bf16 autocast +
channels_last), with the matmul peaks measured in the same run.

The port is not part of genvs and is not redistributed: clone it, give this script its folder, and install
what it imports into an environment beside genvs (its ``visu3d`` needs an older ``etils``)::

    git clone https://github.com/a6o/3d-diffusion-pytorch /path/to/a6o
    pip install visu3d einops "etils[edc,enp,epath,epy,etree]==1.7.0"
    python benchmarks/a6o_reference.py --a6o /path/to/a6o

Writes ``results/a6o_reference_<machine>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (the reference configuration, matmul peaks, machine description)


def median_step(step, repeats: int) -> tuple[float, list[float]]:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def port_step(folder: Path, ref):
    """One fp32 Adam step of the port's XUNet at the reference configuration, on the reference batch."""
    import torch

    file = folder / "xunet.py"
    # the port moves tensors with .to(x.get_device()), which is -1 for CPU tensors
    torch.Tensor.get_device = lambda self: self.device
    spec = importlib.util.spec_from_file_location("a6o_xunet", file)
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)

    views = ref.views
    B, H = views.B, views.H
    net = port.XUNet(H=H, W=H, ch=64, ch_mult=(1, 2, 2, 4), emb_ch=1024, num_res_blocks=2,
                     attn_resolutions=(2, 3), attn_heads=4, dropout=0.0)  # fmt: skip  (levels 2, 3: 16 and 8 px)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    batch = {"x": views.images[:, 0], "z": views.images[:, 1],
             "logsnr": torch.stack([torch.full((B,), 20.0), torch.randn(B, generator=g) * 5], 1),
             "R": views.c2w[..., :3, :3], "t": views.c2w[..., :3, 3], "K": views.K[:, 0]}  # fmt: skip
    target, keep = torch.randn(B, 3, H, H, generator=g), torch.ones(B, dtype=torch.bool)

    def step():
        loss = ((net(batch, cond_mask=keep) - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in net.parameters())


def genvs_step(variant: str):
    """One Adam step of genvs' 3DiM reference (``run.py``'s `training_step`, EMA update included)."""
    import torch

    torch.manual_seed(0)
    ref = bench.reference_threedim(False)
    model = ref.model
    model.channels_last = variant == "bf16_cl"
    model.configure_model()
    if not model.channels_last:
        model.denoiser.to(memory_format=torch.contiguous_format)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16_cl")

    return lambda: bench.training_step(model, ref.views, opt, autocast)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a6o", type=Path, required=True, help="folder of a clone of a6o/3d-diffusion-pytorch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not (args.a6o / "xunet.py").is_file():
        raise SystemExit(f"--a6o {args.a6o}: no xunet.py there; clone https://github.com/a6o/3d-diffusion-pytorch")
    from torch.utils.flop_counter import FlopCounterMode

    step, params = port_step(args.a6o, bench.reference_threedim(False))
    with FlopCounterMode(display=False) as fc:
        step()
    res = {"machine": bench.machine(), "port_params_m": params / 1e6, "tflop_per_step": fc.get_total_flops() / 1e12}
    res["a6o_fp32_s"], res["a6o_fp32_times"] = median_step(step, args.repeats)
    for variant in ("fp32", "bf16_cl"):
        res[f"genvs_{variant}_s"], res[f"genvs_{variant}_times"] = median_step(genvs_step(variant), args.repeats)
    res["matmul_peak_gflops"] = {d: bench.matmul_peak(d, "cpu") for d in ("fp32", "bf16")}
    for variant in ("fp32", "bf16_cl"):
        res[f"genvs_{variant}_speedup"] = res["a6o_fp32_s"] / res[f"genvs_{variant}_s"]
    res["genvs_bf16_cl_mfu"] = res["tflop_per_step"] * 1e3 / res["genvs_bf16_cl_s"] / res["matmul_peak_gflops"]["bf16"]
    out = args.out or bench.RESULTS / ("a6o_reference_" + bench.default_results_file(res["machine"]).name)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_times")}, indent=1))
    return res


if __name__ == "__main__":
    main()
