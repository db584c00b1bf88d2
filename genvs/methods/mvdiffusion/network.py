"""The multi-view denoiser of MVDiffusion: a frozen SD UNet run on ``[B V]`` latents with trainable
correspondence-aware attention mixing the views, plus its training loss and CFG sampling loop.

Pipelines (all eps-prediction on SD's discrete scaled-linear schedule, DDIM 50 steps, CFG 9.0):

- text-conditioned panorama: SD-2-base UNet (4 input channels), 8 views, homography correspondences;
- image&text-conditioned panorama: SD-2-inpainting UNet (9 channels: latents + mask + masked-image
  latents, see `inpaint_channels`), view 0 given;
- depth-to-image: SD-2-depth UNet (5 channels: latents + normalised inverse depth, `depth_channel`),
  depth correspondences; key frames first, then each pair of consecutive key frames with the frames
  between them, conditioned on the two generated key frames (`keyframe_condition`, `keyframe_segments`).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from genvs.core.diffusion import DiscreteSchedule, NoiseSchedule, diffusion_loss, q_sample
from genvs.core.distributed import BatchRNG, as_batch_rng
from genvs.core.samplers import DDIMScheduler, Sampler, cfg_combine
from genvs.methods.mvdiffusion.caa import CAAAdapter
from genvs.methods.mvdiffusion.correspondences import Correspondences
from genvs.methods.mvdiffusion.sd import freeze

__all__ = [
    "MultiViewUNet",
    "sd_schedule",
    "default_sampler",
    "inpaint_channels",
    "depth_channel",
    "keyframe_condition",
    "keyframe_segments",
    "training_loss",
    "sample_latents",
    "SD_DDIM",
]


class MultiViewUNet(nn.Module):
    """Frozen ``UNet2DConditionModel`` + trainable `CAAAdapter`.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (frozen here: ``requires_grad_(False)``, eval mode that
            survives ``.train()``). Its graph stays differentiable so the adapter gets gradients.
        variant: ``"panorama"`` or ``"depth"`` (see `CAAAdapter`).
        condition_channels: 5 for the depth model's interpolation stage (key-frame latents + mask), else 0.
        checkpoint: activation checkpointing of the CAA blocks (as the official code).
        gradient_checkpointing: activation checkpointing of the frozen UNet's blocks too (diffusers'
            ``enable_gradient_checkpointing``): the adapter's gradients flow back through every UNet block,
            whose activations dominate memory at 512x512 with 8 views; same loss and gradients.
    """

    def __init__(
        self,
        unet: nn.Module,
        variant: Literal["panorama", "depth"] = "panorama",
        head_dim: int = 32,
        condition_channels: int = 0,
        checkpoint: bool = True,
        pe_octaves: tuple[float, float] | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.unet = freeze(unet)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.adapter = CAAAdapter(unet, variant, head_dim, condition_channels, checkpoint, pe_octaves)

    def train(self, mode: bool = True) -> "MultiViewUNet":
        super().train(mode)
        self.unet.eval()  # frozen: no dropout / norm statistics updates, whatever Lightning asks
        return self

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapter.parameters() if p.requires_grad]

    def feature_sizes(self, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Feature sizes ``(h, w)`` at the CAA sites for latents of ``latent_size`` (compute the
        correspondences for exactly these)."""
        h, w = latent_size
        sizes = []
        for blk in self.unet.down_blocks:
            sizes.append((h, w))
            if blk.downsamplers is not None:
                h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 conv, padding 1
        sizes.append((h, w))  # mid block
        return list(dict.fromkeys(sizes))

    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_emb: Tensor,
        corr: Correspondences | None,
        extra: Tensor | None = None,
        condition: Tensor | None = None,
    ) -> Tensor:
        """Predict the noise of every view.

        Args:
            latents: ``[B, V, 4, h, w]`` noisy latents.
            timestep: ``[B]`` (shared by the views, as in training) or ``[B, V]`` integer SD timesteps.
            text_emb: ``[B, V, L, D]`` per-view prompt embeddings (or ``[B, L, D]`` shared by the views).
            corr: correspondences at `feature_sizes` (batch ``B`` or 1; ``None`` only when ``V == 1``).
            extra: ``[B, V, C_e, h, w]`` channels concatenated to the latents (inpainting mask + masked
                latents, 5; depth, 1) so that ``4 + C_e`` is the UNet's ``in_channels``.
            condition: ``[B, V, 5, h, w]`` key-frame condition for the adapter's `ConditionEncoder`.

        Returns ``[B, V, 4, h, w]``.
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, V, C, h, w], got {list(latents.shape)}")
        B, V, _, h, w = latents.shape
        x = latents if extra is None else torch.cat([latents, extra.to(latents.dtype)], dim=2)
        if x.shape[2] != self.in_channels:
            hint = {
                9: "an inpainting UNet: pass extra=inpaint_channels(...)",
                5: "a depth UNet: pass extra=depth_channel(...)",
            }
            raise ValueError(
                f"the UNet takes {self.in_channels} input channels but got {x.shape[2]} "
                f"(latents {latents.shape[2]} + extra {0 if extra is None else extra.shape[2]}); "
                f"{hint.get(self.in_channels, 'pass extra=None for a text-to-image UNet')}"
            )
        if text_emb.ndim == 3:
            text_emb = text_emb[:, None].expand(B, V, *text_emb.shape[1:])
        if text_emb.shape[:2] != (B, V):
            raise ValueError(f"text_emb must be [B, V, L, D] with B={B}, V={V}, got {list(text_emb.shape)}")
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(B, V)
        cond = None if condition is None else condition.flatten(0, 1).to(latents.dtype)
        with self.adapter.context(corr, V, cond):
            out = self.unet(
                x.flatten(0, 1),
                timestep.reshape(B * V),
                encoder_hidden_states=text_emb.flatten(0, 1).to(latents.dtype),
                return_dict=False,
            )[0]
        return out.unflatten(0, (B, V))


# ------------------------------------------------------------------------------- conditioning inputs


def inpaint_channels(masked_latents: Tensor, given: Tensor) -> Tensor:
    """Extra channels of the SD inpainting UNet: ``[mask, masked-image latents]`` -> ``[B, V, 5, h, w]``.

    ``given [B, V]`` bool marks the views that are inputs (view 0 in the paper); ``mask`` is 1 where the
    UNet must generate (the other views) as in SD inpainting. ``masked_latents [B, V, 4, h, w]`` are the
    VAE latents of ``images * given`` (given views kept, others zeroed *in pixel space*, then encoded:
    ``encode_images(vae, images * given[..., None, None, None])``).
    """
    B, V, _, h, w = masked_latents.shape
    mask = (~given.bool()).to(masked_latents.dtype)[:, :, None, None, None].expand(B, V, 1, h, w)
    return torch.cat([mask, masked_latents], dim=2)


def depth_channel(depth: Tensor, size: tuple[int, int], invalid: float = -2.0) -> Tensor:
    """Depth input of the SD depth UNet: inverse depth normalised to [-1, 1] per view (near = 1), read
    at the latent pixel centres; pixels without depth get ``invalid`` (as in the official code).

    ``depth [B, V, 1, H, W]`` z-depth (0 = unknown) -> ``[B, V, 1, h, w]``.
    """
    valid = depth > 0
    inv = torch.where(valid, 1.0 / depth.clamp_min(1e-6), torch.zeros_like(depth))
    big = torch.finfo(inv.dtype).max
    lo = torch.where(valid, inv, torch.full_like(inv, big)).amin(dim=(-1, -2, -3), keepdim=True)
    hi = torch.where(valid, inv, torch.full_like(inv, -big)).amax(dim=(-1, -2, -3), keepdim=True)
    norm = (inv - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    norm = torch.where(valid, norm, torch.full_like(norm, invalid))
    B, V = depth.shape[:2]
    out = torch.nn.functional.interpolate(norm.flatten(0, 1).float(), size=size, mode="nearest-exact")
    return out.unflatten(0, (B, V)).to(depth.dtype)


def keyframe_condition(latents: Tensor, key: Tensor) -> Tensor:
    """Interpolation-stage condition ``[B, V, 5, h, w]``: the key frames' latents (zero elsewhere) and a
    mask channel that is 1 on key frames. ``latents [B, V, 4, h, w]``, ``key [B, V]`` bool."""
    k = key.bool().to(latents.dtype)[:, :, None, None, None]
    return torch.cat([latents * k, k.expand(*latents.shape[:2], 1, *latents.shape[-2:])], dim=2)


def keyframe_segments(key: Sequence[bool] | Tensor) -> list[tuple[int, int]]:
    """Every pair of consecutive key frames with at least one frame between them, as inclusive index
    ranges ``(start, end)``: the interpolation stage generates frames ``start + 1 .. end - 1`` of each
    (all pairs, not only the first as in the official test code)."""
    idx = [i for i, k in enumerate(torch.as_tensor(key).tolist()) if k]
    return [(a, b) for a, b in zip(idx[:-1], idx[1:]) if b - a > 1]


# --------------------------------------------------------------------------------- train / sample


SD_DDIM = dict(timestep_spacing="leading", steps_offset=1, clip_sample=False)  # SD-2's DDIM settings


def sd_schedule(scheduler_config: dict | None = None) -> tuple[NoiseSchedule, str]:
    """The noise schedule and parameterisation of an SD checkpoint (from its ``scheduler_config.json``;
    default SD-2-base: scaled-linear 0.00085..0.012, eps)."""
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    cfg.update({k: v for k, v in (scheduler_config or {}).items() if k in cfg or k == "prediction_type"})
    kind = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(cfg.pop("prediction_type", "epsilon"))
    if kind is None:
        raise ValueError(f"unsupported prediction_type in scheduler config: {scheduler_config}")
    schedule = DiscreteSchedule(cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"])
    return schedule, kind


def default_sampler(num_steps: int = 50, guidance_scale: float = 9.0) -> Sampler:
    """DDIM 50 steps with CFG 9.0 on SD's "leading" timestep spacing, as in the paper (no x0 clipping:
    SD latents are not bounded by [-1, 1], unlike diffusers' DDIM default ``clip_sample=True``)."""
    return Sampler(DDIMScheduler(**SD_DDIM), num_steps, guidance_scale)


def _randn(shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)


def training_loss(
    net: MultiViewUNet,
    schedule: NoiseSchedule,
    latents: Tensor,
    text_emb: Tensor,
    corr: Correspondences | None,
    extra: Tensor | None = None,
    condition: Tensor | None = None,
    prediction: str = "eps",
    generator: BatchRNG | torch.Generator | None = None,
) -> Tensor:
    """Per-sample denoising loss ``[B]`` on clean latents ``[B, V, 4, h, w]``: one SD timestep per sample
    shared by its views (as in the official code), MSE against the ``prediction`` target over all views.
    ``generator``: a `BatchRNG` (draws independent of the process layout), a generator, or ``None``."""
    B = latents.shape[0]
    rng = as_batch_rng(generator)
    t = rng.draw(lambda n, g: schedule.sample_t(n, device=latents.device, generator=g), B, latents.device)
    logsnr = schedule.logsnr(t)
    eps = rng.draw(lambda n, g: _randn((n, *latents.shape[1:]), latents, g), B, latents.device)
    z = q_sample(latents, logsnr, eps)
    pred = net(z, schedule.timestep_index(t), text_emb, corr, extra, condition)
    return diffusion_loss(pred, latents, eps, logsnr, prediction)  # type: ignore[arg-type]


@torch.no_grad()
def sample_latents(
    net: MultiViewUNet,
    sampler: Sampler,
    schedule: NoiseSchedule,
    text_emb: Tensor,
    uncond_emb: Tensor | None,
    corr: Correspondences | None,
    latent_size: tuple[int, int],
    extra: Tensor | None = None,
    condition: Tensor | None = None,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
) -> Tensor:
    """Generate latents ``[B, V, 4, h, w]`` for ``text_emb [B, V, L, D]``.

    With ``sampler.guidance_scale != 1`` every step runs the batch twice (``uncond_emb``, the empty
    prompt's embedding ``[L, D]`` or ``[B, V, L, D]``, then ``text_emb``) and combines them with
    `cfg_combine`; ``extra`` and ``condition`` are the same in both halves. Correspondences are computed
    once by the caller and reused by every step.
    """
    B, V = text_emb.shape[:2]
    h, w = latent_size
    device = text_emb.device
    if sampler.guided:
        if uncond_emb is None:
            raise ValueError(f"guidance_scale={sampler.guidance_scale} needs uncond_emb (the empty prompt's embedding)")
        uncond = uncond_emb.expand_as(text_emb) if uncond_emb.ndim == 2 else uncond_emb
        emb2 = torch.cat([uncond, text_emb])
        extra2 = None if extra is None else torch.cat([extra, extra])
        cond2 = None if condition is None else torch.cat([condition, condition])
        corr2 = corr.repeat(2) if corr is not None and corr.B == B else corr  # once, not every step

    def model_fn(z: Tensor, logsnr: Tensor, timestep: Tensor) -> Tensor:
        if not sampler.guided:
            return net(z, timestep, text_emb, corr, extra, condition)
        out = net(torch.cat([z, z]), torch.cat([timestep, timestep]), emb2, corr2, extra2, cond2)
        un, co = out.chunk(2)
        return cfg_combine(co, un, sampler.guidance_scale)

    shape = (B, V, net.latent_channels, h, w)
    return sampler.loop(model_fn, shape, schedule, prediction, generator, device, x_T)  # type: ignore[arg-type]
