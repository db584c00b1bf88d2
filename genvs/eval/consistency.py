"""3D-consistency score (3DiM, Watson et al. 2022, "3D consistency scoring").

Idea of the paper: views that a model generated for one scene are 3D consistent if a single radiance
field can explain them. 3DiM fits a NeRF to the generated views of an object and reports PSNR / SSIM of
the field's renders against *held-out generated views* (no ground truth is involved). Inconsistent
views (geometry or colours that disagree between poses) cannot all be fitted, so the held-out renders
are blurry or wrong and the score drops.

Representation used here, and why it differs from the paper
-----------------------------------------------------------
3DiM trains an MLP NeRF on an accelerator. genvs must score scenes on a 2-core CPU in seconds, so the
field is a *dense voxel grid* (DVGO / Plenoxels style): one density channel and 3 colour channels
(optionally degree-1 spherical harmonics per colour) on a ``G^3`` grid inside an axis-aligned box,
read with trilinear interpolation (``F.grid_sample``), volume-rendered with alpha compositing over a
constant background (white for SRN). It is optimised with Adam at a high learning rate, coarse to fine
(the grid starts at half resolution and is upsampled once), with a total-variation prior on density and
colour. A grid has no MLP to evaluate per sample, so a few hundred steps of a few thousand rays converge
on CPU in seconds to a minute at 32-64 px; an MLP NeRF needs thousands of steps. The price is a weaker
smoothness prior than an MLP's, which the TV term replaces; with the default diffuse colours (no view
dependence) an inconsistent set cannot hide its disagreements in view-dependent effects.

The absolute numbers therefore depend on this field and its settings and are *not* comparable to the
3DiM paper's table; compare methods (or samplers) with the same `ConsistencyConfig`.

Usage::

    res = consistency_score(images, K, c2w)          # images [V,3,H,W] in [-1,1], K [V,3,3], c2w [V,4,4]
    res.psnr, res.ssim, res.held_out                 # held-out PSNR (dB), SSIM, which views were held out
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from genvs.core.cameras import camera_rays
from genvs.eval.metrics import psnr_per_image, ssim

__all__ = [
    "ConsistencyConfig",
    "ConsistencyResult",
    "VoxelField",
    "consistency_score",
    "held_out_indices",
    "ring_overlap_psnr",
    "shares_centre",
]


@dataclass
class ConsistencyConfig:
    """Settings of the 3D-consistency fit. Defaults suit SRN-like objects (cameras at radius ~1.3,
    objects within ~0.6 of the origin, white background) at 32-64 px with ~20 views.

    Scene bounds: the field lives in the cube ``[-bound, bound]^3`` (world units, centred at ``center``);
    rays are sampled between their entry and exit of that cube, further clipped to ``[near, far]`` when
    given (distances along unit-length rays). pixelNeRF's SRN setting (near 0.8, far 1.8 at camera radius
    1.3) corresponds to ``bound`` ~0.5-0.6.
    """

    iterations: int = 300  # optimisation steps
    grid_size: int = 48  # voxels per side at the end of coarse-to-fine
    bound: float = 0.6  # half-extent of the scene cube (world units)
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    near: float | None = None  # optional extra clipping of the ray interval
    far: float | None = None
    samples_per_ray: int = 48
    rays_per_step: int = 2048
    lr: float = 0.1  # Adam learning rate of the grids (voxel grids train at high rates)
    tv_density: float = 1e-3  # total-variation weights (per voxel-difference, mean over the grid)
    tv_color: float = 1e-4
    coarse_to_fine: bool = True  # first third of the steps at half resolution
    sh_degree: int = 0  # 0: diffuse colour; 1: degree-1 spherical harmonics (view-dependent)
    background: float = 1.0  # background intensity in [0, 1] (1 = white, SRN); same for R, G, B
    holdout_every: int = 5  # hold out views ``holdout_every-1, 2*holdout_every-1, ...`` if not given
    render_chunk: int = 16384  # rays per chunk when rendering whole views
    seed: int = 0
    # CPU threads during the fit (restored afterwards); None keeps torch's setting. The ops are small, so
    # 1 thread is as fast on an idle machine and far faster on a busy one (no OpenMP barrier stalls).
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.sh_degree not in (0, 1):
            raise ValueError(f"ConsistencyConfig.sh_degree must be 0 or 1, got {self.sh_degree}")
        if self.grid_size < 4 or self.samples_per_ray < 2 or self.iterations < 1 or self.rays_per_step < 1:
            raise ValueError(
                "ConsistencyConfig: grid_size >= 4, samples_per_ray >= 2, iterations >= 1 and rays_per_step >= 1 "
                f"are required, got {self.grid_size}, {self.samples_per_ray}, {self.iterations}, {self.rays_per_step}"
            )
        if self.bound <= 0:
            raise ValueError(f"ConsistencyConfig.bound must be > 0 (half-extent of the scene cube), got {self.bound}")


@dataclass
class ConsistencyResult:
    """Outcome of one fit. ``psnr``/``ssim`` are the 3D-consistency scores (held-out generated views)."""

    psnr: float  # mean over held-out views of per-view PSNR (dB, images in [0, 1])
    ssim: float  # mean over held-out views of per-view SSIM
    train_psnr: float  # same on the fitted views: how well the field explains them
    per_view_psnr: list[float]  # held-out views, in the order of `held_out`
    held_out: list[int]
    train: list[int]
    seconds: float
    config: dict = field(default_factory=dict)
    renders: Tensor | None = field(default=None, repr=False)  # [n_held_out, 3, H, W] in [-1, 1]

    def to_dict(self) -> dict:
        """JSON-friendly summary (without the renders)."""
        d = dataclasses.asdict(dataclasses.replace(self, renders=None))
        d.pop("renders")
        return d


def held_out_indices(num_views: int, every: int) -> list[int]:
    """Views ``every-1, 2*every-1, ...`` (e.g. 4, 9, 14, 19 of 20 for ``every=5``)."""
    if every < 2:
        raise ValueError(f"holdout_every must be >= 2 (one view in `every` is held out), got {every}")
    idx = list(range(every - 1, num_views, every))
    if not idx or len(idx) >= num_views:
        raise ValueError(
            f"holdout_every={every} holds out {len(idx)} of {num_views} views; "
            "need at least one held-out and one training view (pass more views or a smaller holdout_every)"
        )
    return idx


# ------------------------------------------------------------------------------------------ field
class VoxelField(torch.nn.Module):
    """Dense grid of density + colour (+ SH) in the cube ``center +- bound``; trilinear lookups."""

    def __init__(self, grid_size: int, bound: float, center=(0.0, 0.0, 0.0), sh_degree: int = 0, alpha_init: float = 0.01):
        super().__init__()
        self.bound = float(bound)
        self.register_buffer("center", torch.tensor(center, dtype=torch.float32), persistent=False)
        self.sh_degree = sh_degree
        n_color = 3 * (1 if sh_degree == 0 else 4)
        self.voxel = 2 * self.bound / (grid_size - 1)  # world size of one voxel at the final resolution
        # softplus(raw + shift) * (step / voxel) is the optical depth of a step; initial alpha per voxel-sized
        # step is `alpha_init`, so the untrained field is nearly transparent (as in DVGO).
        self.shift = math.log(math.expm1(-math.log1p(-alpha_init)))
        self.density = torch.nn.Parameter(torch.zeros(1, 1, grid_size, grid_size, grid_size))
        self.color = torch.nn.Parameter(torch.zeros(1, n_color, grid_size, grid_size, grid_size))

    @torch.no_grad()
    def resize(self, grid_size: int) -> None:
        """Trilinearly resample both grids to ``grid_size`` per side (coarse-to-fine)."""
        for name in ("density", "color"):
            g = getattr(self, name)
            new = F.interpolate(g.data, size=(grid_size,) * 3, mode="trilinear", align_corners=True)
            setattr(self, name, torch.nn.Parameter(new))

    def query(self, pts: Tensor, dirs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """pts ``[N, 3]`` world -> (optical density per world unit ``[N]``, rgb in [0, 1] ``[N, 3]``)."""
        x = (pts - self.center) / self.bound  # [N, 3] in [-1, 1]; grid_sample wants (x, y, z) -> (W, H, D)
        g = x.view(1, 1, 1, -1, 3)
        raw = F.grid_sample(
            torch.cat([self.density, self.color], dim=1), g, mode="bilinear", padding_mode="border", align_corners=True
        )  # [1, C, 1, 1, N]
        raw = raw.view(raw.shape[1], -1).t()  # [N, C]
        sigma = F.softplus(raw[:, 0] + self.shift) / self.voxel
        c = raw[:, 1:]
        if self.sh_degree == 1:
            assert dirs is not None
            c = c.view(-1, 3, 4)
            # real SH of degree 1 up to constants absorbed by the coefficients: (1, y, z, x)
            basis = torch.cat([torch.ones_like(dirs[:, :1]), dirs[:, 1:2], dirs[:, 2:3], dirs[:, 0:1]], dim=-1)
            c = (c * basis[:, None, :]).sum(-1)
        return sigma, torch.sigmoid(c)

    def tv(self) -> tuple[Tensor, Tensor]:
        """Mean squared differences between neighbouring voxels, for density and colour."""

        def _tv(g: Tensor) -> Tensor:
            return (
                (g[..., 1:, :, :] - g[..., :-1, :, :]).square().mean()
                + (g[..., :, 1:, :] - g[..., :, :-1, :]).square().mean()
                + (g[..., :, :, 1:] - g[..., :, :, :-1]).square().mean()
            )

        return _tv(self.density), _tv(self.color)


def _ray_box(o: Tensor, d: Tensor, center: Tensor, bound: float, near: float | None, far: float | None):
    """Entry/exit distances of rays ``o + t d`` through the cube ``center +- bound`` (slab test).

    o, d ``[N, 3]`` -> t0, t1 ``[N]`` with ``t1 == t0`` for rays that miss (empty interval)."""
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    ta = (center - bound - o) * inv
    tb = (center + bound - o) * inv
    t0 = torch.minimum(ta, tb).amax(-1).clamp_min(0.0 if near is None else near)
    t1 = torch.maximum(ta, tb).amin(-1)
    if far is not None:
        t1 = t1.clamp_max(far)
    t1 = torch.maximum(t1, t0)
    return t0, t1


def _render(
    fld: VoxelField,
    o: Tensor,
    d: Tensor,
    t0: Tensor,
    t1: Tensor,
    n_samples: int,
    background: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Alpha-composite ``n_samples`` stratified samples per ray (jittered when a generator is given).

    o, d ``[N, 3]``, t0, t1 ``[N]`` -> rgb ``[N, 3]`` in [0, 1]."""
    N = o.shape[0]
    u = torch.arange(n_samples, device=o.device, dtype=o.dtype)  # [S]
    if generator is not None:
        u = u + torch.rand(N, n_samples, device=o.device, generator=generator)
    else:
        u = (u + 0.5).expand(N, n_samples)
    step = (t1 - t0) / n_samples  # [N]
    t = t0[:, None] + u * step[:, None]  # [N, S]
    pts = o[:, None, :] + t[..., None] * d[:, None, :]  # [N, S, 3]
    dirs = d[:, None, :].expand_as(pts).reshape(-1, 3) if fld.sh_degree else None
    sigma, rgb = fld.query(pts.reshape(-1, 3), dirs)
    sigma, rgb = sigma.view(N, n_samples), rgb.view(N, n_samples, 3)
    tau = sigma * step[:, None]  # optical depth of each step  [N, S]
    alpha = 1 - torch.exp(-tau)
    trans = torch.exp(-(torch.cumsum(tau, dim=-1) - tau))  # transmittance before each sample
    w = alpha * trans  # [N, S]
    acc = w.sum(-1, keepdim=True)  # [N, 1]
    return (w[..., None] * rgb).sum(-2) + (1 - acc) * background


# -------------------------------------------------------------------------------------------- API
def consistency_score(
    images: Tensor,
    K: Tensor,
    c2w: Tensor,
    held_out: Sequence[int] | None = None,
    config: ConsistencyConfig | None = None,
    return_renders: bool = False,
    **overrides,
) -> ConsistencyResult:
    """Fit a voxel radiance field to the non-held-out views of one scene, score it on the held-out ones.

    Args:
        images: ``[V, 3, H, W]`` generated views of one scene, in [-1, 1].
        K: ``[V, 3, 3]`` intrinsics in pixels of ``images``.
        c2w: ``[V, 4, 4]`` OpenCV camera-to-world.
        held_out: indices of the views to score (default: every ``config.holdout_every``-th view).
        config: `ConsistencyConfig`; keyword ``overrides`` replace its fields (e.g. ``iterations=200``).
        return_renders: keep the held-out renders in ``result.renders`` (``[n, 3, H, W]`` in [-1, 1]).

    Deterministic for a given ``seed`` on CPU (on GPU up to the ordering of atomic adds in
    ``grid_sample``'s backward pass). Runs on the device of ``images``, in fp32 (autocast disabled).
    """
    cfg = dataclasses.replace(config or ConsistencyConfig(), **overrides)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"consistency_score: images must be [V, 3, H, W] in [-1, 1], got {list(images.shape)}")
    V, _, H, W = images.shape
    if K.shape != (V, 3, 3) or c2w.shape != (V, 4, 4):
        raise ValueError(
            f"consistency_score: expected K [V, 3, 3] and c2w [V, 4, 4] with V={V}, "
            f"got {list(K.shape)} and {list(c2w.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError("consistency_score: images contain NaN or Inf")
    held = list(held_out) if held_out is not None else held_out_indices(V, cfg.holdout_every)
    if any(not 0 <= i < V for i in held) or len(set(held)) != len(held) or len(held) >= V or not held:
        raise ValueError(f"consistency_score: held_out must be distinct indices in [0, {V}) leaving training views, got {held}")
    train = [i for i in range(V) if i not in held]

    start = time.perf_counter()
    device = images.device
    threads = torch.get_num_threads()
    change = cfg.num_threads is not None and device.type == "cpu" and cfg.num_threads != threads
    if change:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _fit(images, K, c2w, held, train, cfg, start, return_renders)
    finally:
        if change:
            torch.set_num_threads(threads)


def _fit(
    images: Tensor,
    K: Tensor,
    c2w: Tensor,
    held: list[int],
    train: list[int],
    cfg: ConsistencyConfig,
    start: float,
    return_renders: bool,
) -> ConsistencyResult:
    V, _, H, W = images.shape
    device = images.device
    with torch.autocast(device.type, enabled=False):
        target = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # [V, H, W, 3] in [0, 1]
        o, d = camera_rays(K.to(device), c2w.to(device), H, W)  # [V, H, W, 3]
        center = torch.tensor(cfg.center, device=device, dtype=torch.float32)
        t0, t1 = _ray_box(o.reshape(-1, 3), d.reshape(-1, 3), center, cfg.bound, cfg.near, cfg.far)
        t0, t1 = t0.view(V, H * W), t1.view(V, H * W)
        o, d, target = o.reshape(V, H * W, 3), d.reshape(V, H * W, 3), target.reshape(V, H * W, 3)

        tr = torch.tensor(train, device=device)
        o_tr, d_tr, c_tr = o[tr].reshape(-1, 3), d[tr].reshape(-1, 3), target[tr].reshape(-1, 3)
        t0_tr, t1_tr = t0[tr].reshape(-1), t1[tr].reshape(-1)
        n_rays = o_tr.shape[0]

        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        coarse = max(4, cfg.grid_size // 2) if cfg.coarse_to_fine else cfg.grid_size
        fld = VoxelField(coarse, cfg.bound, cfg.center, cfg.sh_degree).to(device)
        fld.voxel = 2 * cfg.bound / (cfg.grid_size - 1)  # density scale fixed at the final resolution
        upsample_at = cfg.iterations // 3 if cfg.coarse_to_fine and coarse != cfg.grid_size else -1

        def make_opt():
            return torch.optim.Adam(fld.parameters(), lr=cfg.lr, betas=(0.9, 0.99))

        opt = make_opt()
        batch = min(cfg.rays_per_step, n_rays)
        for it in range(cfg.iterations):
            if it == upsample_at:
                fld.resize(cfg.grid_size)
                opt = make_opt()
            idx = torch.randint(0, n_rays, (batch,), device=device, generator=gen)
            rgb = _render(fld, o_tr[idx], d_tr[idx], t0_tr[idx], t1_tr[idx], cfg.samples_per_ray, cfg.background, gen)
            tv_d, tv_c = fld.tv()
            loss = F.mse_loss(rgb, c_tr[idx]) + cfg.tv_density * tv_d + cfg.tv_color * tv_c
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with torch.no_grad():
            rendered = []
            flat = lambda x: x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x.reshape(-1)  # noqa: E731
            oa, da, t0a, t1a = flat(o), flat(d), flat(t0), flat(t1)
            for s in range(0, oa.shape[0], cfg.render_chunk):
                e = s + cfg.render_chunk
                rendered.append(_render(fld, oa[s:e], da[s:e], t0a[s:e], t1a[s:e], cfg.samples_per_ray, cfg.background))
            pred = torch.cat(rendered).view(V, H, W, 3).permute(0, 3, 1, 2)  # [V, 3, H, W] in [0, 1]
            gt = target.view(V, H, W, 3).permute(0, 3, 1, 2)
            psnr_all = psnr_per_image(pred, gt)  # [V]
            hi = torch.tensor(held, device=device)
            ssim_held = ssim(pred[hi], gt[hi], data_range=1.0)  # [n]

    return ConsistencyResult(
        psnr=float(psnr_all[hi].mean()),
        ssim=float(ssim_held.mean()),
        train_psnr=float(psnr_all[tr].mean()),
        per_view_psnr=[float(x) for x in psnr_all[hi]],
        held_out=held,
        train=train,
        seconds=time.perf_counter() - start,
        config=dataclasses.asdict(cfg),
        renders=(pred[hi] * 2 - 1).cpu() if return_renders else None,
    )


# ------------------------------------------------------------------------------ panorama rings
def shares_centre(c2w: Tensor, tol: float = 1e-3) -> bool:
    """Whether the cameras ``c2w [V, 4, 4]`` share one centre (to ``tol`` relative to their distance from
    the origin, at least 1): a panorama ring, which `ring_overlap_psnr` can score."""
    centres = c2w[:, :3, 3].float()
    return bool((centres - centres[:1]).norm(dim=-1).max() <= tol * max(1.0, float(centres.norm(dim=-1).max())))


def ring_overlap_psnr(images: Tensor, K: Tensor, c2w: Tensor, margin: float = 1.0, center_tol: float = 1e-3) -> Tensor:
    """Consistency of views that share a camera centre (a panorama ring): PSNR between each view and its
    next ring neighbour warped into it by the rotation homography, over the pixels both see.

    Views of one panorama must agree exactly where they overlap (the cameras only rotate), so no field has
    to be fitted: MVDiffusion's multi-view consistency in one number, low for views generated independently.
    ``images [V, 3, H, W]`` in [-1, 1], ``K [V, 3, 3]`` pixels, ``c2w [V, 4, 4]``; pairs ``(v, v + 1 mod V)``.
    Pixels within ``margin`` of the neighbour's border are left out (bilinear reads there use padding).
    Returns ``[V]``: PSNR (dB, images in [0, 1]) of each pair; ``nan`` for pairs that do not overlap.
    """
    from genvs.core.geometry import apply_homography, pixels_to_grid, rotation_homography

    V, _, H, W = images.shape
    if not shares_centre(c2w, center_tol):
        raise ValueError(
            "ring_overlap_psnr needs views that share a camera centre (a panorama ring); for other data leave "
            "evaluation.ring_overlap off"
        )
    nxt = torch.arange(1, V + 1, device=images.device) % V
    Hm = rotation_homography(K.float(), c2w.float(), K[nxt].float(), c2w[nxt].float())  # view v -> view v+1
    ys, xs = torch.meshgrid(torch.arange(H, device=images.device) + 0.5, torch.arange(W, device=images.device) + 0.5, indexing="ij")  # fmt: skip
    uv = torch.stack([xs, ys], -1).reshape(1, H * W, 2).expand(V, H * W, 2)
    dst, w = apply_homography(Hm, uv)
    inside = (w > 0) & (dst[..., 0] >= margin) & (dst[..., 0] <= W - margin) & (dst[..., 1] >= margin) & (dst[..., 1] <= H - margin)  # fmt: skip
    grid = pixels_to_grid(dst, H, W).reshape(V, H, W, 2)
    warped = F.grid_sample(images[nxt].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = inside.reshape(V, 1, H, W).float()
    err = ((warped - images.float()) / 2) ** 2 * mask  # [0, 1] scale
    mse = err.sum(dim=(1, 2, 3)) / (3 * mask.sum(dim=(1, 2, 3)))
    return torch.where(mask.sum(dim=(1, 2, 3)) > 0, -10 * torch.log10(mse.clamp_min(1e-10)), torch.full_like(mse, float("nan")))
