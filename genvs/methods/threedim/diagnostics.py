"""Does a 3DiM checkpoint use its conditioning view? Two measurements, on any (context, target) batch:

- `conditioning_gain`: the one-step x0 estimate's MSE at a few logSNRs with the right conditioning view and
  with another example's (the batch rolled by one). Equal numbers mean the input view is ignored.
- `cross_attention_stats`: for every cross-attention block, the entropy of the target frame's attention
  over the conditioning frame (against the uniform ``log N``) and the attention mass it puts on the
  conditioning view's object (the views' ``mask``, else their non-white pixels) against the object's share
  of the tokens.

Command line (prints both tables)::

    python -m genvs.methods.threedim.diagnostics <checkpoint> --root data/toy_cars --split val --input_view 6
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genvs.core.diffusion import predict_x0_eps, q_sample
from genvs.core.views import Views
from genvs.data.srn import white_background_mask
from genvs.methods.threedim.model import ThreeDiM
from genvs.methods.threedim.xunet import AttnBlock

__all__ = ["AttentionStats", "conditioning_gain", "cross_attention_stats", "foreground"]


def foreground(views: Views) -> Tensor:
    """``[B, 1, H, W]`` object mask of each example's first view: the dataset's ``mask`` (SRN loader: positive
    depth, else non-white pixels), or the non-white pixels when the views carry none."""
    return views.mask[:, 0] if views.mask is not None else white_background_mask(views.images[:, 0])


def _pair(context: Views, target: Views, model: ThreeDiM) -> tuple[Tensor, Tensor, Tensor]:
    x, x0 = context.images[:, 0], target.images[:, 0]
    K = torch.cat([context.K[:, :1], target.K[:, :1]], 1)
    c2w = torch.cat([context.c2w[:, :1], target.c2w[:, :1]], 1)
    return x, x0, model.rays(K, c2w, x0.shape[-2], x0.shape[-1])


@torch.no_grad()
def conditioning_gain(
    model: ThreeDiM, context: Views, target: Views, logsnrs=(-8.0, -4.0, 0.0), seed: int = 0
) -> dict[float, tuple[float, float]]:
    """``{logsnr: (x0 MSE with the right view, x0 MSE with another example's view)}`` for the first
    context and target view of each example (needs a batch of at least 2 examples)."""
    if context.B < 2:
        raise ValueError("conditioning_gain needs a batch of at least 2 examples (it swaps their input views)")
    x, x0, rays = _pair(context, target, model)
    g = torch.Generator(device=x0.device).manual_seed(seed)
    on = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    out = {}
    with model.ema_weights():
        for lam in logsnrs:
            logsnr = torch.full((x0.shape[0],), float(lam), device=x0.device)
            z = q_sample(x0, logsnr, torch.randn(x0.shape, generator=g, device=x0.device))
            mse = []
            for cond in (x, x.roll(1, dims=0)):
                x0_hat = predict_x0_eps(model.denoise(cond, z, logsnr, rays, on), z, logsnr, model.prediction)[0]
                mse.append(float((x0_hat.clamp(-1, 1) - x0).pow(2).mean()))
            out[float(lam)] = (mse[0], mse[1])
    return out


@dataclass
class AttentionStats:
    """One cross-attention block, target-frame queries over conditioning-frame keys (means over the batch,
    heads and queries)."""

    block: int
    resolution: int
    entropy: float  # nats
    uniform_entropy: float  # log(number of keys)
    object_mass_inside: float  # attention on the conditioning object, queries inside the target's object
    object_mass_outside: float  # same, queries on the target's background
    object_share: float  # the conditioning object's share of the keys (what uniform attention gives)


@torch.no_grad()
def cross_attention_stats(model: ThreeDiM, context: Views, target: Views, logsnr: float = -4.0, seed: int = 0) -> list[AttentionStats]:
    """Attention statistics of every cross-attention block for the denoising step at ``logsnr``."""
    x, x0, rays = _pair(context, target, model)
    inputs: list[Tensor] = []
    blocks = [m for m in model.denoiser.modules() if isinstance(m, AttnBlock) and m.kind == "cross"]
    hooks = [b.register_forward_hook(lambda mod, args, out: inputs.append(args[0])) for b in blocks]
    g = torch.Generator(device=x0.device).manual_seed(seed)
    lam = torch.full((x0.shape[0],), float(logsnr), device=x0.device)
    z = q_sample(x0, lam, torch.randn(x0.shape, generator=g, device=x0.device))
    try:
        with model.ema_weights():
            model.denoise(x, z, lam, rays, torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device))
            fg_cond, fg_target = foreground(context), foreground(target)
            stats = [_block_stats(i, b, h, fg_cond, fg_target) for i, (b, h) in enumerate(zip(blocks, inputs))]
    finally:
        for h in hooks:
            h.remove()
    return stats


def _block_stats(i: int, block: AttnBlock, x: Tensor, fg_cond: Tensor, fg_target: Tensor) -> AttentionStats:
    B, H, W = x.shape[0] // 2, x.shape[-2], x.shape[-1]
    q, k, _ = (t.float().unflatten(0, (B, 2))[:, 1] for t in block.project(x))  # target frame: its queries, frame 0's keys
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, heads, HW, HW]
    obj_c = F.adaptive_avg_pool2d(fg_cond, (H, W)).flatten(1) > 0.5  # [B, HW]
    obj_t = F.adaptive_avg_pool2d(fg_target, (H, W)).flatten(1) > 0.5
    mass = (attn * obj_c[:, None, None, :]).sum(-1)  # [B, heads, HW]
    inside = obj_t[:, None, :].expand_as(mass)
    mean = lambda t: float(t.mean()) if t.numel() else float("nan")  # noqa: E731
    return AttentionStats(
        block=i,
        resolution=H,
        entropy=float(-(attn * attn.clamp_min(1e-12).log()).sum(-1).mean()),
        uniform_entropy=math.log(H * W),
        object_mass_inside=mean(mass[inside]),
        object_mass_outside=mean(mass[~inside]),
        object_share=float(obj_c.float().mean()),
    )


def main(argv: list[str] | None = None) -> None:
    from genvs.data import EvalProtocol, SRNDataModule

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--root", default="data/toy_cars", help="dataset in SRN layout")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--input_view", type=int, default=6)
    p.add_argument("--num_scenes", type=int, default=8)
    a = p.parse_args(argv)
    model = ThreeDiM.load_from_checkpoint(a.checkpoint, map_location="cpu").eval()
    protocol = EvalProtocol(input_views=[a.input_view], num_scenes=a.num_scenes, num_targets=1)
    dm = SRNDataModule(root=a.root, image_size=model.denoiser.image_size, num_workers=0, eval_batch_size=a.num_scenes,
                       val_protocol=protocol, test_protocol=protocol)
    dm.setup("validate" if a.split == "val" else "test")
    loader = dm.val_dataloader() if a.split == "val" else dm.test_dataloader()
    context, target = next(iter(loader)).split()
    print("| logSNR | x0 MSE, right input view | x0 MSE, another object's view |\n|---|---|---|")
    for lam, (right, other) in conditioning_gain(model, context, target).items():
        print(f"| {lam:g} | {right:.4f} | {other:.4f} |")
    print("\n| block | px | entropy (uniform) | mass on input object: queries in / out of target object | object share |")
    print("|---|---|---|---|---|")
    for s in cross_attention_stats(model, context, target):
        print(f"| {s.block} | {s.resolution} | {s.entropy:.2f} ({s.uniform_entropy:.2f}) | "
              f"{s.object_mass_inside:.2f} / {s.object_mass_outside:.2f} | {s.object_share:.2f} |")


if __name__ == "__main__":
    main()
