"""Lightning plumbing shared by every method: image grids, prediction writer, atomic checkpoints,
progress bar."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid, save_image

from genvs.core.views import Views

__all__ = [
    "views_grid",
    "save_gif",
    "save_mp4",
    "colorize_depth",
    "PredictionWriter",
    "StepBoundProgressBar",
    "AtomicCheckpointIO",
    "CheckpointError",
    "check_checkpoint",
    "load_checkpoint",
]


def _to_unit(x: Tensor) -> Tensor:
    return (x.detach().float().cpu().clamp(-1, 1) + 1) / 2


def _to_uint8_frames(frames: Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8, rounded (what GIF and MP4 writers take)."""
    return (_to_unit(frames).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def views_grid(context: Tensor, pred: Tensor, target: Tensor | None = None, pad: int = 2) -> Tensor:
    """``[3, H', W']`` grid in [0, 1]: one row per scene with its context views, then the generated
    views, then (if given) the ground truth. Inputs are ``[B, V, 3, H, W]`` in [-1, 1]."""
    parts = [context, pred] + ([target] if target is not None else [])
    rows = torch.cat([_to_unit(p) for p in parts], dim=1)  # [B, Vc + Vp (+ Vt), 3, H, W]
    return make_grid(rows.flatten(0, 1), nrow=rows.shape[1], padding=pad, pad_value=1.0)


def save_gif(frames: Tensor, path: str | Path, fps: int = 8) -> None:
    """Write ``[N, 3, H, W]`` frames in [-1, 1] as a looping GIF."""
    arr = _to_uint8_frames(frames)
    images = [Image.fromarray(a) for a in arr]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def _require_av():
    try:
        import av
    except ImportError as e:  # optional: PyAV bundles FFmpeg, a large wheel most runs do not need
        raise ImportError(
            "writing MP4 needs PyAV: pip install 'genvs[video]' (or pip install av), "
            "or turn MP4 off with --predict_writer.mp4 false"
        ) from e
    return av


def save_mp4(frames: Tensor, path: str | Path, fps: int = 8, crf: int = 18) -> None:
    """Write ``[N, 3, H, W]`` frames in [-1, 1] as an H.264 MP4 (yuv420p, so it plays in browsers and
    slide decks; an odd height or width is padded by one white pixel, as yuv420p needs even sizes).
    ``crf`` is x264's quality (0 = lossless, 18 = visually lossless, 23 = its default)."""
    av = _require_av()
    arr = _to_uint8_frames(frames)
    n, h, w, _ = arr.shape
    if h % 2 or w % 2:
        padded = np.full((n, h + h % 2, w + w % 2, 3), 255, dtype=np.uint8)
        padded[:, :h, :w] = arr
        arr = padded
    codec = "libx264" if "libx264" in av.codecs_available else "h264"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps, options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        for a in arr:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder's delayed frames


# inferno-like anchors (dark = far, bright = near), linearly interpolated
_DEPTH_COLORS = torch.tensor(
    [[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.74, 0.22, 0.33], [0.98, 0.56, 0.04], [0.99, 1.0, 0.64]]
)


def colorize_depth(depth: Tensor) -> Tensor:
    """``[N, 1, H, W]`` z-depth -> ``[N, 3, H, W]`` colours in [0, 1] (bright = near, dark = far, black =
    unknown). Inverse depth is stretched between its 1st and 99th percentile over all ``N`` maps together,
    so the views of one scene share a colour scale."""
    d = depth.detach().float().cpu()
    valid = torch.isfinite(d) & (d > 0)
    inv = torch.where(valid, 1.0 / d.clamp_min(1e-12), torch.zeros_like(d))
    if valid.any():
        vals = inv[valid]
        if vals.numel() > 100_000:
            vals = vals[torch.randperm(vals.numel())[:100_000]]
        lo, hi = torch.quantile(vals, 0.01), torch.quantile(vals, 0.99)
        u = ((inv - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    else:
        u = torch.zeros_like(inv)
    pos = u * (len(_DEPTH_COLORS) - 1)
    i0 = pos.floor().long().clamp(max=len(_DEPTH_COLORS) - 2)
    w = (pos - i0)[..., None]
    rgb = _DEPTH_COLORS[i0] * (1 - w) + _DEPTH_COLORS[i0 + 1] * w  # [N, 1, H, W, 3]
    rgb = torch.where(valid[..., None], rgb, torch.zeros_like(rgb))
    return rgb[:, 0].permute(0, 3, 1, 2)


class StepBoundProgressBar(RichProgressBar):
    """Lightning's rich progress bar, except that a run bounded by ``max_steps`` (``max_epochs=-1``) reads
    "Epoch 30 · max_steps 12000" rather than Lightning's "Epoch 30/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        if self.trainer.max_steps > 0:
            description += f" · max_steps {self.trainer.max_steps}"
        return f"{description:{len(self.validation_description)}}"


class PredictionWriter(L.Callback):
    """Writes what `genvs predict` generates, one folder per scene::

        <output_dir>/<scene>/context_<i>.png   input views
                            /view_<i>.png      generated views (i = view index in the scene)
                            /depth_<i>.png     their depth, colourised, when the method predicts depth
                            /gt_<i>.png        ground truth, when the dataset has it
                            /grid.png          context | generated | ground truth
                            /orbit.gif         the generated views in order, or the ``"orbit"`` views a
                                               method returns (e.g. DFM renders an orbit of its scene)
                            /orbit.mp4         the same frames as an H.264 video (``mp4=True``)
                            /<name>.png        any other ``[B, 3, H, W]`` image the model returns under
                                               ``<name>`` (e.g. MVDiffusion's stitched ``panorama``)

    Args:
        output_dir: where to write (default: ``<trainer.default_root_dir>/predictions``).
        gif: write the orbit GIF.
        mp4: also write it as an MP4 video (needs PyAV: ``pip install 'genvs[video]'``).
        fps: frame rate of the GIF and the MP4.
    """

    def __init__(self, output_dir: str | None = None, gif: bool = True, mp4: bool = False, fps: int = 8):
        super().__init__()
        if mp4:
            _require_av()  # fail before any sampling, not after the first batch
        if fps < 1:
            raise ValueError(f"predict_writer.fps must be a positive frame rate, got {fps}")
        self.output_dir = output_dir
        self.gif = gif
        self.mp4 = mp4
        self.fps = fps

    def _root(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or os.path.join(trainer.default_root_dir, "predictions"))

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not isinstance(outputs, dict) or "pred" not in outputs:
            return
        context: Views = outputs["context"]
        pred: Views = outputs["pred"]
        target: Views | None = outputs.get("target")
        root = self._root(trainer)
        for b in range(pred.B):
            scene = (pred.scene or context.scene or [""] * pred.B)[b] or f"batch{batch_idx:05d}_{b:03d}"
            folder = root / scene
            folder.mkdir(parents=True, exist_ok=True)
            has_context = context.images is not None and context.V > 0  # pure generation has no input view
            for v in range(context.V if has_context else 0):
                idx = int(context.index[b, v]) if context.index is not None else v
                save_image(_to_unit(context.images[b, v]), folder / f"context_{idx:04d}.png")
            depth = colorize_depth(pred.depth[b]) if pred.depth is not None else None
            for v in range(pred.V):
                idx = int(pred.index[b, v]) if pred.index is not None else v
                save_image(_to_unit(pred.images[b, v]), folder / f"view_{idx:04d}.png")
                if depth is not None:
                    save_image(depth[v], folder / f"depth_{idx:04d}.png")
                if target is not None and target.images is not None:
                    save_image(_to_unit(target.images[b, v]), folder / f"gt_{idx:04d}.png")
            tgt = target.images[b : b + 1] if target is not None and target.images is not None else None
            ctx = context.images[b : b + 1] if has_context else pred.images.new_zeros(1, 0, *pred.images.shape[2:])
            save_image(views_grid(ctx, pred.images[b : b + 1], tgt), folder / "grid.png")
            orbit: Views | None = outputs.get("orbit")  # a method may render its own orbit (DFM's 3D scene)
            frames = orbit.images[b] if orbit is not None else pred.images[b]
            if self.gif and len(frames) > 1:
                save_gif(frames, folder / "orbit.gif", self.fps)
            if self.mp4 and len(frames) > 1:
                save_mp4(frames, folder / "orbit.mp4", self.fps)
            for name, image in outputs.items():  # extra per-scene images, e.g. a stitched panorama
                if isinstance(image, Tensor) and image.ndim == 4 and image.shape[:2] == (pred.B, 3):
                    save_image(_to_unit(image[b]), folder / f"{name}.png")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, unsafe to unpickle, or of another method."""


def check_checkpoint(path: str | Path) -> Path:
    """Raise `CheckpointError` naming the file if it is missing, truncated or not a torch checkpoint.

    torch checkpoints are zip archives; a truncated copy fails the archive's own CRC checks, which are
    verified here before anything is loaded (so nothing is ever loaded half-way).
    """
    path = Path(path)
    if not path.is_file():
        where = "a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"checkpoint {path} {where}; give the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt), "
            "or --ckpt_path last to resume from the newest last.ckpt under trainer.default_root_dir"
        )
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) is truncated or corrupt ({e}); it cannot be loaded. "
            "Resume from an earlier checkpoint (e.g. the previous one in the same checkpoints/ folder)."
        ) from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: member {bad!r} fails its CRC check; use an earlier checkpoint")
    return path


def _refuse_code(path: str | Path, error: Exception) -> CheckpointError:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()] or [type(error).__name__]
    reason = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[0])
    return CheckpointError(
        f"refusing to load {path}: it contains objects that would run code when unpickled ({reason}). "
        "genvs checkpoints hold plain data only (tensors, numbers, strings); only load this file if you trust its source, "
        "with torch.load(path, weights_only=False) in your own code."
    )


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Verify a checkpoint (`check_checkpoint`) and load it with ``weights_only=True``.

    Raises `CheckpointError` naming the file if it is missing, truncated or corrupt, or if unpickling it would
    run code (a pickled function or class instance). ``mmap=True`` maps the tensors instead of reading them: a
    cheap way to read a large checkpoint's metadata.
    """
    check_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refuse_code(path, e) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint (a dict with a state_dict)")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file in the same folder, flushed, then renamed over the
    target: a run killed mid-write leaves the previous checkpoint intact, never a truncated one.
    Loading verifies the file first (`check_checkpoint`) and unpickles with ``weights_only=True``: a
    checkpoint that would run code is refused."""

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refuse_code(path, e) from None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
