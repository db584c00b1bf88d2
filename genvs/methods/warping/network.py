"""ADM UNet (Dhariwal & Nichol 2021) for RGBD diffusion, and the conditional model's input layout.

The warping method trains two eps-prediction UNets on 4-channel RGBD images (RGB and normalised depth in
[-1, 1]): an unconditional one for the first view, and a conditional one whose input concatenates the
noisy RGBD with the warped condition (10 channels, `conditional_input`). Both are class-conditional with
a null label (``-1``: a zero class embedding) for classifier-free guidance. The conditional model starts
from the unconditional one with zero-initialised weights for the new input channels
(`conditional_from_unconditional`).

Written for genvs (plain torch, SDPA attention, channels_last friendly) rather than on diffusers'
``UNet2DModel``: ADM's null label is an exact zero embedding, its residual/attention output layers are
zero-initialised, and the architecture must be reproducible from a small config so the conditional model
can be derived from the unconditional one; those are simpler to guarantee in ~200 lines of our own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from genvs.core.attention import attention
from genvs.core.config import Configurable
from genvs.core.distributed import BatchRNG, as_batch_rng

__all__ = [
    "ADMUNet",
    "WarpCondition",
    "conditional_input",
    "conditional_from_unconditional",
    "convert_ivid_state_dict",
    "drop_class_labels",
    "RGBD_CHANNELS",
    "CONDITIONAL_IN_CHANNELS",
]

RGBD_CHANNELS = 4
# noisy RGBD (4) | RGB mask (1) | warped RGB (3) | warped depth (1) | depth mask (1), as in the official code
CONDITIONAL_IN_CHANNELS = 10


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """ADM sinusoidal embedding ``[cos, sin]`` of (integer-valued) timesteps ``[B]`` -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under bf16/fp16 autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """GN -> SiLU -> (up/down) -> conv3x3 -> scale-shift GN(emb) -> SiLU -> dropout -> conv3x3 (zero) + skip."""

    def __init__(self, ch: int, emb_ch: int, out_ch: int, dropout: float, groups: int, up: bool = False, down: bool = False):
        super().__init__()
        self.norm1 = GroupNorm32(groups, ch)
        self.conv1 = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2 = GroupNorm32(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)
        self.up, self.down = up, down

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb(F.silu(emb))[..., None, None].to(h.dtype).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Spatial self-attention with ``ch // head_channels`` heads (SDPA), zero-initialised output."""

    def __init__(self, ch: int, head_channels: int, groups: int):
        super().__init__()
        if ch % head_channels:
            raise ValueError(f"attention channels {ch} not divisible by head_channels={head_channels}")
        self.heads = ch // head_channels
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # [B, heads, HW, hc]
        h = attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class _Seq(nn.ModuleList):
    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for m in self:
            x = m(x, emb) if isinstance(m, (ResBlock, Attention)) else m(x)
        return x


class ADMUNet(Configurable, nn.Module):
    """ADM UNet with scale-shift norm, residual up/down-sampling and class conditioning.

    Args:
        in_channels, out_channels: 4 (RGBD) for the unconditional model; 10 in for the conditional one.
        model_channels: base width (256 in the paper's ImageNet-128 models).
        channel_mult: width multipliers per level ((1, 1, 2, 3, 4) at 128 px).
        num_res_blocks: residual blocks per level (2).
        attention_resolutions: feature-map sizes (pixels) with self-attention, relative to ``image_size``.
        image_size: the training resolution the attention placement refers to (128).
        num_head_channels: channels per attention head (64).
        num_classes: class-conditional when set; label ``-1`` is the null label (zero embedding).
        dropout, num_groups: as in ADM (0.0 and 32 for the paper's model).
        gradient_checkpointing: recompute each down/middle/up stage in the backward pass instead of storing
            its activations (non-reentrant `torch.utils.checkpoint`: same loss and gradients, less memory).

    ``forward(x [B, C, H, W], timestep [B], class_labels [B] | None) -> eps [B, out, H, W]``; ``timestep``
    is the integer DDPM step index in ``[0, T)`` (float accepted), ``class_labels=None`` means all null.
    Class labels are range-checked when they are on the CPU (on a GPU the check would synchronise).
    Under FSDP (`genvs.core.distributed.NVSFSDPStrategy`) the units are the residual and attention blocks.
    """

    fsdp_block_types = (ResBlock, Attention)

    def __init__(
        self,
        in_channels: int = RGBD_CHANNELS,
        out_channels: int = RGBD_CHANNELS,
        model_channels: int = 256,
        channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (32, 16, 8),
        image_size: int = 128,
        num_head_channels: int = 64,
        num_classes: int | None = 1000,
        dropout: float = 0.0,
        num_groups: int = 32,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.config = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions),
            image_size=image_size,
            num_head_channels=num_head_channels,
            num_classes=num_classes,
            dropout=dropout,
            num_groups=num_groups,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.in_channels, self.out_channels, self.num_classes = in_channels, out_channels, num_classes
        self.model_channels = model_channels
        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_emb = nn.Embedding(num_classes, emb_ch) if num_classes else None

        def rb(ci, co, **kw):
            return ResBlock(ci, emb_ch, co, dropout, num_groups, **kw)

        def attn(c):
            return Attention(c, num_head_channels, num_groups)

        ch = int(channel_mult[0] * model_channels)
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch]
        res = image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [rb(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if res in attention_resolutions:
                    layers.append(attn(ch))
                self.down.append(_Seq(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(_Seq([rb(ch, ch, down=True)]))
                skips.append(ch)
                res //= 2
        self.mid = _Seq([rb(ch, ch), attn(ch), rb(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [rb(ch + skips.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if res in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(rb(ch, ch, up=True))
                    res *= 2
                self.up.append(_Seq(layers))
        self.out_norm = GroupNorm32(num_groups, ch)
        self.out_conv = _zero(nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"ADMUNet expects {self.in_channels} input channels, got {list(x.shape)}")
        B = x.shape[0]
        t = timestep.reshape(-1).expand(B) if timestep.numel() == 1 else timestep
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.label_emb is not None and class_labels is not None:
            labels = class_labels.long()
            if labels.shape != (B,):
                raise ValueError(f"class_labels must be [B]={B} integers (-1 = null), got {list(labels.shape)}")
            if labels.device.type == "cpu" and ((labels >= self.num_classes).any() or (labels < -1).any()):
                raise ValueError(f"class_labels must lie in [-1, {self.num_classes}) (-1 = null label)")
            cls = self.label_emb(labels.clamp_min(0)) * (labels >= 0)[:, None].to(emb.dtype)
            emb = emb + cls
        h = self.input_conv(x)
        hs = [h]
        run = self._run
        for blk in self.down:
            h = run(blk, h, emb)
            hs.append(h)
        h = run(self.mid, h, emb)
        for blk in self.up:
            h = run(blk, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))

    def _run(self, blk: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, h, emb, use_reentrant=False)
        return blk(h, emb)


def conditional_from_unconditional(uncond: ADMUNet, in_channels: int = CONDITIONAL_IN_CHANNELS) -> ADMUNet:
    """The conditional model initialised from the unconditional one.

    Same architecture with ``in_channels`` inputs; every weight is copied, the input convolution's
    weights for the new channels (everything after the first ``uncond.in_channels``: the condition of
    `conditional_input`) are zero, so at initialisation the conditional model ignores its condition and
    equals the unconditional model.
    """
    if in_channels < uncond.in_channels:
        raise ValueError(f"in_channels={in_channels} must be at least the unconditional model's {uncond.in_channels}")
    cfg = dict(uncond.config, in_channels=in_channels)
    cond = ADMUNet(**cfg)
    like = uncond.input_conv.weight
    if (cond.input_conv.weight.device, cond.input_conv.weight.dtype) != (like.device, like.dtype):
        cond = cond.to(device=like.device, dtype=like.dtype)  # (moving fake tensors fails: only when needed)
    state = {k: v.clone() for k, v in uncond.state_dict().items()}
    w = state["input_conv.weight"]
    new_w = w.new_zeros(w.shape[0], in_channels, *w.shape[2:])
    new_w[:, : w.shape[1]] = w
    state["input_conv.weight"] = new_w
    cond.load_state_dict(state)
    return cond


def drop_class_labels(labels: Tensor, p: float, generator: BatchRNG | torch.Generator | None = None) -> Tensor:
    """Replace each label by the null label ``-1`` with probability ``p`` (classifier-free guidance training).
    ``generator``: a `BatchRNG` (per-example draws independent of the process layout), a generator or ``None``."""
    if p <= 0:
        return labels
    drop = as_batch_rng(generator).rand(*labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, -1), labels)


@dataclass
class WarpCondition:
    """What the conditional model sees of a novel view: the warped RGBD and its masks, ``[B, ., H, W]``.

    ``rgb`` in [-1, 1] and ``depth`` (normalised, see `genvs.methods.warping.depth.normalize_depth`) are
    meaningful where ``mask_rgb`` / ``mask`` are 1; hole values are ignored (`conditional_input` fills them
    with noise). ``depth_convex`` (optional, inference only) is a lower bound on the normalised depth of
    hole pixels (the stretched surfaces of the previous views).
    """

    rgb: Tensor  # [B, 3, H, W]
    depth: Tensor  # [B, 1, H, W]
    mask_rgb: Tensor  # [B, 1, H, W] float {0, 1}
    mask: Tensor  # [B, 1, H, W] float {0, 1}
    depth_convex: Tensor | None = None  # [B, 1, H, W]

    def to(self, *args, **kwargs) -> "WarpCondition":
        f = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        return WarpCondition(f(self.rgb), f(self.depth), f(self.mask_rgb), f(self.mask), f(self.depth_convex))


def conditional_input(z: Tensor, cond: WarpCondition, generator: torch.Generator | None = None) -> Tensor:
    """The conditional model's 10-channel input, in the official layout.

    ``[z_t (4) | mask_rgb (1) | rgb, holes filled with N(0, 1) (3) | depth, holes filled with N(0, 1) (1) | mask (1)]``
    """
    B, _, H, W = z.shape
    noise = torch.randn(B, 4, H, W, generator=generator, device=z.device, dtype=torch.float32).to(z.dtype)
    m_rgb, m = cond.mask_rgb.to(z.dtype), cond.mask.to(z.dtype)
    rgb = cond.rgb.to(z.dtype) * m_rgb + noise[:, :3] * (1 - m_rgb)
    depth = cond.depth.to(z.dtype) * m + noise[:, 3:] * (1 - m)
    return torch.cat([z, m_rgb, rgb, depth, m], dim=1)


# ------------------------------------------------------------------------------- official checkpoints
def convert_ivid_state_dict(state_dict: dict[str, Tensor], num_head_channels: int = 64) -> dict[str, Tensor]:
    """Map an official ivid ``AdmUnet2d`` state dict (e.g. ``imagenet128_uncond.pt``) to `ADMUNet` keys.

    Module paths correspond one to one (``input_blocks.0.0`` is ``input_conv``, ``input_blocks.{i+1}`` is
    ``down.{i}``, ``middle_block`` is ``mid``, ``output_blocks`` is ``up``, ``out.0``/``out.2`` are
    ``out_norm``/``out_conv``); residual blocks rename their layers; attention ``qkv`` weights are
    reordered from the official per-head interleaved ``[q_h, k_h, v_h]`` layout to genvs' ``[q, k, v]``
    blocks and 1-D convolutions become 1x1 2-D ones. Load the official file with
    ``torch.load(path, map_location="cpu", weights_only=True)``.
    """
    res_names = {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "emb",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "skip",
    }
    out: dict[str, Tensor] = {}
    for key, v in state_dict.items():
        parts = key.split(".")
        if parts[0] == "time_embed":
            if parts[1] == "0":  # PosEncoding's frequency buffer: recomputed by genvs
                continue
            out[f"time_embed.{int(parts[1]) - 1}.{parts[2]}"] = v
            continue
        if parts[0] == "label_emb":
            out[key] = v
            continue
        if parts[0] == "out":
            out[{"0": "out_norm", "2": "out_conv"}[parts[1]] + "." + parts[2]] = v
            continue
        if parts[0] == "input_blocks" and parts[1] == "0":
            out["input_conv." + parts[3]] = v
            continue
        if parts[0] == "input_blocks":
            prefix = f"down.{int(parts[1]) - 1}.{parts[2]}"
            rest = parts[3:]
        elif parts[0] == "middle_block":
            prefix, rest = f"mid.{parts[1]}", parts[2:]
        elif parts[0] == "output_blocks":
            prefix, rest = f"up.{parts[1]}.{parts[2]}", parts[3:]
        else:
            raise KeyError(f"unexpected key {key!r} in an ivid AdmUnet2d state dict")
        sub = ".".join(rest[:-1])
        name = rest[-1]
        if sub in res_names:
            out[f"{prefix}.{res_names[sub]}.{name}"] = v
        elif sub in ("norm", "qkv", "proj_out"):
            tgt = {"norm": "norm", "qkv": "qkv", "proj_out": "proj"}[sub]
            if sub == "qkv":
                C3 = v.shape[0]
                C = C3 // 3
                heads = C // num_head_channels
                # official rows: (head, {q,k,v}, c); genvs rows: ({q,k,v}, head, c)
                v = v.reshape(heads, 3, num_head_channels, *v.shape[1:]).transpose(0, 1).reshape(C3, *v.shape[1:])
            if v.ndim == 3:  # Conv1d weight [out, in, 1] -> Conv2d [out, in, 1, 1]
                v = v[..., None]
            out[f"{prefix}.{tgt}.{name}"] = v
        else:
            raise KeyError(f"unexpected key {key!r} in an ivid AdmUnet2d state dict")
    return out
