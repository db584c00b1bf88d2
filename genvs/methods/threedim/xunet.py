"""X-UNet of 3DiM (Watson et al. 2022, appendix code), in plain PyTorch.

Two frames go through the same weights: frame 0 is the clean conditioning view, frame 1 the noisy
target. Internally the frames are folded into the batch (``[B * 2, C, H, W]``, frame-interleaved) so
every convolution, norm and FiLM layer is literally shared; attention unfolds them to attend within a
frame (self) and to the other frame (cross).

Conditioning of every residual block is per-pixel FiLM driven by ``emb = logsnr_emb + pose_emb[level]``:

- ``logsnr_emb``: each frame's logSNR, clipped to [-20, 20], mapped to ``t' = 2 arctan(exp(-logsnr/2)) / pi``
  in [0, 1] and embedded sinusoidally as ``1000 t'`` (never the raw logSNR), then a 2-layer MLP;
- ``pose_emb``: the per-pixel ray encoding (origin 15 octaves + direction 8 octaves, raw values
  included: 144 channels) plus a learned ``(H, W, 144)`` position embedding and a learned per-frame
  vector, mapped to ``emb_ch`` at each UNet resolution by a strided 3x3 conv.

Residual block: GN -> swish -> conv3x3 -> FiLM(GN(h)) -> swish -> dropout -> conv3x3 (zero-init),
1x1 skip when channels change, ``(h + skip) / sqrt(2)``, resampling after the sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from genvs.core.attention import attention
from genvs.core.cameras import ray_posenc_channels
from genvs.core.config import Configurable

__all__ = ["XUNet", "logsnr_embedding_input"]


def _groups(ch: int) -> int:
    """GroupNorm groups: the paper's 32, or fewer so that every group keeps at least 8 channels.

    The paper's smallest width is 256 channels (8 per group). Scaled-down models keep that group size:
    32 groups of 32 or 64 channels would make each norm a per-channel instance norm, which removes every
    channel's spatial mean, so a uniform cross-attention (the first thing it learns) carries nothing
    from the other frame.
    """
    return math.gcd(32, max(1, ch // 8))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    module.zero_init = True
    return module


def _lecun_init(root: nn.Module) -> None:
    """Flax's default initialisation, as in the paper's code: LeCun-normal kernels (variance
    1 / fan_in, truncated at 2 standard deviations) and zero biases, except for the zero-initialised
    output layers. (PyTorch's default has a third of that variance and random biases.)"""
    for m in root.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not getattr(m, "zero_init", False):
            fan_in = m.weight[0].numel()
            std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of the truncated unit normal
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def logsnr_embedding_input(logsnr: Tensor) -> Tensor:
    """``t' = 2 arctan(exp(-logsnr / 2)) / pi`` in [0, 1] of the logSNR clipped to [-20, 20]."""
    return 2.0 * torch.atan(torch.exp(-logsnr.float().clamp(-20, 20) / 2)) / math.pi


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """DDPM/transformer sinusoidal embedding ``[..., dim]`` of ``t`` (already scaled by 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[..., None] * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def interleave_frames(cond: Tensor, target: Tensor) -> Tensor:
    """``[N, C, H, W]`` tensors of the conditioning and target frames -> ``[2N, C, H, W]`` in the X-UNet's frame
    order (scene 0's conditioning frame, its target frame, scene 1's, ...), channels_last when the inputs are
    laid out channels-last, expanded ones included (``torch.stack(..., 1).flatten(0, 1)`` returns them contiguous)."""
    if cond.dim() == 4 and cond.stride(1) == 1 and cond.shape[2] * cond.shape[3] > 1:
        return torch.stack([cond.permute(0, 2, 3, 1), target.permute(0, 2, 3, 1)], 1).flatten(0, 1).permute(0, 3, 1, 2)
    return torch.stack([cond, target], 1).flatten(0, 1)


class FiLM(nn.Module):
    """``h * (1 + scale) + shift`` with per-pixel ``(scale, shift) = Linear(swish(emb))``."""

    def __init__(self, emb_ch: int, features: int):
        super().__init__()
        self.proj = nn.Conv2d(emb_ch, 2 * features, 1)

    def forward(self, h: Tensor, emb_act: Tensor) -> Tensor:
        scale, shift = self.proj(emb_act).chunk(2, dim=1)
        return h * (1 + scale) + shift


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, resample: str | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.film = FiLM(emb_ch, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.resample = resample

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(self.film(self.norm2(h), emb_act))  # swish after FiLM (missing in some ports)
        h = self.conv2(self.dropout(h))
        out = (h + self.skip(x)) / math.sqrt(2)
        if self.resample == "down":
            out = F.avg_pool2d(out, 2)
        elif self.resample == "up":
            out = F.interpolate(out, scale_factor=2.0, mode="nearest")
        return out


class AttnBlock(nn.Module):
    """Multi-head attention within a frame (``self``) or to the other frame (``cross``).

    One q/k/v projection serves both frames and both directions; the output projection is
    zero-initialised so the block starts as the identity (up to the 1/sqrt(2) residual scaling).
    """

    def __init__(self, ch: int, heads: int, kind: str):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} must be divisible by attn_heads={heads}")
        self.kind, self.heads = kind, heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.out = _zero(nn.Linear(ch, ch))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries, keys and values ``[B*2, heads, HW, C / heads]`` of frame-interleaved ``x``;
        for ``cross`` the keys and values of each frame come from the other frame."""
        BF, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B*2, HW, C]
        kv = h
        if self.kind == "cross":  # frame 0 reads frame 1 and vice versa
            kv = h.unflatten(0, (BF // 2, 2)).flip(1).flatten(0, 1)
        split = lambda t: t.unflatten(-1, (self.heads, C // self.heads)).transpose(1, 2)  # noqa: E731
        return split(self.q(h)), split(self.k(kv)), split(self.v(kv))

    def forward(self, x: Tensor) -> Tensor:
        BF, C, H, W = x.shape
        a = attention(*self.project(x))  # [B*2, heads, HW, d]
        a = self.out(a.transpose(1, 2).flatten(2))  # [B*2, HW, C]
        a = a.transpose(1, 2).reshape(BF, C, H, W)
        return (a + x) / math.sqrt(2)


class XUNetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, use_attn: bool, heads: int):
        super().__init__()
        self.res = ResnetBlock(in_ch, out_ch, emb_ch, dropout)
        self.attn = nn.Sequential(AttnBlock(out_ch, heads, "self"), AttnBlock(out_ch, heads, "cross")) if use_attn else None

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        h = self.res(x, emb_act)
        return self.attn(h) if self.attn is not None else h


class XUNet(Configurable, nn.Module):
    """3DiM's X-UNet.

    Args:
        image_size: H = W of the frames (the learned position embedding is per pixel).
        in_ch: image channels.
        ch, ch_mult, emb_ch, num_res_blocks, attn_resolutions, attn_heads, dropout: as in the paper
            (defaults are the paper's 128x128 model, 461.7M parameters; the paper reports ~471M).
        origin_octaves, dir_octaves: ray encoding octaves (3DiM: 15 and 8 -> 144 channels).
        use_pos_emb, use_ref_pose_emb: learned per-pixel and per-frame pose embeddings.
        gradient_checkpointing: recompute each UNet block in the backward pass instead of storing its
            activations (non-reentrant `torch.utils.checkpoint`; same loss and gradients, about a third
            more compute, far less activation memory: for the 471M model at 128x128 and large batches).

    Under FSDP (`genvs.core.distributed.NVSFSDPStrategy`) the units are the residual and attention blocks
    (``fsdp_block_types``).
    """

    fsdp_block_types = (ResnetBlock, AttnBlock)

    def __init__(
        self,
        image_size: int = 128,
        in_ch: int = 3,
        ch: int = 256,
        ch_mult: tuple[int, ...] = (1, 2, 2, 4),
        emb_ch: int = 1024,
        num_res_blocks: int = 3,
        attn_resolutions: tuple[int, ...] = (8, 16, 32),
        attn_heads: int = 4,
        dropout: float = 0.1,
        origin_octaves: int = 15,
        dir_octaves: int = 8,
        use_pos_emb: bool = True,
        use_ref_pose_emb: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        n_levels = len(ch_mult)
        if image_size % 2 ** (n_levels - 1):
            raise ValueError(f"image_size={image_size} must be divisible by 2**(len(ch_mult)-1)={2 ** (n_levels - 1)}")
        self.image_size, self.in_ch, self.emb_ch = image_size, in_ch, emb_ch
        self.origin_octaves, self.dir_octaves = origin_octaves, dir_octaves
        D = ray_posenc_channels(origin_octaves, dir_octaves)
        self.pose_dim = D

        # conditioning processor
        self.logsnr_mlp = nn.Sequential(nn.Linear(emb_ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.pos_emb = nn.Parameter(torch.randn(D, image_size, image_size) / math.sqrt(D)) if use_pos_emb else None
        self.ref_pose_emb = nn.Parameter(torch.randn(2, D) / math.sqrt(D)) if use_ref_pose_emb else None  # first, other
        self.pose_convs = nn.ModuleList(
            [nn.Conv2d(D, emb_ch, 3, stride=2**i, padding=1) for i in range(n_levels)]
        )

        # UNet
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur, res = ch, image_size
        for i, mult in enumerate(ch_mult):
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(XUNetBlock(cur, ch * mult, emb_ch, dropout, res in attn_resolutions, attn_heads))
                cur = ch * mult
                skip_chs.append(cur)
            if i != n_levels - 1:
                level.append(ResnetBlock(cur, cur, emb_ch, dropout, resample="down"))
                skip_chs.append(cur)
                res //= 2
            self.down.append(level)
        self.mid = XUNetBlock(cur, ch * ch_mult[-1], emb_ch, dropout, res in attn_resolutions, attn_heads)
        cur = ch * ch_mult[-1]
        self.up = nn.ModuleList()
        for i in reversed(range(n_levels)):
            level = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                skip = skip_chs.pop()
                use_attn = res in attn_resolutions  # resolution of the skip, as in the paper's code
                level.append(XUNetBlock(cur + skip, ch * ch_mult[i], emb_ch, dropout, use_attn, attn_heads))
                cur = ch * ch_mult[i]
            if i != 0:
                level.append(ResnetBlock(cur, cur, emb_ch, dropout, resample="up"))
                res *= 2
            self.up.append(level)
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = _zero(nn.Conv2d(cur, in_ch, 3, padding=1))
        self.num_res_blocks = num_res_blocks
        _lecun_init(self)

    def _run_block(self, block: nn.Module, h: Tensor, emb_act: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb_act, use_reentrant=False)
        return block(h, emb_act)

    def frame_pose_embedding(self, rays: Tensor | None, role: int, like: Tensor | None = None) -> list[Tensor]:
        """Per-level pose embeddings ``[N, emb_ch, H_l, W_l]`` of ``N`` frames in one role.

        ``rays [N, H, W, D]`` are ray encodings, or ``None`` for dropped poses (classifier-free
        guidance: only the learned embeddings remain, ``N = 1``); ``role`` 0 is the conditioning frame,
        1 the target frame (they differ by the learned per-frame vector).
        """
        ref = self.ref_pose_emb[role, :, None, None] if self.ref_pose_emb is not None else 0
        pos = self.pos_emb if self.pos_emb is not None else 0
        if rays is None:
            dtype = self.pose_convs[0].weight.dtype
            pe = (torch.zeros(self.pose_dim, self.image_size, self.image_size, dtype=dtype, device=self.pose_convs[0].weight.device) + pos + ref)[None]
        else:
            pe = rays.permute(0, 3, 1, 2) + pos + ref
        pe = pe.contiguous(memory_format=torch.channels_last)
        return [conv(pe) for conv in self.pose_convs]

    def pose_embedding(self, rays: Tensor, cond_mask: Tensor) -> list[Tensor]:
        """Per-level pose embeddings ``[B*2, emb_ch, H_l, W_l]`` from ray encodings ``[B, 2, H, W, D]``.

        ``cond_mask [B]`` False zeroes the ray encodings of both frames (classifier-free guidance).
        """
        B = rays.shape[0]
        pe = rays.permute(0, 1, 4, 2, 3) * cond_mask.view(B, 1, 1, 1, 1).to(rays.dtype)  # [B, 2, D, H, W]
        if self.pos_emb is not None:
            pe = pe + self.pos_emb
        if self.ref_pose_emb is not None:
            pe = pe + self.ref_pose_emb[None, :, :, None, None]
        pe = pe.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        return [conv(pe) for conv in self.pose_convs]

    def forward(
        self,
        x: Tensor,
        z: Tensor,
        logsnr: Tensor,
        rays: Tensor | None,
        cond_mask: Tensor | None = None,
        pose: list[Tensor] | None = None,
    ) -> Tensor:
        """Predict the noise of the target frame.

        Args:
            x: ``[B, C, H, W]`` clean conditioning frame.
            z: ``[B, C, H, W]`` noisy target frame.
            logsnr: ``[B, 2]`` logSNR of (conditioning, target) frames; the clean frame uses +20.
            rays: ``[B, 2, H, W, D]`` ray encodings of (conditioning, target) cameras.
            cond_mask: ``[B]`` bool, False drops the pose conditioning (CFG); default all True.
            pose: precomputed per-level pose embeddings ``[B*2, emb_ch, H_l, W_l]`` (frame-interleaved,
                see `frame_pose_embedding`), used instead of ``rays``/``cond_mask`` by samplers that
                reuse them across denoising steps.
        Returns ``[B, C, H, W]``: the prediction for the target frame.
        """
        B = x.shape[0]
        if cond_mask is None:
            cond_mask = torch.ones(B, dtype=torch.bool, device=x.device)
        t_emb = sinusoidal_embedding(1000 * logsnr_embedding_input(logsnr), self.emb_ch)  # [B, 2, emb]
        logsnr_emb = self.logsnr_mlp(t_emb.to(self.logsnr_mlp[0].weight.dtype)).flatten(0, 1)  # [B*2, emb]
        if pose is None:
            pose = self.pose_embedding(rays, cond_mask)
        # swish(emb) feeds every FiLM of a level: computed once per level, channels_last like every activation
        # (precomputed embeddings may come in contiguous, and each FiLM conv of the level would convert its
        # [B*2, emb_ch, H, W] input again: on a CPU, most of a bf16 sampling step)
        emb_act = [F.silu(p + logsnr_emb[:, :, None, None]).contiguous(memory_format=torch.channels_last) for p in pose]

        h = torch.stack([x, z], dim=1).flatten(0, 1).contiguous(memory_format=torch.channels_last)
        h = self.conv_in(h)
        hs = [h]
        run = self._run_block
        for i, level in enumerate(self.down):
            for j, block in enumerate(level):
                h = run(block, h, emb_act[i])
                hs.append(h)
        h = run(self.mid, h, emb_act[-1])
        for k, level in enumerate(self.up):
            i = len(self.up) - 1 - k
            for j, block in enumerate(level):
                if j <= self.num_res_blocks:
                    h = run(block, torch.cat([h, hs.pop()], dim=1), emb_act[i])
                else:
                    h = run(block, h, emb_act[i])
        assert not hs
        h = h.unflatten(0, (B, 2))[:, 1]  # only the target frame is read out
        return self.conv_out(F.silu(self.norm_out(h)))
