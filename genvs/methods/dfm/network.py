"""DFM's denoiser ("Diffusion with Forward Models", Tewari et al. 2023) and its training/sampling helpers.

Denoising step for a noisy target ``z_t`` at pose ``(K, c2w)`` given clean context views:

1. encode the context views at ``t = 0`` and render, from the context alone (a separate context-only
   field, coarse samples only), the target pose's RGB, depth and ``cond_features`` features;
2. concatenate ``[z_t, rgb, depth, feats]`` (``3 + 3 + 1 + 64 = 71`` channels in the official code) and
   encode it at time ``t`` with the same image network (its own input stem);
3. the context views plus the encoded target form a `Scene`; the joint field renders the target pose:
   the rendered image **is** the x0 estimate. Any other pose renders from the same scene (training
   supervises one extra pose; after sampling, orbit videos are rendered from the final scene).

Plain ``nn.Module`` + functions; no Lightning here. Diffusion times are continuous ``t in [0, 1]``;
`sampler_time` converts a diffusers timestep to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from genvs.core.config import Configurable
from genvs.core.diffusion import NoiseSchedule, diffusion_loss, dynamic_threshold, q_sample
from genvs.core.distributed import BatchRNG, as_batch_rng
from genvs.core.samplers import Sampler, cfg_combine
from genvs.core.views import Views
from genvs.methods.dfm.pixelnerf import PixelNeRFField, Scene, build_encoder
from genvs.methods.dfm.render import RenderOutput, VolumeRenderer

__all__ = [
    "DFMDenoiser",
    "DFMOutput",
    "random_patches",
    "edge_aware_smoothness",
    "dfm_training_losses",
    "pixelnerf_losses",
    "init_joint_field_from_context_field",
    "sampler_time",
    "dfm_sample",
    "dfm_sample_autoregressive",
]


@dataclass
class DFMOutput:
    """What one denoiser call produces.

    render: joint-field render at the requested cameras (``rgb`` is the x0 estimate): image layout
        ``rgb [B, M, 3, H, W]`` for full views, per-pixel ``rgb [B, M, R, 3]`` when pixels were given.
    cond: ``[B, 4 + F, H, W]`` the context-only render at the target pose (rgb in [-1, 1], z-depth, features).
    cond_render: the same render as a `RenderOutput` in image layout (``rgb [B, 1, 3, H, W]``).
    scene: context views + encoded noisy target (the target is the last view).
    """

    render: RenderOutput
    cond: Tensor
    cond_render: RenderOutput
    scene: Scene


class DFMDenoiser(Configurable, nn.Module):
    """DFM denoiser: image encoder + context-only field + joint field + volume renderers.

    Args:
        encoder: ``"dit"`` (official DFM: `DiTEncoder`) or ``"timm"`` (pixelNeRF: `TimmEncoder`).
        encoder_kwargs: passed to the encoder (DiT sizes, ``abs_pose``, ``gradient_checkpointing``; timm
            ``backbone``/``pretrained``/...).
        feature_dim: encoder output channels (512 in DFM and pixelNeRF).
        cond_features: features the context-only field renders for the target's input (64).
        mlp_hidden, mlp_blocks, combine_layer, feature_injection: `PixelNeRFField` shape (512, 5, 3, "input").
        near, far: z-depth range (official: CO3D 0.5 / 40 after scaling scenes to mean depth 10;
            RealEstate10K 0.7 / 10).
        n_coarse, n_fine: samples per ray of the joint render (official code 64 + 64; paper 64 + 128).
        cond_n_coarse, cond_n_fine: samples of the context-only render (official: CO3D 64 + 0, RE10K 32 + 0).
        chunk_rays, checkpoint: ray chunking and per-chunk gradient checkpointing of both renderers.
        eval_chunk_rays: rays per chunk without gradients (sampling, videos; default ``chunk_rays``).
        background: background colour in [-1, 1] (DFM: black, -1; white data such as genvs' procedural
            dataset: +1).
        lindisp: sample depths linearly in inverse depth.
        depth_scale: the conditioning depth is divided by this before encoding (official: 1, raw depth).
    """

    def __init__(
        self,
        encoder: Literal["dit", "timm"] = "dit",
        encoder_kwargs: dict | None = None,
        feature_dim: int = 512,
        cond_features: int = 64,
        mlp_hidden: int = 512,
        mlp_blocks: int = 5,
        combine_layer: int = 3,
        feature_injection: Literal["input", "blocks"] = "input",
        near: float = 0.5,
        far: float = 40.0,
        n_coarse: int = 64,
        n_fine: int = 64,
        cond_n_coarse: int = 64,
        cond_n_fine: int = 0,
        chunk_rays: int = 4096,
        checkpoint: bool = False,
        eval_chunk_rays: int | None = None,
        background: float = -1.0,
        lindisp: bool = False,
        depth_scale: float = 1.0,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        self.cond_features, self.depth_scale = cond_features, depth_scale
        self.target_in_channels = 3 + 3 + 1 + cond_features
        self.encoder = build_encoder(
            encoder, self.target_in_channels, feature_dim, time_scale=time_scale, **(encoder_kwargs or {})
        )
        feat_dim = self.encoder.out_channels
        field_kw = dict(
            feat_dim=feat_dim, hidden=mlp_hidden, n_blocks=mlp_blocks, combine_layer=combine_layer,
            feature_injection=feature_injection, time_scale=time_scale,
        )
        self.cond_field = PixelNeRFField(n_feats_out=cond_features, **field_kw)
        self.field = PixelNeRFField(n_feats_out=0, **field_kw)
        rkw = dict(
            near=near, far=far, chunk_rays=chunk_rays, checkpoint=checkpoint, background=background, lindisp=lindisp,
            eval_chunk_rays=eval_chunk_rays,
        )
        self.cond_renderer = VolumeRenderer(n_coarse=cond_n_coarse, n_fine=cond_n_fine, **rkw)
        self.renderer = VolumeRenderer(n_coarse=n_coarse, n_fine=n_fine, **rkw)

    def target_only_modules(self) -> list[nn.Module]:
        """Modules only the diffusion stage uses: the joint field and the encoder's target input stem (frozen in
        the deterministic pixelNeRF stage, which renders targets from the context alone)."""
        mods: list[nn.Module] = [self.field]
        for name in ("stem_target", "extra_stem"):
            m = getattr(self.encoder, name, None)
            if isinstance(m, nn.Module):
                mods.append(m)
        return mods

    # ---------------------------------------------------------------------------------- scenes
    def encode_context(self, images: Tensor, K: Tensor, c2w: Tensor) -> Scene:
        """Clean context ``images [B, Nc, 3, H, W]``, ``K [B, Nc, 3, 3]``, ``c2w [B, Nc, 4, 4]`` -> `Scene` (t = 0)."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"context images must be [B, Nc, 3, H, W], got {list(images.shape)}")
        B, Nc = images.shape[:2]
        t = images.new_zeros(B * Nc, dtype=torch.float32)
        feats = self.encoder(images.flatten(0, 1), t, target=False, c2w=c2w.flatten(0, 1).float())
        feats = feats.unflatten(0, (B, Nc))
        return Scene(feats, K.float(), c2w.float(), t.view(B, Nc), tuple(images.shape[-2:]))

    def render_conditioning(self, context: Scene, K: Tensor, c2w: Tensor) -> tuple[Tensor, RenderOutput]:
        """Context-only render of the target camera ``K [B, 3, 3]``, ``c2w [B, 4, 4]`` at the context's image
        size: ``cond [B, 4 + F, H, W]`` (rgb, z-depth / depth_scale, features) and the `RenderOutput`."""
        field = lambda p: self.cond_field(context, p)  # noqa: E731
        out = self.cond_renderer.render_views(field, K[:, None], c2w[:, None], context.image_size)
        cond = torch.cat([out.rgb[:, 0], out.depth[:, 0] / self.depth_scale, out.feats[:, 0]], dim=1)
        return cond, out

    def target_scene(self, context: Scene, noisy: Tensor, t: Tensor, K: Tensor, c2w: Tensor, cond: Tensor) -> Scene:
        """Encode the noisy target ``[B, 3, H, W]`` at time ``t [B]`` with its conditioning ``cond`` and append
        it (as the last view) to the context scene."""
        B = noisy.shape[0]
        t = t.float().expand(B)
        x = torch.cat([noisy, cond.to(noisy.dtype)], dim=1)
        feats = self.encoder(x, t, target=True, c2w=c2w.float())[:, None]
        target = Scene(feats, K[:, None].float(), c2w[:, None].float(), t[:, None], context.image_size)
        return context.append(target)

    def render(
        self,
        scene: Scene,
        K: Tensor,
        c2w: Tensor,
        uv: Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> RenderOutput:
        """Render a scene at cameras ``K [B, M, 3, 3]``, ``c2w [B, M, 4, 4]`` with the joint field, no diffusion.

        Full views of ``size`` (default: the scene's image size; intrinsics must match that size) in image
        layout, or the pixels ``uv [B, M, R, 2]`` in per-pixel layout. Use under ``torch.no_grad()`` for
        videos: memory is bounded by ``chunk_rays`` whatever the number of cameras.
        """
        field = lambda p: self.field(scene, p)  # noqa: E731
        if uv is not None:
            return self.renderer.render_pixels(field, K, c2w, uv)
        return self.renderer.render_views(field, K, c2w, size or scene.image_size)

    # --------------------------------------------------------------------------------- forward
    def forward(
        self,
        context_images: Tensor,
        context_K: Tensor,
        context_c2w: Tensor,
        noisy_target: Tensor,
        t: Tensor,
        target_K: Tensor,
        target_c2w: Tensor,
        render_K: Tensor | None = None,
        render_c2w: Tensor | None = None,
        render_uv: Tensor | None = None,
    ) -> DFMOutput:
        """One denoising step.

        Args:
            context_images: ``[B, Nc, 3, H, W]`` clean, with ``context_K [B, Nc, 3, 3]`` and
                ``context_c2w [B, Nc, 4, 4]``.
            noisy_target: ``[B, 3, H, W]`` at time ``t [B]`` (continuous, 0 = clean), camera
                ``target_K [B, 3, 3]``, ``target_c2w [B, 4, 4]``.
            render_K, render_c2w: ``[B, M, ...]`` cameras to render (default: the target camera, M = 1).
            render_uv: ``[B, M, R, 2]``: render only these pixels (training patches).

        The x0 estimate is ``out.render.rgb[:, 0]`` when rendering the target camera in full.
        """
        context = self.encode_context(context_images, context_K, context_c2w)
        cond, cond_render = self.render_conditioning(context, target_K, target_c2w)
        scene = self.target_scene(context, noisy_target, t, target_K, target_c2w, cond)
        if render_K is None:
            render_K, render_c2w = target_K[:, None], target_c2w[:, None]
        render = self.render(scene, render_K, render_c2w, uv=render_uv)
        return DFMOutput(render, cond, cond_render, scene)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def random_patches(
    B: int, M: int, H: int, W: int, size: int = 24, generator: torch.Generator | None = None, device=None
) -> tuple[Tensor, Tensor]:
    """One random ``size x size`` patch per scene, at the same place in its ``M`` views (as the official code).

    Returns pixel-centre coordinates ``uv [B, M, size*size, 2]`` and flat pixel indices ``[B, M, size*size]``
    (row-major ``y * W + x``) to gather ground truth with. ``size`` is clipped to the image.
    """
    s = min(size, H, W)
    y0 = torch.randint(0, H - s + 1, (B,), generator=generator).to(device)
    x0 = torch.randint(0, W - s + 1, (B,), generator=generator).to(device)
    r = torch.arange(s, device=device)
    ys = (y0[:, None, None] + r[None, :, None]).expand(B, s, s)  # [B, s, s]
    xs = (x0[:, None, None] + r[None, None, :]).expand(B, s, s)
    uv = torch.stack([xs, ys], dim=-1).reshape(B, 1, s * s, 2).float() + 0.5
    idx = (ys * W + xs).reshape(B, 1, s * s)
    return uv.expand(B, M, s * s, 2), idx.expand(B, M, s * s)


def _gather_pixels(images: Tensor, idx: Tensor) -> Tensor:
    """``images [B, M, C, H, W]``, ``idx [B, M, R]`` -> ``[B, M, R, C]``."""
    flat = images.flatten(-2)  # [B, M, C, HW]
    return flat.gather(-1, idx[:, :, None].expand(-1, -1, flat.shape[2], -1)).transpose(-1, -2)


def edge_aware_smoothness(image: Tensor, depth: Tensor) -> Tensor:
    """Edge-aware smoothness of inverse depth (official DFM RealEstate10K regulariser), per image ``[N]``.

    ``image [N, 3, h, w]`` (the ground-truth patch), ``depth [N, 1, h, w]`` (rendered). Inverse depth
    (depth clamped to [1e-3, 80]) is normalised by its mean over the patch; its horizontal and vertical
    differences are weighted by ``exp(-|image gradient|)`` (mean over channels) and averaged.
    """
    inv = 1.0 / depth.float().clamp(1e-3, 80.0)
    inv = inv / inv.mean(dim=(2, 3), keepdim=True)
    img = image.float()
    dx = (inv[..., :, :-1] - inv[..., :, 1:]).abs() * torch.exp(-(img[..., :, :-1] - img[..., :, 1:]).abs().mean(1, True))
    dy = (inv[..., :-1, :] - inv[..., 1:, :]).abs() * torch.exp(-(img[..., :-1, :] - img[..., 1:, :]).abs().mean(1, True))
    h, w = depth.shape[-2:]
    return (dx.flatten(1).sum(1) + dy.flatten(1).sum(1)) / (h * w)


def _patch_images(x: Tensor, s: int) -> Tensor:
    """Per-pixel patch values ``[B, M, s*s, C]`` -> images ``[B*M, C, s, s]``."""
    return x.reshape(-1, s, s, x.shape[-1]).permute(0, 3, 1, 2)


def dfm_training_losses(
    denoiser: DFMDenoiser,
    schedule: NoiseSchedule,
    views: Views,
    lpips: nn.Module | None = None,
    patch_size: int = 24,
    p_uncond: float = 0.0,
    lpips_weight: float = 1.0,
    cond_weight: float = 1.0,
    distortion_weight: float = 0.0,
    smoothness_weight: float = 0.0,
    generator: BatchRNG | torch.Generator | None = None,
) -> dict[str, Tensor]:
    """DFM's loss terms on a `Views` batch (``num_context >= 1`` context views, then ``M >= 1`` targets).

    Target 0 is noised (``t ~ schedule.sample_t``, ``z = q_sample``); every target (target 0 and the extra
    poses) is rendered from the scene on one random ``patch_size`` patch per scene and compared with the
    ground truth: x0 MSE (`diffusion_loss`, kind ``"x0"``) and LPIPS (``lpips(pred, gt)`` on ``[-1, 1]``
    patches; skipped when ``lpips`` is None). ``cond_mse`` is the MSE of the full context-only render at
    target 0 against target 0. With probability ``p_uncond`` a scene's context images are zeroed (the
    unconditional model of classifier-free guidance) and its ``cond_mse`` is dropped. The official
    RealEstate10K regularisers act on the same patch renders: mip-NeRF 360's ``distortion`` (weight 0.005)
    and the ``smoothness`` of inverse depth (`edge_aware_smoothness`, weight 0.002).

    Returns ``{"loss", "mse", "lpips", "cond_mse", "distortion", "smoothness"}``: ``loss = mse +
    lpips_weight * lpips + cond_weight * cond_mse + distortion_weight * distortion + smoothness_weight *
    smoothness`` is the one to backpropagate (official: LPIPS 1 on RealEstate10K, 0.2 in the CO3D training
    command; cond 1); the other terms are detached, for logging.

    ``generator``: a `BatchRNG` (the LightningModule's ``batch_rng``: draws independent of the process
    layout), a generator, or ``None`` (torch's global RNG).
    """
    if views.num_context < 1 or views.V - views.num_context < 1 or views.images is None:
        raise ValueError(f"DFM training needs >= 1 context and >= 1 target view with images, got {views!r}")
    ctx, trg = views.context, views.targets
    B, M = trg.B, trg.V
    H, W = trg.H, trg.W
    device = views.device
    x0 = trg.images[:, 0]
    rng = as_batch_rng(generator)
    t = rng.draw(lambda n, g: schedule.sample_t(n, device=device, generator=g), B, device)
    logsnr = schedule.logsnr(t)
    eps = rng.randn_like(x0)
    z = q_sample(x0, logsnr, eps)
    keep = torch.ones(B, device=device)
    if p_uncond > 0:
        u = rng.rand(B, device=device)
        keep = (u >= p_uncond).float()
    ctx_images = ctx.images * keep.view(B, 1, 1, 1, 1).to(ctx.images.dtype)
    uv, idx = rng.draw(lambda n, g: random_patches(n, M, H, W, patch_size, g, device), B, "cpu")
    out = denoiser(ctx_images, ctx.K, ctx.c2w, z, t, trg.K[:, 0], trg.c2w[:, 0], trg.K, trg.c2w, render_uv=uv)
    pred = out.render.rgb  # [B, M, R, 3]
    gt = _gather_pixels(trg.images, idx)  # [B, M, R, 3]
    mse = diffusion_loss(pred.flatten(1), gt.flatten(1), torch.zeros_like(gt.flatten(1)), logsnr, "x0").mean()
    s = int(round(idx.shape[-1] ** 0.5))
    zero = pred.new_zeros((), dtype=torch.float32)
    lp = lpips(_patch_images(pred, s).float(), _patch_images(gt, s).float()).mean() if lpips is not None else zero
    cond_err = (out.cond_render.rgb[:, 0].float() - x0.float()).pow(2).flatten(1).mean(1)  # [B]
    cond_mse = (cond_err * keep).sum() / keep.sum().clamp_min(1)
    dist = out.render.distortion.float().mean()
    smooth = edge_aware_smoothness(_patch_images(gt, s), _patch_images(out.render.depth[..., None], s)).mean()
    loss = mse + lpips_weight * lp + cond_weight * cond_mse
    if distortion_weight:
        loss = loss + distortion_weight * dist
    if smoothness_weight:
        loss = loss + smoothness_weight * smooth
    return {
        "loss": loss, "mse": mse.detach(), "lpips": lp.detach(), "cond_mse": cond_mse.detach(),
        "distortion": dist.detach(), "smoothness": smooth.detach(),
    }


def pixelnerf_losses(
    denoiser: DFMDenoiser,
    views: Views,
    lpips: nn.Module | None = None,
    patch_size: int = 24,
    lpips_weight: float = 1.0,
    generator: BatchRNG | torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Stage 1 of DFM's training: a deterministic pixelNeRF (encoder + context-only field) that renders every
    target view from the context alone, on one random patch per scene, with the joint renderer's samples.

    Returns ``{"loss", "mse", "lpips"}``. Afterwards `init_joint_field_from_context_field` initialises the
    joint field from it (the official code loads the pixelNeRF weights into both fields).
    """
    if views.num_context < 1 or views.V - views.num_context < 1 or views.images is None:
        raise ValueError(f"pixelNeRF training needs >= 1 context and >= 1 target view with images, got {views!r}")
    ctx, trg = views.context, views.targets
    B, M, H, W = trg.B, trg.V, trg.H, trg.W
    scene = denoiser.encode_context(ctx.images, ctx.K, ctx.c2w)
    rng = as_batch_rng(generator)
    uv, idx = rng.draw(lambda n, g: random_patches(n, M, H, W, patch_size, g, views.device), B, "cpu")
    out = denoiser.renderer.render_pixels(lambda p: denoiser.cond_field(scene, p), trg.K, trg.c2w, uv)
    gt = _gather_pixels(trg.images, idx)
    mse = (out.rgb.float() - gt.float()).pow(2).mean()
    s = int(round(idx.shape[-1] ** 0.5))
    lp = lpips(_patch_images(out.rgb, s).float(), _patch_images(gt, s).float()).mean() if lpips is not None else mse.new_zeros(())
    return {"loss": mse + lpips_weight * lp, "mse": mse.detach(), "lpips": lp.detach()}


@torch.no_grad()
def init_joint_field_from_context_field(denoiser: DFMDenoiser) -> None:
    """Copy the context-only field's weights into the joint field (its output layer: density and colour
    rows only; the context-only field also outputs ``cond_features`` features)."""
    src = denoiser.cond_field.state_dict()
    dst = denoiser.field.state_dict()
    for k, v in dst.items():
        w = src[k]
        dst[k] = w[: v.shape[0]].clone() if k.startswith("lin_out.") else w.clone()
    denoiser.field.load_state_dict(dst)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def sampler_time(timestep: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Continuous time of a diffusers timestep: ``t = (i + 1) / T`` (the grid `NoiseSchedule.betas` is built on)."""
    return (timestep.float() + 1.0) / schedule.num_train_timesteps


@torch.no_grad()
def dfm_sample(
    denoiser: DFMDenoiser,
    schedule: NoiseSchedule,
    sampler: Sampler,
    context_images: Tensor,
    context_K: Tensor,
    context_c2w: Tensor,
    target_K: Tensor,
    target_c2w: Tensor,
    generator: torch.Generator | None = None,
    threshold_percentile: float | None = 0.95,
) -> tuple[Tensor, Scene]:
    """Sample one target view per scene with ``sampler`` (DFM: DDIM, 50 steps) over x0 predictions.

    Classifier-free guidance (``sampler.guidance_scale != 1``) combines x0 from the real context with x0
    from zeroed context images (the official unconditional model); ``sampler.noise_temperature`` scales
    the noise (RealEstate10K: CFG 2.0, temperature 0.85). x0 is dynamically thresholded at
    ``threshold_percentile`` (official 0.95; None = plain clipping to [-1, 1]).

    Returns the sample ``[B, 3, H, W]`` and the scene of the last denoising step (context views + the
    target encoded at the last, smallest, noise level), to render videos from with `DFMDenoiser.render`.
    """
    B, _, _, H, W = context_images.shape
    ctx = denoiser.encode_context(context_images, context_K, context_c2w)
    cond, _ = denoiser.render_conditioning(ctx, target_K, target_c2w)
    K2, c2w2 = target_K, target_c2w
    if sampler.guided:
        uctx = denoiser.encode_context(torch.zeros_like(context_images), context_K, context_c2w)
        ucond, _ = denoiser.render_conditioning(uctx, target_K, target_c2w)
        ctx, cond = Scene.cat_batch([ctx, uctx]), torch.cat([cond, ucond], dim=0)
        K2, c2w2 = torch.cat([target_K, target_K]), torch.cat([target_c2w, target_c2w])
    last: dict[str, Scene] = {}

    def model_fn(z: Tensor, logsnr: Tensor, timestep: Tensor) -> Tensor:
        t = sampler_time(timestep, schedule).to(z.device)
        if sampler.guided:
            z, t = torch.cat([z, z]), torch.cat([t, t])
        scene = denoiser.target_scene(ctx, z, t, K2, c2w2, cond)
        x0 = denoiser.render(scene, K2[:, None], c2w2[:, None]).rgb[:, 0].float()
        if sampler.guided:
            x0 = cfg_combine(x0[:B], x0[B:], sampler.guidance_scale)
            scene = scene.batch(slice(0, B))
        last["scene"] = scene
        return dynamic_threshold(x0, threshold_percentile) if threshold_percentile else x0.clamp(-1, 1)

    x = sampler.loop(model_fn, (B, 3, H, W), schedule, "x0", generator=generator, device=context_images.device)
    return x, last["scene"]


@torch.no_grad()
def dfm_sample_autoregressive(
    denoiser: DFMDenoiser,
    schedule: NoiseSchedule,
    sampler: Sampler,
    context_images: Tensor,
    context_K: Tensor,
    context_c2w: Tensor,
    target_K: Tensor,
    target_c2w: Tensor,
    generator: torch.Generator | None = None,
    threshold_percentile: float | None = 0.95,
    max_context: int | None = None,
) -> tuple[Tensor, Scene]:
    """DFM's autoregressive mode (CO3D): sample targets ``K [B, M, 3, 3]``, ``c2w [B, M, 4, 4]`` in order, each
    conditioned on the context views and every target sampled before it (the most recent ``max_context``
    views when set). Returns ``[B, M, 3, H, W]`` and the final scene (all views + the last target)."""
    images, Ks, c2ws = context_images, context_K, context_c2w
    outs, scene = [], None
    for j in range(target_K.shape[1]):
        x, scene = dfm_sample(
            denoiser, schedule, sampler, images, Ks, c2ws, target_K[:, j], target_c2w[:, j], generator,
            threshold_percentile,
        )
        x = x.clamp(-1, 1)
        outs.append(x)
        images = torch.cat([images, x[:, None].to(images.dtype)], dim=1)
        Ks = torch.cat([Ks, target_K[:, j : j + 1]], dim=1)
        c2ws = torch.cat([c2ws, target_c2w[:, j : j + 1]], dim=1)
        if max_context is not None:
            images, Ks, c2ws = images[:, -max_context:], Ks[:, -max_context:], c2ws[:, -max_context:]
    return torch.stack(outs, dim=1), scene
