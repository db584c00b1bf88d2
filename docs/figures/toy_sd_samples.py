"""Text-to-image samples of a `genvs toy-sd` folder (docs/methods/mvdiffusion.md): the top row holds real
training views, the rows below the SD's own samples for the same prompts, one row per guidance scale
(diffusers' DDIM on SD-2-base's schedule, no MVDiffusion adapter, same seeds in every row).

    python docs/figures/toy_sd_samples.py --sd data/toy_sd_base --out docs/figures/toy_sd_samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import save_image


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd", default="data/toy_sd_base", help="a folder written by genvs toy-sd")
    ap.add_argument("--rooms", default="data/toy_rooms", help="the procedural rooms it was trained on")
    ap.add_argument("--num-rooms", type=int, default=6, help="two opposite views of each")
    ap.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="docs/figures/toy_sd_samples.png")
    args = ap.parse_args(argv)

    from genvs.data.panorama import RingScenes
    from genvs.methods.mvdiffusion.sd import decode_latents, load_stable_diffusion, sd_ddim_scheduler

    sd = load_stable_diffusion(args.sd)
    rings = RingScenes(args.rooms, "train")
    stride = max(1, len(rings.scenes) // args.num_rooms)
    views = [rings.load(i * stride, [0, 4], load_depth=False) for i in range(args.num_rooms)]
    real = torch.cat([v["images"] for v in views])
    prompts = [p for v in views for p in v["prompts"]]
    scheduler = sd_ddim_scheduler()
    scheduler.set_timesteps(args.steps)
    h, w = (s // 8 for s in real.shape[-2:])
    rows = [real]
    with torch.no_grad():
        cond, uncond = sd.text_encoder(prompts), sd.text_encoder([""] * len(prompts))
        for scale in args.guidance_scales:
            z = torch.randn(len(prompts), 4, h, w, generator=torch.Generator().manual_seed(0))
            for t in scheduler.timesteps:
                eps_c, eps_u = sd.unet(torch.cat([z, z]), t, torch.cat([cond, uncond])).sample.chunk(2)
                z = scheduler.step(eps_u + scale * (eps_c - eps_u), t, z).prev_sample
            rows.append(decode_latents(sd.vae, z[:, None])[:, 0])
    out = Path(args.out)
    save_image((torch.cat(rows) + 1) / 2, out, nrow=len(prompts), padding=1)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
