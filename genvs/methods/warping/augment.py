"""Training pairs for the conditional model from single RGBD images (forward-backward warping).

Following Xiang et al. (2023) and their code: an RGBD image is warped to a random nearby camera and back.
What survives the round trip is what a real novel view would receive from this view; the holes (regions
seen by the image but hidden from, or outside, the random camera) become the condition's mask, and the
image itself is the target. Augmentations, as in the official ``WarpDataset``:

- pre-warp noise: ``N(0, (0.005 u)^2)``, ``u ~ U(0, 1)``, added to RGB and to depth in [0, 1] units;
- blur (probability 0.8): the condition's colour is the *original* image blurred with a 3x3 Gaussian of
  sigma ``U(0, 1) + 1e-3`` instead of the warped colour (warping blurs, the model must learn to sharpen);
- texture erosion: the colour mask is the mask eroded by a square of side ``k`` in {1, 3, 5, 7, 9}
  (uniform); depth keeps the full mask.

Cameras (OpenCV, relative to the image's camera at the identity): the random camera sits at
``pivot + r (cos(pitch) sin(yaw), -sin(pitch), -cos(pitch) cos(yaw))`` around a pivot 1 unit ahead
``(0, 0, 1)``, with ``yaw, pitch ~ N(0, 0.15^2)``, ``r ~ N(1, 0.1^2)``, looking at ``pivot + N(0, 0.05^2 I)``
with the image's up direction; depth is in the normalised units of `genvs.methods.warping.depth`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from genvs.core.cameras import intrinsics_from_fov, orbit_camera
from genvs.core.config import Configurable
from genvs.core.distributed import BatchRNG, as_batch_rng
from genvs.core.geometry import forward_warp
from genvs.methods.warping.depth import TRAIN_FAR, TRAIN_NEAR, denormalize_depth, normalize_depth
from genvs.methods.warping.network import WarpCondition

__all__ = [
    "orbit_camera",  # re-exported from genvs.core.cameras
    "random_orbit_cameras",
    "forward_backward_warp",
    "gaussian_blur3",
    "erode_mask",
    "WarpPair",
    "TrainingPairs",
    "OFFICIAL_FOV_DEG",
]

OFFICIAL_FOV_DEG = 45.0


def random_orbit_cameras(
    n: int,
    yaw_std: float = 0.15,
    pitch_std: float = 0.15,
    radius_std: float = 0.1,
    target_std: float = 0.05,
    pivot: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> Tensor:
    """``[n, 4, 4]`` random training cameras (the official ``WarpDataset`` distribution)."""
    g = dict(generator=generator, device=device)
    yaw = torch.randn(n, **g) * yaw_std
    pitch = torch.randn(n, **g) * pitch_std
    r = pivot * (1 + torch.randn(n, **g) * radius_std)
    t = torch.randn(n, 3, **g) * target_std
    return orbit_camera(yaw, pitch, r, t, pivot=pivot)


def forward_backward_warp(
    image: Tensor,
    depth: Tensor,
    K: Tensor,
    c2w: Tensor,
    *,
    supersample: int = 3,
    atol: float = 0.02,
    rtol: float = 0.02,
    mode: str = "nearest",
) -> tuple[Tensor, Tensor, Tensor]:
    """Warp ``[B, C, H, W]`` attributes with z-depth ``[B, 1, H, W]`` to cameras ``c2w [B, 4, 4]`` and back.

    The forward pass draws every triangle (stretched ones included, as the official renderer: they fill the
    disocclusions of the novel view) of a mesh whose border is extended by the image size (the official
    padding, so the novel view has no holes at its frame); the novel view's mesh is then warped back with
    the discontinuity test, so regions the novel camera does not see become holes.

    Returns ``(image, depth, mask)`` in the original camera (identity pose), depth and image zero in holes.
    """
    B, C, H, W = image.shape
    I = torch.eye(4, device=image.device).expand(B, 4, 4)
    fwd = forward_warp(
        image, depth, K, I, K, c2w, supersample=supersample, atol=None, rtol=None, mode=mode, border=float(max(H, W))
    )
    valid1 = fwd.depth_raw > 0
    back = forward_warp(
        fwd.image, fwd.depth_raw, K, c2w, K, I, valid=valid1, supersample=supersample, atol=atol, rtol=rtol, mode=mode
    )
    return back.image, back.depth, back.mask


def gaussian_blur3(x: Tensor, sigma: Tensor) -> Tensor:
    """3x3 Gaussian blur with a per-image ``sigma [B]`` (reflect-101 borders, as OpenCV's default)."""
    B, C, H, W = x.shape
    r = torch.arange(-1, 2, device=x.device, dtype=torch.float32)
    g = torch.exp(-(r[None] ** 2) / (2 * sigma.float()[:, None] ** 2))  # [B, 3]
    g = g / g.sum(-1, keepdim=True)
    k = (g[:, :, None] * g[:, None, :]).repeat_interleave(C, 0)[:, None]  # [B*C, 1, 3, 3]
    xp = F.pad(x.float().reshape(1, B * C, H, W), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(xp, k, groups=B * C).reshape(B, C, H, W).to(x.dtype)


def erode_mask(mask: Tensor, size: Tensor | int, max_size: int | None = None) -> Tensor:
    """Erode binary masks ``[B, 1, H, W]`` by squares of side ``size`` (odd; per image ``[B]`` allowed).

    Pixels outside the image do not erode (OpenCV's default border for erosion). ``max_size``: an upper
    bound of the sizes, known on the host (the sizes are then trusted: no device value is read); without
    it the sizes are validated and their maximum read (a host-device synchronisation on GPU).
    """
    B = mask.shape[0]
    size = torch.as_tensor(size, device=mask.device).expand(B)
    if max_size is None:
        if ((size < 1) | (size % 2 == 0)).any():
            raise ValueError(f"erode_mask: sizes must be odd and positive, got {size.tolist()}")
        max_size = int(size.max())
    out = mask.float()
    cur = out
    for k in range(3, max_size + 1, 2):
        cur = -F.max_pool2d(-cur, 3, stride=1, padding=1)  # one more 3x3 erosion: a (k x k) square
        out = torch.where((size == k).view(B, 1, 1, 1), cur, out)
    return out


@dataclass
class WarpPair:
    """A training example for the conditional model: predict ``target`` given ``cond``."""

    target: Tensor  # [B, 4, H, W] RGB and normalised depth of the original image, in [-1, 1]
    cond: WarpCondition  # the forward-backward warped condition
    c2w: Tensor  # [B, 4, 4] the random cameras used (relative to the image's camera)


class TrainingPairs(Configurable):
    """Builds `WarpPair` batches from RGBD images (the official ``WarpDataset``, vectorised on tensors).

    Args mirror the official defaults: camera distribution (``yaw_std``, ``pitch_std``, ``radius_std``,
    ``target_std``, ``pivot``: the distance to the orbited point, in depth units), ``fov_deg`` for images
    without intrinsics, augmentations (``prewarp_noise``, ``blur_prob``, ``erode_sizes``), and the warp
    (``supersample``, ``atol``, ``rtol``). The depth normalisation is an argument of each call.
    """

    def __init__(
        self,
        yaw_std: float = 0.15,
        pitch_std: float = 0.15,
        radius_std: float = 0.1,
        target_std: float = 0.05,
        pivot: float = 1.0,
        fov_deg: float = OFFICIAL_FOV_DEG,
        prewarp_noise: float = 0.005,
        blur_prob: float = 0.8,
        erode_sizes: tuple[int, ...] = (1, 3, 5, 7, 9),
        supersample: int = 3,
        atol: float = 0.02,
        rtol: float = 0.02,
    ):
        self.yaw_std, self.pitch_std, self.radius_std, self.target_std, self.pivot = (
            yaw_std,
            pitch_std,
            radius_std,
            target_std,
            pivot,
        )
        self.fov_deg = fov_deg
        self.prewarp_noise, self.blur_prob, self.erode_sizes = prewarp_noise, blur_prob, tuple(erode_sizes)
        if any(k < 1 or k % 2 == 0 for k in self.erode_sizes):
            raise ValueError(f"TrainingPairs: erode_sizes must be odd and positive, got {list(self.erode_sizes)}")
        self.supersample, self.atol, self.rtol = supersample, atol, rtol

    @torch.no_grad()
    def __call__(
        self,
        images: Tensor,
        depth: Tensor,
        K: Tensor | None = None,
        c2w: Tensor | None = None,
        generator: BatchRNG | torch.Generator | None = None,
        near: float = TRAIN_NEAR,
        far: float = TRAIN_FAR,
    ) -> WarpPair:
        """``images [B, 3, H, W]`` in [-1, 1], z-depth ``[B, 1, H, W]`` (normalised units) -> `WarpPair`.

        ``K [B, 3, 3]`` defaults to a ``fov_deg`` pinhole; ``c2w [B, 4, 4]`` (novel cameras relative to the
        image's) defaults to `random_orbit_cameras`; ``near``/``far`` are the depth normalisation (the
        LightningModule passes its own, so that both models see one encoding). ``generator``: a
        `genvs.core.distributed.BatchRNG` (per-example draws independent of the process layout), a
        generator, or ``None`` (torch's global RNG).
        """
        if images.ndim != 4 or images.shape[1] != 3 or depth.shape != (images.shape[0], 1, *images.shape[-2:]):
            raise ValueError(
                f"TrainingPairs expects images [B, 3, H, W] and depth [B, 1, H, W], got {list(images.shape)} and {list(depth.shape)}"
            )
        B, _, H, W = images.shape
        dev = images.device
        rng = as_batch_rng(generator)
        if K is None:
            K = intrinsics_from_fov(self.fov_deg, H, W).to(dev).expand(B, 3, 3)
        if c2w is None:
            c2w = rng.draw(
                lambda n, g: random_orbit_cameras(
                    n, self.yaw_std, self.pitch_std, self.radius_std, self.target_std, self.pivot, g, dev
                ),
                B,
                dev,
            )
        images = images.float()
        depth_n = normalize_depth(depth, near, far)  # [-1, 1]
        target = torch.cat([images, depth_n], dim=1)

        # pre-warp noise on [0, 1]-scaled RGB and depth (std 0.005 u there, 0.01 u in [-1, 1])
        x = target
        if self.prewarp_noise > 0:
            std = 2 * self.prewarp_noise * rng.rand(B, 1, 1, 1, device=dev)
            x = x + rng.randn(*x.shape, device=dev) * std
        warp_rgb, warp_depth, mask = forward_backward_warp(
            x[:, :3],
            denormalize_depth(x[:, 3:], near, far),
            K,
            c2w,
            supersample=self.supersample,
            atol=self.atol,
            rtol=self.rtol,
        )
        cond_depth = normalize_depth(warp_depth, near, far) * mask
        rgb = warp_rgb
        if self.blur_prob > 0:
            blur = rng.rand(B, device=dev) < self.blur_prob
            sigma = rng.rand(B, device=dev) + 1e-3
            rgb = torch.where(blur.view(B, 1, 1, 1), gaussian_blur3(images, sigma), warp_rgb)
        if self.erode_sizes:
            sizes = torch.tensor(self.erode_sizes, device=dev)
            k = sizes[rng.randint(0, len(sizes), (B,), device=dev)]
            mask_rgb = erode_mask(mask, k, max_size=max(self.erode_sizes))
        else:
            mask_rgb = mask
        cond = WarpCondition(rgb=rgb * mask_rgb, depth=cond_depth, mask_rgb=mask_rgb, mask=mask)
        return WarpPair(target=target, cond=cond, c2w=c2w)
