"""pixelNeRF-style scene representation used by DFM: image encoders, the `Scene`, the pixel-aligned field.

A *scene* is a set of views, each with a feature map, a camera and a diffusion time: the clean context
views (``t = 0``) and, inside the denoiser, the noisy target view (``t > 0``, always the **last** view).
A 3D point is projected into every view, features are fetched there with ``grid_sample``, and a residual
MLP conditioned on each view's diffusion time turns (positional encoding of the point in that camera's
frame, feature) into a hidden vector; the per-view vectors are averaged mid-network (block 3 of 5) and
the rest of the MLP outputs density, colour and (optionally) extra features to render.

Two image encoders share one interface, ``encoder(x [N, C, H, W], t [N], target: bool, c2w [N, 4, 4] | None)
-> [N, F, h, w]`` (``c2w``: the view's camera, used by DiT's optional absolute-pose conditioning):

- `DiTEncoder`: what the official DFM code trains (``model_type: dit``): a 7x7 stride-2 conv stem (one
  per input kind: 3 channels for context images, ``7 + cond_features`` for the target), a DiT (adaLN-Zero
  transformer, patch 2) conditioned on the diffusion time (and, with ``abs_pose``, on the camera pose as
  the official CO3D model), and a full-resolution skip branch on the RGB.
- `TimmEncoder`: pixelNeRF's encoder on any timm CNN: multi-scale features (ResNet34: conv1, layer1..3,
  512 channels) upsampled to the first level's resolution and concatenated; diffusion time enters by
  FiLM on every returned level, the target's extra channels through a zero-initialised parallel stem.

Times are continuous ``t in [0, 1]`` (0 = clean); networks embed ``t * time_scale`` (1000 by default, the
integer-timestep range the official code embeds).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from genvs.core.attention import attention
from genvs.core.cameras import posenc_nerf
from genvs.core.geometry import pixels_to_grid, project_points, transform_points, world_to_camera

__all__ = [
    "Scene",
    "timestep_embedding",
    "TimeEmbedding",
    "DiTEncoder",
    "TimmEncoder",
    "build_encoder",
    "harmonic_embedding",
    "PixelNeRFField",
]


# ----------------------------------------------------------------------------------------------
# Scene
# ----------------------------------------------------------------------------------------------
@dataclass
class Scene:
    """Encoded views that define a radiance field (no diffusion needed to render it).

    feats ``[B, N, F, h, w]`` feature maps; ``K [B, N, 3, 3]`` intrinsics in pixels of images of
    ``image_size = (H, W)`` (the feature maps may be smaller: sampling uses normalised coordinates);
    ``c2w [B, N, 4, 4]`` OpenCV; ``t [B, N]`` diffusion time of each view (0 = clean).
    """

    feats: Tensor
    K: Tensor
    c2w: Tensor
    t: Tensor
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        B, N = self.feats.shape[:2]
        if self.feats.ndim != 5:
            raise ValueError(f"Scene.feats must be [B, N, F, h, w], got {list(self.feats.shape)}")
        for name, shape in (("K", (B, N, 3, 3)), ("c2w", (B, N, 4, 4)), ("t", (B, N))):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"Scene.{name} must be {list(shape)}, got {list(getattr(self, name).shape)}")

    @property
    def B(self) -> int:
        return self.feats.shape[0]

    @property
    def N(self) -> int:
        return self.feats.shape[1]

    def append(self, other: "Scene") -> "Scene":
        """Views of ``other`` added after this scene's views (same scenes, same image size)."""
        if tuple(other.image_size) != tuple(self.image_size):
            raise ValueError(f"cannot join scenes of image size {self.image_size} and {other.image_size}")
        return Scene(
            torch.cat([self.feats, other.feats.to(self.feats.dtype)], 1),
            torch.cat([self.K, other.K], 1),
            torch.cat([self.c2w, other.c2w], 1),
            torch.cat([self.t, other.t], 1),
            self.image_size,
        )

    @staticmethod
    def cat_batch(scenes: list["Scene"]) -> "Scene":
        """Concatenate scenes along the batch dimension (e.g. conditional + unconditional for CFG)."""
        f = lambda n: torch.cat([getattr(s, n) for s in scenes], 0)  # noqa: E731
        return Scene(f("feats"), f("K"), f("c2w"), f("t"), scenes[0].image_size)

    def batch(self, idx: slice | Tensor) -> "Scene":
        return Scene(self.feats[idx], self.K[idx], self.c2w[idx], self.t[idx], self.image_size)

    def detach(self) -> "Scene":
        return dataclasses.replace(self, feats=self.feats.detach())


# ----------------------------------------------------------------------------------------------
# Time embeddings
# ----------------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[N] -> [N, dim]`` (``cos | sin`` halves, as GLIDE/DiT); ``t`` may be fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeEmbedding(nn.Module):
    """``t in [0, 1]`` -> ``[N, out_dim]``: sinusoid of ``t * time_scale`` then Linear-act-Linear."""

    def __init__(self, out_dim: int, freq_dim: int = 256, time_scale: float = 1000.0, act: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), act(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t.reshape(-1) * self.time_scale, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype)).reshape(*t.shape, -1)


# ----------------------------------------------------------------------------------------------
# DiT encoder (the official DFM image network)
# ----------------------------------------------------------------------------------------------
def sincos_pos_embed_2d(dim: int, h: int, w: int, device=None) -> Tensor:
    """Fixed 2D sin-cos position embedding ``[h * w, dim]`` (MAE/DiT): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"DiT hidden_size={dim} must be divisible by 4 for the 2D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64), torch.arange(w, device=device, dtype=torch.float64),
        indexing="ij",
    )
    ax = xs.reshape(-1, 1) * omega
    ay = ys.reshape(-1, 1) * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1).float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie); attention through SDPA."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"DiT hidden_size={hidden} must be divisible by num_heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x [N, L, D], c [N, D]
        N, L, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v).transpose(1, 2).reshape(N, L, D)
        x = x + gate1 * self.proj(a)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


def harmonic_embedding(x: Tensor, n_freqs: int = 6) -> Tensor:
    """``[N, D] -> [N, D * (2 n_freqs + 1)]``: ``sin(2^k x)``, ``cos(2^k x)`` for ``k < n_freqs``, then ``x``
    (PyTorch3D's ``HarmonicEmbedding`` defaults, which the official DFM pose conditioning uses)."""
    freqs = 2.0 ** torch.arange(n_freqs, device=x.device, dtype=torch.float32)
    e = (x.float()[..., None] * freqs).flatten(-2)
    return torch.cat([e.sin(), e.cos(), x.float()], dim=-1)


class DiTEncoder(nn.Module):
    """DFM's image network: conv stem -> DiT on the diffusion time -> per-pixel features.

    Input ``[N, C, H, W]`` with ``C = 3`` (context, ``target=False``) or ``in_channels_target`` (the noisy
    target with the rendered conditioning). Output ``[N, out_channels, H, W]`` when ``high_res`` (the
    official setting: DiT features at half resolution upsampled and fused with a full-resolution conv of
    the RGB channels by a zero-initialised 3x3 conv), else ``[N, out_channels, H/2, W/2]``.
    ``H`` and ``W`` must be divisible by ``2 * patch_size``. Official size (DiT-XL/2): hidden 1152,
    depth 28, 16 heads, 512 output channels, 64 stem channels.

    ``abs_pose`` (official CO3D model, ``use_abs_pose=True``): the top three rows of the view's
    camera-to-world matrix (12 numbers) are harmonically embedded (6 frequencies: 156 values), mapped by an
    MLP to the hidden size and fused with the time embedding by a second MLP; the result conditions every
    block in place of the time embedding alone.

    Under FSDP (`genvs.core.distributed.NVSFSDPStrategy`) each DiT block is a unit.
    """

    fsdp_block_types = (DiTBlock,)

    def __init__(
        self,
        in_channels_target: int = 71,
        out_channels: int = 512,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        stem_channels: int = 64,
        high_res: bool = True,
        time_scale: float = 1000.0,
        gradient_checkpointing: bool = False,
        abs_pose: bool = False,
        pose_freqs: int = 6,
    ):
        super().__init__()
        self.in_channels_target, self.out_channels = in_channels_target, out_channels
        self.abs_pose, self.pose_freqs = abs_pose, pose_freqs
        self.patch_size, self.high_res = patch_size, high_res
        self.gradient_checkpointing = gradient_checkpointing
        self.stem_context = nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False)
        self.stem_target = nn.Conv2d(in_channels_target, stem_channels, 7, 2, 3, bias=False)
        self.patch_embed = nn.Conv2d(stem_channels, hidden_size, patch_size, patch_size)
        self.t_embed = TimeEmbedding(hidden_size, 256, time_scale)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if high_res:
            self.skip = nn.Conv2d(3, stem_channels, 7, 1, 3)
            self.refine = nn.Conv2d(out_channels + stem_channels, out_channels, 3, 1, 1)
        if abs_pose:
            d_pose = 12 * (2 * pose_freqs + 1)
            self.pose_mlp = nn.Sequential(nn.Linear(d_pose, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size))
            self.fuse_mlp = nn.Sequential(
                nn.Linear(2 * hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, hidden_size)
            )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for b in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(b.ada[-1].weight)
            nn.init.zeros_(b.ada[-1].bias)
        if self.high_res:  # as the official code: the fused features start at zero
            nn.init.zeros_(self.refine.weight)
            nn.init.zeros_(self.refine.bias)

    @property
    def stride(self) -> int:
        return 1 if self.high_res else 2

    def forward(self, x: Tensor, t: Tensor, target: bool = False, c2w: Tensor | None = None) -> Tensor:
        N, C, H, W = x.shape
        want = self.in_channels_target if target else 3
        if C != want:
            kind = "target" if target else "context"
            raise ValueError(f"DiTEncoder: {kind} input must have {want} channels, got {C}")
        m = 2 * self.patch_size
        if H % m or W % m:
            raise ValueError(f"DiTEncoder: image size {H}x{W} must be divisible by 2 * patch_size = {m}")
        h = F.relu((self.stem_target if target else self.stem_context)(x))  # [N, S, H/2, W/2]
        tok = self.patch_embed(h)  # [N, D, h', w']
        hp, wp = tok.shape[-2:]
        tok = tok.flatten(2).transpose(1, 2)  # [N, L, D]
        tok = tok + sincos_pos_embed_2d(tok.shape[-1], hp, wp, device=x.device).to(tok.dtype)
        c = self.t_embed(t.expand(N))  # [N, D]
        if self.abs_pose:
            if c2w is None or c2w.shape != (N, 4, 4):
                raise ValueError(f"DiTEncoder(abs_pose=True) needs the views' cameras c2w [N={N}, 4, 4]")
            pose = self.pose_mlp(harmonic_embedding(c2w[:, :3, :].reshape(N, 12), self.pose_freqs).to(c.dtype))
            c = self.fuse_mlp(torch.cat([c, pose], dim=-1))
        for blk in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tok = checkpoint(blk, tok, c, use_reentrant=False)
            else:
                tok = blk(tok, c)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        out = self.final_linear(_modulate(self.final_norm(tok), shift, scale))  # [N, L, p*p*F]
        p, Fo = self.patch_size, self.out_channels
        out = out.view(N, hp, wp, p, p, Fo).permute(0, 5, 1, 3, 2, 4).reshape(N, Fo, hp * p, wp * p)
        if not self.high_res:
            return out
        out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
        skip = self.skip(x[:, :3])
        return self.refine(torch.cat([out, skip.to(out.dtype)], dim=1))


# ----------------------------------------------------------------------------------------------
# timm encoder (pixelNeRF's multi-scale CNN features)
# ----------------------------------------------------------------------------------------------
class TimmEncoder(nn.Module):
    """pixelNeRF's spatial encoder on a timm CNN, with diffusion-time FiLM and a target stem.

    ``backbone`` is any timm model name that supports ``features_only`` (pixelNeRF: ``resnet34``, levels
    ``(0, 1, 2, 3)`` = conv1, layer1, layer2, layer3 -> 64 + 64 + 128 + 256 = 512 channels). Levels are
    upsampled (bilinear) to the first level's resolution (H/2) and concatenated; ``out_channels`` adds a
    1x1 projection when it differs from that sum. ``skip_first_pool`` removes the stem max-pool
    (DFM's ``use_first_pool: false``). ``backbone_kwargs`` go to ``timm.create_model`` (tiny test nets).

    ``pretrained`` is a *local* weight file (``.pth``/``.bin``/``.safetensors`` holding the backbone's
    ``state_dict``); it is never downloaded. Diffusion time modulates every returned level with a
    zero-initialised FiLM, and the target's extra input channels (rendered RGB, depth, features) enter
    through a zero-initialised conv parallel to the backbone's first conv, so a pretrained backbone
    starts out computing exactly its pretrained features.
    """

    def __init__(
        self,
        backbone: str = "resnet34",
        pretrained: str | None = None,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        in_channels_target: int = 71,
        out_channels: int | None = None,
        skip_first_pool: bool = True,
        time_dim: int = 256,
        time_scale: float = 1000.0,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        import timm

        kwargs = dict(backbone_kwargs or {})
        if pretrained:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"TimmEncoder: pretrained weights for {backbone!r} not found at {path}. genvs never downloads "
                    f"weights: on a machine with internet run `timm.create_model({backbone!r}, pretrained=True)` and "
                    f"save its state_dict there (torch.save(model.state_dict(), {str(path)!r})), or pass "
                    f"pretrained=None to train from scratch."
                )
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
        self.backbone = timm.create_model(
            backbone, pretrained=bool(pretrained), features_only=True, out_indices=tuple(out_indices), **kwargs
        )
        if skip_first_pool and isinstance(getattr(self.backbone, "maxpool", None), nn.Module):
            self.backbone.maxpool = nn.Identity()
        self.in_channels_target = in_channels_target
        chans = list(self.backbone.feature_info.channels())
        names = list(self.backbone.feature_info.module_name())

        first_conv = next(m for m in self.backbone.modules() if isinstance(m, nn.Conv2d))
        if first_conv.in_channels != 3:
            raise ValueError(f"TimmEncoder: backbone {backbone!r} must take 3-channel input")
        self.extra_stem = None
        if in_channels_target > 3:
            self.extra_stem = nn.Conv2d(
                in_channels_target - 3, first_conv.out_channels, first_conv.kernel_size, first_conv.stride,
                first_conv.padding, bias=False,
            )
            nn.init.zeros_(self.extra_stem.weight)
            first_conv.register_forward_hook(self._add_extra_hook)

        self.t_embed = TimeEmbedding(time_dim, time_dim, time_scale)
        self.film = nn.ModuleList([nn.Linear(time_dim, 2 * c) for c in chans])
        for i, (lin, name) in enumerate(zip(self.film, names)):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
            self.backbone.get_submodule(name).register_forward_hook(functools.partial(self._film_hook, i))

        total = sum(chans)
        self.proj = nn.Conv2d(total, out_channels, 1) if out_channels and out_channels != total else None
        self.out_channels = out_channels or total
        self._extra: Tensor | None = None
        self._temb: Tensor | None = None

    stride = 2

    def _add_extra_hook(self, module, inputs, output):
        return output if self._extra is None else output + self._extra.to(output.dtype)

    def _film_hook(self, i: int, module, inputs, output):
        if self._temb is None:
            return output
        scale, shift = self.film[i](self._temb).to(output.dtype)[:, :, None, None].chunk(2, dim=1)
        return output * (1 + scale) + shift

    def forward(self, x: Tensor, t: Tensor, target: bool = False, c2w: Tensor | None = None) -> Tensor:
        """``c2w`` is accepted for interface compatibility and ignored (no pose conditioning)."""
        want = self.in_channels_target if target else 3
        if x.shape[1] != want:
            kind = "target" if target else "context"
            raise ValueError(f"TimmEncoder: {kind} input must have {want} channels, got {x.shape[1]}")
        self._extra = self.extra_stem(x[:, 3:]) if (target and self.extra_stem is not None) else None
        self._temb = self.t_embed(t.expand(x.shape[0]))
        try:
            feats = self.backbone(x[:, :3])
        finally:
            self._extra = self._temb = None
        size = feats[0].shape[-2:]
        feats = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        out = torch.cat(feats, dim=1)
        return self.proj(out) if self.proj is not None else out


def build_encoder(kind: Literal["dit", "timm"], in_channels_target: int, out_channels: int, **kwargs) -> nn.Module:
    """``"dit"`` -> `DiTEncoder` (official DFM), ``"timm"`` -> `TimmEncoder` (pixelNeRF)."""
    if kind == "dit":
        return DiTEncoder(in_channels_target=in_channels_target, out_channels=out_channels, **kwargs)
    if kind == "timm":
        return TimmEncoder(in_channels_target=in_channels_target, out_channels=out_channels, **kwargs)
    raise ValueError(f"encoder={kind!r}: use 'dit' (DFM's DiT) or 'timm' (pixelNeRF's CNN features)")


# ----------------------------------------------------------------------------------------------
# Pixel-aligned radiance field
# ----------------------------------------------------------------------------------------------
class ResBlockFC(nn.Module):
    """``x + fc1(relu(FiLM_t(fc0(relu(x)))))`` with ``fc1`` zero-initialised (DVR/pixelNeRF + time)."""

    def __init__(self, dim: int, time_dim: int):
        super().__init__()
        self.fc0 = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, dim)
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * dim))
        nn.init.kaiming_normal_(self.fc0.weight, a=0, mode="fan_in")
        nn.init.zeros_(self.fc0.bias)
        nn.init.zeros_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # x [..., P, D], temb [..., 1, T]
        h = self.fc0(F.relu(x))
        scale, shift = self.time(temb).chunk(2, dim=-1)
        h = h * (1 + scale) + shift
        return x + self.fc1(F.relu(h))


class PixelNeRFField(nn.Module):
    """Radiance field of a `Scene`: ``(scene, points [B, P, 3]) -> sigma [B, P], rgb [B, P, 3], feats [B, P, F]``.

    Each point is projected into every view (`project_points`), the view's features are fetched with
    ``grid_sample`` (bilinear, border padding), and its camera-space coordinates are encoded NeRF-style
    (6 octaves, frequency factor 1.5: 39 channels). A 5-block residual MLP (512 wide) with per-view
    diffusion-time FiLM runs per view up to ``combine_layer`` (3), where the views are averaged; the
    remaining blocks see the time of the last view (the noisy target inside the denoiser).

    ``feature_injection="input"`` feeds the features once, at the input layer (the official DFM code:
    ``lin_in(cat(posenc, feat))``); ``"blocks"`` adds a projection of them before every block up to
    ``combine_layer`` (pixelNeRF). ``rgb`` is in ``[-1, 1]`` (``2 sigmoid - 1``), ``sigma >= 0`` (ReLU),
    ``feats`` are the ``n_feats_out`` raw extra outputs DFM renders for conditioning.
    """

    def __init__(
        self,
        feat_dim: int = 512,
        hidden: int = 512,
        n_blocks: int = 5,
        combine_layer: int = 3,
        n_feats_out: int = 64,
        num_freqs: int = 6,
        freq_factor: float = 1.5,
        feature_injection: Literal["input", "blocks"] = "input",
        time_scale: float = 1000.0,
        padding_mode: Literal["border", "zeros", "reflection"] = "border",
    ):
        super().__init__()
        if not 1 <= combine_layer:
            raise ValueError(f"combine_layer={combine_layer} must be >= 1 (views are averaged before that block)")
        if feature_injection not in ("input", "blocks"):
            raise ValueError(f"feature_injection={feature_injection!r}: use 'input' (DFM) or 'blocks' (pixelNeRF)")
        self.feat_dim, self.hidden, self.n_blocks = feat_dim, hidden, n_blocks
        self.combine_layer, self.n_feats_out = combine_layer, n_feats_out
        self.num_freqs, self.freq_factor = num_freqs, freq_factor
        self.feature_injection, self.time_scale, self.padding_mode = feature_injection, time_scale, padding_mode
        d_pe = 3 * (1 + 2 * num_freqs)
        self.lin_pe = nn.Linear(d_pe, hidden)
        n_inject = 1 if feature_injection == "input" else max(1, min(combine_layer, n_blocks))
        # lin_pe(pe) + lin_z[0](f) is DFM's lin_in(cat(pe, f)) without materialising the concatenation
        self.lin_z = nn.ModuleList([nn.Linear(feat_dim, hidden, bias=False) for _ in range(n_inject)])
        time_dim = 4 * hidden
        self.time_mlp = nn.Sequential(nn.Linear(hidden, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
        self.blocks = nn.ModuleList([ResBlockFC(hidden, time_dim) for _ in range(n_blocks)])
        self.lin_out = nn.Linear(hidden, 4 + n_feats_out)
        for lin in [self.lin_pe, *self.lin_z, self.lin_out]:
            nn.init.kaiming_normal_(lin.weight, a=0, mode="fan_in")
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def sample_features(self, scene: Scene, points: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[B, N, P, F]`` and camera-frame coordinates ``[B, N, P, 3]`` of ``points [B, P, 3]``."""
        B, N = scene.B, scene.N
        P = points.shape[1]
        pts = points[:, None].expand(B, N, P, 3)
        uv, _ = project_points(pts, scene.K, scene.c2w)  # [B, N, P, 2]
        p_cam = transform_points(world_to_camera(scene.c2w), pts)  # [B, N, P, 3]
        H, W = scene.image_size
        grid = pixels_to_grid(uv, H, W).flatten(0, 1)[:, :, None]  # [B*N, P, 1, 2]
        fmap = scene.feats.flatten(0, 1)  # [B*N, F, h, w]
        f = F.grid_sample(
            fmap, grid.to(fmap.dtype), mode="bilinear", padding_mode=self.padding_mode, align_corners=False
        )
        f = f[..., 0].transpose(1, 2).unflatten(0, (B, N))  # [B, N, P, F]
        return f, p_cam

    def forward(self, scene: Scene, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if scene.feats.shape[2] != self.feat_dim:
            raise ValueError(
                f"PixelNeRFField expects {self.feat_dim}-channel features, the scene has {scene.feats.shape[2]}"
            )
        f, p_cam = self.sample_features(scene, points)
        pe = posenc_nerf(p_cam * self.freq_factor, 0, self.num_freqs)  # [B, N, P, 39]
        temb = timestep_embedding(scene.t.reshape(-1) * self.time_scale, self.hidden)
        temb = self.time_mlp(temb.to(self.lin_pe.weight.dtype)).unflatten(0, scene.t.shape)[:, :, None]  # [B, N, 1, T]
        x = self.lin_pe(pe.to(self.lin_pe.weight.dtype))
        f = f.to(x.dtype)
        for i in range(self.n_blocks):
            if i == self.combine_layer:
                x = x.mean(dim=1)  # [B, P, D]: average over views
                temb = temb[:, -1]  # the last view's (noisy target's) time from here on
            if i < len(self.lin_z):  # one injection ("input") or one per block before the average ("blocks")
                x = x + self.lin_z[i](f)
            x = self.blocks[i](x, temb)
        if self.combine_layer >= self.n_blocks:
            x = x.mean(dim=1)
        out = self.lin_out(F.relu(x)).float()
        rgb = torch.sigmoid(out[..., :3]) * 2 - 1
        sigma = F.relu(out[..., 3])
        return sigma, rgb, out[..., 4:]
