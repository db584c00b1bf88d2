"""Image-file helpers shared by the dataset readers: load an RGB frame, crop/resize it with its intrinsics."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["load_rgb", "crop_resize"]


def crop_resize(
    image: Tensor, K: Tensor, size: int | tuple[int, int] | None, crop: Literal["center", "none"] = "center"
) -> tuple[Tensor, Tensor]:
    """Centre-crop ``image [C, H, W]`` to a square (``crop="center"``) and resize to ``size`` (antialiased
    bilinear), adjusting ``K [3, 3]`` (pixel centres at ``i + 0.5``, so the maps are exact)."""
    C, H, W = image.shape
    K = K.clone()
    if crop == "center":
        s = min(H, W)
        y0, x0 = (H - s) // 2, (W - s) // 2
        image = image[:, y0 : y0 + s, x0 : x0 + s]
        K[0, 2] -= x0
        K[1, 2] -= y0
        H = W = s
    elif crop != "none":
        raise ValueError(f"crop={crop!r}: use 'center' or 'none'")
    if size is not None:
        H2, W2 = (size, size) if isinstance(size, int) else size
        if (H2, W2) != (H, W):
            image = F.interpolate(image[None], size=(H2, W2), mode="bilinear", antialias=True, align_corners=False)[0]
            K[0] *= W2 / W
            K[1] *= H2 / H
    return image, K


def load_rgb(path: str | Path) -> Tensor:
    """RGB image file -> ``[3, H, W]`` float in [-1, 1]; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} is missing")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
