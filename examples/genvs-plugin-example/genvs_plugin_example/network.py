"""TinyUNet: the denoiser of TinyDiff. A plain ``nn.Module``: no Lightning, no training logic.

Per pixel it sees the noisy target view, the clean context view, and NeRF-style encodings of the rays of
both cameras (computed by `genvs.core.cameras.ray_posenc`); the noise level enters every residual block
through FiLM. ``cond_mask`` drops the context (image and rays) per example, for classifier-free guidance.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from genvs.core.cameras import ray_posenc, ray_posenc_channels
from genvs.core.config import Configurable

__all__ = ["TinyUNet", "noise_level_embedding"]


def noise_level_embedding(logsnr: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of the noise level ``t = 2/pi atan(exp(-logsnr/2))`` in [0, 1]."""
    t = 2.0 / math.pi * torch.atan(torch.exp(-logsnr.float().clamp(-20, 20) / 2))
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = 1000 * t[:, None] * freqs
    return torch.cat([args.sin(), args.cos()], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> FiLM(GN) -> SiLU -> conv (zero-init), plus a (1x1) skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class TinyUNet(Configurable, nn.Module):
    """A small conditional UNet.

    Args:
        ch: channels at full resolution.
        ch_mult: channel multiplier per resolution (one 2x downsampling between levels).
        num_res_blocks: residual blocks per level.
        emb_ch: width of the noise-level embedding.
        origin_octaves, dir_octaves: frequencies of the ray origin / direction encodings.
    """

    def __init__(
        self,
        ch: int = 32,
        ch_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        emb_ch: int = 128,
        origin_octaves: int = 6,
        dir_octaves: int = 4,
    ):
        super().__init__()
        self.origin_octaves, self.dir_octaves = origin_octaves, dir_octaves
        pose_ch = 2 * ray_posenc_channels(origin_octaves, dir_octaves)  # context camera + target camera
        self.ch = ch
        self.emb = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(3 + 3, ch, 3, padding=1)  # noisy target | clean context
        self.pose_in = nn.Conv2d(pose_ch, ch, 1)
        widths = [ch * m for m in ch_mult]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, c = [ch], ch
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, w, emb_ch))
                c = w
                skips.append(c)
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = ResBlock(c, c, emb_ch)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), w, emb_ch))
                c = w
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.levels, self.blocks = len(widths), num_res_blocks

    def ray_encoding(self, K: Tensor, c2w: Tensor, H: int, W: int) -> Tensor:
        """``K [..., 3, 3]``, ``c2w [..., 4, 4]`` -> per-pixel ray encodings ``[..., H, W, P]``."""
        return ray_posenc(K, c2w, H, W, self.origin_octaves, self.dir_octaves)

    def forward(self, z: Tensor, context: Tensor, rays: Tensor, logsnr: Tensor, cond_mask: Tensor | None = None) -> Tensor:
        """Prediction for the noisy target ``z [B, 3, H, W]``.

        Args:
            context: the clean context view ``[B, 3, H, W]``.
            rays: ray encodings of (context camera, target camera) ``[B, 2, H, W, P]``.
            logsnr: noise level of ``z`` ``[B]``.
            cond_mask: ``[B]`` bool, False drops the context image and both cameras (unconditional).
        """
        pose = rays.permute(0, 1, 4, 2, 3).flatten(1, 2).to(z.dtype)  # [B, 2P, H, W]
        if cond_mask is not None:
            keep = cond_mask.view(-1, 1, 1, 1).to(z.dtype)
            context, pose = context * keep, pose * keep
        emb = self.emb(noise_level_embedding(logsnr, self.ch))
        h = self.conv_in(torch.cat([z, context], dim=1)) + self.pose_in(pose)
        hs = [h]
        for i in range(self.levels):
            for block in self.down[i * self.blocks : (i + 1) * self.blocks]:
                h = block(h, emb)
                hs.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid(h, emb)
        for i in range(self.levels):
            for block in self.up[i * (self.blocks + 1) : (i + 1) * (self.blocks + 1)]:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < self.levels - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.out(h)
