"""Export the CAA adapter of an MVDiffusion Lightning checkpoint as safetensors.

    python -m genvs.methods.mvdiffusion.export runs/.../last.ckpt caa.safetensors [--sd_path DIR] [--no-ema]

The checkpoint holds only the trainable weights; the model is rebuilt from its Stable Diffusion folder
(the ``sd_path`` it was trained with, or ``--sd_path``). Load the file back with
``MVDiffusion(..., adapter_path=...)`` or `genvs.methods.mvdiffusion.load_adapter`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genvs.methods.mvdiffusion.model import MVDiffusion

__all__ = ["export_adapter", "main"]


def export_adapter(ckpt_path: str | Path, out_path: str | Path, sd_path: str | None = None, ema: bool = True) -> Path:
    """Write the adapter (its EMA weights when the checkpoint has them and ``ema``) to ``out_path``."""
    overrides = {"sd_path": sd_path} if sd_path is not None else {}
    model = MVDiffusion.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, **overrides)
    return model.save_adapter(out_path, ema=ema)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genvs.methods.mvdiffusion.export", description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="Lightning checkpoint of an MVDiffusion model")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--sd_path", default=None, help="Stable Diffusion folder (default: the one in the checkpoint)")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights, not the EMA")
    args = parser.parse_args(argv)
    path = export_adapter(args.ckpt, args.out, args.sd_path, args.ema)
    print(f"genvs: MVDiffusion CAA adapter written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
