"""Correspondence-aware attention (CAA): the only trainable part of MVDiffusion.

A CAA block sits after each down block, the mid block and each up block of a frozen diffusers
``UNet2DConditionModel`` (9 blocks for SD-2, at 64/32/16/8 feature resolution for 512 px views). Every
pixel ``s`` of every view attends to keys read (``grid_sample``) around its corresponding locations in
other views, each key carrying a sinusoidal encoding of its geometry (`correspondences`):

    q = W_q LN(F(s) + g(0)),   k_l = W_k LN(F^l(t*_l) + g(pe_l)),   v_l = W_v LN(F^l(t*_l) + g(pe_l))
    F(s) <- F(s) + W_o softmax_l(q . k_l) v_l ;   F(s) <- F(s) + FF(LN(F(s)))   [; + ResBlock (depth model)]

``W_o``, the feed-forward's output layer (and the residual block's last conv) are zero-initialised, so
before training the multi-view UNet equals the base UNet exactly.

The blocks are attached to the UNet with hooks; diffusers' UNet code is untouched:
- a down/up block with a down/upsampler: forward pre-hook on that sampler (CAA runs before it, after
  the block's skip features are taken, as in the official code);
- the last down block, the mid block, the last up block: forward hook on the block output.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from genvs.methods.mvdiffusion.correspondences import Correspondences, LevelCorrespondence

__all__ = [
    "fourier_encoding",
    "CorrespondenceAttention",
    "ConditionEncoder",
    "CAAAdapter",
    "caa_sites",
    "save_adapter",
    "load_adapter",
]


def fourier_encoding(x: Tensor, dim: int, min_log2: float = -3.0, max_log2: float = 3.0) -> Tensor:
    """``[..., D]`` -> ``[..., dim]``: ``sin``/``cos`` of ``pi 2^f x`` for ``dim // (2 D)`` octaves ``f``
    evenly spaced in ``[min_log2, max_log2]`` (zero-padded to ``dim``). With the defaults a unit of ``x``
    (a feature pixel) is resolved from 16-pixel to quarter-pixel periods."""
    D = x.shape[-1]
    n = max(dim // (2 * D), 1)
    freqs = math.pi * torch.exp2(torch.linspace(min_log2, max_log2, n, device=x.device, dtype=torch.float32))
    ang = (x.float()[..., None] * freqs).flatten(-2)  # [..., D n]
    out = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    if out.shape[-1] < dim:
        out = F.pad(out, (0, dim - out.shape[-1]))
    return out[..., :dim]


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


def _groups(c: int, max_groups: int = 32) -> int:
    return math.gcd(c, max_groups)


class _ZeroResBlock(nn.Module):
    """Pre-norm residual conv block with a zero-initialised last conv (identity at init)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(dim), dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(dim), dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        return x + self.conv2(F.relu(self.norm2(h)))


class CorrespondenceAttention(nn.Module):
    """One CAA block for features of ``dim`` channels.

    Args:
        dim: channels of the UNet features it sits on.
        pe_dim: size of the geometric quantity each key encodes (2: displacement, 1: depth ratio).
        head_dim: attention head width (32 in the official code).
        ff_mult: feed-forward expansion (GEGLU).
        resnet: append a zero-initialised residual conv block (the official depth model does).
        pe_octaves: ``(min_log2, max_log2)`` of `fourier_encoding`.
        checkpoint: recompute the block in backward, keeping only its input feature map (the official
            code checkpoints its CAA blocks too; the ``[N, 18, C]`` keys dominate memory at 64x64).
    """

    def __init__(
        self,
        dim: int,
        pe_dim: int = 2,
        head_dim: int = 32,
        ff_mult: int = 4,
        resnet: bool = False,
        pe_octaves: tuple[float, float] = (-3.0, 3.0),
        checkpoint: bool = True,
    ):
        super().__init__()
        if dim % head_dim:
            head_dim = math.gcd(dim, head_dim)
        self.dim, self.pe_dim, self.heads = dim, pe_dim, dim // head_dim
        self.pe_octaves = tuple(pe_octaves)
        self.checkpoint = checkpoint
        self.norm1 = nn.LayerNorm(dim)  # shared by query and keys, as in the official block
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(_GEGLU(dim, ff_mult * dim), nn.Linear(ff_mult * dim, dim))
        self.resnet = _ZeroResBlock(dim) if resnet else None
        self.zero_init_()

    def zero_init_(self) -> None:
        """Zero the output layers: the block becomes the identity."""
        for lin in (self.to_out, self.ff[-1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.resnet is not None:
            nn.init.zeros_(self.resnet.conv2.weight)

    def _encode(self, pe: Tensor) -> Tensor:
        return fourier_encoding(pe, self.dim, *self.pe_octaves)

    def gather_keys(self, x: Tensor, corr: LevelCorrespondence) -> Tensor:
        """Source features at the keys: ``x [B, V, C, h, w]`` -> ``[B, V, h, w, J S, C]``."""
        B, V, C, h, w = x.shape
        _, _, J, S = corr.mask.shape[:4]
        b = torch.arange(B, device=x.device)[:, None, None]
        src = x[b, corr.src]  # [B, V, J, C, h, w]
        grid = corr.grid.to(x.dtype).reshape(B * V * J, S * h, w, 2)  # S stacked along rows
        keys = F.grid_sample(src.reshape(B * V * J, C, h, w), grid, mode="bilinear", align_corners=False)
        keys = keys.to(x.dtype).reshape(B, V, J, C, S, h, w)
        return keys.permute(0, 1, 5, 6, 2, 4, 3).reshape(B, V, h, w, J * S, C)

    def _attend(self, x: Tensor, keys: Tensor, pe: Tensor, mask: Tensor) -> Tensor:
        """Tokens ``x [N, C]``, keys ``[N, L, C]``, pe ``[N, L, D]``, mask ``[N, L]`` -> ``[N, C]``."""
        N, L, C = keys.shape
        hd = C // self.heads
        q_in = x + self._encode(torch.zeros(1, self.pe_dim, device=x.device)).to(x.dtype)
        kv = self.norm1(keys + self._encode(pe).to(keys.dtype))
        q = self.to_q(self.norm1(q_in)).view(N, self.heads, 1, hd)
        k = self.to_k(kv).view(N, L, self.heads, hd).transpose(1, 2)
        v = self.to_v(kv).view(N, L, self.heads, hd).transpose(1, 2)
        any_key = mask.any(-1)  # [N]
        attn_mask = (mask | ~any_key[:, None])[:, None, None, :]  # rows without keys attend to all, then zeroed
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask)
        out = out.reshape(N, C) * any_key[:, None].to(out.dtype)
        x = x + self.to_out(out)
        return x + self.ff(self.norm2(x))

    def _mix(self, x5: Tensor, src: Tensor, grid: Tensor, pe: Tensor, mask: Tensor) -> Tensor:
        """``x5 [B, V, C, h, w]`` -> updated tokens ``[B V h w, C]`` (gather keys, attend, feed-forward)."""
        B, V, C, h, w = x5.shape
        corr = LevelCorrespondence(src, grid, pe, mask)
        tokens = x5.permute(0, 1, 3, 4, 2).reshape(-1, C)  # [N, C]
        N = tokens.shape[0]
        keys = self.gather_keys(x5, corr).reshape(N, -1, C)  # [N, L, C]
        L = keys.shape[1]
        pe = pe.permute(0, 1, 4, 5, 2, 3, 6).reshape(N, L, -1)
        mask = mask.permute(0, 1, 4, 5, 2, 3).reshape(N, L)
        return self._attend(tokens, keys, pe, mask)

    def forward(self, x: Tensor, corr: LevelCorrespondence, num_views: int) -> Tensor:
        """``x [B V, C, h, w]`` -> same shape."""
        BV, C, h, w = x.shape
        V = num_views
        B = BV // V
        if corr.size != (h, w):
            raise ValueError(f"correspondences of size {corr.size} given for features of size {(h, w)}")
        corr = corr.for_batch(B)
        x5 = x.unflatten(0, (B, V))
        args = (x5, corr.src, corr.grid, corr.pe, corr.mask)
        if self.checkpoint and torch.is_grad_enabled():
            # only the feature map is kept for backward; the [N, L, C] keys are recomputed
            out = torch_checkpoint(self._mix, *args, use_reentrant=False)
        else:
            out = self._mix(*args)
        out = out.reshape(B * V, h, w, C).permute(0, 3, 1, 2)
        # keep the input's memory format: the UNet's convolutions then run the same kernels as without
        # CAA, which keeps the zero-initialised model bit-identical to the base UNet
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if self.resnet is not None:
            out = self.resnet(out)
        return out


class _EncodingBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3-GroupNorm-SiLU-conv1x1 with the last conv zero-initialised."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(_groups(cin), cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            nn.GroupNorm(_groups(cout), cout), nn.SiLU(), nn.Conv2d(cout, cout, 1),
        )  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if x.shape[-2:] != size:
            x = F.adaptive_avg_pool2d(x, size)
        return self.net(x)


class ConditionEncoder(nn.Module):
    """Image conditioning of the depth model's interpolation stage: key-frame latents + a mask channel
    (``in_channels = 5``) are encoded once and added to the input of every down block, the mid block
    and every up block (zero-initialised, so it starts as a no-op)."""

    def __init__(self, in_channels: int, base: int, down: list[int], mid: int, up: list[int]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.down = nn.ModuleList(_EncodingBlock(base, c) for c in down)
        self.mid = _EncodingBlock(base, mid)
        self.up = nn.ModuleList(_EncodingBlock(base, c) for c in up)


def caa_sites(unet: nn.Module) -> list[tuple[str, int, int]]:
    """``(kind, index, channels)`` of every CAA site: ``("down", i, c)``, ``("mid", 0, c)``, ``("up", i, c)``."""
    sites = [("down", i, b.resnets[-1].out_channels) for i, b in enumerate(unet.down_blocks)]
    sites.append(("mid", 0, unet.mid_block.resnets[-1].out_channels))
    sites += [("up", i, b.resnets[-1].out_channels) for i, b in enumerate(unet.up_blocks)]
    return sites


def _replace_hidden(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))
    else:
        args = (fn(args[0]),) + tuple(args[1:])
    return args, kwargs


class CAAAdapter(nn.Module):
    """The trainable multi-view adapter of one UNet: one `CorrespondenceAttention` per site (plus the
    optional `ConditionEncoder`), attached with hooks. Active only inside `context`; elsewhere the UNet
    behaves exactly as without it.

    Args:
        unet: the (frozen) ``UNet2DConditionModel`` to attach to; it is not stored as a submodule.
        variant: ``"panorama"`` (displacement encoding, k=3) or ``"depth"`` (depth encoding, k=1,
            residual block after each attention, as the official depth model).
        condition_channels: ``> 0`` adds a `ConditionEncoder` with that many input channels.
    """

    def __init__(
        self,
        unet: nn.Module,
        variant: Literal["panorama", "depth"] = "panorama",
        head_dim: int = 32,
        condition_channels: int = 0,
        checkpoint: bool = True,
        pe_octaves: tuple[float, float] | None = None,
    ):
        super().__init__()
        if variant not in ("panorama", "depth"):
            raise ValueError(f"variant={variant!r}: use 'panorama' or 'depth'")
        self.variant = variant
        self.condition_channels = condition_channels
        pe_dim = 2 if variant == "panorama" else 1
        octaves = pe_octaves if pe_octaves is not None else ((-3.0, 3.0) if variant == "panorama" else (-2.0, 6.0))
        self.config = dict(
            variant=variant, head_dim=head_dim, condition_channels=condition_channels, pe_octaves=list(octaves)
        )

        def block(c: int) -> CorrespondenceAttention:
            return CorrespondenceAttention(c, pe_dim, head_dim, resnet=variant == "depth", pe_octaves=octaves,
                                           checkpoint=checkpoint)  # fmt: skip

        sites = caa_sites(unet)
        self.down = nn.ModuleList(block(c) for k, _, c in sites if k == "down")
        self.mid = block(sites[len(self.down)][2])
        self.up = nn.ModuleList(block(c) for k, _, c in sites if k == "up")
        self.condition: ConditionEncoder | None = None
        if condition_channels:
            down_in = [b.resnets[0].in_channels for b in unet.down_blocks]
            up_in = [unet.mid_block.resnets[-1].out_channels] + [b.resnets[-1].out_channels for b in unet.up_blocks][
                :-1
            ]
            self.condition = ConditionEncoder(
                condition_channels, unet.conv_in.out_channels, down_in, unet.mid_block.resnets[0].in_channels, up_in
            )
        self._ctx: dict | None = None
        self._handles: list = []
        self._attach(unet)

    # ------------------------------------------------------------------------------------- hooks
    def _attach(self, unet: nn.Module) -> None:
        for i, blk in enumerate(unet.down_blocks):
            if blk.downsamplers is not None:
                h = blk.downsamplers[0].register_forward_pre_hook(
                    functools.partial(self._pre_hook, "down", i), with_kwargs=True
                )
            else:
                h = blk.register_forward_hook(functools.partial(self._post_hook, "down", i))
            self._handles.append(h)
        self._handles.append(unet.mid_block.register_forward_hook(functools.partial(self._post_hook, "mid", 0)))
        for i, blk in enumerate(unet.up_blocks):
            if blk.upsamplers is not None:
                h = blk.upsamplers[0].register_forward_pre_hook(
                    functools.partial(self._pre_hook, "up", i), with_kwargs=True
                )
            else:
                h = blk.register_forward_hook(functools.partial(self._post_hook, "up", i))
            self._handles.append(h)
        if self.condition is not None:
            for i, blk in enumerate(unet.down_blocks):
                self._handles.append(
                    blk.register_forward_pre_hook(functools.partial(self._cond_hook, "down", i), with_kwargs=True)
                )
            self._handles.append(
                unet.mid_block.register_forward_pre_hook(functools.partial(self._cond_hook, "mid", 0), with_kwargs=True)
            )
            for i, blk in enumerate(unet.up_blocks):
                self._handles.append(
                    blk.register_forward_pre_hook(functools.partial(self._cond_hook, "up", i), with_kwargs=True)
                )

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def block(self, kind: str, i: int) -> CorrespondenceAttention:
        return {"down": lambda: self.down[i], "mid": lambda: self.mid, "up": lambda: self.up[i]}[kind]()

    def _run_site(self, kind: str, i: int, x: Tensor) -> Tensor:
        ctx = self._ctx
        if ctx is None or ctx["num_views"] < 2:
            return x
        corr: Correspondences = ctx["corr"]
        return self.block(kind, i)(x, corr[tuple(x.shape[-2:])], ctx["num_views"])

    # Hooks are partials of bound methods (not closures) so that deep-copying the module that owns both
    # the UNet and the adapter (EMA, checkpoint averaging) re-binds the copied hooks to the copied adapter.
    def _pre_hook(self, kind: str, i: int, module, args, kwargs):
        return _replace_hidden(args, kwargs, functools.partial(self._run_site, kind, i))

    def _post_hook(self, kind: str, i: int, module, args, output):
        if isinstance(output, tuple):  # down block: (hidden_states, skip features) - skips untouched
            return (self._run_site(kind, i, output[0]),) + tuple(output[1:])
        return self._run_site(kind, i, output)

    def _cond_hook(self, kind: str, i: int, module, args, kwargs):
        ctx = self._ctx
        if ctx is None or ctx.get("condition") is None:
            return None
        enc = self.condition.mid if kind == "mid" else getattr(self.condition, kind)[i]
        feats = ctx["condition"]
        return _replace_hidden(args, kwargs, lambda x: x + enc(feats, tuple(x.shape[-2:])).to(x.dtype))

    @contextlib.contextmanager
    def context(self, corr: Correspondences | None, num_views: int, condition: Tensor | None = None) -> Iterator[None]:
        """Activate the adapter for one UNet call on ``[B V, ...]`` latents.

        ``condition [B V, condition_channels, h, w]`` feeds the `ConditionEncoder` (None: not used)."""
        if num_views > 1 and corr is None:
            raise ValueError(f"{num_views} views need correspondences (homography_ or depth_correspondences)")
        cond_feats = None
        if condition is not None:
            if self.condition is None:
                raise ValueError("a condition was given but the adapter was built with condition_channels=0")
            cond_feats = self.condition.conv_in(condition)
        self._ctx = {"corr": corr, "num_views": num_views, "condition": cond_feats}
        try:
            yield
        finally:
            self._ctx = None


# ------------------------------------------------------------------------------------ save / load


def save_adapter(adapter: CAAAdapter, path: str | Path) -> Path:
    """Write only the adapter's weights (CAA blocks + condition encoder) as safetensors, with its config."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    save_file(state, str(path), metadata={"genvs": "mvdiffusion-caa", "config": json.dumps(adapter.config)})
    return path


def load_adapter(adapter: CAAAdapter, path: str | Path, strict: bool = True) -> CAAAdapter:
    """Load weights written by `save_adapter` into ``adapter`` (a clear error on any mismatch)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MVDiffusion adapter file {str(path)!r} does not exist (write it with save_adapter)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("genvs") != "mvdiffusion-caa":
        raise ValueError(f"{str(path)!r} is not an MVDiffusion adapter file written by save_adapter")
    saved_cfg = json.loads(meta.get("config", "{}"))
    for key in ("variant", "condition_channels"):
        if saved_cfg.get(key) != adapter.config[key]:
            raise ValueError(
                f"adapter {str(path)!r} was saved with {key}={saved_cfg.get(key)!r} but the model has "
                f"{key}={adapter.config[key]!r}; build the model with the same settings"
            )
    state = load_file(str(path))
    own = adapter.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(
                f"adapter {str(path)!r}: {k} has shape {list(v.shape)} but the model expects {list(own[k].shape)} "
                "(saved for a different UNet?)"
            )
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"adapter {str(path)!r} does not match the model: missing {missing}, unexpected {unexpected}")
    return adapter
