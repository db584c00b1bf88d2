"""Monocular depth for the warping method: an estimator interface, a DPT on a timm ViT, and the paper's
depth normalisation.

Xiang et al. train on ImageNet with depth from MiDaS (``dpt_beit_large_512``). Its output is a relative
disparity; the official data pipeline turns it into the depth the diffusion model sees in two steps, both
reproduced here:

1. `disparity_to_depth`: ``disp / 6250``; if the largest disparity exceeds ``1 / near`` the map is
   rescaled so it equals ``1 / near`` (the nearest point sits at depth ``near = 0.5``), disparities are
   clamped at ``1e-3``, and depth is ``1 / disp``. These are the "normalised depth units" in which the
   training cameras orbit a pivot 1 unit ahead.
2. `normalize_depth`: a z-buffer style encoding, linear in disparity,
   ``(1/near - 1/depth) / (1/near - 1/far)`` clipped to [0, 1] and mapped to [-1, 1]
   (training: ``near = 0.5``, ``far = 100``); `denormalize_depth` inverts it. The official sampling script
   decodes generated depth with ``near = 0.6``, ``far = 5`` instead (see docs/methods/warping.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DepthEstimator",
    "disparity_to_depth",
    "normalize_depth",
    "denormalize_depth",
    "DPT",
    "DPTDepthEstimator",
    "TorchHubDepthEstimator",
    "TransformersDepthEstimator",
    "load_depth_estimator",
    "DepthWeightsNotFound",
]

TRAIN_NEAR, TRAIN_FAR = 0.5, 100.0  # official training normalisation
SAMPLE_NEAR, SAMPLE_FAR = 0.6, 5.0  # official sampling script's decoding of generated depth
MIDAS_DISPARITY_SCALE = 1.0 / 6250.0


@runtime_checkable
class DepthEstimator(Protocol):
    """Monocular depth: ``images [B, 3, H, W]`` in [-1, 1] -> z-depth ``[B, 1, H, W]`` (normalised units)."""

    def __call__(self, images: Tensor) -> Tensor: ...


class DepthWeightsNotFound(FileNotFoundError):
    """Depth model weights are missing locally (genvs never downloads them)."""


# --------------------------------------------------------------------------------------- normalisation
def disparity_to_depth(
    disparity: Tensor, scale: float = MIDAS_DISPARITY_SCALE, near: float = TRAIN_NEAR, min_disparity: float = 1e-3
) -> Tensor:
    """Relative disparity ``[B, 1, H, W]`` (MiDaS-style) -> depth in the paper's normalised units.

    Per image: ``d = disparity * scale``; if ``max(d) > 1 / near`` then ``d *= 1 / (near * max(d))``;
    ``depth = 1 / max(d, min_disparity)`` (so depth lies in ``[near, 1 / min_disparity]``).
    """
    d = disparity.float() * scale
    dmax = d.flatten(1).amax(1).view(-1, *([1] * (d.ndim - 1)))
    d = torch.where(dmax > 1.0 / near, d / (dmax * near), d)
    return 1.0 / d.clamp_min(min_disparity)


def normalize_depth(depth: Tensor, near: float = TRAIN_NEAR, far: float = TRAIN_FAR) -> Tensor:
    """z-depth -> [-1, 1]: ``2 * (1/near - 1/depth) / (1/near - 1/far) - 1``, depth clipped to [near, far]."""
    d = depth.float().clamp(near, far)
    return 2.0 * (1.0 / near - 1.0 / d) / (1.0 / near - 1.0 / far) - 1.0


def denormalize_depth(x: Tensor, near: float = TRAIN_NEAR, far: float = TRAIN_FAR, eps: float = 1e-6) -> Tensor:
    """Inverse of `normalize_depth`: [-1, 1] -> z-depth in [near, far] (values clamped into range first)."""
    u = ((x.float() + 1.0) / 2.0).clamp(eps, 1.0 - eps)
    return near * far / (far - (far - near) * u)


# ------------------------------------------------------------------------------------------------ DPT
class _ResidualConv(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _Fusion(nn.Module):
    """DPT fusion block: refine the skip, add the coarser path, refine, upsample x2, project."""

    def __init__(self, ch: int):
        super().__init__()
        self.skip_unit = _ResidualConv(ch)
        self.unit = _ResidualConv(ch)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.proj(x)


class DPT(nn.Module):
    """Dense Prediction Transformer (Ranftl et al. 2021) for relative disparity on a timm ViT backbone.

    Four backbone blocks (``hooks``) are read out, the class token is folded in ("project" readout),
    reassembled at 1/4, 1/8, 1/16 and 1/32 of the input, fused coarse-to-fine and decoded to a
    non-negative disparity map at the input resolution.

    Args:
        backbone: timm model name of a ViT (e.g. ``vit_large_patch16_384``); built without weights.
        backbone_kwargs: extra ``timm.create_model`` arguments (small test models set depth/width here).
        hooks: indices of the backbone blocks to read.
        channels: reassemble widths per stage; ``features``: fusion width.
    """

    def __init__(
        self,
        backbone: str = "vit_large_patch16_384",
        backbone_kwargs: dict | None = None,
        hooks: tuple[int, ...] = (5, 11, 17, 23),
        channels: tuple[int, ...] = (256, 512, 1024, 1024),
        features: int = 256,
    ):
        super().__init__()
        import timm

        self.config = dict(
            backbone=backbone,
            backbone_kwargs=dict(backbone_kwargs or {}),
            hooks=tuple(hooks),
            channels=tuple(channels),
            features=features,
        )
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=0, dynamic_img_size=True, **(backbone_kwargs or {})
        )
        if not hasattr(self.backbone, "forward_intermediates"):
            raise ValueError(f"DPT backbone {backbone!r} has no forward_intermediates; use a timm ViT")
        self.hooks = list(hooks)
        D = self.backbone.embed_dim
        self.patch = self.backbone.patch_embed.patch_size[0]
        self.readout = nn.ModuleList([nn.Sequential(nn.Linear(2 * D, D), nn.GELU()) for _ in hooks])
        c1, c2, c3, c4 = channels
        self.reassemble = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(D, c1, 1), nn.ConvTranspose2d(c1, c1, 4, stride=4)),
                nn.Sequential(nn.Conv2d(D, c2, 1), nn.ConvTranspose2d(c2, c2, 2, stride=2)),
                nn.Sequential(nn.Conv2d(D, c3, 1)),
                nn.Sequential(nn.Conv2d(D, c4, 1), nn.Conv2d(c4, c4, 3, stride=2, padding=1)),
            ]
        )
        self.project = nn.ModuleList([nn.Conv2d(c, features, 3, padding=1, bias=False) for c in channels])
        self.fusion = nn.ModuleList([_Fusion(features) for _ in channels])
        self.head = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, 3, H, W]`` normalised for the backbone, ``H, W`` multiples of ``2 * patch`` -> ``[B, 1, H, W]``."""
        feats = self.backbone.forward_intermediates(x, indices=self.hooks, return_prefix_tokens=True, intermediates_only=True)
        layers = []
        for (sp, prefix), ro, re, pr in zip(feats, self.readout, self.reassemble, self.project):
            B, D, h, w = sp.shape
            tokens = sp.flatten(2).transpose(1, 2)  # [B, hw, D]
            cls = prefix[:, :1].expand(-1, tokens.shape[1], -1) if prefix is not None and prefix.shape[1] else torch.zeros_like(tokens)
            tokens = ro(torch.cat([tokens, cls], dim=-1))
            layers.append(pr(re(tokens.transpose(1, 2).reshape(B, D, h, w))))
        y = self.fusion[3](layers[3])
        y = self.fusion[2](_match(y, layers[2]), layers[2])
        y = self.fusion[1](_match(y, layers[1]), layers[1])
        y = self.fusion[0](_match(y, layers[0]), layers[0])
        return self.head(y)


def _match(x: Tensor, ref: Tensor) -> Tensor:
    return x if x.shape[-2:] == ref.shape[-2:] else F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class DPTDepthEstimator(nn.Module):
    """`DepthEstimator` around a `DPT` loaded from a local directory (``config.json`` + ``model.safetensors``).

    Images are resized so the shorter side is ``input_size`` (both sides multiples of ``2 * patch``),
    normalised with ``mean``/``std``, the disparity is resized back (bicubic, as the MiDaS scripts) and
    turned into depth with `disparity_to_depth` (``disparity_scale``, ``near``).
    """

    def __init__(
        self,
        dpt: DPT,
        input_size: int = 384,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        disparity_scale: float = MIDAS_DISPARITY_SCALE,
        near: float = TRAIN_NEAR,
    ):
        super().__init__()
        self.dpt = dpt.eval().requires_grad_(False)
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.disparity_scale, self.near = disparity_scale, near

    def estimator_config(self) -> dict:
        return dict(
            input_size=self.input_size,
            mean=self.mean.flatten().tolist(),
            std=self.std.flatten().tolist(),
            disparity_scale=self.disparity_scale,
            near=self.near,
        )

    @torch.no_grad()
    def disparity(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"depth estimator expects images [B, 3, H, W] in [-1, 1], got {list(images.shape)}")
        H, W = images.shape[-2:]
        m = 2 * self.dpt.patch
        s = self.input_size / min(H, W)
        h, w = max(m, round(H * s / m) * m), max(m, round(W * s / m) * m)
        x = F.interpolate((images.float() + 1) / 2, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - self.mean) / self.std
        disp = self.dpt(x.to(next(self.dpt.parameters()).dtype)).float()
        return F.interpolate(disp, size=(H, W), mode="bicubic", align_corners=False).clamp_min(0)

    def forward(self, images: Tensor) -> Tensor:
        return disparity_to_depth(self.disparity(images), self.disparity_scale, self.near)

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = dict(dpt=self.dpt.config, estimator=self.estimator_config())
        (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        save_file({k: v.contiguous() for k, v in self.dpt.state_dict().items()}, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "DPTDepthEstimator":
        """Load from ``directory/config.json`` and ``directory/model.safetensors`` (never downloads)."""
        from safetensors.torch import load_file

        directory = Path(directory).expanduser()
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        missing = [p for p in (cfg_path, w_path) if not p.is_file()]
        if missing:
            raise DepthWeightsNotFound(
                f"DPT depth weights not found: {', '.join(str(p) for p in missing)} missing. genvs does not "
                f"download weights; put a DPTDepthEstimator export ({CONFIG_NAME} + {WEIGHTS_NAME}, written by "
                f"DPTDepthEstimator.save_pretrained) in {directory}, or use TorchHubDepthEstimator with a local "
                f"MiDaS checkout and checkpoint (the official code used MiDaS dpt_beit_large_512)."
            )
        cfg = json.loads(cfg_path.read_text())
        dpt = DPT(**cfg["dpt"])
        dpt.load_state_dict(load_file(str(w_path), device=str(map_location)))
        est = cfg.get("estimator", {})
        for k in ("mean", "std"):
            if k in est:
                est[k] = tuple(est[k])
        return cls(dpt, **est)


class TorchHubDepthEstimator(nn.Module):
    """`DepthEstimator` around a MiDaS model from a LOCAL torch.hub checkout (``source="local"``).

    ``repo_dir`` is a clone of ``isl-org/MiDaS`` (with its ``hubconf.py``); ``model`` a hub entry such as
    ``"DPT_BEiT_L_512"`` (the official choice). MiDaS loads its checkpoint through torch.hub's cache
    (``$TORCH_HOME/hub/checkpoints``), so put the ``.pt`` file there; nothing is downloaded when it is present.
    The MiDaS disparity goes through `disparity_to_depth` exactly as in the official pipeline.
    """

    def __init__(
        self,
        repo_dir: str | Path,
        model: str = "DPT_BEiT_L_512",
        input_size: int = 512,
        disparity_scale: float = MIDAS_DISPARITY_SCALE,
        near: float = TRAIN_NEAR,
        **hub_kwargs,
    ):
        super().__init__()
        repo = Path(repo_dir).expanduser()
        if not (repo / "hubconf.py").is_file():
            raise DepthWeightsNotFound(
                f"no torch.hub checkout at {repo} (expected {repo / 'hubconf.py'}): clone the MiDaS repository "
                f"there and put its checkpoint in $TORCH_HOME/hub/checkpoints; genvs never downloads models."
            )
        self.net = torch.hub.load(str(repo), model, source="local", **hub_kwargs).eval().requires_grad_(False)
        self.input_size, self.disparity_scale, self.near = input_size, disparity_scale, near

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"depth estimator expects images [B, 3, H, W] in [-1, 1], got {list(images.shape)}")
        H, W = images.shape[-2:]
        s = self.input_size / min(H, W)
        h, w = max(32, round(H * s / 32) * 32), max(32, round(W * s / 32) * 32)
        x = F.interpolate(images.float(), size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)  # MiDaS DPT: mean=std=0.5
        disp = self.net(x)
        disp = disp[:, None] if disp.ndim == 3 else disp
        disp = F.interpolate(disp.float(), size=(H, W), mode="bicubic", align_corners=False).clamp_min(0)
        return disparity_to_depth(disp, self.disparity_scale, self.near)


class TransformersDepthEstimator(nn.Module):
    """`DepthEstimator` around a Hugging Face ``transformers`` depth model in a LOCAL directory.

    Any ``AutoModelForDepthEstimation`` checkpoint whose ``predicted_depth`` is a relative disparity works:
    ``Intel/dpt-beit-large-512`` is the transformers port of MiDaS v3.1 ``dpt_beit_large_512``, the model the
    official code used, whose disparity scale the official ``1 / 6250`` (`disparity_to_depth`) assumes;
    ``Intel/dpt-large`` and ``Intel/dpt-hybrid-midas`` are the older MiDaS v3 DPTs. Download once, e.g.
    ``huggingface-cli download Intel/dpt-beit-large-512 --local-dir weights/dpt-beit-large-512``; genvs
    loads with ``local_files_only=True`` and never reaches the network.

    Images are resized (bicubic) to a square ``input_size`` (default: the processor's or model's size), normalised
    with the processor's mean/std (default 0.5/0.5), and the disparity is resized back. Feed square crops
    (the image-folder datamodule does) to keep the aspect ratio.
    """

    def __init__(
        self,
        model_dir: str | Path,
        input_size: int | None = None,
        disparity_scale: float = MIDAS_DISPARITY_SCALE,
        near: float = TRAIN_NEAR,
    ):
        super().__init__()
        directory = Path(model_dir).expanduser()
        if not (directory / CONFIG_NAME).is_file():
            raise DepthWeightsNotFound(
                f"no transformers depth model in {directory} (expected {directory / CONFIG_NAME} and its weights). "
                "Download one once, e.g. `huggingface-cli download Intel/dpt-beit-large-512 --local-dir "
                f"{directory}` (the MiDaS model of the official code); genvs never downloads weights."
            )
        from transformers import AutoModelForDepthEstimation

        self.net = AutoModelForDepthEstimation.from_pretrained(str(directory), local_files_only=True)
        self.net = self.net.eval().requires_grad_(False)
        mean, std, size = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None
        proc = directory / "preprocessor_config.json"
        if proc.is_file():
            pc = json.loads(proc.read_text())
            mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
            sz = pc.get("size")
            size = sz.get("height", sz.get("shortest_edge")) if isinstance(sz, dict) else sz
        cfg_size = getattr(self.net.config, "image_size", None)
        self.input_size = int(input_size or size or cfg_size or 384)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.disparity_scale, self.near = disparity_scale, near

    @torch.no_grad()
    def disparity(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"depth estimator expects images [B, 3, H, W] in [-1, 1], got {list(images.shape)}")
        H, W = images.shape[-2:]
        s = self.input_size
        x = F.interpolate((images.float() + 1) / 2, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - self.mean) / self.std
        disp = self.net(pixel_values=x.to(next(self.net.parameters()).dtype)).predicted_depth
        disp = disp[:, None] if disp.ndim == 3 else disp
        return F.interpolate(disp.float(), size=(H, W), mode="bicubic", align_corners=False).clamp_min(0)

    def forward(self, images: Tensor) -> Tensor:
        return disparity_to_depth(self.disparity(images), self.disparity_scale, self.near)


def load_depth_estimator(path: str | Path, hub_model: str = "DPT_BEiT_L_512", **kwargs) -> nn.Module:
    """A `DepthEstimator` from a local directory, whichever kind it holds:

    - a ``transformers`` depth model (``config.json`` with a ``model_type``) -> `TransformersDepthEstimator`;
    - a genvs DPT export (``config.json`` with ``dpt``, from `DPTDepthEstimator.save_pretrained`) -> `DPTDepthEstimator`;
    - a MiDaS torch.hub checkout (``hubconf.py``) -> `TorchHubDepthEstimator` with ``hub_model``.

    ``kwargs`` go to the estimator (e.g. ``near``).
    """
    directory = Path(path).expanduser()
    if (directory / "hubconf.py").is_file():
        return TorchHubDepthEstimator(directory, hub_model, **kwargs)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise DepthWeightsNotFound(
            f"no depth model at {directory}: expected {cfg_path} (a transformers depth model such as "
            "Intel/dpt-beit-large-512 downloaded with `huggingface-cli download Intel/dpt-beit-large-512 --local-dir "
            f"{directory}`, or a genvs DPTDepthEstimator export) or {directory / 'hubconf.py'} (a MiDaS checkout). "
            "genvs never downloads weights."
        )
    cfg = json.loads(cfg_path.read_text())
    if "dpt" in cfg:
        est = DPTDepthEstimator.from_pretrained(directory)
        for k, v in kwargs.items():
            if k not in ("input_size", "disparity_scale", "near"):
                raise TypeError(f"DPTDepthEstimator has no setting {k!r} (input_size, disparity_scale, near)")
            setattr(est, k, v)
        return est
    if "model_type" in cfg:
        return TransformersDepthEstimator(directory, **kwargs)
    raise DepthWeightsNotFound(f"{cfg_path}: neither a transformers config (no 'model_type') nor a genvs DPT export (no 'dpt')")
