"""3DiM (Watson et al. 2022): pose-conditional image-to-image diffusion with stochastic conditioning."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from genvs.core.cameras import ray_posenc
from genvs.core.config import build, spec
from genvs.core.diffusion import CosineLogSNRSchedule, NoiseSchedule, diffusion_loss, q_sample
from genvs.core.model import BaseNVSModel, OptimConfig
from genvs.core.samplers import Sampler, cfg_combine, stochastic_conditioning
from genvs.core.views import Views
from genvs.methods.threedim.xunet import XUNet, interleave_frames

__all__ = ["ThreeDiM"]

DDPM = "diffusers.DDPMScheduler"  # ancestral sampling, as in the paper
CLEAN_LOGSNR = 20.0  # the conditioning frame's noise level (logSNR of t = 0 on the clipped schedule)


class ThreeDiM(BaseNVSModel):
    """3DiM: an X-UNet denoises a target view given one clean view and both cameras.

    Training takes the first view of each example as the conditioning frame and the first target view
    as the frame to denoise (use ``n_context: 1, n_target: 1`` in the datamodule). Sampling generates
    the targets one by one with stochastic conditioning.

    Args:
        network: the X-UNet (defaults: the paper's 128x128 model).
        p_uncond: fraction of training examples without conditioning (classifier-free guidance).
        cfg_drop: what an unconditional example loses: ``frame`` (the conditioning image and the pose
            encodings of both frames) or ``pose`` (only the pose encodings, as in the paper's appendix code).
        stochastic_conditioning: sample with 3DiM's stochastic conditioning; ``False`` conditions
            every target on the first context view only (the naive sampler of the paper's ablation).
        prediction: the network's parameterisation: ``eps`` as in the paper, or ``v``. An eps network
            must predict the noise to ~1e-5 at logSNR -20 for its x0 estimate to mean anything; short
            training runs (the CPU toy config) do not get there and sample noise, v-prediction does.

    The remaining arguments are `BaseNVSModel`'s.
    """

    prediction = "eps"

    def __init__(
        self,
        network: XUNet = spec(XUNet),
        p_uncond: float = 0.1,
        cfg_drop: Literal["frame", "pose"] = "frame",
        stochastic_conditioning: bool = True,
        prediction: Literal["eps", "v"] = "eps",
        noise_schedule: NoiseSchedule = spec(CosineLogSNRSchedule, logsnr_min=-20.0, logsnr_max=20.0),
        sampler: Sampler = spec(Sampler, scheduler=spec(DDPM), num_steps=256, guidance_scale=3.0),
        optim: OptimConfig = OptimConfig(lr=1e-4, betas=(0.9, 0.99), warmup_steps=10_000_000 // 128),
        ema_decay: float = 0.9999,
        **kwargs,
    ):
        super().__init__(noise_schedule=noise_schedule, sampler=sampler, optim=optim, ema_decay=ema_decay, **kwargs)
        self.denoiser: XUNet = build(network, XUNet, "network")
        self.p_uncond = p_uncond
        self.cfg_drop = cfg_drop
        self.use_stochastic_conditioning = stochastic_conditioning
        self.prediction = prediction

    # ---------------------------------------------------------------------------------- helpers
    def rays(self, K: Tensor, c2w: Tensor, H: int, W: int) -> Tensor:
        """Ray encodings ``[..., H, W, D]`` computed in torch on the cameras' device (once per call)."""
        net = self.denoiser
        return ray_posenc(K, c2w, H, W, net.origin_octaves, net.dir_octaves)

    def denoise(
        self, cond: Tensor, z: Tensor, logsnr: Tensor, rays: Tensor | None, cond_mask: Tensor, pose: list[Tensor] | None = None
    ) -> Tensor:
        """The network's prediction (``self.prediction``) for ``z`` given the clean ``cond`` frame;
        ``rays [B, 2, H, W, D]`` (or precomputed ``pose`` embeddings, see `XUNet.forward`)."""
        if self.cfg_drop == "frame":
            cond = cond * cond_mask.view(-1, 1, 1, 1).to(cond.dtype)
        logsnr2 = torch.stack([torch.full_like(logsnr, CLEAN_LOGSNR), logsnr], dim=1)
        return self.denoiser(cond, z, logsnr2, rays, cond_mask, pose=pose)

    # --------------------------------------------------------------------------------- training
    def training_loss(self, views: Views) -> dict[str, Tensor]:
        if views.num_context < 1 or views.V - views.num_context < 1:
            raise ValueError(
                f"3DiM trains on (context, target) pairs; got a batch with num_context={views.num_context} of "
                f"V={views.V} views. Set data n_context: 1 and n_target: 1."
            )
        B, H, W = views.B, views.H, views.W
        pair = views.select([0, views.num_context])  # conditioning frame, target frame
        x, x0 = pair.images[:, 0], pair.images[:, 1]
        rays = self.rays(pair.K, pair.c2w, H, W)  # [B, 2, H, W, D]
        rng = self.batch_rng  # per-example draws: the same for an example whatever the process layout
        t = rng.draw(lambda n, g: self.noise_schedule.sample_t(n, device=x0.device, generator=g), B, x0.device)
        logsnr = self.noise_schedule.logsnr(t)
        eps = rng.randn_like(x0)
        z = q_sample(x0, logsnr, eps)
        cond_mask = rng.rand(B, device=x0.device) >= self.p_uncond
        pred = self.denoise(x, z, logsnr, rays, cond_mask)
        loss = diffusion_loss(pred, x0, eps, logsnr, self.prediction).mean()
        return {"loss": loss}

    # --------------------------------------------------------------------------------- sampling
    def sample(
        self,
        context: Views,
        targets: Views,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> Views:
        sampler = sampler or self.sampler
        B, Nc, Nt, H, W = context.B, context.V, targets.V, targets.H, targets.W
        if (context.H, context.W) != (H, W):
            context = context.resize((H, W))
        # ray encodings of every camera, computed once: pool order = context views, then targets
        rays_all = self.rays(torch.cat([context.K, targets.K], 1), torch.cat([context.c2w, targets.c2w], 1), H, W)
        net = self.denoiser
        batch = torch.arange(B, device=context.device)
        ones = torch.ones(B, dtype=torch.bool, device=context.device)
        guided = sampler.guided
        # Pose embeddings that stay fixed while one target is denoised are computed once, not per step:
        # the target frame's, and (with guidance) the pose-free ones of the unconditional branch.
        uncond_pose = None
        if guided:  # the learned embeddings alone: the pose input of the unconditional branch
            free = zip(net.frame_pose_embedding(None, role=0), net.frame_pose_embedding(None, role=1))
            uncond_pose = [interleave_frames(c.expand(B, -1, -1, -1), t.expand(B, -1, -1, -1)) for c, t in free]
        target_pose: dict[int, list[Tensor]] = {}

        def denoise(z: Tensor, logsnr: Tensor, cond_img: Tensor, cond_idx: Tensor, j: int) -> Tensor:
            if not self.use_stochastic_conditioning:
                cond_img, cond_idx = context.images[:, 0], torch.zeros_like(cond_idx)
            if j not in target_pose:
                target_pose.clear()
                target_pose[j] = net.frame_pose_embedding(rays_all[:, Nc + j], role=1)
            cond_pose = net.frame_pose_embedding(rays_all[batch, cond_idx], role=0)
            pose = [interleave_frames(c, t) for c, t in zip(cond_pose, target_pose[j])]
            if not guided:
                return self.denoise(cond_img, z, logsnr, None, ones, pose=pose)
            both = [torch.cat([p, u]) for p, u in zip(pose, uncond_pose)]
            mask = torch.cat([ones, ~ones])
            out = self.denoise(cond_img.repeat(2, 1, 1, 1), z.repeat(2, 1, 1, 1), logsnr.repeat(2), None, mask, pose=both)
            cond, uncond = out.chunk(2)
            return cfg_combine(cond, uncond, sampler.guidance_scale)

        images = stochastic_conditioning(
            sampler, denoise, context.images, Nt, self.noise_schedule, self.prediction, generator
        )
        return targets.with_images(images)
