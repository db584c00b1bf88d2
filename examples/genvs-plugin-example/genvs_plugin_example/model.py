"""TinyDiff: pose-conditional image-to-image diffusion, written against the `BaseNVSModel` contract.

Training denoises one target view given one clean context view and both cameras; sampling generates
every requested target view from the first context view. Everything else (optimizer, EMA, logging,
validation/test metrics, results tables, checkpoints, precision, prediction writing) is the base's.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from genvs.core.config import build, spec
from genvs.core.diffusion import CosineLogSNRSchedule, NoiseSchedule, diffusion_loss, q_sample
from genvs.core.model import BaseNVSModel, OptimConfig
from genvs.core.samplers import Sampler, cfg_combine, stochastic_conditioning
from genvs.core.views import Views

from genvs_plugin_example.network import TinyUNet

__all__ = ["TinyDiff"]


# --8<-- [start:init]
class TinyDiff(BaseNVSModel):
    """A small pose-conditional diffusion model (the genvs "add a method" tutorial).

    Args:
        network: the denoiser.
        p_uncond: fraction of training examples without the context (for classifier-free guidance).
        prediction: what the network predicts: ``eps``, ``v`` or ``x0``.
        stochastic_conditioning: sample targets one after another, each denoising step conditioned on a
            random one of the views available so far (3DiM); ``False`` conditions every target on the
            first context view and samples all of them at once.
        (the remaining arguments are `BaseNVSModel`'s)
    """

    def __init__(
        self,
        network: TinyUNet = spec(TinyUNet),
        p_uncond: float = 0.1,
        prediction: Literal["eps", "v", "x0"] = "v",
        stochastic_conditioning: bool = False,
        noise_schedule: NoiseSchedule = spec(CosineLogSNRSchedule, logsnr_min=-15.0, logsnr_max=15.0),
        sampler: Sampler = spec(Sampler, num_steps=32),
        optim: OptimConfig = OptimConfig(lr=2e-4, warmup_steps=100),
        ema_decay: float = 0.999,
        **kwargs,
    ):
        super().__init__(noise_schedule=noise_schedule, sampler=sampler, optim=optim, ema_decay=ema_decay, **kwargs)
        self.denoiser: TinyUNet = build(network, TinyUNet, "network")  # a spec from a config, or an instance
        self.p_uncond = p_uncond
        self.prediction = prediction
        self.use_stochastic_conditioning = stochastic_conditioning
    # --8<-- [end:init]

    # --8<-- [start:loss]
    def training_loss(self, views: Views) -> dict[str, Tensor]:
        if views.num_context < 1 or views.V <= views.num_context:
            raise ValueError(
                f"TinyDiff trains on (context, target) pairs; got num_context={views.num_context} of V={views.V} "
                "views. Set data n_context: 1 and n_target: 1."
            )
        B, H, W = views.B, views.H, views.W
        pair = views.select([0, views.num_context])  # the first context view and the first target view
        context, x0 = pair.images[:, 0], pair.images[:, 1]  # [B, 3, H, W] each
        rays = self.denoiser.ray_encoding(pair.K, pair.c2w, H, W)  # [B, 2, H, W, P]
        logsnr = self.noise_schedule.logsnr(self.noise_schedule.sample_t(B, device=self.device))  # [B]
        eps = torch.randn_like(x0)
        z = q_sample(x0, logsnr, eps)
        keep = torch.rand(B, device=self.device) >= self.p_uncond  # classifier-free guidance dropout
        pred = self.denoiser(z, context, rays, logsnr, keep)
        return {"loss": diffusion_loss(pred, x0, eps, logsnr, self.prediction).mean()}
    # --8<-- [end:loss]

    # --8<-- [start:sample]
    def sample(
        self, context: Views, targets: Views, sampler: Sampler | None = None, generator: torch.Generator | None = None
    ) -> Views:
        sampler = sampler or self.sampler
        B, Nc, Nt, H, W = targets.B, context.V, targets.V, targets.H, targets.W
        context = context.resize((H, W))  # no-op when the sizes already match
        net = self.denoiser
        # ray encodings of every camera, once per call: context views first, then the targets
        rays_all = net.ray_encoding(torch.cat([context.K, targets.K], 1), torch.cat([context.c2w, targets.c2w], 1), H, W)

        def guided(z: Tensor, cond: Tensor, rays: Tensor, logsnr: Tensor) -> Tensor:
            keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
            if not sampler.guided:
                return net(z, cond, rays, logsnr, keep)
            both = net(z.repeat(2, 1, 1, 1), cond.repeat(2, 1, 1, 1), rays.repeat(2, 1, 1, 1, 1), logsnr.repeat(2),
                       torch.cat([keep, ~keep]))
            return cfg_combine(*both.chunk(2), sampler.guidance_scale)

        if self.use_stochastic_conditioning:  # targets one by one, conditioned on random earlier views
            batch = torch.arange(B, device=rays_all.device)

            def denoise(z: Tensor, logsnr: Tensor, cond: Tensor, cond_idx: Tensor, j: int) -> Tensor:
                rays = torch.stack([rays_all[batch, cond_idx], rays_all[:, Nc + j]], dim=1)
                return guided(z, cond, rays, logsnr)

            images = stochastic_conditioning(
                sampler, denoise, context.images, Nt, self.noise_schedule, self.prediction, generator
            )
            return targets.with_images(images)

        # every target from the first context view, all targets folded into the batch: one sampling loop
        cond = context.images[:, :1].expand(B, Nt, *context.images.shape[2:]).flatten(0, 1)  # [B*Nt, 3, H, W]
        rays = torch.stack([rays_all[:, :1].expand(B, Nt, *rays_all.shape[2:]), rays_all[:, Nc:]], dim=2)
        rays = rays.flatten(0, 1)  # [B*Nt, 2, H, W, P]
        x = sampler.loop(
            lambda z, logsnr, t: guided(z, cond, rays, logsnr),
            tuple(cond.shape), self.noise_schedule, self.prediction, generator, device=cond.device,
        )
        return targets.with_images(x.clamp(-1, 1).unflatten(0, (B, Nt)))
    # --8<-- [end:sample]
