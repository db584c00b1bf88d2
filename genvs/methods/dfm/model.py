"""DFM (Tewari et al. 2023, "Diffusion with Forward Models") as a genvs method.

The denoiser (`genvs.methods.dfm.network.DFMDenoiser`) outputs a 3D scene; the x0 prediction is its volume
rendering at the target camera. `DFM.sample` samples that scene for the first target (or for every target in
turn, ``autoregressive: true``) and then *renders* every requested camera from the final scene, with depth:
the outputs of one call are 3D-consistent by construction.

Training has two stages (``stage``): ``pixelnerf`` trains the encoder and the context-only field as a
deterministic pixelNeRF; ``diffusion`` trains the whole denoiser, starting from a stage-1 checkpoint given
as ``init_from`` (its context-only field also initialises the joint field, as the official ``load_pn``).
A 128 px fine-tune is a ``diffusion`` run with ``init_from`` a 64 px diffusion checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from genvs.core.cameras import optical_axes_center, orbit_around
from genvs.core.config import build, spec
from genvs.core.diffusion import EMA, DiscreteSchedule, NoiseSchedule
from genvs.core.model import BaseNVSModel, OptimConfig
from genvs.core.samplers import DDIMScheduler, Sampler, sampling_progress
from genvs.core.views import Views
from genvs.methods.dfm.network import (
    DFMDenoiser,
    dfm_sample,
    dfm_sample_autoregressive,
    dfm_training_losses,
    init_joint_field_from_context_field,
    pixelnerf_losses,
)
from genvs.methods.dfm.pixelnerf import Scene

__all__ = ["DFM"]


class DFM(BaseNVSModel):
    """DFM: diffusion over 3D scenes observed through a volume-rendering forward model.

    Training examples: ``n_context`` context views then ``n_target >= 1`` targets (DFM: CO3D 3 + 2,
    RealEstate10K 1 + 2). Target 0 is noised; every target is rendered on a random patch from the scene.

    Args:
        network: the denoiser (defaults: the official model, DiT-XL/2 encoder, 64 + 64 samples).
        stage: ``diffusion`` (DFM) or ``pixelnerf`` (stage 1: deterministic pixelNeRF from the context alone;
            the joint field and the target input stem are frozen).
        init_from: a genvs DFM checkpoint whose denoiser weights start this run (only when training starts
            fresh, not on resume). From a ``pixelnerf``-stage checkpoint the joint field is initialised from the
            context-only field (`init_joint_field_from_context_field`); from a ``diffusion``-stage checkpoint
            (e.g. 64 px -> 128 px fine-tune) its EMA weights are taken over too.
        random_num_context: use a random number ``1..n_context`` of the context views each step (official).
        patch_size: side of the random patch rendered per target (official: 24 in diffusion, 20 in stage 1).
        lpips_weight: weight of LPIPS on the patches (official: RealEstate10K 1.0, CO3D command 0.2; stage 1: 0).
            ``0`` needs no LPIPS weights.
        lpips_net, lpips_backbone_weights, lpips_linear_weights: LPIPS network (official: VGG) and local weight
            files (default: ``$TORCH_HOME/hub/checkpoints`` and the ``lpips`` package; never downloaded).
        cond_weight: weight of the context-only render's MSE at target 0.
        distortion_weight, smoothness_weight: official RealEstate10K regularisers (0.005 and 0.002).
        p_uncond: probability that a training scene's context images are zeroed (classifier-free guidance;
            official 0.1 when guidance is used, RealEstate10K).
        threshold_percentile: dynamic thresholding of x0 while sampling (official 0.95; None = clip to [-1, 1]).
        autoregressive: sample every target in turn, each joining the context of the next (official CO3D
            videos); otherwise only the first target is sampled. Every target is then rendered from the final scene.
        max_context: autoregressive mode: condition on at most this many most recent views.
        orbit_frames: `predict` also renders this many cameras on an orbit around the scene from the sampled
            scene (returned as ``"orbit"`` and written as ``orbit.gif`` by the prediction writer); 0 = off.

    ``noise_schedule``, ``sampler``, ``optim``, ``ema_decay`` and the rest are `BaseNVSModel`'s; defaults: the
    official cosine beta schedule with T = 1000, DDIM 50 steps, Adam lr 2e-5 with betas (0.9, 0.99) and 1000
    warmup steps, EMA 0.9995 per step = the official 0.995 every 10 steps.
    """

    prediction = "x0"

    def __init__(
        self,
        network: DFMDenoiser = spec(DFMDenoiser),
        stage: Literal["diffusion", "pixelnerf"] = "diffusion",
        init_from: str | None = None,
        random_num_context: bool = True,
        patch_size: int = 24,
        lpips_weight: float = 0.0,
        lpips_net: Literal["vgg", "alex"] = "vgg",
        lpips_backbone_weights: str | None = None,
        lpips_linear_weights: str | None = None,
        cond_weight: float = 1.0,
        distortion_weight: float = 0.0,
        smoothness_weight: float = 0.0,
        p_uncond: float = 0.0,
        threshold_percentile: float | None = 0.95,
        autoregressive: bool = False,
        max_context: int | None = None,
        orbit_frames: int = 0,
        noise_schedule: NoiseSchedule = spec(DiscreteSchedule, beta_schedule="cosine"),
        sampler: Sampler = spec(Sampler, scheduler=spec(DDIMScheduler, timestep_spacing="trailing"), num_steps=50),
        optim: OptimConfig = OptimConfig(lr=2e-5, betas=(0.9, 0.99), warmup_steps=1000),
        ema_decay: float = 0.9995,
        **kwargs,
    ):
        super().__init__(noise_schedule=noise_schedule, sampler=sampler, optim=optim, ema_decay=ema_decay, **kwargs)
        if stage not in ("diffusion", "pixelnerf"):
            raise ValueError(f"DFM stage={stage!r}: use 'pixelnerf' (stage 1) or 'diffusion'")
        if patch_size < 1 or not 0 <= p_uncond <= 1 or lpips_weight < 0 or orbit_frames < 0:
            raise ValueError(
                f"DFM: need patch_size >= 1, 0 <= p_uncond <= 1, lpips_weight >= 0, orbit_frames >= 0; got "
                f"{patch_size}, {p_uncond}, {lpips_weight}, {orbit_frames}"
            )
        self.denoiser: DFMDenoiser = build(network, DFMDenoiser, "network")
        self.stage = stage
        self.init_from = init_from
        self.random_num_context = random_num_context
        self.patch_size = patch_size
        self.lpips_weight, self.lpips_net = lpips_weight, lpips_net
        self.lpips_backbone_weights, self.lpips_linear_weights = lpips_backbone_weights, lpips_linear_weights
        self.cond_weight, self.distortion_weight, self.smoothness_weight = cond_weight, distortion_weight, smoothness_weight
        self.p_uncond = p_uncond
        self.threshold_percentile = threshold_percentile
        self.autoregressive, self.max_context = autoregressive, max_context
        self.orbit_frames = orbit_frames
        if stage == "pixelnerf":
            for m in self.denoiser.target_only_modules():
                m.requires_grad_(False)

    # ------------------------------------------------------------------------------------ LPIPS
    def lpips(self) -> nn.Module | None:
        """The frozen LPIPS network of the loss (built on first use, kept outside the module tree so that it is
        neither trained, averaged by the EMA nor saved); None when ``lpips_weight == 0``."""
        if self.lpips_weight == 0:
            return None
        net = self.__dict__.get("_lpips_module")
        if net is None:
            from genvs.eval.metrics import MissingWeightsError, build_lpips

            try:
                net = build_lpips(self.lpips_net, self.lpips_backbone_weights, self.lpips_linear_weights)
            except MissingWeightsError as e:
                raise MissingWeightsError(
                    f"DFM's LPIPS loss (model.init_args.lpips_weight={self.lpips_weight}, lpips_net={self.lpips_net!r}) "
                    f"needs local LPIPS weights. {e}\nFor this loss, set model.init_args.lpips_backbone_weights / "
                    "lpips_linear_weights to the files, or lpips_weight: 0 to train without LPIPS."
                ) from None
            net.requires_grad_(False)
            self.__dict__["_lpips_module"] = net
        p = next(net.parameters(), None)
        if p is not None and p.device != self.device:
            net.to(self.device)
        return net

    # --------------------------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.lpips()  # fail before the first step when LPIPS weights are missing
        if self.init_from and self.trainer.ckpt_path is None:  # a fresh run, not a resume
            self.load_initial_weights(self.init_from)

    @torch.no_grad()
    def load_initial_weights(self, path: str | Path) -> None:
        """Initialise the denoiser (and the EMA) from a DFM checkpoint (see ``init_from``)."""
        from genvs.callbacks import check_checkpoint

        path = check_checkpoint(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        mine = f"{DFM.__module__}.{DFM.__qualname__}"
        method = ckpt.get("genvs", {}).get("method")
        if method is not None and method != mine:
            raise ValueError(f"init_from={path}: a checkpoint of {method}, not of DFM; give a DFM checkpoint")
        src_stage = (ckpt.get("hyper_parameters") or {}).get("stage", "diffusion")
        state = ckpt.get("state_dict", {})
        weights = {k[len("denoiser.") :]: v for k, v in state.items() if k.startswith("denoiser.")}
        try:
            self.denoiser.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"init_from={path}: its denoiser does not match this model's network settings ({e}). Use the same "
                "model.init_args.network as the run that wrote it."
            ) from None
        if src_stage == "pixelnerf":
            init_joint_field_from_context_field(self.denoiser)
        if self.ema is not None:
            params = dict(self.denoiser.named_parameters())
            for name in self.ema.names:
                src = state.get(f"ema.{EMA._key(name)}") if src_stage != "pixelnerf" else None
                getattr(self.ema, EMA._key(name)).copy_(src if src is not None else params[name].detach().float())
            self.ema.reset_count()
        print(f"genvs: DFM initialised from {path} ({src_stage} stage)")

    def compiled_modules(self) -> list[nn.Module]:
        """``torch_compile``: the image encoder and both pixelNeRF fields (the denoiser calls them directly)."""
        return [self.denoiser.encoder, self.denoiser.field, self.denoiser.cond_field]

    def context_subset(self, views: Views) -> Views:
        """The official trainer's random number of context views: the first ``n ~ U{1..num_context}``."""
        nc = views.num_context
        if not self.random_num_context or nc <= 1:
            return views
        n = self.batch_rng.step_randint(1, nc + 1)  # the same on every process (host value, no device sync)
        if n == nc:
            return views
        return views.select(list(range(n)) + list(range(nc, views.V)), num_context=n)

    def training_loss(self, views: Views) -> dict[str, Tensor]:
        if views.num_context < 1 or views.V - views.num_context < 1:
            raise ValueError(
                f"DFM trains on context + target views; got num_context={views.num_context} of V={views.V} views. "
                "Set data n_context >= 1 and n_target >= 1 (official: CO3D 3 + 2, RealEstate10K 1 + 2)."
            )
        views = self.context_subset(views)
        if self.stage == "pixelnerf":
            return pixelnerf_losses(
                self.denoiser, views, self.lpips(), self.patch_size, self.lpips_weight, generator=self.batch_rng
            )
        return dfm_training_losses(
            self.denoiser, self.noise_schedule, views, lpips=self.lpips(), patch_size=self.patch_size,
            p_uncond=self.p_uncond, lpips_weight=self.lpips_weight, cond_weight=self.cond_weight,
            distortion_weight=self.distortion_weight, smoothness_weight=self.smoothness_weight,
            generator=self.batch_rng,
        )

    # --------------------------------------------------------------------------------- sampling
    def sample_scene(
        self,
        context: Views,
        targets: Views,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Views, Scene]:
        """`sample`, also returning the final sampled `Scene` (to render more cameras from)."""
        sampler = sampler or self.sampler
        H, W = targets.H, targets.W
        if (context.H, context.W) != (H, W):
            context = context.resize((H, W))
        den = self.denoiser
        args = (den, self.noise_schedule, sampler, context.images, context.K, context.c2w)
        if self.stage == "pixelnerf":  # deterministic: render the targets from the context alone
            scene = den.encode_context(context.images, context.K, context.c2w)
            out = den.renderer.render_views(lambda p: den.cond_field(scene, p), targets.K, targets.c2w, (H, W))
            return targets.with_images(out.rgb.clamp(-1, 1), depth=out.depth), scene
        if self.autoregressive:
            _, scene = dfm_sample_autoregressive(
                *args, targets.K, targets.c2w, generator, self.threshold_percentile, self.max_context
            )
        else:
            _, scene = dfm_sample(*args, targets.K[:, 0], targets.c2w[:, 0], generator, self.threshold_percentile)
        out = den.render(scene, targets.K, targets.c2w, size=(H, W))
        return targets.with_images(out.rgb.clamp(-1, 1), depth=out.depth), scene

    def sample(
        self,
        context: Views,
        targets: Views,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> Views:
        """Sample the scene (first target, or all in turn when ``autoregressive``), then render every target camera
        from the final scene: images ``[B, M, 3, H, W]`` and z-depth ``[B, M, 1, H, W]``."""
        return self.sample_scene(context, targets, sampler, generator)[0]

    def render_orbit(self, scene: Scene, context: Views, targets: Views, n: int) -> Views:
        """``n`` cameras on a full turn around the scene, rendered from ``scene`` (no diffusion).

        The orbit starts at the first context camera and turns about the line through the point closest to every
        camera's optical axis (the object the cameras look at), along the cameras' mean up direction; it suits
        object-centric captures (CO3D, genvs' procedural data), not forward-facing ones.
        """
        cams = torch.cat([context.c2w, targets.c2w], dim=1)  # [B, N, 4, 4]
        center = optical_axes_center(cams)  # [B, 3]
        up = -cams[..., :3, 1].mean(dim=1)  # OpenCV y points down
        c2w = orbit_around(context.c2w[:, 0], n, axis=up, center=center)  # [B, n, 4, 4]
        K = context.K[:, :1].expand(-1, n, 3, 3)
        H, W = targets.H, targets.W
        if self.stage == "pixelnerf":
            out = self.denoiser.renderer.render_views(lambda p: self.denoiser.cond_field(scene, p), K, c2w, (H, W))
        else:
            out = self.denoiser.render(scene, K, c2w, size=(H, W))
        return Views(out.rgb.clamp(-1, 1), K, c2w, depth=out.depth, scene=list(context.scene))

    def predict_step(self, batch: Views | tuple[Views, Views], batch_idx: int) -> dict[str, Any]:
        """As `BaseNVSModel.predict_step` (``batch`` may be ``(context, camera-only targets)``, e.g. the
        datamodule's ``predict_orbit``), plus ``"orbit"``: ``orbit_frames`` cameras around the sampled scene."""
        context, targets = batch if isinstance(batch, tuple) else batch.split()
        bar = self._trainer.progress_bar_callback if self._trainer is not None else None
        with self.ema_weights(), torch.no_grad(), sampling_progress(bar):
            pred, scene = self.sample_scene(context, targets.cameras_only(), generator=self._generator(batch_idx))
            out: dict[str, Any] = {"context": context, "pred": pred, "target": targets if targets.images is not None else None}
            if self.orbit_frames > 0:
                out["orbit"] = self.render_orbit(scene, context, targets, self.orbit_frames)
        return out
