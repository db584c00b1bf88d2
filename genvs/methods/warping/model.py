"""The warping RGBD iterative model (Xiang et al. 2023) as a genvs method.

Two ADM UNets on RGBD images (RGB + normalised depth): ``unconditional`` generates a first view,
``conditional`` generates every further view from the aggregation of all previous views warped into it.
Both train on single images: the conditional model on forward-backward warped pairs
(`genvs.methods.warping.augment.TrainingPairs`).

One LightningModule covers the paper's two training runs through ``stage``:

- ``unconditional``: trains G_u only (the paper's first model);
- ``conditional``: trains G_c, initialised from G_u with zero weights on the new input channels, with G_u
  frozen next to it (loaded from ``unconditional_weights``; the paper's second model). Its checkpoint
  therefore holds everything sampling needs;
- ``joint``: both at once, as two loss terms (a one-command convenience for small data; not the paper's).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from genvs.core.config import build, spec
from genvs.core.diffusion import DiscreteSchedule, NoiseSchedule, diffusion_loss, q_sample
from genvs.core.model import BaseNVSModel, OptimConfig
from genvs.core.samplers import DDIMScheduler, Sampler, cfg_combine
from genvs.core.views import Views
from genvs.methods.warping.aggregate import aggregate_views, guide_prediction
from genvs.methods.warping.augment import TrainingPairs
from genvs.methods.warping.depth import SAMPLE_FAR, SAMPLE_NEAR, TRAIN_FAR, TRAIN_NEAR, denormalize_depth, normalize_depth
from genvs.methods.warping.network import (
    ADMUNet,
    WarpCondition,
    conditional_from_unconditional,
    conditional_input,
    convert_ivid_state_dict,
    drop_class_labels,
)

__all__ = ["WarpingRGBD", "AggregationConfig", "load_network_weights"]

DDPM = "diffusers.DDPMScheduler"
Stage = Literal["unconditional", "conditional", "joint"]


@dataclass
class AggregationConfig:
    """How previous views condition a new one at sampling (official sampling-script defaults).

    Args:
        sharpness: the 20 of the per-pixel view weight ``exp(-20 theta)``.
        atol, rtol: depth-discontinuity tolerances of the meshes (0.03 at sampling).
        erode: colour-mask erosion radius around discontinuities (3).
        supersample: rasterisation supersampling (3, as the official 3x render target); odd.
        coverage: fraction of covered subpixels for a pixel to count as seen (0.75).
        rgb_weight, depth_weight, convex_weight: the official DDIM sampler's pull of the predicted x0 toward
            the condition's colour (0.1) and depth (0.2), and of hole depth behind the previous surfaces (0.5).
    """

    sharpness: float = 20.0
    atol: float = 0.03
    rtol: float = 0.03
    erode: int = 3
    supersample: int = 3
    coverage: float = 0.75
    rgb_weight: float = 0.1
    depth_weight: float = 0.2
    convex_weight: float = 0.5


def _ema_or_raw(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The sub-state-dict under ``denoiser.<prefix>.`` of a genvs checkpoint, EMA weights where saved."""
    raw = {k[len(f"denoiser.{prefix}.") :]: v for k, v in state.items() if k.startswith(f"denoiser.{prefix}.")}
    for name in list(raw):
        key = "ema.shadow__" + f"{prefix}.{name}".replace(".", "__")
        if key in state:
            raw[name] = state[key]
    return raw


def load_network_weights(path: str | Path, which: Literal["unconditional", "conditional"], num_head_channels: int = 64) -> dict[str, Tensor]:
    """`ADMUNet` weights from a local file, whichever format it has:

    - a genvs Lightning checkpoint (``.ckpt``) of this method: the ``which`` network, its EMA weights where saved;
    - an official ivid checkpoint (``imagenet128_uncond.pt`` / ``imagenet128_cond.pt``): converted with
      `convert_ivid_state_dict`;
    - a plain `ADMUNet` state dict (``.pt`` / ``.safetensors``).

    Loads with ``weights_only=True`` / safetensors; never downloads.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{which} network weights not found: {path}. Give a genvs checkpoint of this method (e.g. the "
            f"last.ckpt of a `stage: unconditional` run) or an official ivid checkpoint (imagenet128_uncond.pt / "
            f"imagenet128_cond.pt from https://huggingface.co/JeffreyXiang/ivid, saved locally); genvs never downloads."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or a Lightning checkpoint, got {type(state).__name__}")
    if any(k.startswith("denoiser.") for k in state):
        sub = _ema_or_raw(state, which)
        if not sub:
            found = sorted({k.split(".")[1] for k in state if k.startswith("denoiser.")})
            raise KeyError(f"{path}: a genvs checkpoint without a {which!r} network (it has {found})")
        return sub
    if "input_blocks.0.0.weight" in state:
        return convert_ivid_state_dict(state, num_head_channels=num_head_channels)
    if "input_conv.weight" in state:
        return state
    raise KeyError(f"{path}: not a genvs checkpoint, an ivid AdmUnet2d checkpoint or an ADMUNet state dict")


def _has_ground_truth(views: Views) -> bool:
    """Whether target views carry images to score against (generation batches carry cameras only)."""
    return views.images is not None and views.V > 0


class WarpingRGBD(BaseNVSModel):
    """Xiang et al. 2023: unconditional first view, then conditional views from warped, aggregated RGBD.

    Args:
        network: the ADM UNet of the unconditional model (4 channels in and out); the conditional model is
            the same architecture with 10 input channels (`conditional_from_unconditional`).
        stage: what trains (see the module docstring): ``unconditional``, ``conditional`` or ``joint``.
        unconditional_weights: file to initialise the unconditional network from (`load_network_weights`:
            a stage-1 genvs checkpoint, EMA weights preferred, or the official ``imagenet128_uncond.pt``);
            the conditional network is then derived from it. Loaded (and the EMA restarted from it) when
            a Trainer starts fit/validate/test/predict without a checkpoint to restore.
        conditional_weights: optional file for the conditional network (e.g. the official
            ``imagenet128_cond.pt``), instead of deriving it from the unconditional one.
        pairs: how training pairs are built from single RGBD images.
        p_uncond: probability of replacing a class label by the null label (classifier-free guidance).
        near, far: depth normalisation of the training data (``[-1, 1]``, linear in disparity); unknown depth
            (0, e.g. the procedural data's background) is treated as ``far``.
        sample_near, sample_far: how generated depth is decoded and the aggregated condition re-encoded at
            sampling (the official script: 0.6 / 5); ``None`` uses ``near`` / ``far`` (keeps metric depth and
            posed datasets consistent).
        aggregation: aggregation and x0-guidance settings.
        generation_order: ``given`` generates targets in their order; ``nearest`` always generates next the
            target whose camera is closest to one already available (one order for the whole batch).
        prediction: the networks' parameterisation: ``eps`` as in the paper (and the official weights), or
            ``v``. An eps network must predict the noise almost exactly at t = 999 (alpha = 0.006) for its x0
            estimate to mean anything; short runs (the CPU toy config) do not get there and sample noise.
        first_view_sampler: sampler of the unconditional first view (paper: 1000 DDPM steps). Its
            ``guidance_scale`` is the label guidance ``1 + w``.
        sampler: sampler of the conditional views (paper: 50 DDIM steps).

    The remaining arguments are `BaseNVSModel`'s.
    """

    prediction = "eps"

    def __init__(
        self,
        network: ADMUNet = spec(ADMUNet),
        stage: Stage = "joint",
        unconditional_weights: str | None = None,
        conditional_weights: str | None = None,
        pairs: TrainingPairs = spec(TrainingPairs),
        p_uncond: float = 0.1,
        near: float = TRAIN_NEAR,
        far: float = TRAIN_FAR,
        sample_near: float | None = SAMPLE_NEAR,
        sample_far: float | None = SAMPLE_FAR,
        aggregation: AggregationConfig = AggregationConfig(),
        generation_order: Literal["given", "nearest"] = "given",
        prediction: Literal["eps", "v"] = "eps",
        first_view_sampler: Sampler = spec(Sampler, scheduler=spec(DDPM, clip_sample=False), num_steps=1000, guidance_scale=4.0),
        noise_schedule: NoiseSchedule = spec(DiscreteSchedule, beta_schedule="linear"),
        sampler: Sampler = spec(
            Sampler, scheduler=spec(DDIMScheduler, timestep_spacing="trailing", clip_sample=False), num_steps=50, guidance_scale=4.0
        ),
        optim: OptimConfig = OptimConfig(name="AdamW", lr=1e-4, weight_decay=0.0),
        ema_decay: float = 0.9999,
        **kwargs,
    ):
        super().__init__(noise_schedule=noise_schedule, sampler=sampler, optim=optim, ema_decay=ema_decay, **kwargs)
        if stage not in ("unconditional", "conditional", "joint"):
            raise ValueError(f"stage={stage!r}: use 'unconditional', 'conditional' or 'joint'")
        uncond: ADMUNet = build(network, ADMUNet, "network")
        if uncond.in_channels != 4 or uncond.out_channels != 4:
            raise ValueError(
                f"network must be the unconditional RGBD UNet (in_channels=4, out_channels=4), got "
                f"{uncond.in_channels}/{uncond.out_channels}; the conditional one is derived from it"
            )
        nets = {"unconditional": uncond}
        if stage != "unconditional":
            nets["conditional"] = conditional_from_unconditional(uncond)
        if stage == "conditional":
            uncond.requires_grad_(False)  # frozen: not optimised, not in the EMA
        self.denoiser = nn.ModuleDict(nets)
        self.stage = stage
        self.unconditional_weights, self.conditional_weights = unconditional_weights, conditional_weights
        self.pairs: TrainingPairs = build(pairs, TrainingPairs, "pairs")
        self.p_uncond = p_uncond
        if not 0 < near < far:
            raise ValueError(f"depth normalisation needs 0 < near < far, got near={near}, far={far}")
        self.near, self.far = near, far
        self.sample_near = near if sample_near is None else sample_near
        self.sample_far = far if sample_far is None else sample_far
        self.aggregation = AggregationConfig(**aggregation) if isinstance(aggregation, dict) else aggregation
        self.generation_order = generation_order
        self.prediction = prediction
        self.first_view_sampler: Sampler = build(first_view_sampler, Sampler, "first_view_sampler")

    # ------------------------------------------------------------------------------ networks
    @property
    def unconditional(self) -> ADMUNet:
        return self.denoiser["unconditional"]

    @property
    def conditional(self) -> ADMUNet | None:
        return self.denoiser["conditional"] if "conditional" in self.denoiser else None

    @torch.no_grad()
    def load_pretrained(self, unconditional: str | Path | None = None, conditional: str | Path | None = None) -> None:
        """Initialise the networks from files (`load_network_weights`).

        The unconditional network is loaded first; the conditional one is then loaded from ``conditional``
        or, without it, re-derived from the loaded unconditional network (zero weights on the new input
        channels), as the paper initialises its conditional model.
        """
        heads = self.unconditional.config["num_head_channels"]
        if unconditional is not None:
            self.unconditional.load_state_dict(load_network_weights(unconditional, "unconditional", heads))
            if self.conditional is not None and conditional is None:
                derived = conditional_from_unconditional(self.unconditional)
                self.conditional.load_state_dict(derived.state_dict())
        if conditional is not None:
            if self.conditional is None:
                raise ValueError("conditional weights given but stage='unconditional' has no conditional network")
            self.conditional.load_state_dict(load_network_weights(conditional, "conditional", heads))

    def _maybe_load_pretrained(self, fitting: bool = False) -> None:
        """Load ``unconditional_weights`` / ``conditional_weights`` once, when a Trainer starts without a
        checkpoint to restore (a restored checkpoint holds the networks already), and restart the EMA
        from the loaded weights."""
        trainer = self._trainer
        if getattr(self, "_pretrained_done", False) or (trainer is not None and trainer.ckpt_path is not None):
            return
        self._pretrained_done = True
        if self.unconditional_weights or self.conditional_weights:
            self.load_pretrained(self.unconditional_weights, self.conditional_weights)
            if self.ema is not None:
                with torch.no_grad():
                    for shadow, p in zip(self.ema.shadow(), self.ema._params(self.denoiser)):
                        shadow.copy_(p.detach().float())
        elif self.stage == "conditional" and fitting:
            warnings.warn(
                "WarpingRGBD(stage='conditional') without unconditional_weights: the frozen unconditional model "
                "(and the conditional model's initialisation) is random. Set model.init_args.unconditional_weights "
                "to the last.ckpt of a stage='unconditional' run.",
                stacklevel=2,
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._maybe_load_pretrained(fitting=True)

    def on_validation_start(self) -> None:
        self._maybe_load_pretrained()

    def on_test_start(self) -> None:
        self._maybe_load_pretrained()

    def on_predict_start(self) -> None:
        self._maybe_load_pretrained()

    # ---------------------------------------------------------------------------- depth units
    def _linear_depth(self, depth: Tensor) -> Tensor:
        """Dataset depth with unknown (0) pixels at ``far``."""
        return torch.where(depth > 0, depth, torch.full_like(depth, self.far)).float()

    def _to_sample_units(self, depth: Tensor) -> Tensor:
        """Dataset depth -> the sampling decoding's depth (as if the unconditional model had generated it)."""
        d = self._linear_depth(depth)
        if (self.sample_near, self.sample_far) == (self.near, self.far):
            return d
        return denormalize_depth(normalize_depth(d, self.near, self.far), self.sample_near, self.sample_far)

    # -------------------------------------------------------------------------------- labels
    def _labels(self, views: Views, repeat: int = 1) -> Tensor | None:
        """Class labels ``[B * repeat]`` for the networks, or ``None`` (unconditional on class).

        No device value is read: a class-conditional network gets the labels as they are (``-1``, the null
        label, adds nothing, as ``None`` would), a class-unconditional one none; labels on a class-unconditional
        network are an error, checked where it is free: on the host (`on_before_batch_transfer` for batches
        of a Trainer, here for CPU batches).
        """
        labels = views.labels
        if labels is None:
            return None
        if self.unconditional.num_classes is None:
            if labels.device.type == "cpu":
                self._check_no_labels(labels)
            return None
        return labels.to(self.device).long().repeat_interleave(repeat)

    def _check_no_labels(self, labels: Tensor) -> None:
        if bool((labels >= 0).any()):
            raise ValueError(
                "the batch has class labels but network.num_classes is None; set model.init_args.network."
                f"init_args.num_classes to the number of classes (labels up to {int(labels.max())}), or turn "
                "the datamodule's class labels off"
            )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.unconditional.num_classes is None:  # check on the host, before the batch moves to the device
            for views in batch if isinstance(batch, tuple) else (batch,):
                if isinstance(views, Views) and views.labels is not None:
                    self._check_no_labels(views.labels)
        return batch

    # ------------------------------------------------------------------------------ training
    def training_loss(self, views: Views) -> dict[str, Tensor]:
        """eps-MSE of the trained network(s) on every view of the batch, each taken as a single image."""
        if views.images is None or views.depth is None:
            raise ValueError(
                "WarpingRGBD trains on RGBD images: the batch needs images and depth (procedural data: "
                "load_depth: true; image folders: genvs.data.ImageFolderDataModule with a depth_estimator)"
            )
        N = views.B * views.V
        images = views.images.flatten(0, 1).float()
        depth = self._linear_depth(views.depth.flatten(0, 1))
        K = views.K.flatten(0, 1).float()
        rng = self.batch_rng.grouped(views.V)  # per-example draws (the V views of a scene are its rows)
        labels = self._labels(views, views.V)
        if labels is not None:
            labels = drop_class_labels(labels, self.p_uncond, generator=rng)
        sched = self.noise_schedule
        losses: dict[str, Tensor] = {}

        def term(net: ADMUNet, target: Tensor, cond: WarpCondition | None) -> Tensor:
            t = rng.draw(lambda n, g: sched.sample_t(n, device=target.device, generator=g), N, target.device)
            logsnr = sched.logsnr(t)
            eps = rng.randn_like(target)
            z = q_sample(target, logsnr, eps)
            x = z if cond is None else conditional_input(z, cond)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            pred = net(x, sched.timestep_index(t), labels)
            return diffusion_loss(pred, target, eps, logsnr, self.prediction).mean()

        if self.stage in ("unconditional", "joint"):
            target = torch.cat([images, normalize_depth(depth, self.near, self.far)], dim=1)
            losses["loss_unconditional"] = term(self.unconditional, target, None)
        if self.stage in ("conditional", "joint"):
            pair = self.pairs(images, depth, K, generator=rng, near=self.near, far=self.far)
            losses["loss_conditional"] = term(self.conditional, pair.target, pair.cond)
        losses["loss"] = sum(losses.values())
        return losses

    # ------------------------------------------------------------------------------ sampling
    def _predict(self, net: ADMUNet, x: Tensor, timestep: Tensor, labels: Tensor | None, scale: float) -> Tensor:
        """The network's prediction with classifier-free guidance on the class label (official, on eps:
        ``(1 + w) e(c) - w e(null)``)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if labels is None or scale == 1.0:
            return net(x, timestep, labels)
        out = net(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([labels, torch.full_like(labels, -1)]))
        cond, uncond = out.chunk(2)
        return cfg_combine(cond, uncond, scale)

    def sample_first_view(
        self, B: int, H: int, W: int, labels: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``[B, 4, H, W]`` RGBD (normalised depth) from the unconditional model."""
        sampler = self.first_view_sampler

        def model_fn(z: Tensor, logsnr: Tensor, timestep: Tensor) -> Tensor:
            return self._predict(self.unconditional, z, timestep, labels, sampler.guidance_scale)

        return sampler.loop(model_fn, (B, 4, H, W), self.noise_schedule, self.prediction, generator, self.device)

    def sample_conditional_view(
        self,
        cond: WarpCondition,
        labels: Tensor | None = None,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``[B, 4, H, W]`` RGBD from the conditional model given an aggregated condition, with the
        official x0 guidance toward the condition at every step."""
        sampler = sampler or self.sampler
        if self.conditional is None:
            raise RuntimeError("stage='unconditional' has no conditional network to sample novel views with")
        B, _, H, W = cond.rgb.shape
        bound = sampler.bind(self.noise_schedule, self.prediction)
        bound.set_timesteps(sampler.num_steps)
        t_last = int(bound.timesteps.min())
        agg = self.aggregation
        cond = cond.to(self.device)

        def model_fn(z: Tensor, logsnr: Tensor, timestep: Tensor) -> Tensor:
            x = conditional_input(z, cond, generator=generator)
            pred = self._predict(self.conditional, x, timestep, labels, sampler.guidance_scale)
            return guide_prediction(
                pred, z, logsnr, cond, self.prediction, last_step=int(timestep[0]) == t_last,
                rgb_weight=agg.rgb_weight, depth_weight=agg.depth_weight, convex_weight=agg.convex_weight,
            )

        return sampler.loop(model_fn, (B, 4, H, W), self.noise_schedule, self.prediction, generator, self.device)

    def aggregate(self, images: Tensor, depths: Tensor, K: Tensor, c2w: Tensor, K_tgt: Tensor, c2w_tgt: Tensor) -> WarpCondition:
        """Previous views ``[B, V, ...]`` (depth in sampling units) warped into a new camera and blended."""
        a = self.aggregation
        return aggregate_views(
            images, depths, K, c2w, K_tgt, c2w_tgt, near=self.sample_near, far=self.sample_far,
            sharpness=a.sharpness, atol=a.atol, rtol=a.rtol, erode=a.erode, supersample=a.supersample, coverage=a.coverage,
        )

    def _order(self, c2w_ctx: Tensor, c2w_tgt: Tensor) -> list[int]:
        T = c2w_tgt.shape[1]
        if self.generation_order == "given" or T <= 1:
            return list(range(T))
        centres_t = c2w_tgt[..., :3, 3].float()  # [B, T, 3]
        avail = [c2w_ctx[..., :3, 3].float()[:, i] for i in range(c2w_ctx.shape[1])]
        todo, order = list(range(T)), []
        if not avail:  # pure generation: the first camera is the unconditional view
            order.append(todo.pop(0))
            avail.append(centres_t[:, order[0]])
        while todo:
            a = torch.stack(avail, 1)  # [B, A, 3]
            d = torch.cdist(centres_t[:, todo], a).amin(-1).sum(0)  # [len(todo)] summed over scenes
            j = todo.pop(int(d.argmin()))
            order.append(j)
            avail.append(centres_t[:, j])
        return order

    def sample(
        self,
        context: Views,
        targets: Views,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> Views:
        """Generate ``targets`` one by one; each is conditioned on every view available so far.

        - NVS (``context.V >= 1``): the context views, with their depth (``context.depth``, from the dataset
          or the image-folder datamodule's depth estimator), start the pool;
        - generation (``context.V == 0``): the first target comes from the unconditional model.

        Returns the targets with RGB ``images`` and z-``depth`` (sampling units, see ``sample_near``).
        A ``stage='unconditional'`` model has no conditional network: it draws every target independently
        from the unconditional model (a stage-1 monitor, not 3D consistent).
        """
        B, T, H, W = targets.B, targets.V, targets.H, targets.W
        dev = self.device
        labels = self._labels(context if context.labels is not None else targets)
        if labels is not None and not bool((labels >= 0).any()):  # all null: skip the guidance passes
            labels = None
        if self.conditional is None:
            x = self.sample_first_view(B * T, H, W, None if labels is None else labels.repeat_interleave(T), generator)
            x = x.unflatten(0, (B, T)).clamp(-1, 1)
            depth = denormalize_depth(x[:, :, 3:], self.sample_near, self.sample_far)
            return targets.with_images(x[:, :, :3], depth=depth)

        Nc = context.V
        if Nc:
            if context.depth is None:
                raise ValueError(
                    "WarpingRGBD needs the depth of the context views (Views.depth): load it from the dataset "
                    "(load_depth: true) or use genvs.data.ImageFolderDataModule, which estimates and caches it"
                )
            if (context.H, context.W) != (H, W):
                context = context.resize((H, W))
        V = Nc + T
        images = torch.zeros(B, V, 3, H, W, device=dev)
        depths = torch.zeros(B, V, 1, H, W, device=dev)
        K = torch.cat([context.K, targets.K], 1).to(dev).float()
        c2w = torch.cat([context.c2w, targets.c2w], 1).to(dev).float()
        if Nc:
            images[:, :Nc] = context.images.to(dev).float()
            depths[:, :Nc] = self._to_sample_units(context.depth.to(dev))
        available = list(range(Nc))
        for j in self._order(c2w[:, :Nc], c2w[:, Nc:]):
            if not available:
                x = self.sample_first_view(B, H, W, labels, generator)
            else:
                idx = torch.tensor(available, device=dev)
                cond = self.aggregate(images[:, idx], depths[:, idx], K[:, idx], c2w[:, idx], K[:, Nc + j], c2w[:, Nc + j])
                x = self.sample_conditional_view(cond, labels, sampler, generator)
            x = x.float().clamp(-1, 1)
            images[:, Nc + j] = x[:, :3]
            depths[:, Nc + j] = denormalize_depth(x[:, 3:], self.sample_near, self.sample_far)
            available.append(Nc + j)
        return targets.with_images(images[:, Nc:], depth=depths[:, Nc:])

    # ---------------------------------------------------------------------------- evaluation
    # Batches without ground truth (generation from scratch, e.g. the image-folder datamodule's validation)
    # are sampled and shown in the logged grid but not scored; batches with ground truth go through the
    # base class's metrics.
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._scored = False

    def validation_step(self, batch: Views, batch_idx: int) -> None:
        if _has_ground_truth(batch.targets):
            self._scored = True
            return super().validation_step(batch, batch_idx)
        context, pred = self.generate(batch, batch_idx)
        if batch_idx == 0:
            self.log_image_grid(context, pred, None)

    def on_validation_epoch_end(self) -> None:
        if getattr(self, "_scored", True):
            return super().on_validation_epoch_end()
        self._evaluator = None

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._scored = False

    def test_step(self, batch: Views, batch_idx: int) -> None:
        if _has_ground_truth(batch.targets):
            self._scored = True
            return super().test_step(batch, batch_idx)
        self.generate(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        if getattr(self, "_scored", True):
            return super().on_test_epoch_end()
        self._evaluator = None
        self.print("genvs: the test batches had no ground-truth views (generation): nothing was scored")

    def log_image_grid(self, context: Views, pred: Views, target: Views | None = None) -> None:
        if context.images is None:  # generation: no input views
            context = context.with_images(torch.zeros(context.B, context.V, 3, pred.H, pred.W, device=pred.device))
        if target is not None and not _has_ground_truth(target):
            target = None
        super().log_image_grid(context, pred, target)
