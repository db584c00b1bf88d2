"""The MVDiffusion toy figure of docs/methods/mvdiffusion.md: for each test room, three equirectangular
panoramas stitched from 8-view rings (top to bottom): the real ring; the toy SD alone (the untrained,
zero-initialised adapter: every view denoised independently); MVDiffusion after training its
correspondence-aware attention. Same prompts and seeds for both models (the checkpoint's sampler).

    python docs/figures/mvdiffusion_toy.py --config configs/mvdiffusion_toy.yaml \\
        --config configs/mvdiffusion_toy_sd.yaml --ckpt runs/mvdiffusion_toy_sd/.../last.ckpt \\
        --out docs/figures/mvdiffusion_toy_sd.png
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

ROOT = Path(__file__).resolve().parents[2]


def _samplers():
    """benchmarks/samplers.py (its config merging and test-split datamodule)."""
    spec = importlib.util.spec_from_file_location("genvs_benchmarks_samplers", ROOT / "benchmarks" / "samplers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--num-scenes", type=int, default=3)
    ap.add_argument("--width", type=int, default=256, help="panorama width in pixels")
    ap.add_argument("--out", default="docs/figures/mvdiffusion_toy_sd.png")
    args = ap.parse_args(argv)

    from genvs.core.config import build
    from genvs.core.geometry import perspective_to_equirect
    from genvs.core.model import BaseNVSModel
    from genvs.methods.mvdiffusion import MVDiffusion

    samplers = _samplers()
    config = samplers.merged_config(args.config)
    trained = MVDiffusion.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True).eval()
    base = build(config["model"], BaseNVSModel, "model").eval()  # the same SD, adapter still zero
    base.sampler = trained.sampler
    loader = samplers.build_datamodule(config, argparse.Namespace(
        config=args.config, data_root=None, batch_size=1, num_scenes=args.num_scenes, num_targets=8, input_views=None
    )).test_dataloader()  # fmt: skip

    def pano(images, views) -> torch.Tensor:
        out, _ = perspective_to_equirect(images, views.K, views.c2w, (args.width // 2, args.width))
        return out

    rows = []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            targets = batch.targets
            rows.append(pano(targets.images, targets))
            for model in (base, trained):
                _, pred = model.generate(batch, i)
                rows.append(pano(pred.images, pred))
    grid = torch.cat(rows)
    out = Path(args.out)
    save_image((grid + 1) / 2, out, nrow=1, padding=2, pad_value=1.0)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
